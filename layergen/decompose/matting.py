"""Alpha matting and foreground extraction ("unblending").

Two swappable steps turn an instance proposal into an RGBA layer:

1. **Matting** (`HardMatting`, `ClosedFormMatting`, or the learned decomposer's
   alpha): a coarse mask -> soft alpha of the object *body*.
2. **Extraction** (`Unblend`, `HardCut`): given the input `I` and the completed
   background `B`, recover straight `(F, alpha)` with `I = alpha*F + (1-alpha)*B`.

Why unblending: once `B` is known, every pixel where `I != B` is explained by
the layer, so shadows and glows — which matting alone drops — stay in the
object's layer, and re-compositing the stack reproduces the input exactly.
Per pixel the alpha is chosen among a few colour hypotheses (the object's
dominant colours for glow/edges, black for shadows, white for highlights) as
the one that explains `I - B` best; the colour is then solved exactly, raising
alpha only where the exact colour would leave [0, 1].
"""
from __future__ import annotations

import contextlib
import importlib
import io
import logging
import sys
import threading

import numpy as np

from ..errors import LayergenError

logger = logging.getLogger(__name__)


def import_announced(name: str, message: str, after: float = 3.0):
    """`importlib.import_module(name)`, logging `message` if the import is still running after `after` seconds.

    Why: importing pymatting compiles all its numba kernels the first time after an install (about 50 s on 2
    cores; cached afterwards), and a first decomposition that sits silent that long looks hung.
    """
    module = sys.modules.get(name)
    if module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False):
        return module  # imported already (one another thread is still importing goes through the import lock)
    timer = threading.Timer(after, logger.warning, (message,))
    timer.daemon = True
    timer.start()
    try:
        return importlib.import_module(name)
    finally:
        timer.cancel()


# --------------------------------------------------------------------------- matting
class AlphaMatting:
    """Base class: `matting(image, mask) -> alpha` (float32 H x W in [0, 1])."""

    name = "matting"

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        image = np.asarray(image, np.float32)
        mask = np.asarray(mask, np.float32)
        if mask.shape != image.shape[:2]:
            raise LayergenError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                                f"{image.shape[1]}x{image.shape[0]}")
        if mask.max() <= 0:
            return np.zeros(mask.shape, np.float32)
        return np.clip(self.estimate(image, mask), 0.0, 1.0).astype(np.float32)

    def estimate(self, image, mask):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class HardMatting(AlphaMatting):
    """Alpha = the mask itself, binarised at 0.5 (the naive baseline)."""

    name = "hard"

    def estimate(self, image, mask):
        return (mask >= 0.5).astype(np.float32)


class ClosedFormMatting(AlphaMatting):
    """pymatting closed-form matting on a trimap built from the mask (eroded = sure, dilated = unknown).

    Runs on the mask's bounding box plus a margin, downscaled to at most
    `max_pixels`, because the sparse solve grows with the unknown area.
    """

    name = "closed_form"

    def __init__(self, band: int | None = None, max_pixels: int = 60_000):
        self.band, self.max_pixels = band, int(max_pixels)

    def estimate(self, image, mask):
        import cv2

        estimate_alpha_cf = import_announced(
            "pymatting", "compiling pymatting's numba kernels (once after an install, about a minute)...",
        ).estimate_alpha_cf
        h, w = mask.shape
        hard = mask >= 0.5
        band = self.band or max(2, int(round(0.012 * max(h, w))))
        ys, xs = np.nonzero(hard)
        if len(xs) == 0:
            return np.zeros_like(mask)
        m = 2 * band + 2
        x0, y0 = max(0, xs.min() - m), max(0, ys.min() - m)
        x1, y1 = min(w, xs.max() + m + 1), min(h, ys.max() + m + 1)
        crop_img, crop_mask = image[y0:y1, x0:x1], hard[y0:y1, x0:x1].astype(np.uint8)
        ch, cw = crop_mask.shape
        scale = min(1.0, (self.max_pixels / float(ch * cw)) ** 0.5)
        if scale < 1.0:
            sw, sh = max(4, int(cw * scale)), max(4, int(ch * scale))
            crop_img = cv2.resize(crop_img, (sw, sh), interpolation=cv2.INTER_AREA)
            crop_mask = cv2.resize(crop_mask, (sw, sh), interpolation=cv2.INTER_NEAREST)
            band = max(1, int(round(band * scale)))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * band + 1, 2 * band + 1))
        sure_fg = cv2.erode(crop_mask, kernel)
        maybe = cv2.dilate(crop_mask, kernel)
        trimap = np.where(sure_fg > 0, 1.0, np.where(maybe > 0, 0.5, 0.0))
        if not (trimap == 1.0).any() or not (trimap == 0.0).any():
            alpha = crop_mask.astype(np.float32)
        else:
            # pymatting prints a "PERFORMANCE WARNING" to stdout when its preconditioner retries with a larger
            # shift; the retry succeeds, so it only clutters the CLI's output
            with contextlib.redirect_stdout(io.StringIO()):
                alpha = estimate_alpha_cf(crop_img.astype(np.float64), trimap.astype(np.float64))
            alpha = np.asarray(alpha, np.float32)
        if scale < 1.0:
            alpha = cv2.resize(alpha, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
        out = np.zeros((h, w), np.float32)
        out[y0:y1, x0:x1] = alpha
        return out

    def __repr__(self) -> str:
        return f"ClosedFormMatting(band={self.band})"


# --------------------------------------------------------------------------- extraction
def minimal_alpha(diff: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Smallest alpha for which `F = B + diff/alpha` stays inside [0, 1]^3 (per pixel)."""
    up = np.where(diff > 0, diff / np.maximum(1.0 - background, 1e-6), 0.0)
    down = np.where(diff < 0, -diff / np.maximum(background, 1e-6), 0.0)
    return np.clip(np.maximum(up, down).max(-1), 0.0, 1.0)


def dominant_colours(pixels: np.ndarray, max_colours: int = 4, radius: float = 0.08,
                     min_share: float = 0.04) -> np.ndarray:
    """Greedy mode-seeking colour clustering: the few colours most pixels are close to."""
    pixels = np.asarray(pixels, np.float32).reshape(-1, 3)
    if len(pixels) == 0:
        return np.zeros((0, 3), np.float32)
    if len(pixels) > 20000:
        pixels = pixels[np.random.default_rng(0).choice(len(pixels), 20000, replace=False)]
    remaining = pixels
    colours = []
    for _ in range(max_colours):
        if len(remaining) < max(1, min_share * len(pixels)):
            break
        q = np.floor(np.clip(remaining, 0, 0.9999) * 16).astype(np.int32)
        key = q[:, 0] * 256 + q[:, 1] * 16 + q[:, 2]
        mode = np.bincount(key).argmax()
        centre = remaining[key == mode].mean(0)
        for _ in range(3):  # a few mean-shift steps
            near = np.abs(remaining - centre).max(-1) < radius
            centre = remaining[near].mean(0)
        near = np.abs(remaining - centre).max(-1) < radius
        if near.sum() < min_share * len(pixels):
            break
        colours.append(np.median(remaining[near], 0))
        remaining = remaining[~near]
    return np.asarray(colours, np.float32).reshape(-1, 3)


class ForegroundExtraction:
    """Base class: `extract(image, background, region, alpha_prior) -> (rgb, alpha)` in float32."""

    name = "extraction"

    def __call__(self, image, background, region, alpha_prior=None, fixed=None):
        """`fixed`: pixels whose alpha is already known (e.g. a glass body); the prior is kept there."""
        image = np.asarray(image, np.float32)
        background = np.asarray(background, np.float32)
        region = np.asarray(region).astype(bool)
        if alpha_prior is None:
            alpha_prior = np.zeros(region.shape, np.float32)
        fixed = np.zeros(region.shape, bool) if fixed is None else np.asarray(fixed).astype(bool)
        return self.extract(image, background, region, np.asarray(alpha_prior, np.float32), fixed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class HardCut(ForegroundExtraction):
    """Layer = the input pixels where the prior alpha >= 0.5, fully opaque (the naive baseline)."""

    name = "hard_cut"

    def extract(self, image, background, region, alpha_prior, fixed):
        alpha = ((alpha_prior >= 0.5) & region).astype(np.float32)
        return image * alpha[..., None], alpha


class Unblend(ForegroundExtraction):
    """Recover `(F, alpha)` from `I = alpha F + (1 - alpha) B` inside `region` (see module docstring).

    `tolerance`: differences `|I - B|` below it are treated as background
    (the pipeline then copies `I` into the background there, so nothing is lost).
    `opaque_prior`: prior alpha above it is taken as solid body (alpha 1).
    """

    name = "unblend"

    def __init__(self, tolerance: float = 3.0 / 255.0, opaque_prior: float = 0.98, extra_colours=((0, 0, 0), (1, 1, 1)),
                 glow_tints=(0.25, 0.4, 0.55)):
        self.tolerance, self.opaque_prior = float(tolerance), float(opaque_prior)
        self.glow_tints = tuple(float(t) for t in glow_tints)
        self.extra_colours = np.asarray(extra_colours, np.float32).reshape(-1, 3)

    def extract(self, image, background, region, alpha_prior, fixed):
        h, w = region.shape
        rgb = np.zeros((h, w, 3), np.float32)
        alpha = np.zeros((h, w), np.float32)
        if not region.any():
            return rgb, alpha
        I, B = image[region], background[region]
        D = I - B
        prior = alpha_prior[region]
        changed = np.abs(D).max(-1) > self.tolerance
        # colour hypotheses: the body's dominant colours + black (shadows) + white (highlights)
        body = I[(prior >= 0.5) & changed]
        if len(body) < 8:
            dist = np.abs(D).max(-1)
            body = I[dist >= np.quantile(dist, 0.7)] if changed.any() else I[:0]
        dom = dominant_colours(body)
        # glows are usually a lighter tint of the object's colour: offer a few tints as hypotheses too
        tints = [dom * (1 - t) + t for t in self.glow_tints] if len(dom) else []
        cands = np.concatenate([dom, *tints, self.extra_colours], 0)
        best_a = np.zeros(len(I), np.float32)
        best_r = np.full(len(I), np.inf, np.float32)
        for c in cands:
            v = c[None] - B
            a = np.clip((D * v).sum(-1) / np.maximum((v * v).sum(-1), 1e-6), 0.0, 1.0)
            r = np.abs(D - a[:, None] * v).max(-1)
            better = r < best_r - 1e-6
            best_a = np.where(better, a, best_a)
            best_r = np.where(better, r, best_r)
        a = np.maximum(best_a, np.clip(prior, 0.0, 1.0))
        a = np.where(prior >= self.opaque_prior, 1.0, a)
        a = np.where(fixed[region], np.clip(prior, 0.0, 1.0), a)  # known alpha (glass) stays
        a = np.where(changed, np.maximum(a, minimal_alpha(D, B)), 0.0)
        F = np.where(a[:, None] > 0, B + D / np.maximum(a[:, None], 1e-6), 0.0)
        rgb[region] = np.clip(F, 0.0, 1.0)
        alpha[region] = a
        return rgb, alpha


EXTRACTORS = {"unblend": Unblend, "hard_cut": HardCut}
MATTINGS = {"closed_form": ClosedFormMatting, "hard": HardMatting}
