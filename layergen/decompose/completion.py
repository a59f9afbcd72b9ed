"""Background completion: fill the hole an instance leaves behind.

Every completer is a callable `completer(image, hole) -> image`: `image` is
float32 `H x W x 3` in [0, 1], `hole` a bool `H x W` mask; the result equals
`image` outside the hole (exactly — the decomposition relies on it to keep the
re-composite identical to the input) and is a plausible background inside.

* `OpenCVInpainting` — Telea / Navier-Stokes, the CPU baseline, works on photos.
* `PyramidFill` — push-pull (mask-weighted Gaussian pyramid) fill: smooth,
  fast, exact on gradients; the best cheap choice for flat design backgrounds.
* `StructureFill` — for backgrounds that vary along one direction only
  (gradients, stripes, horizons): fills along the iso-lines, exact there;
  falls back to another completer when the known pixels are not 1-D.
* `DiffusersInpainting` — any diffusers inpainting pipeline the user has weights for.
* `LearnedCompletion` lives in `layergen.decompose.learned` (the mini decomposer).
"""
from __future__ import annotations

import numpy as np

from ..errors import LayergenError


def _check(image: np.ndarray, hole: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image, np.float32)
    hole = np.asarray(hole).astype(bool)
    if image.ndim != 3 or image.shape[2] != 3:
        raise LayergenError(f"completion expects an H x W x 3 image, got shape {image.shape}")
    if hole.shape != image.shape[:2]:
        raise LayergenError(f"hole mask is {hole.shape[1]}x{hole.shape[0]} but the image is "
                            f"{image.shape[1]}x{image.shape[0]}")
    return image, hole


class BackgroundCompleter:
    """Base class: subclasses implement `fill(image, hole)`; `__call__` guarantees the outside is untouched."""

    name = "completer"

    def __call__(self, image: np.ndarray, hole: np.ndarray, ignore: np.ndarray | None = None) -> np.ndarray:
        """Fill `hole`; pixels in `ignore` (other objects still in the image) are kept but not learnt from."""
        image, hole = _check(image, hole)
        if not hole.any():
            return image.copy()
        if hole.all():
            raise LayergenError("the hole covers the whole image; nothing is left to complete the background from")
        work = hole
        if ignore is not None:
            work = hole | np.asarray(ignore).astype(bool)
            if work.mean() > 0.97:  # too little left to learn from: ignore the ignore mask
                work = hole
        filled = np.clip(np.asarray(self.fill(image, work), np.float32), 0.0, 1.0)
        out = image.copy()
        out[hole] = filled[hole]
        return out

    def fill(self, image: np.ndarray, hole: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class OpenCVInpainting(BackgroundCompleter):
    """`cv2.inpaint` (Telea fast marching or Navier-Stokes): classic, no weights, smears large holes."""

    name = "opencv"

    def __init__(self, method: str = "telea", radius: int = 5):
        if method not in ("telea", "ns"):
            raise LayergenError(f"unknown OpenCV inpainting method {method!r}; expected 'telea' or 'ns'")
        self.method, self.radius = method, int(radius)

    def fill(self, image, hole):
        import cv2

        flag = cv2.INPAINT_TELEA if self.method == "telea" else cv2.INPAINT_NS
        u8 = np.floor(image * 255.0 + 0.5).astype(np.uint8)
        out = cv2.inpaint(u8, hole.astype(np.uint8) * 255, self.radius, flag)
        return out.astype(np.float32) / 255.0

    def __repr__(self) -> str:
        return f"OpenCVInpainting(method={self.method!r}, radius={self.radius})"


class PyramidFill(BackgroundCompleter):
    """Push-pull fill: average the known pixels down a pyramid, then pull the coarse estimate back up.

    Why: design backgrounds are mostly gradients and flat colours; push-pull
    reproduces those almost exactly and costs a few milliseconds, where Telea
    drags edge colours into the hole.
    """

    name = "pyramid"

    def fill(self, image, hole):
        import cv2

        weight = (~hole).astype(np.float32)
        colour = image * weight[..., None]
        levels = []
        c, w = colour, weight
        while min(c.shape[:2]) > 1:
            levels.append((c, w))
            h2, w2 = (c.shape[0] + 1) // 2, (c.shape[1] + 1) // 2
            c = cv2.resize(c, (w2, h2), interpolation=cv2.INTER_AREA)
            w = cv2.resize(w, (w2, h2), interpolation=cv2.INTER_AREA)
        # coarsest level: fill with the global mean of what is known
        est = np.where(w[..., None] > 1e-6, c / np.maximum(w[..., None], 1e-6), colour.sum((0, 1)) / weight.sum())
        for c_l, w_l in reversed(levels):
            up = cv2.resize(est, (c_l.shape[1], c_l.shape[0]), interpolation=cv2.INTER_LINEAR)
            if up.ndim == 2:
                up = up[..., None]
            known = np.where(w_l[..., None] > 1e-6, c_l / np.maximum(w_l[..., None], 1e-6), 0.0)
            a = np.clip(w_l, 0.0, 1.0)[..., None]
            est = a * known + (1.0 - a) * up
        return est


class BiharmonicFill(BackgroundCompleter):
    """scikit-image biharmonic inpainting: smooth, continues gradients and soft textures well.

    Large images are filled at a reduced resolution (`max_side`) inside the
    hole's bounding box, since the sparse solve grows with the hole.
    """

    name = "biharmonic"

    def __init__(self, max_side: int = 256):
        self.max_side = int(max_side)

    def fill(self, image, hole):
        import cv2
        from skimage.restoration import inpaint_biharmonic

        h, w = hole.shape
        scale = min(1.0, self.max_side / max(h, w))
        if scale >= 1.0:
            return inpaint_biharmonic(image, hole, channel_axis=-1)
        sw, sh = max(2, int(round(w * scale))), max(2, int(round(h * scale)))
        small = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA)
        small_hole = cv2.resize(hole.astype(np.uint8), (sw, sh), interpolation=cv2.INTER_AREA) > 0
        if small_hole.all():
            return PyramidFill().fill(image, hole)
        filled = inpaint_biharmonic(small, small_hole, channel_axis=-1)
        up = cv2.resize(filled.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
        return up


def _structure_direction(image: np.ndarray, known: np.ndarray) -> tuple[float, float]:
    """Dominant gradient angle and its coherence: colour structure tensor over the known pixels.

    Colour, not gray: two background colours of equal brightness must still count as an edge.
    """
    import cv2

    if image.ndim == 2:
        image = image[..., None]
    blur = cv2.GaussianBlur(image, (0, 0), 1.0)
    if blur.ndim == 2:
        blur = blur[..., None]
    gx = cv2.Sobel(blur, cv2.CV_32F, 1, 0, ksize=3).reshape(blur.shape)
    gy = cv2.Sobel(blur, cv2.CV_32F, 0, 1, ksize=3).reshape(blur.shape)
    inner = cv2.erode(known.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    jxx, jyy, jxy = ((gx * gx).sum(-1)[inner].sum(), (gy * gy).sum(-1)[inner].sum(),
                     (gx * gy).sum(-1)[inner].sum())
    trace = jxx + jyy
    if trace < 1e-8:
        return 0.0, 1.0  # flat colour: any direction is exact
    coherence = float(np.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2) / trace)
    return 0.5 * float(np.arctan2(2 * jxy, jxx - jyy)), coherence


def fit_profile(image: np.ndarray, known: np.ndarray, angle: float, bin_width: float = 0.25):
    """Background as a function of one coordinate `u = x cos(angle) + y sin(angle)`.

    Returns the model image (H x W x 3) and its median absolute error on the
    known pixels; per-bin medians (and the median error) keep objects left in `known` from deciding.
    """
    h, w = known.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    idx = np.floor((u - float(u.min())) / bin_width).astype(np.int64)
    nb = int(idx.max()) + 1
    kidx, kval = idx[known], image[known]
    counts = np.bincount(kidx, minlength=nb)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    have = counts > 0
    prof = np.zeros((nb, 3), np.float32)
    centres = np.arange(nb, dtype=np.float32)
    for c in range(3):
        order = np.lexsort((kval[:, c], kidx))
        med = kval[order, c][starts[have] + counts[have] // 2]
        prof[:, c] = np.interp(centres, centres[have], med)
    model = prof[idx]
    err = np.abs(model[known] - kval).max(-1)
    err = float(np.median(err) + 0.25 * err.mean()) if len(err) else np.inf
    return model, err


class StructureFill(BackgroundCompleter):
    """Fill along the iso-lines of a background that varies in one direction only.

    Why: gradients, stripes and horizons are the common design backgrounds
    and every generic inpainter (Telea, push-pull) blurs stripes away; a 1-D
    profile fitted to the known pixels continues them exactly. When the known
    pixels are not 1-D (photos, 2-D textures), `fallback` fills instead.
    """

    name = "structure"

    def __init__(self, fallback: BackgroundCompleter | None = None, max_error: float = 3.0 / 255.0,
                 min_coherence: float = 0.8):
        self.fallback = fallback if fallback is not None else BiharmonicFill()
        self.max_error, self.min_coherence = float(max_error), float(min_coherence)

    def fill(self, image, hole):
        model = self.model(image, hole)
        return self.fallback(image, hole) if model is None else model

    def model(self, image, hole):
        """The 1-D background model, or None when the known pixels are not 1-D."""
        known = ~hole
        angle, coherence = _structure_direction(image, known)
        if coherence < self.min_coherence and self.min_coherence > 0:
            # No dominant direction: a 2-D texture, or a plain colour (the commonest design background, a 1-D
            # profile at any angle). Accept the plain case: the smooth fallback would continue the slope of a
            # shadow's tail at the hole's edge into a dark blob under the object.
            model, err = fit_profile(image, known, 0.0)
            return model if err <= self.max_error else None
        # coarse-to-fine search around the tensor's angle (edges near the hole bias it slightly);
        # the axis directions are tried too, since horizons and gradients are often axis-aligned
        starts = [(fit_profile(image, known, a)[1], a) for a in (angle, 0.0, np.pi / 2)]
        best_err, best_angle = min(starts)
        step = 0.02
        while step > 0.0005:
            for a in (best_angle - step, best_angle + step):
                err = fit_profile(image, known, a)[1]
                if err < best_err:
                    best_angle, best_err = a, err
            step /= 2
        model, err = fit_profile(image, known, best_angle)
        return model if err <= self.max_error else None

    def __repr__(self) -> str:
        return f"StructureFill(fallback={self.fallback!r})"


class DiffusersInpainting(BackgroundCompleter):
    """Any diffusers inpainting pipeline (SD / SDXL inpaint, or a folder path to load one).

    The pipeline sees the image at `resolution` (multiple of 8), the hole
    dilated a little; its output is resized back and pasted into the hole only.
    """

    name = "diffusers"

    def __init__(self, pipeline, prompt: str = "background", negative_prompt: str = "object, person, text",
                 num_inference_steps: int = 30, resolution: int = 512, seed: int = 0, **kwargs):
        if isinstance(pipeline, str):
            try:
                from diffusers import AutoPipelineForInpainting

                pipeline = AutoPipelineForInpainting.from_pretrained(pipeline)
            except (OSError, ValueError) as exc:
                from ..errors import ModelNotFoundError

                raise ModelNotFoundError(f"cannot load an inpainting pipeline from {pipeline!r}: {exc}") from None
        self.pipeline = pipeline
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self.num_inference_steps, self.resolution, self.seed = int(num_inference_steps), int(resolution), int(seed)
        self.kwargs = kwargs

    def fill(self, image, hole):
        import cv2
        import torch
        from PIL import Image

        h, w = hole.shape
        scale = self.resolution / max(h, w)
        tw, th = max(8, int(round(w * scale / 8)) * 8), max(8, int(round(h * scale / 8)) * 8)
        pil = Image.fromarray(np.floor(image * 255 + 0.5).astype(np.uint8)).resize((tw, th), Image.BICUBIC)
        dil = cv2.dilate(hole.astype(np.uint8), np.ones((5, 5), np.uint8))
        mask = Image.fromarray(dil * 255).resize((tw, th), Image.NEAREST)
        generator = torch.Generator("cpu").manual_seed(self.seed)
        out = self.pipeline(prompt=self.prompt, negative_prompt=self.negative_prompt, image=pil, mask_image=mask,
                            height=th, width=tw, num_inference_steps=self.num_inference_steps,
                            generator=generator, **self.kwargs).images[0]
        out = np.asarray(out.convert("RGB").resize((w, h), Image.BICUBIC), np.float32) / 255.0
        return out

    def __repr__(self) -> str:
        return f"DiffusersInpainting({type(self.pipeline).__name__}, steps={self.num_inference_steps})"


COMPLETERS = {"opencv": OpenCVInpainting, "telea": OpenCVInpainting, "pyramid": PyramidFill,
              "structure": StructureFill, "biharmonic": BiharmonicFill}
