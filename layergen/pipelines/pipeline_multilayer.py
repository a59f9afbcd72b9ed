"""Global prompt + layout (1..64 boxes) -> background + one cropped RGBA layer per box; one-layer repaint.

Design (see docs/multilayer.md for the measurements behind the numbers):

* **One UNet, three tasks.** The background comes from the background part of the prompt
  (task 2 "background behind foreground" with a zero condition = background from text). Each
  box is then a task-1 "foreground on background" sample whose condition latent is the current
  composite (background + every layer already placed), so a layer is drawn *for* what lies
  below it: shared prompt + conditioning on the layers underneath keep the image coherent.
* **Layer-wise region crop** (ART's idea, on a UNet). A box is denoised on a crop of the
  canvas around it, ``box / fill`` wide (``fill`` = 0.65: the mini model's objects span about
  that fraction of their canvas), rounded up to the VAE factor. Self-attention and
  convolutions run over the crop's tokens only, so the cost grows with the total box area,
  not with layers x canvas. ``attention="full"`` runs the identical per-layer denoising on the
  whole canvas latent instead (the benchmark baseline).
* **Working size.** A crop smaller than the model's native size (``min_region_size``, default
  `default_size()`: 128 px for the mini) is denoised upsampled to it and the layer resized back:
  the mini UNet only ever saw 16 x 16 latents and draws far worse shapes on 5 x 5 ones (measured:
  shape accuracy 8 % native vs 26 % at 128 px on 12 held-out layouts). Large boxes keep their
  own size, so on big canvases the cost still follows the box area.
* **Box binding.** Outside the box (inside the crop) the latent is reset at every step to the
  noised latent of an *empty* transparent layer (the diffusers inpainting recipe for plain
  UNets), so the content lands in the box. ``box_fit="scale"`` (default) holds only the box
  grown by ``margin`` (25 %) empty and then scales/centres the drawn object onto the box, so an
  object the model drew a little off-place is not clipped (IoU of the object's bounding box
  with its box 0.70 -> 0.81 on the 12 layouts); ``box_fit="crop"`` holds the exact box and cuts the layer there. Either way the layer
  is box-sized, so it never leaks out of its box.
* **Joint denoising in waves.** A layer whose box overlaps a box below it waits for that
  layer (it must see it); layers with mutually disjoint boxes form one wave and are denoised
  together, batched by crop size, in one UNet call per step (``joint=False``: one layer at a
  time, each seeing all layers below it).
* **Prompts.** A box with its own prompt binds it (RAG-style). Anonymous boxes (ART-style)
  take the object phrases of the global prompt: the background is the text after the last
  " on " (or ``background_prompt`` / the layout's ``background``); the rest is split at
  commas, semicolons and " and ", and phrase k goes to the k-th anonymous box in layout order
  (bottom -> top; ``anonymous_order="reading"``: boxes sorted top-to-bottom, left-to-right),
  cycling when there are more boxes than phrases. Unused phrases are listed in the stack
  metadata (``unassigned_phrases``).
* **Seeds.** Background: ``seed``; box k (0-based): ``seed + 1 + k`` unless the box has its own.
  Every layer's noise comes from its own generator, so batching never changes which noise a
  layer gets, and every layer records prompt, seed, box, steps and region so `repaint` can
  redo exactly one of them.
* **Repaint** regenerates one layer (new prompt / seed / box) conditioned on the composite of
  the layers below it, or the background conditioned on the layers above it; all other
  `Layer` objects of the returned stack are copies with bit-identical pixels.
"""
from __future__ import annotations

import math
import re
import secrets
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from ..errors import LayergenError
from ..layers import Layer, LayerStack
from ..layers.compositing import composite_layers
from ..layout import Box, Layout
from ..seeds import check_seed
from .layer_diffusion import (TASK_BACKGROUND_BEHIND_FOREGROUND, TASK_FOREGROUND_ON_BACKGROUND,
                              LayerDiffusionPipelineBase, _is_int, check_guidance, check_steps,
                              scheduler_step_kwargs, to_rgba_tensor)

ATTENTION_MODES = ("region", "full")
BOX_FITS = ("crop", "scale")
_PHRASE_SPLIT = re.compile(r"\s*(?:[,;]|\band\b)\s*", re.IGNORECASE)
_ON = re.compile(r"\s+on\s+", re.IGNORECASE)


def split_prompt(prompt: str | None, background: str | None = None) -> tuple[list[str], str | None]:
    """Global prompt -> (object phrases in reading order, background text).

    "a red star, a blue ring and a green heart on a grey gradient background" ->
    (["a red star", "a blue ring", "a green heart"], "a grey gradient background").
    With an explicit `background` the prompt is only cut at " on <background>" if it ends so.
    Limitation (documented): an " and " inside one object ("a red and blue ball") splits it.
    """
    text = (prompt or "").strip()
    if background is not None:
        bg = background.strip()
        m = re.search(r"\s+on\s+" + re.escape(bg) + r"\s*$", text, re.IGNORECASE)
        objects = text[:m.start()] if m else text
    else:
        matches = list(_ON.finditer(text))
        if matches:
            objects, bg = text[:matches[-1].start()], text[matches[-1].end():].strip()
        else:
            objects, bg = text, None
    phrases = [p.strip(" .") for p in _PHRASE_SPLIT.split(objects)]
    return [p for p in phrases if p], (bg or None)


def assign_prompts(layout: Layout, order: str = "layout") -> tuple[list[str], list[bool], list[str]]:
    """Per-box prompts: bound boxes keep theirs, anonymous ones get the global prompt's object phrases.

    Returns (prompts, bound flags, unassigned phrases)."""
    if order not in ("layout", "reading"):
        raise LayergenError(f"anonymous_order must be 'layout' or 'reading', got {order!r}")
    phrases, _ = split_prompt(layout.prompt, layout.background)
    anon = [i for i, b in enumerate(layout.boxes) if not b.bound]
    if order == "reading":
        anon.sort(key=lambda i: (layout.boxes[i].y + layout.boxes[i].h / 2, layout.boxes[i].x))
    if anon and not phrases:
        phrases = [layout.prompt]
    prompts = [b.prompt for b in layout.boxes]
    for k, i in enumerate(anon):
        prompts[i] = phrases[k % len(phrases)]
    unassigned = phrases[len(anon):] if anon else phrases
    return prompts, [b.bound for b in layout.boxes], unassigned


def background_prompt_of(layout: Layout) -> str:
    """Text for the background: the layout's `background`, else the global prompt's " on ..." part,
    else the global prompt itself, else a neutral default."""
    if layout.background:
        return layout.background
    _, bg = split_prompt(layout.prompt)
    return bg or layout.prompt or "a plain background"


@dataclass
class RegionSettings:
    """How a box becomes a denoising region. Stored in every layer's metadata; `repaint` reuses it.

    attention: "region" (denoise a crop of about box / fill) or "full" (the whole canvas, the baseline).
    min_region_size: crops whose longer side is below this (px) are denoised upsampled to it.
    box_fit: "crop" = hard binding: the latent outside the box is held empty, the layer is cut
    to the box. "scale" = the latent is held empty only outside the box grown by `margin` (a
    fraction of the box side), then the drawn object (alpha >= 0.5 bounding box) is scaled and
    centred to fill the box, so an object drawn a little off-place or off-size is not clipped.
    """

    attention: str = "region"
    fill: float = 0.65
    min_region_size: int | None = None
    box_fit: str = "scale"
    margin: float = 0.25

    def check(self) -> "RegionSettings":
        if self.attention not in ATTENTION_MODES:
            raise LayergenError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.box_fit not in BOX_FITS:
            raise LayergenError(f"box_fit must be one of {BOX_FITS}, got {self.box_fit!r}")
        if not 0.05 <= float(self.fill) <= 1.0:
            raise LayergenError(f"fill must be in [0.05, 1], got {self.fill}")
        if not 0.0 <= float(self.margin) <= 1.0:
            raise LayergenError(f"margin must be in [0, 1], got {self.margin}")
        mrs = self.min_region_size
        if mrs is not None and (isinstance(mrs, bool) or not isinstance(mrs, int) or mrs < 1):
            raise LayergenError(f"min_region_size must be a positive integer or None, got {mrs!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_metadata(cls, meta: dict) -> "RegionSettings":
        return cls(**{f.name: meta[f.name] for f in fields(cls) if meta.get(f.name) is not None}).check()


@dataclass
class _Region:
    """One layer to denoise: where its box is, which canvas crop it sees, at what working size."""

    index: int                       # position in the layout (0-based, bottom -> top)
    box: Box
    prompt: str
    seed: int
    crop: tuple[int, int, int, int]  # x, y, w, h on the canvas (may extend past the canvas)
    work: tuple[int, int]            # (h, w) pixels the crop is denoised at (multiple of the VAE factor)
    settings: RegionSettings

    def mask(self, f: int) -> torch.Tensor:
        """1 x 1 x h x w latent mask: 1 on latent cells the (grown, for box_fit="scale") box touches, 0 elsewhere."""
        cx, cy, cw, ch = self.crop
        wh, ww = self.work
        sx, sy = ww / cw, wh / ch
        gx = self.settings.margin * self.box.w if self.settings.box_fit == "scale" else 0.0
        gy = self.settings.margin * self.box.h if self.settings.box_fit == "scale" else 0.0
        x0, y0 = math.floor((self.box.x - gx - cx) * sx / f), math.floor((self.box.y - gy - cy) * sy / f)
        x1 = math.ceil((self.box.x + self.box.w + gx - cx) * sx / f)
        y1 = math.ceil((self.box.y + self.box.h + gy - cy) * sy / f)
        m = torch.zeros(1, 1, wh // f, ww // f)
        m[..., max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = 1.0
        return m

    def place(self, rgba: np.ndarray) -> np.ndarray:
        """Decoded crop (work size) -> the box-sized layer pixels."""
        cx, cy, cw, ch = self.crop
        px = resize_rgba(rgba, ch, cw)
        bx, by, bw, bh = self.box.x - cx, self.box.y - cy, self.box.w, self.box.h
        if self.settings.box_fit == "scale":
            fitted = fit_to_box(px, bw, bh)
            if fitted is not None:
                return fitted
        return np.ascontiguousarray(px[by:by + bh, bx:bx + bw])


def fit_to_box(rgba: np.ndarray, width: int, height: int, max_scale: float = 3.0) -> np.ndarray | None:
    """Scale (uniformly) and centre the object of an RGBA crop so its bounding box fills a width x height
    box; whatever else of the crop lands in the box (soft shadow, glow) comes along. The object is
    where alpha reaches half the layer's near-peak alpha (so a 40 %-opaque glass body counts).
    None if the crop holds no object."""
    a = rgba[..., 3]
    peak = float(np.percentile(a, 99.5)) if a.any() else 0.0
    if peak < 16:
        return None
    ys, xs = np.nonzero(a >= max(16.0, 0.5 * peak))
    if len(xs) < 4:
        return None
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    s = min(width / (x1 - x0), height / (y1 - y0), max_scale)
    h, w = max(1, round(rgba.shape[0] * s)), max(1, round(rgba.shape[1] * s))
    scaled = resize_rgba(rgba, h, w)
    ox = int(round(width / 2 - (x0 + x1) / 2 * s))  # where the scaled crop's origin lands in the box
    oy = int(round(height / 2 - (y0 + y1) / 2 * s))
    out = np.zeros((height, width, 4), np.uint8)
    sx0, sy0 = max(0, -ox), max(0, -oy)
    dx0, dy0 = max(0, ox), max(0, oy)
    cw_, ch_ = min(w - sx0, width - dx0), min(h - sy0, height - dy0)
    if cw_ > 0 and ch_ > 0:
        out[dy0:dy0 + ch_, dx0:dx0 + cw_] = scaled[sy0:sy0 + ch_, sx0:sx0 + cw_]
    return out


def _round_up(v: float, m: int) -> int:
    return max(m, int(math.ceil(v / m - 1e-9)) * m)


def region_crop(box: Box, width: int, height: int, f: int = 8, attention: str = "region", fill: float = 0.65,
                min_region_size: int | None = None) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """The canvas crop a box is denoised on, and the (h, w) pixel size it is denoised at.

    Region mode: ``box / fill`` per side, rounded up to the VAE factor `f`, at most the canvas
    (but never smaller than the box), centred on the box and shifted inside the canvas when it
    fits; `min_region_size` upsamples crops whose longer side is below it. Full mode: the whole
    (f-padded) canvas. Shared with `training/train_multilayer.py`, so training crops match."""
    gw, gh = _round_up(width, f), _round_up(height, f)
    if attention == "full":
        return (0, 0, gw, gh), (gh, gw)
    cw = min(_round_up(box.w / fill, f), max(gw, _round_up(box.w, f)))
    ch = min(_round_up(box.h / fill, f), max(gh, _round_up(box.h, f)))
    x = int(round(box.x + box.w / 2 - cw / 2))
    y = int(round(box.y + box.h / 2 - ch / 2))
    if cw <= width:
        x = min(max(x, 0), width - cw)
    if ch <= height:
        y = min(max(y, 0), height - ch)
    work = (ch, cw)
    if min_region_size and max(cw, ch) < min_region_size:
        s = min_region_size / max(cw, ch)
        work = (_round_up(ch * s, f), _round_up(cw * s, f))
    return (x, y, cw, ch), work


def crop_pixels(image: np.ndarray, crop: tuple[int, int, int, int]) -> np.ndarray:
    """Crop `image` (H x W x C) to (x, y, w, h), replicating edge pixels where the crop leaves the canvas."""
    x, y, w, h = crop
    ys = np.clip(np.arange(y, y + h), 0, image.shape[0] - 1)
    xs = np.clip(np.arange(x, x + w), 0, image.shape[1] - 1)
    return image[ys][:, xs]


def resize_rgba(rgba: np.ndarray, height: int, width: int) -> np.ndarray:
    """Straight uint8 RGBA resize done premultiplied (no dark fringes), area-style when shrinking."""
    if rgba.shape[:2] == (height, width):
        return rgba
    x = torch.from_numpy(rgba).float().permute(2, 0, 1)[None] / 255.0
    x[:, :3] *= x[:, 3:]
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    a = x[:, 3:].clamp(0, 1)
    rgb = torch.where(a > 0, x[:, :3] / a.clamp_min(1e-6), torch.zeros_like(x[:, :3])).clamp(0, 1)
    out = torch.cat([rgb, a], 1)[0].permute(1, 2, 0).numpy()
    out = np.floor(out * 255 + 0.5).astype(np.uint8)
    out[out[..., 3] == 0, :3] = 0
    return out


class MultiLayerPipeline(LayerDiffusionPipelineBase):
    """Prompt + layout -> `LayerStack`: background, then one RGBA layer per box (cropped to the box), bottom -> top.

    Works with the mini UNet (task class labels, concatenated condition latent) and degrades
    gracefully with a plain text-to-layer UNet (no condition: layers share only the prompt).

    Example:
        >>> pipe = MultiLayerPipeline.from_pretrained("assets/layergen-mini")
        >>> out = pipe("a red star and a blue ring on a grey to white gradient background",
        ...            layout=[(8, 8, 48, 48), (64, 56, 56, 56)], seed=0)
        >>> stack = out.stacks[0]                          # background + 2 layers
        >>> stack = pipe.repaint(stack, 2, prompt="a green heart").stacks[0]   # only layer 2 changes
    """

    task_id = TASK_FOREGROUND_ON_BACKGROUND
    output_types = ("pil", "np", "stack")

    # -- helpers ---------------------------------------------------------------------------------
    def _layout(self, prompt, layout, height, width, background_prompt) -> Layout:
        if isinstance(layout, Layout):
            if (height is not None and height != layout.height) or (width is not None and width != layout.width):
                raise LayergenError(f"height/width {height}x{width} disagree with the layout's canvas "
                                    f"{layout.height}x{layout.width}")
            prompt = prompt if prompt is not None else layout.prompt
            bg = background_prompt if background_prompt is not None else layout.background
            return Layout(layout.width, layout.height, [Box(**vars(b)) for b in layout.boxes], prompt,
                          bg).check_prompts()
        if layout is None:
            raise LayergenError("a layout is needed: a list of boxes (x, y, w, h[, prompt]) or a Layout")
        size = self.default_size()
        return Layout.from_boxes(layout, size if width is None else width, size if height is None else height, prompt,
                                 background_prompt).check_prompts()

    def _region(self, index: int, box: Box, prompt: str, seed: int, width: int, height: int,
                settings: RegionSettings) -> _Region:
        crop, work = region_crop(box, width, height, self.vae_scale_factor, settings.attention, settings.fill,
                                 settings.min_region_size)
        return _Region(index, box, prompt, seed, crop, work, settings)

    def _empty_latent(self, cache: dict, h: int, w: int) -> torch.Tensor:
        """Latent of a fully transparent layer: what 'nothing here' looks like to the UNet."""
        if (h, w) not in cache:  # through the transparent encoder if there is one, else grey (its convention)
            cache[(h, w)] = self.encode_condition_rgba(torch.zeros(1, 4, h, w))
        return cache[(h, w)]

    def _class_labels(self, task: int, batch: int):
        if not getattr(self.unet.config, "num_class_embeds", None):
            return None
        return torch.full((batch,), task, device=self._execution_device, dtype=torch.long)

    def _embed(self, prompts: list[str], negative_prompt):
        """Unique prompts encoded once; returns a function (list of prompts) -> batched embeddings."""
        uniq = list(dict.fromkeys(prompts))
        pos, neg, pooled, neg_pooled = self.encode_prompt(uniq, 1, [negative_prompt or ""] * len(uniq))
        idx = {p: i for i, p in enumerate(uniq)}

        def take(ps):
            sel = torch.tensor([idx[p] for p in ps], device=pos.device)
            pick = (lambda x: None if x is None else x[sel])
            return pick(pos), pick(neg), pick(pooled), pick(neg_pooled)

        return take

    def _sample(self, task, embeds, cond, generators, shape, steps, mask=None, known=None,
                progress_bar=None, callback_on_step_end=None, callback_tensor_inputs=()):
        """One batched denoising loop. Each sample's noise comes from its own generator.

        `mask`/`known`: where mask == 0 the latent is reset every step to `known` noised to the
        current level (diffusers' inpainting recipe for plain UNets)."""
        pos, neg, pooled, neg_pooled = embeds
        device, dtype = self._execution_device, pos.dtype
        b = len(generators)
        init = torch.cat([randn_tensor((1,) + shape, generator=g, device=device, dtype=dtype) for g in generators])
        blend_noise = None
        if mask is not None:
            blend_noise = torch.cat([randn_tensor((1,) + shape, generator=g, device=device, dtype=dtype)
                                     for g in generators])
            mask, known = mask.to(device, dtype), known.to(device, dtype)
        self.scheduler.set_timesteps(steps, device=device)
        timesteps = self.scheduler.timesteps
        latents = init * self.scheduler.init_noise_sigma
        if cond is None and self._takes_condition():
            cond = torch.zeros((b,) + shape, device=device, dtype=dtype)
        labels = self._class_labels(task, b)
        step_kwargs = scheduler_step_kwargs(self.scheduler, generator=generators)
        self._num_timesteps = len(timesteps)
        h, w = shape[-2] * self.vae_scale_factor, shape[-1] * self.vae_scale_factor
        added = self._added_cond_kwargs(pooled, h, w, b)
        neg_added = self._added_cond_kwargs(neg_pooled, h, w, b) if neg_pooled is not None else None
        cfg = self.do_classifier_free_guidance
        for i, t in enumerate(timesteps):
            if self.interrupt:
                continue
            x = self.scheduler.scale_model_input(latents, t)
            if cond is not None:
                x = torch.cat([x, cond.to(device, dtype)], dim=1)
            if cfg:
                out = self.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([neg, pos]),
                                class_labels=None if labels is None else torch.cat([labels, labels]),
                                added_cond_kwargs=None if added is None else
                                {k: torch.cat([neg_added[k], added[k]]) for k in added},
                                cross_attention_kwargs=self.cross_attention_kwargs).sample
                uncond, text = out.chunk(2)
                noise = uncond + self._guidance_scale * (text - uncond)
            else:
                noise = self.unet(x, t, encoder_hidden_states=pos, class_labels=labels,
                                  added_cond_kwargs=added, cross_attention_kwargs=self.cross_attention_kwargs).sample
            latents = self.scheduler.step(noise, t, latents, **step_kwargs).prev_sample
            if mask is not None:
                target = known
                if i < len(timesteps) - 1:
                    target = self.scheduler.add_noise(known, blend_noise, timesteps[i + 1:i + 2])
                latents = mask * latents + (1 - mask) * target
            if callback_on_step_end is not None:
                local = {"latents": latents, "prompt_embeds": pos}
                out = callback_on_step_end(self, i, t, {k: local[k] for k in callback_tensor_inputs}) or {}
                latents = out.pop("latents", latents)
            if progress_bar is not None:
                progress_bar.update()
        return self.check_finite(latents)

    def _waves(self, boxes: list[Box], joint: bool) -> list[int]:
        """Wave number per box: after every lower box it overlaps (it must see those), else as early as possible."""
        waves = []
        for i, b in enumerate(boxes):
            if not joint:
                waves.append(i)
                continue
            waves.append(max([waves[j] + 1 for j in range(i) if boxes[j].intersects(b)], default=0))
        return waves

    def _generate_layers(self, regions: list[_Region], below, width, height, steps, negative_prompt, tta,
                         max_batch, progress_bar=None, callback_on_step_end=None, callback_tensor_inputs=()):
        """Denoise + decode a set of regions that all condition on the same composite `below` (H x W x 4)."""
        f = self.vae_scale_factor
        take = self._embed([r.prompt for r in regions], negative_prompt)
        comp = below[..., :3]
        empty_cache: dict = {}
        cond_cache: dict = {}
        results = {}
        groups: dict = {}
        for r in regions:
            groups.setdefault(r.work, []).append(r)
        for (wh, ww), members in groups.items():
            for start in range(0, len(members), max_batch):
                chunk = members[start:start + max_batch]
                cond = None
                if self._takes_condition():
                    conds = []
                    for r in chunk:
                        key = (r.crop, r.work)
                        if key not in cond_cache:
                            px = crop_pixels(comp, r.crop)
                            x = torch.from_numpy(np.ascontiguousarray(px)).float().permute(2, 0, 1)[None] / 255.0
                            if x.shape[-2:] != (wh, ww):
                                x = F.interpolate(x, size=(wh, ww), mode="bilinear", align_corners=False,
                                                  antialias=True).clamp(0, 1)
                            cond_cache[key] = self.encode_condition_rgb(x)
                        conds.append(cond_cache[key])
                    cond = torch.cat(conds)
                mask = torch.cat([r.mask(f) for r in chunk])
                known = self._empty_latent(empty_cache, wh, ww).expand(len(chunk), -1, -1, -1)
                gens = [torch.Generator().manual_seed(r.seed) for r in chunk]
                lat = self._sample(TASK_FOREGROUND_ON_BACKGROUND, take([r.prompt for r in chunk]), cond, gens,
                                   (self.latent_channels, wh // f, ww // f), steps, mask, known, progress_bar,
                                   callback_on_step_end, callback_tensor_inputs)
                rgba = self.decode_transparent(lat, wh, ww, tta=tta)
                for r, px in zip(chunk, rgba):
                    results[r.index] = r.place(px)
        return results

    def _layer(self, region: _Region, pixels, bound: bool, steps, guidance_scale, wave=None) -> Layer:
        meta = self._provenance(region.prompt, region.seed, steps, guidance_scale, "instance")
        meta.update({"box": list(region.box.xywh), "bound": bound, "region": list(region.crop),
                     **region.settings.to_dict(), "layout_index": region.index})
        if wave is not None:
            meta["wave"] = wave
        name = region.box.name or f"{region.index + 1}: {region.prompt[:48]}"
        return Layer(pixels, name=name, x=region.box.x, y=region.box.y, metadata=meta)

    def _background(self, prompt, seed, width, height, steps, negative_prompt, condition_rgba=None,
                    progress_bar=None, callback_on_step_end=None, callback_tensor_inputs=()) -> np.ndarray:
        f = self.vae_scale_factor
        gw, gh = _round_up(width, f), _round_up(height, f)
        cond = None
        if condition_rgba is not None and self._takes_condition():
            x = torch.from_numpy(condition_rgba).float().permute(2, 0, 1)[None] / 255.0
            cond = self.encode_condition_rgba(F.pad(x, (0, gw - width, 0, gh - height)))
        take = self._embed([prompt], negative_prompt)
        lat = self._sample(TASK_BACKGROUND_BEHIND_FOREGROUND, take([prompt]), cond,
                           [torch.Generator().manual_seed(seed)], (self.latent_channels, gh // f, gw // f), steps,
                           progress_bar=progress_bar, callback_on_step_end=callback_on_step_end,
                           callback_tensor_inputs=callback_tensor_inputs)
        return self.decode_opaque(lat, height, width)[0]

    def _check(self, steps, guidance_scale, max_batch, output_type):
        check_steps(self.scheduler, steps)
        check_guidance(guidance_scale)
        if not _is_int(max_batch) or max_batch < 1:
            raise LayergenError(f"max_batch must be a positive integer, got {max_batch!r}")
        self.check_output_type(output_type)

    @staticmethod
    def _resolve_seed(seed, generator) -> int:
        """The layout's base seed: `seed`, else one generator's (a layout is one image; the background and
        every box derive their seeds from it), else a fresh one."""
        if seed is not None and generator is not None:
            raise LayergenError("pass seed= or generator=, not both")
        if seed is not None:
            return seed  # checked by the caller, with the span of box seeds it derives
        if isinstance(generator, list) and len(generator) == 1:
            generator = generator[0]
        if isinstance(generator, torch.Generator):
            return int(generator.initial_seed()) % 2**62  # a generator seeded at random may hold any 64-bit seed
        if generator is not None:
            raise LayergenError("generator must be one torch.Generator (a layout is one image; its layers derive "
                                f"their seeds from it), got {type(generator).__name__}; or pass seed=")
        return secrets.randbits(31)

    # -- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str | None = None, layout=None, height: int | None = None, width: int | None = None,
                 background_prompt: str | None = None, background=None, num_inference_steps: int = 20,
                 guidance_scale: float = 5.0, negative_prompt: str | None = None, seed: int | None = None,
                 generator: torch.Generator | None = None, attention: str = "region", fill: float = 0.65,
                 min_region_size: int | None = None, box_fit: str = "scale", margin: float = 0.25,
                 joint: bool = True, max_batch: int = 16,
                 anonymous_order: str = "layout", tta: bool = True, output_type: str = "pil",
                 return_dict: bool = True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), cross_attention_kwargs: dict | None = None):
        """Generate a layered image.

        `layout`: a `Layout`, or a list of boxes: `Box`, (x, y, w, h), (x, y, w, h, prompt), dicts
        or "x,y,w,h:prompt" strings (canvas = `width` x `height`, default the model's size).
        `background`: an image to use instead of generating one. `attention`: "region" (crop per
        layer) or "full" (whole canvas per layer, the baseline). `fill`: box side / crop side.
        `min_region_size`: crops whose longer side is below this (pixels) are denoised upsampled to
        it; None = the model's native size (`default_size()`: a small UNet like the mini degrades on
        latents smaller than it was trained on), 0 = never. `box_fit` / `margin`: "scale" (fit the
        drawn object to its box) or "crop" (hard: cut to the box); see `RegionSettings`.
        `joint`: batch layers with disjoint boxes (False: strictly one after another).
        `output_type`: "pil", "np" (uint8) or "stack". `generator`: one torch.Generator (or a list holding
        one); the background and the boxes derive their seeds from it."""
        layout = self._layout(prompt, layout, height, width, background_prompt)
        self._check(num_inference_steps, guidance_scale, max_batch, output_type)
        if min_region_size is None:
            min_region_size = self.default_size()
        settings = RegionSettings(attention, fill, min_region_size or None, box_fit, margin).check()
        bad = [k for k in (callback_on_step_end_tensor_inputs or []) if k not in self._callback_tensor_inputs]
        if bad:
            raise LayergenError(f"callback tensor inputs {bad} not in {self._callback_tensor_inputs}")
        self._guidance_scale = float(guidance_scale)
        self._interrupt = False
        self._cross_attention_kwargs = cross_attention_kwargs
        W, H = layout.width, layout.height
        if W < self.vae_scale_factor or H < self.vae_scale_factor:
            raise LayergenError(f"canvas must be at least {self.vae_scale_factor}x{self.vae_scale_factor}")
        base_seed = check_seed(self._resolve_seed(seed, generator), "seed", len(layout) + 1)  # boxes: seed + 1 + i
        prompts, bound, unassigned = assign_prompts(layout, anonymous_order)
        bg_prompt = background_prompt_of(layout)
        regions = []
        for i, (box, p) in enumerate(zip(layout.boxes, prompts)):
            seed_i = box.seed if box.seed is not None else base_seed + 1 + i
            regions.append(self._region(i, box, p, seed_i, W, H, settings))
        waves = self._waves(layout.boxes, joint)

        n_loops = sum(-(-sum(1 for r in regions if waves[r.index] == w and r.work == wk) // max_batch)
                      for w in set(waves) for wk in {r.work for r in regions if waves[r.index] == w})
        with self.progress_bar(total=num_inference_steps * (n_loops + (background is None))) as bar:
            if background is None:
                bg_px = self._background(bg_prompt, base_seed, W, H, num_inference_steps, negative_prompt,
                                         progress_bar=bar, callback_on_step_end=callback_on_step_end,
                                         callback_tensor_inputs=callback_on_step_end_tensor_inputs or ())
                bg_meta = self._provenance(bg_prompt, base_seed, num_inference_steps, guidance_scale, "background")
            else:
                t = to_rgba_tensor(background, H, W)[0].permute(1, 2, 0).numpy()
                bg_px = np.floor(t * 255 + 0.5).astype(np.uint8)
                bg_px[..., 3] = 255
                bg_meta = {"kind": "background", "source": "input"}
            bg_layer = Layer(bg_px, name="background", metadata=bg_meta)
            layers: dict[int, Layer] = {}
            for w in sorted(set(waves)):
                done = [bg_layer] + [layers[i] for i in sorted(layers)]
                below = composite_layers(W, H, done)
                todo = [r for r in regions if waves[r.index] == w]
                pixels = self._generate_layers(todo, below, W, H, num_inference_steps, negative_prompt, tta,
                                               max_batch, bar, callback_on_step_end,
                                               callback_on_step_end_tensor_inputs or ())
                for r in todo:
                    layers[r.index] = self._layer(r, pixels[r.index], bound[r.index], num_inference_steps,
                                                  guidance_scale, wave=w)
        meta = {"prompt": layout.prompt, "background_prompt": bg_prompt, "layout": layout.to_dict(),
                "seed": base_seed, "pipeline": type(self).__name__, "attention": attention}
        if unassigned:
            meta["unassigned_phrases"] = unassigned
        stack = LayerStack(W, H, [bg_layer] + [layers[i] for i in range(len(regions))], metadata=meta)
        return self._output([stack], output_type, return_dict)

    # -- repaint ---------------------------------------------------------------------------------
    @torch.no_grad()
    def repaint(self, stack: LayerStack, index, prompt: str | None = None, seed: int | None = None,
                box=None, num_inference_steps: int | None = None, guidance_scale: float | None = None,
                negative_prompt: str | None = None, tta: bool = True, output_type: str = "stack",
                return_dict: bool = True):
        """Regenerate one layer; every other layer keeps bit-identical pixels.

        `index`: stack position (0 = background), negative index, name or the Layer. A layer is
        redrawn with task 1 conditioned on the composite of the layers *below* it; the
        background with task 2 conditioned on the (transparent) composite of the layers above.
        Unset arguments come from the layer's metadata (prompt, box, steps, guidance, region
        settings); `seed=None` draws a fresh seed (pass the old one to keep it). `box`:
        (x, y, w, h), a `Box` or "x,y,w,h" - a new place for the layer. The input stack is not
        modified; the result is a new stack (`output_type="stack"` by default)."""
        if not isinstance(stack, LayerStack):
            raise LayergenError(f"repaint needs a LayerStack, got {type(stack).__name__}")
        i = stack.index(index)
        old = stack.layers[i]
        meta = dict(old.metadata)
        steps = num_inference_steps or int(meta.get("steps") or 20)
        gs = float(guidance_scale if guidance_scale is not None else meta.get("guidance_scale", 5.0))
        self._check(steps, gs, 1, output_type)
        self._guidance_scale = gs
        self._interrupt = False
        self._cross_attention_kwargs = None
        if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
            raise LayergenError(f"prompt is empty; describe the new layer, or pass prompt=None to keep {old.name!r}'s")
        new_prompt = prompt if prompt is not None else meta.get("prompt")
        if not isinstance(new_prompt, str) or not new_prompt.strip():
            raise LayergenError(f"layer {old.name!r} has no prompt in its metadata; pass prompt=...")
        new_seed = check_seed(seed) if seed is not None else secrets.randbits(31)
        out = stack.copy()
        W, H = stack.width, stack.height
        is_background = i == 0 and (old.kind in (None, "background"))
        if is_background:
            if box is not None:
                raise LayergenError("the background covers the canvas; it takes no box")
            above = composite_layers(W, H, stack.layers[1:]) if len(stack) > 1 else None
            with self.progress_bar(total=steps) as bar:
                px = self._background(new_prompt, new_seed, W, H, steps, negative_prompt, above, bar)
            meta.update(self._provenance(new_prompt, new_seed, steps, gs, "background"))
            meta["conditioned_on"] = "layers above"
            out.layers[i] = Layer(px, name=old.name, x=0, y=0, opacity=old.opacity, blend_mode=old.blend_mode,
                                  visible=old.visible, metadata=meta)
        else:
            if i == 0:
                raise LayergenError("layer 0 is not a background; repaint needs a layer above something")
            if box is None:
                b = meta.get("box")
                box = tuple(b) if b is not None else (old.x, old.y, old.width, old.height)
            if isinstance(box, str):
                from ..layout import parse_box

                box = parse_box(box)
            new_box = Layout.from_boxes([box], W, H, prompt=new_prompt).boxes[0]
            new_box.prompt, new_box.seed = new_prompt, new_seed
            region = self._region(int(meta.get("layout_index", i - 1)), new_box, new_prompt, new_seed, W, H,
                                  RegionSettings.from_metadata(meta))
            below = composite_layers(W, H, stack.layers[:i])
            with self.progress_bar(total=steps) as bar:
                px = self._generate_layers([region], below, W, H, steps, negative_prompt, tta, 1, bar)
            layer = self._layer(region, px[region.index], True if prompt is not None else meta.get("bound", True),
                                steps, gs)
            layer.name = old.name if prompt is None else f"{region.index + 1}: {new_prompt[:48]}"
            layer.opacity, layer.blend_mode, layer.visible = old.opacity, old.blend_mode, old.visible
            layer.metadata["repainted_from_seed"] = meta.get("seed")
            out.layers[i] = layer
        return self._output([out], output_type, return_dict)
