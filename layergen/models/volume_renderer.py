"""Cameras, rays and a batched NeRF-style volume renderer (stratified + importance sampling).

Conventions (written down in docs/conventions_3d.md):

* World: right-handed, +y up; the mannequin stands on y = -0.95 and faces +z, so its left
  hand is on +x. The scene box (tri-plane domain) is [-1, 1]^3.
* Cameras are OpenCV-style: camera x right, y down, z forward (looking along +z_cam).
  `c2w` is a 4x4 camera-to-world matrix whose columns are (right, down, forward, position).
* Intrinsics `K = [[f, 0, cx], [0, f, cy], [0, 0, 1]]` in pixels; pixel (row i, col j) has its
  centre at (u, v) = (j + 0.5, i + 0.5).

A *field* is any callable `field(points (N, 3), dirs (N, 3)) -> (sigma (N,), rgb (N, 3))`;
the renderer never knows whether it is a tri-plane, a baked voxel grid or the analytic
ground truth, which is what lets one renderer serve fitting, evaluation and the pipeline.
Rendered colour is returned premultiplied (`rgb = sum w_i c_i`) together with the
accumulated opacity; `to_straight_rgba` turns that into straight-alpha RGBA.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BOX_MIN = (-1.0, -1.0, -1.0)
BOX_MAX = (1.0, 1.0, 1.0)


# ----------------------------------------------------------------------------- cameras
def look_at(position, target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0)) -> torch.Tensor:
    """OpenCV camera-to-world (4, 4) for a camera at `position` looking at `target`."""
    pos = torch.as_tensor(position, dtype=torch.float32)
    fwd = torch.as_tensor(target, dtype=torch.float32) - pos
    fwd = fwd / fwd.norm()
    up_t = torch.as_tensor(up, dtype=torch.float32)
    right = torch.linalg.cross(fwd, up_t)
    if right.norm() < 1e-6:  # looking straight up/down: pick any right vector
        right = torch.tensor([1.0, 0.0, 0.0])
    right = right / right.norm()
    down = torch.linalg.cross(fwd, right)
    c2w = torch.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, fwd, pos
    return c2w


def orbit_cameras(num_views: int, radius: float = 3.2, elevation_deg: float = 10.0,
                  azimuth_offset_deg: float = 0.0, target=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """`num_views` cameras evenly spaced in azimuth around +y, (V, 4, 4).

    Azimuth 0 is the front (camera on +z); positive azimuth turns towards +x (the
    mannequin's left). Elevation is positive above the target.
    """
    out = []
    for k in range(num_views):
        az = math.radians(azimuth_offset_deg + 360.0 * k / num_views)
        el = math.radians(elevation_deg)
        pos = (radius * math.sin(az) * math.cos(el) + target[0], radius * math.sin(el) + target[1],
               radius * math.cos(az) * math.cos(el) + target[2])
        out.append(look_at(pos, target))
    return torch.stack(out)


def intrinsics(size: int | tuple[int, int], fov_deg: float = 37.0) -> torch.Tensor:
    """Pinhole K (3, 3) for an image of `size` (H, W) or H = W, with a vertical field of view."""
    h, w = (size, size) if isinstance(size, int) else size
    f = 0.5 * h / math.tan(math.radians(fov_deg) / 2)
    return torch.tensor([[f, 0.0, w / 2], [0.0, f, h / 2], [0.0, 0.0, 1.0]])


def get_rays(c2w: torch.Tensor, K: torch.Tensor, height: int, width: int):
    """Ray origins and unit directions, each (V, H, W, 3), for cameras `c2w` (V, 4, 4) or (4, 4)."""
    if c2w.dim() == 2:
        c2w = c2w[None]
    c2w = c2w.float()
    K = K.float()
    i, j = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                          indexing="ij")
    d_cam = torch.stack([(j + 0.5 - K[0, 2]) / K[0, 0], (i + 0.5 - K[1, 2]) / K[1, 1], torch.ones_like(i)], -1)
    d = torch.einsum("vab,hwb->vhwa", c2w[:, :3, :3], d_cam)
    d = d / d.norm(dim=-1, keepdim=True)
    o = c2w[:, None, None, :3, 3].expand_as(d)
    return o.contiguous(), d.contiguous()


def ray_box_intersect(rays_o: torch.Tensor, rays_d: torch.Tensor, box_min=BOX_MIN, box_max=BOX_MAX):
    """Slab test. Returns (near, far), each (R,); rays that miss get near == far (no samples)."""
    bmin = torch.as_tensor(box_min, dtype=rays_o.dtype, device=rays_o.device)
    bmax = torch.as_tensor(box_max, dtype=rays_o.dtype, device=rays_o.device)
    inv = 1.0 / torch.where(rays_d.abs() < 1e-9, torch.full_like(rays_d, 1e-9), rays_d)
    t0, t1 = (bmin - rays_o) * inv, (bmax - rays_o) * inv
    near = torch.minimum(t0, t1).amax(-1).clamp_min(0.0)
    far = torch.maximum(t0, t1).amin(-1)
    far = torch.maximum(far, near)
    return near, far


# ----------------------------------------------------------------------------- sampling
def stratified_samples(near: torch.Tensor, far: torch.Tensor, num_samples: int, perturb: bool = False,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """`num_samples` depths per ray, one per equal bin of [near, far] (bin centre, or jittered)."""
    u = (torch.arange(num_samples, dtype=near.dtype, device=near.device) + 0.5) / num_samples
    u = u.expand(near.shape[0], num_samples)
    if perturb:
        jitter = torch.rand(u.shape, generator=generator, dtype=u.dtype, device=u.device) - 0.5
        u = u + jitter / num_samples
    return near[:, None] + (far - near)[:, None] * u


def sample_pdf(bins: torch.Tensor, weights: torch.Tensor, num_samples: int, deterministic: bool = True,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Inverse-CDF sampling of `num_samples` depths from piecewise-constant `weights` over `bins`.

    bins: (R, B + 1) edges, weights: (R, B). Returns (R, num_samples), detached.
    """
    w = weights.detach() + 1e-5
    pdf = w / w.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, -1)], -1).clamp(max=1.0)
    if deterministic:
        u = (torch.arange(num_samples, dtype=w.dtype, device=w.device) + 0.5) / num_samples
        u = u.expand(w.shape[0], num_samples).contiguous()
    else:
        u = torch.rand((w.shape[0], num_samples), generator=generator, dtype=w.dtype, device=w.device)
    idx = torch.searchsorted(cdf, u, right=True).clamp(1, cdf.shape[-1] - 1)
    c0, c1 = cdf.gather(-1, idx - 1), cdf.gather(-1, idx)
    b0, b1 = bins.gather(-1, idx - 1), bins.gather(-1, idx)
    frac = ((u - c0) / (c1 - c0).clamp_min(1e-8)).clamp(0, 1)
    return (b0 + frac * (b1 - b0)).detach()


def interval_widths(t: torch.Tensor, near: torch.Tensor, far: torch.Tensor) -> torch.Tensor:
    """Width of the interval each (sorted) sample stands for: midpoint to midpoint, ends at near/far.

    The widths of a ray sum exactly to far - near, so an empty box renders alpha 0 and a
    uniformly dense box renders 1 - exp(-sigma (far - near)) whatever the sample count.
    """
    mids = 0.5 * (t[:, 1:] + t[:, :-1])
    edges = torch.cat([near[:, None], mids, far[:, None]], -1)
    return (edges[:, 1:] - edges[:, :-1]).clamp_min(0.0)


def composite(sigma: torch.Tensor, rgb: torch.Tensor, deltas: torch.Tensor):
    """Alpha compositing along rays. sigma (R, S), rgb (R, S, C), deltas (R, S).

    Returns (premultiplied colour (R, C), accumulated opacity (R,), weights (R, S)).
    """
    alpha = 1.0 - torch.exp(-sigma.clamp_min(0.0) * deltas)
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha + 1e-10], -1), -1)[:, :-1]
    weights = alpha * trans
    return (weights[..., None] * rgb).sum(1), weights.sum(1), weights


def to_straight_rgba(premul_rgb: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """(..., 3) premultiplied + (...,) opacity -> (..., 4) straight-alpha RGBA in [0, 1]."""
    a = acc.clamp(0.0, 1.0)
    rgb = torch.where(a[..., None] > 1e-6, premul_rgb / a[..., None].clamp_min(1e-6), torch.zeros_like(premul_rgb))
    return torch.cat([rgb.clamp(0.0, 1.0), a[..., None]], -1)


# ----------------------------------------------------------------------------- renderer
@dataclass
class VolumeRenderer:
    """Stratified + importance sampled volume rendering of any field, in ray chunks.

    `num_coarse` stratified samples locate the surface; `num_importance` more are drawn
    from the coarse weights; the final composite uses all of them, sorted. With
    `reuse_coarse` (inference) the coarse field values are kept and only the new samples
    are evaluated; for training leave it off so every composited sample carries gradients.
    """

    num_coarse: int = 32
    num_importance: int = 32
    chunk: int = 4096
    proposal_max_density: float = 10.0
    box_min: tuple = BOX_MIN
    box_max: tuple = BOX_MAX

    def render_rays(self, field, rays_o: torch.Tensor, rays_d: torch.Tensor, near=None, far=None,
                    perturb: bool = False, reuse_coarse: bool = True, generator=None, extra=None,
                    proposal=None) -> dict:
        """Render flat rays (R, 3). Returns dict(rgb (R,3) premultiplied, acc (R,), depth (R,)).

        `extra`: optional callable points -> (N, C) features composited with the same weights
        (e.g. one-hot part labels for region masks), returned as out['extra'].
        `proposal`: optional cheap density `points -> sigma` (e.g. a cached, dilated voxel grid)
        for the coarse pass. Then only the importance samples query `field` and are
        composited, and rays whose proposal opacity is below 1e-3 are left empty: empty-space
        skipping, which is what makes turntables cheap on a CPU.
        """
        if near is None or far is None:
            near, far = ray_box_intersect(rays_o, rays_d, self.box_min, self.box_max)
        outs = []
        for s in range(0, rays_o.shape[0], self.chunk):
            sl = slice(s, s + self.chunk)
            outs.append(self._render_chunk(field, rays_o[sl], rays_d[sl], near[sl], far[sl], perturb,
                                           reuse_coarse, generator, extra, proposal))
        if not outs:
            z = rays_o.new_zeros(0)
            return {"rgb": rays_o.new_zeros(0, 3), "acc": z, "depth": z}
        return {k: torch.cat([o[k] for o in outs], 0) for k in outs[0]}

    def _render_chunk(self, field, o, d, near, far, perturb, reuse_coarse, generator, extra, proposal=None):
        R = o.shape[0]
        hit = far > near + 1e-6
        out = {"rgb": o.new_zeros(R, 3), "acc": o.new_zeros(R), "depth": o.new_zeros(R)}
        if extra is not None:
            out["extra"] = None
        if not bool(hit.any()):
            if extra is not None:
                out["extra"] = o.new_zeros(R, extra(o[:1]).shape[-1])
            return out
        idx = hit.nonzero(as_tuple=True)[0]
        o, d, near, far = o[idx], d[idx], near[idx], far[idx]
        n = o.shape[0]
        t_c = stratified_samples(near, far, self.num_coarse, perturb, generator)
        if proposal is not None:
            pts = o[:, None] + d[:, None] * t_c[..., None]
            # capped proposal density: its weights reach ~0.1 past the (dilated) proposal surface,
            # far enough to cover the true surface behind the dilation
            sig_p = proposal(pts.reshape(-1, 3)).reshape(n, -1).clamp(max=self.proposal_max_density)
            _, acc_p, w_c = composite(sig_p, torch.zeros(n, t_c.shape[1], 1, dtype=o.dtype, device=o.device),
                                      interval_widths(t_c, near, far))
            keep = (acc_p > 1e-3).nonzero(as_tuple=True)[0]
            idx, o, d, near, far, t_c, w_c = idx[keep], o[keep], d[keep], near[keep], far[keep], t_c[keep], w_c[keep]
            n = o.shape[0]
            if n == 0:
                if extra is not None:
                    out["extra"] = out["rgb"].new_zeros(R, extra(o.new_zeros(1, 3)).shape[-1])
                return out
            bins = torch.cat([near[:, None], 0.5 * (t_c[:, 1:] + t_c[:, :-1]), far[:, None]], -1)
            t = sample_pdf(bins, w_c, max(self.num_importance, 1), deterministic=not perturb, generator=generator)
            sig, rgb = self._eval(field, o, d, t)
        elif self.num_importance > 0:
            with torch.set_grad_enabled(torch.is_grad_enabled() and reuse_coarse):
                sig_c, rgb_c = self._eval(field, o, d, t_c)
            bins = torch.cat([near[:, None], 0.5 * (t_c[:, 1:] + t_c[:, :-1]), far[:, None]], -1)
            _, _, w_c = composite(sig_c.detach(), rgb_c.detach(), interval_widths(t_c, near, far))
            t_f = sample_pdf(bins, w_c, self.num_importance, deterministic=not perturb, generator=generator)
            if reuse_coarse:
                sig_f, rgb_f = self._eval(field, o, d, t_f)
                t_all = torch.cat([t_c, t_f], -1)
                t, order = t_all.sort(-1)
                sig = torch.cat([sig_c, sig_f], -1).gather(-1, order)
                rgb = torch.cat([rgb_c, rgb_f], 1).gather(1, order[..., None].expand(-1, -1, 3))
            else:
                t, _ = torch.cat([t_c, t_f], -1).sort(-1)
                sig, rgb = self._eval(field, o, d, t)
        else:
            t = t_c
            sig, rgb = self._eval(field, o, d, t)
        col, acc, w = composite(sig, rgb, interval_widths(t, near, far))
        depth = (w * t).sum(-1)
        res = {"rgb": col, "acc": acc, "depth": depth}
        for k, v in res.items():  # scatter back to all rays (out-of-place, so gradients flow)
            out[k] = out[k].index_put((idx,), v)
        if extra is not None:
            pts = (o[:, None] + d[:, None] * t[..., None]).reshape(-1, 3)
            feat = extra(pts).reshape(n, t.shape[1], -1)
            e = (w.detach()[..., None] * feat).sum(1)
            out["extra"] = o.new_zeros(R, e.shape[-1]).index_put((idx,), e)
        return out

    @staticmethod
    def _eval(field, o, d, t):
        n, s = t.shape
        pts = o[:, None] + d[:, None] * t[..., None]
        dirs = d[:, None].expand(n, s, 3)
        sig, rgb = field(pts.reshape(-1, 3), dirs.reshape(-1, 3))
        return sig.reshape(n, s), rgb.reshape(n, s, 3)

    @torch.no_grad()
    def render_views(self, field, c2w: torch.Tensor, K: torch.Tensor, height: int, width: int,
                     box_min=None, box_max=None, extra=None, proposal=None) -> dict:
        """Render cameras (V, 4, 4) to straight RGBA (V, H, W, 4) in [0, 1] (+ 'extra' if given).

        `box_min/box_max` may tighten the sampled region (e.g. to the occupied bounding box),
        which skips empty rays and spends the samples where the surface is.
        """
        o, d = get_rays(c2w, K, height, width)
        V = o.shape[0]
        o, d = o.reshape(-1, 3), d.reshape(-1, 3)
        near, far = ray_box_intersect(o, d, box_min or self.box_min, box_max or self.box_max)
        out = self.render_rays(field, o, d, near, far, perturb=False, reuse_coarse=True, extra=extra,
                               proposal=proposal)
        res = {"rgba": to_straight_rgba(out["rgb"], out["acc"]).reshape(V, height, width, 4),
               "depth": out["depth"].reshape(V, height, width)}
        if extra is not None:
            res["extra"] = out["extra"].reshape(V, height, width, -1)
        return res


def grid_density_fn(density: torch.Tensor, box_min=BOX_MIN, box_max=BOX_MAX, dilate: int = 1):
    """points -> density by trilinear lookup in a [z, y, x] voxel grid of voxel-centre samples.

    `dilate` max-pools the grid first (voxels), so a proposal built from it never misses a
    thin part that falls between voxel centres.
    """
    import torch.nn.functional as F

    vol = density.float()[None, None]
    if dilate:
        vol = F.max_pool3d(vol, 2 * dilate + 1, stride=1, padding=dilate)
    bmin = torch.as_tensor(box_min, dtype=torch.float32)
    bmax = torch.as_tensor(box_max, dtype=torch.float32)

    def f(points):
        g = ((points.float() - bmin) / (bmax - bmin) * 2 - 1).view(1, 1, 1, -1, 3)
        return F.grid_sample(vol, g, mode="bilinear", padding_mode="zeros", align_corners=False).view(-1)

    return f


# ----------------------------------------------------------------------------- metrics on renders
def _on_black(rgba) -> "np.ndarray":
    import numpy as np

    x = np.asarray(rgba, np.float32)
    if x.dtype == np.uint8 or x.max() > 1.0 + 1e-6:
        x = x / 255.0
    return x[..., :3] * x[..., 3:4]


def render_mask(gt_rgba, pred_rgba, threshold: float = 0.05) -> "np.ndarray":
    """Pixels that belong to either subject (GT or prediction): the region masked metrics use."""
    import numpy as np

    return (np.asarray(gt_rgba)[..., 3] > threshold) | (np.asarray(pred_rgba)[..., 3] > threshold)


def masked_psnr(gt_rgba, pred_rgba) -> float:
    """PSNR over the union of both foregrounds, colours premultiplied onto black (float RGBA in [0, 1]).

    Background pixels are excluded (they would inflate PSNR); silhouette errors are not,
    since a pixel covered by only one of the two is in the mask.
    """
    import numpy as np

    m = render_mask(gt_rgba, pred_rgba)
    if not m.any():
        return float("inf")
    mse = float(((_on_black(gt_rgba) - _on_black(pred_rgba))[m] ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def masked_ssim(gt_rgba, pred_rgba) -> float:
    """SSIM (skimage, 7x7 windows) on the bounding box of the union foreground, on black."""
    import numpy as np
    from skimage.metrics import structural_similarity

    m = render_mask(gt_rgba, pred_rgba)
    if not m.any():
        return 1.0
    ys, xs = np.nonzero(m)
    y0, y1 = max(ys.min() - 2, 0), min(ys.max() + 3, m.shape[0])
    x0, x1 = max(xs.min() - 2, 0), min(xs.max() + 3, m.shape[1])
    if y1 - y0 < 7:
        y0, y1 = max(0, min(y0, m.shape[0] - 7)), max(y1, min(m.shape[0], y0 + 7))
    if x1 - x0 < 7:
        x0, x1 = max(0, min(x0, m.shape[1] - 7)), max(x1, min(m.shape[1], x0 + 7))
    a, b = _on_black(gt_rgba)[y0:y1, x0:x1], _on_black(pred_rgba)[y0:y1, x0:x1]
    return float(structural_similarity(a, b, channel_axis=-1, data_range=1.0, win_size=7))
