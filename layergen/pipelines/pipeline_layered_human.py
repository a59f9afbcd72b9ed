"""`LayeredHumanPipeline`: layer-by-layer 3D humans on tri-planes (HumanLiff-style).

Sampling is a chain: the body tri-plane first (condition = zeros), then every clothing
layer conditioned on the tri-plane of the layer below, with the layer index as the class
label. The UNet generates each garment as a *residual* on top of the layer below (its
training targets were fitted that way), so layer k = layer k-1 + residual k.

Keeping uncovered body parts unchanged (`keep_uncovered=True`, default): after a garment
residual is sampled, we decode the layer below and the new layer on a voxel grid, find
where the new layer adds something (density rises, or the visible surface changes
colour), dilate that region by one voxel, project it onto the three planes and zero the
residual outside those projections. Texels whose rays carry no new garment thus keep the
previous layer's values exactly; what remains can still touch uncovered parts that share a
projection with the garment (tri-planes couple points along each axis), which is why the
benchmark measures unchanged pixels rather than assuming them.

Outputs are tri-planes; `render_views`, `extract_mesh` and `export_human` turn them into
RGBA turntables (PNG + GIF) and coloured meshes (marching cubes, GLB/OBJ with vertex
colours). `generate_human(...)` is the one-call entry point for the CLI and the studio.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DiffusionPipeline
from diffusers.utils import BaseOutput

from ..data.mannequins import REF_STEP, layer_index, parse_layers
from ..errors import LayergenError, ModelNotFoundError
from ..models.triplane import TriplaneDecoder, grid_points
from ..models.triplane_unet import LayeredTriplaneUNet
from ..models.volume_renderer import VolumeRenderer, intrinsics, orbit_cameras
from ..seeds import generator
from .layer_diffusion import _is_int, check_steps, scheduler_step_kwargs

# density at which a render step of REF_STEP is half opaque: the iso-level of exported meshes
SURFACE_DENSITY = float(np.log(2.0) / REF_STEP)


@dataclass
class LayeredHumanOutput(BaseOutput):
    """layers: names bottom->top; triplanes: (L, 3, C, R, R) cumulative (layer k includes 0..k);
    residuals: (L, 3, C, R, R) what each layer added (residuals[0] is the body itself);
    supports: (L, S, S, S) uint8 [z, y, x] voxel masks of where each layer may change the field
    (layer 0: the body's connected volume; layer k: the garment's volume attached to layer k-1),
    or None for raw tri-plane layers (`compose=False`). See `LayeredHumanPipeline.layer_field`."""

    layers: list
    triplanes: torch.Tensor
    residuals: torch.Tensor
    metadata: dict = field(default_factory=dict)
    supports: torch.Tensor | None = None


def default_model_path() -> Path:
    """The bundled mini model (assets/layergen-mini/human)."""
    from ..mini import MINI_PATH

    return MINI_PATH / "human"


class LayeredHumanPipeline(DiffusionPipeline):
    """Body first, then each clothing layer conditioned on the one below.

    Components: `unet` (LayeredTriplaneUNet), `decoder` (TriplaneDecoder, shared tri-plane
    MLP) and `scheduler` (any diffusers scheduler; the mini model ships DDIM).
    """

    model_cpu_offload_seq = "unet->decoder"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: LayeredTriplaneUNet, decoder: TriplaneDecoder, scheduler: DDIMScheduler):
        super().__init__()
        self.register_modules(unet=unet, decoder=decoder, scheduler=scheduler)

    @property
    def num_timesteps(self) -> int:
        """Steps of the last sampling loop (what diffusers callbacks read)."""
        return self._num_timesteps

    # ------------------------------------------------------------------ shapes
    @property
    def plane_shape(self) -> tuple:
        c = self.unet.config
        return (3, c.plane_channels, c.plane_resolution, c.plane_resolution)

    def _stack(self, planes):  # (..., 3, C, R, R) -> (..., 3C, R, R)
        return planes.reshape(*planes.shape[:-4], -1, *planes.shape[-2:])

    def _unstack(self, x):
        return x.reshape(*x.shape[:-3], *self.plane_shape)

    def _scale(self, label: int) -> float:
        s = self.unet.config.sample_scales
        return float(s[label]) if s else 1.0

    # ------------------------------------------------------------------ sampling
    def sample_residual(self, label: int, cond: torch.Tensor | None, generator=None, num_inference_steps: int = 25,
                        callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",)) -> torch.Tensor:
        """One layer's residual (3, C, R, R) given the cumulative tri-plane below (None for the body)."""
        device, dtype = self._execution_device, self.unet.dtype
        shape = (1, 3 * self.plane_shape[1], *self.plane_shape[2:])
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)
        latents = latents * self.scheduler.init_noise_sigma
        cond_in = (torch.zeros(shape, device=device, dtype=dtype) if cond is None
                   else self._stack(cond)[None].to(device, dtype) * self.unet.config.cond_scale)
        labels = torch.tensor([label], device=device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._num_timesteps = len(self.scheduler.timesteps)
        step_kwargs = scheduler_step_kwargs(self.scheduler, generator=generator)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_in = self.scheduler.scale_model_input(latents, t)
            pred = self.unet(model_in, t, labels, cond_in).sample
            latents = self.scheduler.step(pred, t, latents, **step_kwargs).prev_sample
            if callback_on_step_end is not None:
                available = {"latents": latents}
                kw = {k: available[k] for k in callback_on_step_end_tensor_inputs}
                out = callback_on_step_end(self, i, t, kw) or {}
                latents = out.get("latents", latents)
        return self._unstack(latents[0].float() / self._scale(label)).cpu()

    @torch.no_grad()
    def __call__(self, layers=("body", "pants", "shirt", "shoes"), num_inference_steps: int = 25, generator=None,
                 body_triplane: torch.Tensor | None = None, keep_uncovered: bool = True, compose: bool = True,
                 return_dict: bool = True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",)):
        """Sample a layered human.

        layers: names in canonical order starting with 'body' (e.g. 'body,pants,shirt').
        body_triplane: (3, C, R, R) to dress a given body instead of sampling one; it is kept
        exactly as layer 0.
        keep_uncovered: zero each garment residual on texels that carry nothing new (tri-plane side).
        compose: give every layer a 3D support (`supports`) and render/mesh layer k as layer k-1
        plus the garment inside its support only (`layer_field`): uncovered parts are unchanged
        by construction and floaters off the body are dropped. False = raw tri-plane layers.
        """
        names = parse_layers(layers)
        check_steps(self.scheduler, num_inference_steps)
        for k in callback_on_step_end_tensor_inputs:
            if k not in self._callback_tensor_inputs:
                raise LayergenError(f"callback tensor {k!r} not available; choose from {self._callback_tensor_inputs}")
        cums, ress, masks, sups, counts, tries = [], [], [], [], [], []
        for name in names:
            label = layer_index(name)
            if label == 0:
                if body_triplane is not None:
                    res = self._check_planes(body_triplane)
                else:
                    res = self.sample_residual(0, None, generator, num_inference_steps, callback_on_step_end,
                                               callback_on_step_end_tensor_inputs)
                cum, frac, n_try = res, 1.0, 1
                if compose:
                    sup, count = self.layer_support(cum[None], None, 0)
            else:
                prev = cums[-1]
                best = None
                for n_try in range(1, (self.garment_tries if compose else 1) + 1):
                    res = self.sample_residual(label, prev, generator, num_inference_steps, callback_on_step_end,
                                               callback_on_step_end_tensor_inputs)
                    frac = 1.0
                    if keep_uncovered:
                        res, frac = self.keep_uncovered(prev, res)
                    cand = (res, frac, prev + res)
                    if not compose:
                        best = cand + (None, 0)
                        break
                    sup, count = self.layer_support(torch.stack(cums + [cand[2]]), torch.stack(sups + [sups[0]]),
                                                    len(cums), name)
                    if best is None or count > best[4]:
                        best = cand + (sup, count)
                    if count >= self.min_garment_core.get(name, 0.0) * counts[0]:
                        break
                res, frac, cum, sup, count = best
            cums.append(cum)
            ress.append(res)
            masks.append(frac)
            tries.append(n_try)
            if compose:
                sups.append(sup)
                counts.append(count)
        self.maybe_free_model_hooks()
        triplanes = torch.stack(cums)
        supports = torch.stack(sups) if compose else None
        meta = {"num_inference_steps": num_inference_steps, "keep_uncovered": keep_uncovered, "compose": compose,
                "kept_texel_fraction": [1.0 - f for f in masks], "given_body": body_triplane is not None}
        if supports is not None:
            meta["support_voxel_fraction"] = [float(v) for v in supports.float().mean((1, 2, 3))]
            meta["core_voxels"] = counts
            meta["draws"] = tries
        out = LayeredHumanOutput(layers=list(names), triplanes=triplanes, residuals=torch.stack(ress),
                                 metadata=meta, supports=supports)
        return out if return_dict else (out.layers, out.triplanes, out.residuals)

    @torch.no_grad()
    def resample_layer(self, output: LayeredHumanOutput, layer: str, generator=None, num_inference_steps: int = 25,
                       keep_uncovered: bool = True) -> LayeredHumanOutput:
        """Re-sample one layer, keeping every other layer's own content (its residual) identical.

        Layers below are unchanged; layers above keep their residuals and are re-stacked on the
        new layer (they must contain it). Re-sampling 'body' keeps the clothing residuals.
        """
        if layer not in output.layers:
            raise LayergenError(f"layer {layer!r} is not in this human (layers: {', '.join(output.layers)})")
        j = output.layers.index(layer)
        label = layer_index(layer)
        res = output.residuals.clone()
        prev = output.triplanes[j - 1] if j > 0 else None
        new = self.sample_residual(label, prev, generator, num_inference_steps)
        if keep_uncovered and prev is not None:
            new, _ = self.keep_uncovered(prev, new)
        res[j] = new
        cum = output.triplanes.clone()
        for i in range(j, len(output.layers)):
            cum[i] = (cum[i - 1] if i > 0 else 0) + res[i]
        meta = dict(output.metadata, resampled=layer)
        supports = None
        if output.supports is not None:  # layers below keep their supports; j and above are re-derived
            supports = self.compute_supports(cum, output.layers, start=j, previous=output.supports)
            meta["support_voxel_fraction"] = [float(v) for v in supports.float().mean((1, 2, 3))]
        return LayeredHumanOutput(layers=list(output.layers), triplanes=cum, residuals=res, metadata=meta,
                                  supports=supports)

    def _check_planes(self, planes) -> torch.Tensor:
        planes = torch.as_tensor(planes, dtype=torch.float32)
        if planes.dim() == 5 and planes.shape[0] == 1:
            planes = planes[0]
        if tuple(planes.shape) != tuple(self.plane_shape):
            raise LayergenError(f"body tri-plane has shape {tuple(planes.shape)}, this model expects {self.plane_shape}")
        if not torch.isfinite(planes).all():
            raise LayergenError("body tri-plane contains NaN or Inf")
        return planes.cpu()

    # ------------------------------------------------------------------ consistency
    @torch.no_grad()
    def keep_uncovered(self, prev: torch.Tensor, res: torch.Tensor, grid: int | None = None,
                       density_rise: float = 0.25 * SURFACE_DENSITY, colour_change: float = 0.08):
        """Zero the residual on texels whose projections carry nothing new.

        A voxel (grid at plane resolution) 'changes' when the new layer's density rises by
        `density_rise` over the layer below, or when it is near the surface in both and its
        colour moves by more than `colour_change`. The changed voxels, dilated by one, are
        projected onto XY, XZ and ZY; the residual is kept only there. Returns
        (masked residual, fraction of texels kept).
        """
        R = self.plane_shape[-1]
        grid = grid or R
        pts = grid_points(grid, self.decoder.config.box_min, self.decoder.config.box_max).reshape(1, -1, 3)
        dirs = torch.zeros_like(pts)
        dirs[..., 2] = -1.0
        dev, dt = self.decoder.device, self.decoder.dtype
        planes = torch.stack([prev, prev + res]).to(dev, dt)
        sig, rgb = self.decoder.query(planes, pts.expand(2, -1, -1).to(dev, dt), dirs.expand(2, -1, -1).to(dev, dt))
        sig, rgb = sig.float().cpu(), rgb.float().cpu()
        near_surf = (sig > 0.25 * SURFACE_DENSITY).all(0)
        changed = (sig[1] - sig[0] > density_rise) | (near_surf & ((rgb[1] - rgb[0]).abs().amax(-1) > colour_change))
        vol = changed.reshape(1, 1, grid, grid, grid).float()                        # [z, y, x]
        vol = F.max_pool3d(vol, 3, stride=1, padding=1)[0, 0] > 0
        if grid != R:
            vol = F.interpolate(vol[None, None].float(), size=(R, R, R), mode="trilinear")[0, 0] > 0
        # plane XY: (u=x, v=y) -> image [y, x]; XZ: (u=x, v=z) -> [z, x]; ZY: (u=z, v=y) -> [y, z]
        m_xy = vol.any(0)
        m_xz = vol.any(1)
        m_zy = vol.any(2)
        mask = torch.stack([m_xy, m_xz, m_zy]).float()[:, None]                      # (3, 1, R, R)
        return res * mask, float(mask.mean())

    # ------------------------------------------------------------------ layer composition
    support_grid: int = 48          # voxels per axis of the support masks
    support_min_fraction: float = 0.02
    # A sampled garment whose core (`layer_support`) is smaller than this fraction of the body's
    # occupied voxels counts as missing and is drawn again (at most `garment_tries` draws; the
    # largest is kept). Half the smallest fraction over 12 procedural mannequins (48^3 voxels,
    # density rise > the surface density): pants 0.152, shirt 0.216, shoes 0.037, hat 0.027.
    min_garment_core = {"pants": 0.076, "shirt": 0.108, "shoes": 0.018, "hat": 0.013}
    garment_tries: int = 4
    garment_anchor = {"shoes": "bottom", "hat": "top"}

    @torch.no_grad()
    def _decode(self, triplane: torch.Tensor, points: torch.Tensor, dirs: torch.Tensor):
        dev, dt = self.decoder.device, self.decoder.dtype
        out_s, out_c = [], []
        for i in range(0, points.shape[0], 65536):
            s, c = self.decoder.query(triplane.to(dev, dt)[None], points[i:i + 65536].to(dev, dt)[None],
                                      dirs[i:i + 65536].to(dev, dt)[None])
            out_s.append(s[0].float().cpu())
            out_c.append(c[0].float().cpu())
        return torch.cat(out_s), torch.cat(out_c)

    def _support_at(self, support: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Trilinear lookup of a [z, y, x] voxel mask at points (N, 3): 1 inside, fading to 0 over a voxel."""
        cfg = self.decoder.config
        bmin, bmax = points.new_tensor(cfg.box_min), points.new_tensor(cfg.box_max)
        g = ((points - bmin) / (bmax - bmin) * 2 - 1).view(1, 1, 1, -1, 3)
        return F.grid_sample(support.float()[None, None], g.float(), mode="bilinear", padding_mode="zeros",
                             align_corners=False).view(-1)

    @torch.no_grad()
    def compose_query(self, triplanes: torch.Tensor, supports: torch.Tensor, layer: int, points: torch.Tensor,
                      dirs: torch.Tensor):
        """Density and colour of composed layer `layer` at points (N, 3) (CPU float tensors).

        Layer 0 is the decoded body inside its support (floaters outside it are empty). Layer
        k is layer k-1 everywhere, except inside garment support m_k (a [0, 1] mask), where
        density = sigma_{k-1} + m_k * max(sigma_garment - sigma_{k-1}, 0) (a garment only adds)
        and colour moves to the garment layer's colour by m_k. Outside the supports of layers
        1..k the field is layer k-1's, bit for bit; only points inside a support decode that
        layer's tri-plane.
        """
        points, dirs = points.float().cpu(), dirs.float().cpu()
        sig, rgb = self._decode(triplanes[0], points, dirs)
        sig = sig * self._support_at(supports[0], points)
        for j in range(1, layer + 1):
            m = self._support_at(supports[j], points)
            idx = (m > 0).nonzero().flatten()
            if idx.numel() == 0:
                continue
            s_new, c_new = self._decode(triplanes[j], points[idx], dirs[idx])
            mj = m[idx]
            s_prev = sig[idx]
            sig[idx] = s_prev + mj * (s_new - s_prev).clamp_min(0)
            rgb[idx] = rgb[idx] + mj[:, None] * (c_new - rgb[idx])
        return sig, rgb

    def _grid(self, resolution: int):
        cfg = self.decoder.config
        pts = grid_points(resolution, cfg.box_min, cfg.box_max).reshape(-1, 3)
        dirs = torch.zeros_like(pts)
        dirs[:, 2] = -1.0
        return pts, dirs

    @torch.no_grad()
    def compute_supports(self, triplanes: torch.Tensor, names=None, start: int = 0,
                         previous: torch.Tensor | None = None, **kw) -> torch.Tensor:
        """Support masks (L, S, S, S) uint8 for cumulative tri-planes (L, 3, C, R, R) (`layer_support`
        layer by layer); layers below `start` are taken from `previous`."""
        L, S = triplanes.shape[0], self.support_grid
        sup = torch.zeros((L, S, S, S), dtype=torch.uint8)
        if start > 0:
            sup[:start] = previous[:start]
        for k in range(start, L):
            sup[k] = self.layer_support(triplanes, sup, k, names[k] if names else None, **kw)[0]
        return sup

    @torch.no_grad()
    def layer_support(self, triplanes: torch.Tensor, supports: torch.Tensor, k: int, name: str | None = None,
                      weak: tuple = (0.25, 0.08),
                      strong: tuple = (1.0, 0.15), grow: int = 0, attach: int = 3):
        """Support mask (S, S, S) uint8 of layer k given the supports of layers < k, and its size in
        core voxels (for a garment; for the body its occupied voxels).

        Body: voxels at least a quarter of the surface density, without 26-connected blobs under
        `support_min_fraction` of the occupied voxels (`clean_density`), dilated by a voxel.

        Garment, by hysteresis on how decoded layer k differs from composed layer k-1: a voxel
        *changes* when its density rises by weak[0] x the surface density, or, where both are near
        the surface, its colour moves by weak[1]; it changes *strongly* at strong[0] / strong[1].
        The garment's core is the 26-connected strong components within `attach` voxels of layer
        k-1's volume (density above a tenth of the surface density: sampled bodies' feet often
        fade out a little above the floor the shoes stand on) that hold at least a tenth of the largest such component; for a garment
        with an anchor (`garment_anchor`: shoes at the bottom of the layer below, a hat at its top)
        only components reaching within `attach` voxels of that end count (a sampled residual also
        nudges the field everywhere along the planes' projections; those nudges are weak and
        scattered, the garment is strong and in one piece). The support is the core plus the
        changed voxels within `grow` voxels of it, dilated by a voxel.
        """
        from scipy import ndimage

        S = self.support_grid
        floor = 0.25 * SURFACE_DENSITY
        struct = np.ones((3, 3, 3), bool)
        pts, dirs = self._grid(S)
        if k == 0:
            dens = self._decode(triplanes[0], pts, dirs)[0].reshape(S, S, S)
            keep = (self.clean_density(dens, floor, self.support_min_fraction) > 0).numpy()
            count = int(keep.sum())
        else:
            s_prev, c_prev = self.compose_query(triplanes, supports, k - 1, pts, dirs)
            s_new, c_new = self._decode(triplanes[k], pts, dirs)
            near = (s_prev > floor) & (s_new > floor)
            rise = (s_new - s_prev) / SURFACE_DENSITY
            dcol = torch.where(near, (c_new - c_prev).abs().amax(-1), torch.zeros_like(rise))
            changed = ((rise > weak[0]) | (dcol > weak[1])).reshape(S, S, S).numpy()
            core = ((rise > strong[0]) | (dcol > strong[1])).reshape(S, S, S).numpy()
            faint = (s_prev > 0.1 * SURFACE_DENSITY).reshape(S, S, S).numpy()   # faint feet count as body
            below = ndimage.binary_dilation(faint, struct, iterations=attach)
            labels, n = ndimage.label(core, structure=struct)
            keep = np.zeros_like(core)
            if n:
                sizes = np.bincount(labels.ravel(), minlength=n + 1)
                touching = np.zeros(n + 1, bool)
                touching[np.unique(labels[below & core])] = True
                touching[0] = False
                anchor = self.garment_anchor.get(name)
                if anchor is not None:
                    rows = np.nonzero(faint.any((0, 2)))[0]
                    slab = np.zeros(S, bool)
                    if rows.size:
                        if anchor == "bottom":
                            slab[:rows.min() + attach + 1] = True
                        else:
                            slab[max(rows.max() - attach, 0):] = True
                    at_end = np.zeros(n + 1, bool)
                    at_end[np.unique(labels[:, slab, :])] = True
                    touching &= at_end
                if touching.any():
                    ok = touching & (sizes >= 0.1 * sizes[touching].max())
                    keep = ok[labels]
            count = int(keep.sum())
            if count and grow > 0:
                keep = keep | (changed & ndimage.binary_dilation(keep, struct, iterations=grow))
        if keep.any():
            keep = ndimage.binary_dilation(keep, struct)
        return torch.from_numpy(keep.astype(np.uint8)), count

    def _resolve(self, x, layer):
        """(triplanes, supports or None, k) for a LayeredHumanOutput + layer, or a bare tri-plane."""
        if isinstance(x, LayeredHumanOutput):
            n = len(x.layers)
            if isinstance(layer, str) and layer not in x.layers:
                raise LayergenError(f"layer {layer!r} is not in this human (layers: {', '.join(x.layers)})")
            if not isinstance(layer, str) and layer is not None and not -n <= int(layer) < n:
                raise LayergenError(f"layer {layer} is out of range for a human of {n} layers ({', '.join(x.layers)})")
            k = x.layers.index(layer) if isinstance(layer, str) else n - 1 if layer is None else int(layer) % n
            return x.triplanes, x.supports, k
        return None, None, None

    def layer_field(self, output: LayeredHumanOutput, layer=-1):
        """Renderer field (points, dirs) -> (sigma, rgb) of one layer of an output (composed if it has supports)."""
        tps, sups, k = self._resolve(output, layer)
        if sups is None:
            return self.field(tps[k])

        def _field(points, dirs):
            s, c = self.compose_query(tps, sups, k, points, dirs)
            return s.to(points.device), c.to(points.device)

        return _field

    @torch.no_grad()
    def layer_density_grid(self, output: LayeredHumanOutput, layer=-1, resolution: int = 64) -> torch.Tensor:
        """Density of one layer on a [z, y, x] voxel-centre grid (composed if the output has supports)."""
        tps, sups, k = self._resolve(output, layer)
        if sups is None:
            return self.decoder.density_grid(tps[k], resolution).float().cpu()
        pts, dirs = self._grid(resolution)
        return self.compose_query(tps, sups, k, pts, dirs)[0].reshape(resolution, resolution, resolution)

    def support_box(self, supports: torch.Tensor, pad: float = 0.06):
        """Box around everything any layer's support allows (plus the one-voxel fade): one box per human,
        so every layer is rendered with the same ray bounds."""
        any_ = supports.bool().any(0)
        occ = any_.nonzero()
        lo, hi = np.array(self.decoder.config.box_min, np.float32), np.array(self.decoder.config.box_max, np.float32)
        if occ.numel() == 0:
            return tuple(float(v) for v in lo), tuple(float(v) for v in lo)
        S = any_.shape[0]
        vox = (hi - lo) / S
        zyx_lo, zyx_hi = occ.min(0).values.numpy(), occ.max(0).values.numpy()
        bmin = lo + vox * (zyx_lo[::-1] - 0.5) - pad
        bmax = lo + vox * (zyx_hi[::-1] + 1.5) + pad
        return tuple(float(v) for v in np.maximum(bmin, lo)), tuple(float(v) for v in np.minimum(bmax, hi))

    # ------------------------------------------------------------------ rendering / export
    def field(self, triplane: torch.Tensor):
        return self.decoder.field(triplane.to(self.decoder.device, self.decoder.dtype))

    @torch.no_grad()
    def occupied_box(self, triplane: torch.Tensor = None, grid: int = 32, pad: float = 0.06, density=None):
        """Bounding box of voxels denser than a tenth of the surface density (for tight ray bounds)."""
        dens = (density if density is not None else self.decoder.density_grid(triplane, grid)).float().cpu()
        grid = dens.shape[0]
        occ = (dens > 0.1 * SURFACE_DENSITY).nonzero()
        lo, hi = np.array(self.decoder.config.box_min, np.float32), np.array(self.decoder.config.box_max, np.float32)
        if occ.numel() == 0:
            return tuple(float(v) for v in lo), tuple(float(v) for v in lo)
        vox = (hi - lo) / grid
        zyx_lo, zyx_hi = occ.min(0).values.numpy(), occ.max(0).values.numpy()
        bmin = lo + vox * zyx_lo[::-1] - pad
        bmax = lo + vox * (zyx_hi[::-1] + 1) + pad
        return tuple(float(v) for v in np.maximum(bmin, lo)), tuple(float(v) for v in np.minimum(bmax, hi))

    @staticmethod
    def clean_density(density: torch.Tensor, floor: float = 0.25 * SURFACE_DENSITY,
                      min_component_fraction: float = 0.02) -> torch.Tensor:
        """A density grid without fog and floaters: voxels below `floor` are emptied, and so are
        26-connected occupied components holding less than `min_component_fraction` of the
        occupied voxels (the same rule `extract_mesh` applies to mesh parts)."""
        from scipy import ndimage

        dens = torch.where(density >= floor, density, torch.zeros_like(density))
        if min_component_fraction > 0:
            occ = (dens > 0).numpy()
            labels, n = ndimage.label(occ, structure=np.ones((3, 3, 3), bool))
            if n > 1:
                sizes = np.bincount(labels.ravel())[1:]
                keep = np.zeros(n + 1, bool)
                keep[1:] = sizes >= min_component_fraction * sizes.sum()
                keep[1 + int(sizes.argmax())] = True
                dens = dens * torch.from_numpy(keep[labels])
        return dens

    @torch.no_grad()
    def render_views(self, triplane: torch.Tensor, num_views: int = 8, size: int = 64, elevation: float = 10.0,
                     azimuth_offset: float = 0.0, fov: float = 37.0, num_samples: tuple = (48, 32),
                     cameras: torch.Tensor | None = None, proposal_grid: int = 48,
                     proposal_floor: float = 0.25 * SURFACE_DENSITY,
                     min_component_fraction: float = 0.02, layer=None) -> np.ndarray:
        """Turntable RGBA views (V, H, W, 4) uint8, straight alpha.

        `triplane`: one tri-plane (3, C, R, R), or a `LayeredHumanOutput` with `layer` (index or
        name, default the top one). An output with supports renders the composed layer
        (`layer_field`) with the ray bounds of the whole human (`support_box`), so a pixel whose
        ray misses a garment's support is the same in that layer and the one below.

        The coarse pass reads a cached, dilated density grid (`proposal_grid`^3 decoder queries
        once per tri-plane) and only the importance samples query the decoder: empty rays
        cost nothing. The grid is cleaned first (`clean_density`: faint fog under
        `proposal_floor` and small floating blobs are dropped), so sampled tri-planes render
        without the haze and streaks a diffusion sample can leave off the body; set both to 0
        to see everything. `proposal_grid=0` renders the classic way (every sample decoded).
        """
        from ..models.volume_renderer import grid_density_fn

        check_views(num_views if cameras is None else 1, size)
        c2w = cameras if cameras is not None else orbit_cameras(num_views, elevation_deg=elevation,
                                                                azimuth_offset_deg=azimuth_offset)
        cfg = self.decoder.config
        proposal = None
        tps, sups, k = self._resolve(triplane, layer)
        if tps is not None and sups is None:      # an output of raw tri-plane layers
            triplane = tps[k]
        if sups is not None:
            field_fn = self.layer_field(triplane, k)
            bmin, bmax = self.support_box(sups)
            if proposal_grid:
                dens = self.layer_density_grid(triplane, k, proposal_grid)
                if proposal_floor > 0:            # the supports already dropped the floaters
                    dens = self.clean_density(dens, proposal_floor, 0.0)
                proposal = grid_density_fn(dens, cfg.box_min, cfg.box_max, dilate=1)
        else:
            field_fn = self.field(triplane)
            if proposal_grid:
                dens = self.decoder.density_grid(triplane, proposal_grid).float().cpu()
                if proposal_floor > 0 or min_component_fraction > 0:
                    dens = self.clean_density(dens, proposal_floor, min_component_fraction)
                bmin, bmax = self.occupied_box(density=dens)
                proposal = grid_density_fn(dens, cfg.box_min, cfg.box_max, dilate=1)
            else:
                bmin, bmax = self.occupied_box(triplane)
        renderer = VolumeRenderer(num_coarse=num_samples[0], num_importance=num_samples[1], chunk=16384,
                                  box_min=cfg.box_min, box_max=cfg.box_max)
        out = renderer.render_views(field_fn, c2w, intrinsics(size, fov), size, size,
                                    box_min=bmin, box_max=bmax, proposal=proposal)["rgba"]
        return np.floor(out.float().cpu().numpy() * 255 + 0.5).astype(np.uint8)

    @torch.no_grad()
    def extract_mesh(self, triplane: torch.Tensor, resolution: int = 64, level: float = SURFACE_DENSITY,
                     min_component_fraction: float = 0.02, layer=None):
        """Marching cubes on the decoded density -> trimesh.Trimesh with vertex colours (None if empty).

        `triplane`: one tri-plane, or a `LayeredHumanOutput` with `layer` (composed if it has supports)."""
        import trimesh
        from skimage.measure import marching_cubes

        tps, sups, k = self._resolve(triplane, layer)
        if tps is not None:
            dens = self.layer_density_grid(triplane, k, resolution).numpy()
            colour_fn = self.layer_field(triplane, k)
        else:
            dens = self.decoder.density_grid(triplane, resolution).float().cpu().numpy()   # [z, y, x]
            colour_fn = self.field(triplane)
        if not (dens.max() > level > dens.min()):
            return None
        lo = np.array(self.decoder.config.box_min, np.float32)
        hi = np.array(self.decoder.config.box_max, np.float32)
        vox = (hi - lo) / resolution
        padded = np.pad(dens, 1, constant_values=0.0)                                   # closed surfaces
        verts, faces, normals, _ = marching_cubes(padded, level=level)
        # (z, y, x) -> (x, y, z): swapping axes mirrors, which turns skimage's inward winding outward
        verts = verts[:, ::-1] - 1.0
        xyz = np.clip(lo + (verts + 0.5) * vox, lo, hi)
        outward = normals[:, ::-1].copy()                                                # 'descent': away from dense
        outward /= np.linalg.norm(outward, axis=1, keepdims=True).clip(1e-8)
        mesh = trimesh.Trimesh(xyz.astype(np.float32), faces, process=False)
        # colour seen from outside: query just outside the surface, looking inwards
        pts = torch.from_numpy((xyz + outward * 0.5 * vox).astype(np.float32))
        dirs = torch.from_numpy(-outward.astype(np.float32))
        rgb = torch.cat([colour_fn(pts[i:i + 65536], dirs[i:i + 65536])[1].float().cpu()
                         for i in range(0, pts.shape[0], 65536)]).numpy()
        colours = np.concatenate([np.floor(rgb * 255 + 0.5), np.full((len(rgb), 1), 255)], 1).astype(np.uint8)
        mesh.visual.vertex_colors = colours
        if min_component_fraction > 0 and len(mesh.faces):
            parts = mesh.split(only_watertight=False)
            if len(parts) > 1:
                keep = [p for p in parts if len(p.faces) >= min_component_fraction * len(mesh.faces)]
                mesh = trimesh.util.concatenate(keep or [max(parts, key=lambda p: len(p.faces))])
        return mesh


# ---------------------------------------------------------------------------- files
def _save_png(rgba: np.ndarray, path) -> None:
    from PIL import Image

    from ..atomic import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(rgba, "RGBA").save(tmp, format="PNG")


def _save_gif(frames: np.ndarray, path, background=(255, 255, 255), duration_ms: int = 120) -> None:
    """Turntable GIF; GIF has 1-bit transparency, so frames are composited onto `background`."""
    from PIL import Image

    from ..atomic import atomic_path

    a = frames[..., 3:4].astype(np.float32) / 255.0
    rgb = frames[..., :3].astype(np.float32) * a + np.array(background, np.float32) * (1 - a)
    ims = [Image.fromarray(np.floor(f + 0.5).astype(np.uint8), "RGB") for f in rgb]
    with atomic_path(path) as tmp:
        ims[0].save(tmp, format="GIF", save_all=True, append_images=ims[1:], duration=duration_ms, loop=0)


def _save_mesh(mesh, path) -> None:
    from ..atomic import atomic_path

    with atomic_path(path) as tmp:
        mesh.export(str(tmp), file_type=Path(path).suffix.lstrip(".").lower())


def export_human(pipe: LayeredHumanPipeline, output: LayeredHumanOutput, output_dir, num_views: int = 8,
                 size: int = 64, mesh_resolution: int = 64, mesh_format: str = "glb", extra: dict | None = None,
                 progress: bool = True) -> dict:
    """Write per-layer meshes, turntable PNGs + GIF, the tri-planes and summary.json. Returns the paths.

    Files (layer i = its position, name = layer name):
      {i}_{name}.{glb|obj}             coloured mesh of the cumulative layer
      {i}_{name}/view_{v:02d}.png      RGBA turntable views
      {i}_{name}.gif                   turntable animation
      triplanes.safetensors            'triplanes' and 'residuals' (L, 3, C, R, R), 'supports' (L, S, S, S)
                                       (reload with --body)
      summary.json                     layers, files, timings, settings
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from ..atomic import atomic_dir

    if mesh_format not in ("glb", "obj"):
        raise LayergenError(f"mesh format must be glb or obj, got {mesh_format!r}")
    check_views(num_views, size, mesh_resolution)
    out = Path(output_dir)
    check_human_folder(out)
    files = {"layers": []}
    t0 = time.perf_counter()
    with atomic_dir(out) as work:  # written beside `out`, then swapped in: all of this run or nothing
        for i, name in enumerate(tqdm(output.layers, desc="rendering layers", disable=not progress)):
            stem = f"{i}_{name}"
            views = pipe.render_views(output, num_views=num_views, size=size, layer=i)
            for v, img in enumerate(views):
                _save_png(img, work / stem / f"view_{v:02d}.png")
            _save_gif(views, work / f"{stem}.gif")
            mesh = pipe.extract_mesh(output, resolution=mesh_resolution, layer=i)
            if mesh is not None:
                _save_mesh(mesh, work / f"{stem}.{mesh_format}")
            files["layers"].append({"name": name, "index": layer_index(name),
                                    "views": [str(out / stem / f"view_{v:02d}.png") for v in range(len(views))],
                                    "gif": str(out / f"{stem}.gif"),
                                    "mesh": str(out / f"{stem}.{mesh_format}") if mesh is not None else None,
                                    "mesh_vertices": int(len(mesh.vertices)) if mesh is not None else 0})
        tensors = {"triplanes": output.triplanes.float().contiguous(),
                   "residuals": output.residuals.float().contiguous()}
        if output.supports is not None:
            tensors["supports"] = output.supports.to(torch.uint8).contiguous()
        save_file(tensors, str(work / "triplanes.safetensors"))
        files["triplanes"] = str(out / "triplanes.safetensors")
        summary = {"layers": output.layers, "files": files, "export_seconds": round(time.perf_counter() - t0, 3),
                   "num_views": num_views, "size": size, "mesh_resolution": mesh_resolution, **output.metadata,
                   **(extra or {})}
        (work / "summary.json").write_text(json.dumps(summary, indent=1))
    files["summary"] = str(out / "summary.json")
    return files


def load_triplanes(path) -> torch.Tensor:
    """Tri-planes saved by `export_human` (all layers); layer 0 is the body."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))["triplanes"]
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise LayergenError(f"{path}: not a tri-plane file written by 'layergen human' ({exc})") from None


_PIPE_CACHE: dict = {}


def load_pipeline(model_path=None) -> LayeredHumanPipeline:
    """Load (and cache) the pipeline from a diffusers folder; default: the bundled mini model."""
    path = Path(model_path) if model_path else default_model_path()
    if not (path / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"{path}: no layered-human model here (a diffusers folder with model_index.json). layergen never "
            "downloads; pass --model PATH to a LayeredHumanPipeline folder, or omit it for the bundled layergen-mini")
    key = str(path.resolve())
    if key not in _PIPE_CACHE:
        _PIPE_CACHE[key] = LayeredHumanPipeline.from_pretrained(str(path))
        _PIPE_CACHE[key].set_progress_bar_config(disable=True)
    return _PIPE_CACHE[key]


MAX_VIEW_SIZE = 2048
MAX_VIEWS = 360                # one view per degree
MAX_MESH_RESOLUTION = 512      # a 512^3 density grid is ~0.5 GB; beyond it memory runs out


def check_views(num_views, size, mesh_resolution=64) -> None:
    """Turntable and mesh arguments, checked before anything is sampled or rendered."""
    if not _is_int(num_views) or not 1 <= num_views <= MAX_VIEWS:
        raise LayergenError(f"num_views must be an integer in [1, {MAX_VIEWS}], got {num_views!r}")
    if not _is_int(size) or not 8 <= size <= MAX_VIEW_SIZE:
        raise LayergenError(f"size must be an integer in [8, {MAX_VIEW_SIZE}] pixels, got {size!r}")
    if not _is_int(mesh_resolution) or not 8 <= mesh_resolution <= MAX_MESH_RESOLUTION:
        raise LayergenError(f"mesh_resolution must be an integer in [8, {MAX_MESH_RESOLUTION}], "
                            f"got {mesh_resolution!r}")


_HUMAN_FILE = re.compile(r"\d+_[a-z]+(\.glb|\.obj|\.gif)?|triplanes\.safetensors|summary\.json")


def check_human_folder(path) -> None:
    """`export_human` replaces its folder as a whole (so a failed or smaller run leaves no mix of two runs):
    refuse a folder that holds anything but an earlier human's files."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LayergenError(f"{path}: exists and is not a folder; a human is written into a folder")
    if path.is_dir():
        foreign = sorted(p.name for p in path.iterdir() if not p.name.startswith(".")
                         and not _HUMAN_FILE.fullmatch(p.name))
        if foreign:
            raise LayergenError(f"{path}: folder also holds {', '.join(foreign[:3])}"
                                f"{', ...' if len(foreign) > 3 else ''}, which replacing it would delete; write the "
                                "human to a new or empty folder")


def generate_human(layers="body,pants,shirt,shoes", seed: int = 0, output_dir="human", model_path=None,
                   num_inference_steps: int = 25, num_views: int = 8, size: int = 64, mesh_resolution: int = 64,
                   mesh_format: str = "glb", body=None, keep_uncovered: bool = True, compose: bool | None = None,
                   progress: bool = False) -> dict:
    """Generate a layered human and write it to `output_dir`; returns the file paths (see `export_human`).

    `body`: a tri-plane file from an earlier run (its layer 0 is reused: dress a given body).
    `compose` (default: `keep_uncovered`): 3D layer supports, see `LayeredHumanPipeline.__call__`.
    For the studio: `files['layers'][i]['mesh']` is a GLB for gr.Model3D, `['gif']` a turntable.
    """
    names = parse_layers(layers)
    check_views(num_views, size, mesh_resolution)
    check_human_folder(output_dir)
    pipe = load_pipeline(model_path)
    pipe.set_progress_bar_config(disable=not progress)
    body_tp = load_triplanes(body)[0] if body is not None else None
    t0 = time.perf_counter()
    gen = generator(seed)
    out = pipe(layers=names, num_inference_steps=num_inference_steps, generator=gen, body_triplane=body_tp,
               keep_uncovered=keep_uncovered, compose=keep_uncovered if compose is None else compose)
    t_sample = time.perf_counter() - t0
    files = export_human(pipe, out, output_dir, num_views=num_views, size=size, mesh_resolution=mesh_resolution,
                         mesh_format=mesh_format, progress=progress,
                         extra={"seed": int(seed), "sample_seconds": round(t_sample, 3),
                                "model": str(model_path or default_model_path()), "body": str(body) if body else None})
    files["seconds"] = round(time.perf_counter() - t0, 3)
    return files
