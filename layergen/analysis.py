"""An independent analyser of single RGBA layers: which shape, which colour, how clean the alpha, any fringes.

Why it exists: the generation benchmark must score the mini model with something
that is *not* a diffusion model and not trained with it, so a better score means
a better layer, not a model agreeing with itself. Everything here is classical
and deterministic (numpy + OpenCV):

* shape: the object's body is cut out of the alpha channel at a few thresholds,
  its main connected component is normalised (crop to its box, pad to a square,
  resize) and compared by IoU with templates drawn by the same renderer as the
  training data (`layergen.data.scenes.shape_mask`) over a grid of rotations.
  The threshold whose mask matches *some* template best wins, which is how a
  drop shadow or glow (smooth ramps, never a clean shape) is told from the body
  (a flat plateau of alpha, 1 for solid objects, 0.3-0.7 for glass). Holes are
  kept, so a ring is not a circle.
* colour: the alpha-weighted median colour of the body's inner pixels (no edge,
  shadow or glow pixels), nearest in CIELAB to a named colour's prototypes
  (the base colour, +-10 % shading, and its glass tint).
* alpha cleanliness: the fraction of half-transparent pixels away from the
  object's edges (0 for a clean solid cut-out; soft effects and glass raise it).
* fringe check: edge pixels composited over black and over white should lie on
  the straight line between the background and the body colour; the mean
  distance from that line (0-255 units) measures grey or dark halos.

Not a general-purpose recogniser: it knows the procedural vocabulary (`SHAPES`,
`EXTRA_SHAPES`, `COLOURS`) and assumes one object per layer.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from .data.scenes import COLOURS, EXTRA_SHAPES, SHAPES, shape_mask

NORM_SIZE = 40  # side of the normalised mask compared with the templates
TEMPLATE_ANGLES = tuple(range(-30, 31, 3))  # degrees; the renderer draws -15..15, the margin absorbs model drift
NO_OBJECT = "none"
MIN_AREA = 16  # pixels: smaller bodies are reported as "none"


# --------------------------------------------------------------------------------------------
# input coercion


def _as_alpha(alpha) -> np.ndarray:
    """H x W alpha (uint8 0-255 or float 0-1), or an H x W x 4 RGBA array -> float32 in [0, 1]."""
    a = np.asarray(alpha)
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., 3]
    if a.ndim != 2:
        raise ValueError(f"alpha must be H x W (or H x W x 4 RGBA), got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    return np.clip(np.nan_to_num(a.astype(np.float32)), 0.0, 1.0)


def _as_rgba(rgba) -> np.ndarray:
    """H x W x 4 straight RGBA (uint8 or float 0-1), a PIL image or a Layer -> float32 in [0, 1]."""
    if hasattr(rgba, "pixels"):  # Layer
        rgba = rgba.pixels
    if hasattr(rgba, "convert"):  # PIL image
        rgba = np.asarray(rgba.convert("RGBA"))
    a = np.asarray(rgba)
    if a.ndim != 3 or a.shape[2] != 4:
        raise ValueError(f"rgba must be H x W x 4, got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    return np.clip(np.nan_to_num(a.astype(np.float32)), 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# body mask


def body_level(alpha) -> float:
    """Alpha of the object's body: the most common alpha among clearly visible pixels.

    The body is a flat plateau (1.0 solid, 0.3-0.7 glass); shadows and glows are smooth
    ramps that spread over many histogram bins, so they rarely win the vote.
    """
    a = _as_alpha(alpha)
    vis = a[a > 0.15]
    if vis.size == 0:
        return 0.0
    hist, edges = np.histogram(vis, bins=34, range=(0.15, 1.0 + 1e-6))
    k = int(np.argmax(hist))
    return float(min(1.0, edges[k + 1]))


def _fill_small_holes(mask: np.ndarray, max_fraction: float = 0.02) -> np.ndarray:
    """Fill holes smaller than `max_fraction` of the object's area (noise), keep real ones (a ring's)."""
    inv = (~mask).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(inv, connectivity=4)
    out = mask.copy()
    h, w = mask.shape
    limit = max(1, int(max_fraction * mask.sum()))
    for i in range(1, n):
        x, y, bw, bh, area = stats[i]
        touches = x == 0 or y == 0 or x + bw == w or y + bh == h
        if not touches and area <= limit:
            out[labels == i] = True
    return out


def _main_component(mask: np.ndarray) -> np.ndarray:
    """Largest 8-connected component of a boolean mask (empty stays empty)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros_like(mask, dtype=bool)
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == k


def _normalise(mask: np.ndarray, size: int = NORM_SIZE) -> np.ndarray | None:
    """Crop a boolean mask to its box, pad to a centred square, resize: translation/scale invariant."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 4:
        return None
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
    h, w = crop.shape
    side = max(h, w)
    sq = np.zeros((side, side), np.float32)
    y0, x0 = (side - h) // 2, (side - w) // 2
    sq[y0:y0 + h, x0:x0 + w] = crop
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(sq, (size, size), interpolation=interp) >= 0.5


@functools.lru_cache(maxsize=4)
def _templates(shapes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Normalised templates of every shape at every angle in `TEMPLATE_ANGLES`: (N x S*S float32 masks,
    their areas, their shape names)."""
    masks, names = [], []
    canvas, r = 4 * NORM_SIZE, 1.5 * NORM_SIZE
    for shape in shapes:
        for deg in TEMPLATE_ANGLES:
            m = shape_mask(shape, canvas, canvas / 2, canvas / 2, r, math.radians(deg)) >= 0.5
            norm = _normalise(m)
            if norm is not None:
                masks.append(norm.reshape(-1))
                names.append(shape)
    flat = np.stack(masks).astype(np.float32)
    return flat, flat.sum(1), tuple(names)


def _best_template(norm: np.ndarray, shapes: tuple[str, ...]) -> tuple[str, float]:
    temps, areas, names = _templates(shapes)
    m = norm.reshape(-1).astype(np.float32)
    inter = temps @ m
    iou = inter / np.maximum(areas + m.sum() - inter, 1.0)
    k = int(np.argmax(iou))
    return names[k], float(iou[k])


@dataclass
class ShapeMatch:
    shape: str
    confidence: float  # IoU of the normalised body mask with the best template
    mask: np.ndarray  # H x W bool: the body mask that matched best
    threshold: float  # alpha threshold that produced `mask`


def match_shape(alpha, include_extra: bool = True, rgb=None) -> ShapeMatch:
    """The full result of `classify_shape`, with the body mask it chose (used by the colour and fringe checks).

    `alpha` may be an H x W x 4 RGBA array; its colour (or `rgb`, H x W x 3) then adds candidate
    masks restricted to the body's colour, which separates a glass body from a glow of similar alpha.
    """
    arr = np.asarray(alpha)
    if rgb is None and arr.ndim == 3 and arr.shape[2] == 4:
        rgb = _as_rgba(arr)[..., :3]
    full = _as_alpha(arr)
    shapes = SHAPES + (EXTRA_SHAPES if include_extra else ())
    level = body_level(full)
    best = ShapeMatch(NO_OBJECT, 0.0, np.zeros(full.shape, bool), 1.0)
    if level <= 0.0:
        return best
    ys, xs = np.nonzero(full >= 0.1)  # work on the visible region only (+1 px so holes stay holes)
    y0, y1 = max(0, ys.min() - 1), min(full.shape[0], ys.max() + 2)
    x0, x1 = max(0, xs.min() - 1), min(full.shape[1], xs.max() + 2)
    a = full[y0:y1, x0:x1]
    same_colour = None
    if rgb is not None:
        same_colour = _same_colour_as_plateau(a, level, np.asarray(rgb)[y0:y1, x0:x1])
    thresholds = sorted({round(f * level, 3) for f in (0.35, 0.5, 0.7, 0.85)} | {0.5, 0.8})
    min_area = max(MIN_AREA, 0.15 * float((a >= 0.1).sum()))  # a speck of rim or noise is not the body
    seen = []
    for t in thresholds:  # ascending; ties go to the higher threshold (the more conservative body)
        if t > a.max() or t < 0.1:
            continue
        above = a >= t
        for cand in (above, None if same_colour is None else above & same_colour):
            if cand is None or any(np.array_equal(cand, s) for s in seen):
                continue
            seen.append(cand)
            mask = _main_component(_fill_small_holes(cand))
            if mask.sum() < min_area:
                continue
            norm = _normalise(mask)
            if norm is None:
                continue
            name, iou = _best_template(norm, shapes)
            if iou >= best.confidence:
                best = ShapeMatch(name, iou, mask, t)
    if best.shape != NO_OBJECT:
        full_mask = np.zeros(full.shape, bool)
        full_mask[y0:y1, x0:x1] = best.mask
        best.mask = full_mask
    return best


def _same_colour_as_plateau(a: np.ndarray, level: float, rgb, max_delta_e: float = 12.0) -> np.ndarray | None:
    """Pixels whose colour is within `max_delta_e` (CIELAB) of the alpha plateau's median colour."""
    rgb = np.asarray(rgb)
    rgb = rgb.astype(np.float32) / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float32)
    plateau = np.abs(a - level) < 0.04
    if plateau.sum() < 8:
        return None
    lab = srgb_to_lab(np.clip(rgb, 0, 1))
    ref = np.median(lab[plateau], axis=0)
    return np.linalg.norm(lab - ref, axis=-1) < max_delta_e


def classify_shape(alpha, include_extra: bool = True) -> tuple[str, float]:
    """Shape name (from SHAPES, plus EXTRA_SHAPES unless `include_extra=False`) and its confidence.

    `alpha`: H x W uint8 or float in [0, 1], or an H x W x 4 RGBA array (its colour then helps to
    separate the body from a glow or shadow of similar alpha). Confidence is
    the IoU between the normalised body mask and the best template (1 = perfect). An empty
    layer gives ("none", 0.0); any other input gets the nearest shape, however poor the match.
    """
    m = match_shape(alpha, include_extra)
    return m.shape, m.confidence


def body_mask(rgba_or_alpha) -> np.ndarray:
    """H x W bool mask of the object's body (no drop shadow, no glow), as chosen by the shape matcher."""
    return match_shape(rgba_or_alpha).mask


# --------------------------------------------------------------------------------------------
# colour


def srgb_to_lab(rgb) -> np.ndarray:
    """sRGB in [0, 1] (... x 3) -> CIELAB (D65), float64."""
    rgb = np.asarray(rgb, np.float64)
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


@functools.lru_cache(maxsize=1)
def _colour_prototypes() -> tuple[np.ndarray, tuple[str, ...]]:
    """Lab prototypes per colour name: the base colour, +-10 % shading, and the glass tint of each."""
    labs, names = [], []
    for name, rgb in COLOURS.items():
        base = np.asarray(rgb, np.float64) / 255.0
        for shade in (0.9, 1.0, 1.1):
            solid = np.clip(base * shade, 0, 1)
            for variant in (solid, np.clip(solid * 0.85 + 0.15, 0, 1)):
                labs.append(srgb_to_lab(variant))
                names.append(name)
    return np.stack(labs), tuple(names)


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    v, w = values[order], weights[order]
    c = np.cumsum(w)
    return float(v[min(int(np.searchsorted(c, 0.5 * c[-1])), len(v) - 1)])


def body_colour(rgba, mask: np.ndarray | None = None) -> np.ndarray | None:
    """Alpha-weighted median straight RGB (floats in [0, 1]) of the body's inner pixels; None if empty."""
    px = _as_rgba(rgba)
    if mask is None:
        mask = match_shape(px).mask
    if not mask.any():
        vis = px[..., 3] > 0.05
        if not vis.any():
            return None
        mask = vis
    inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    if inner.sum() >= 8:
        mask = inner
    rgb, w = px[..., :3][mask], px[..., 3][mask] + 1e-6
    return np.array([_weighted_median(rgb[:, c], w) for c in range(3)])


def nearest_colour(rgb) -> str:
    """Named colour (a key of COLOURS) nearest in CIELAB to `rgb` (floats in [0, 1])."""
    labs, names = _colour_prototypes()
    d = np.linalg.norm(labs - srgb_to_lab(np.asarray(rgb, np.float64))[None], axis=1)
    return names[int(np.argmin(d))]


def classify_colour(rgba) -> str:
    """Named colour (a key of COLOURS) of the object in an H x W x 4 straight RGBA layer; "none" if empty.

    Uses the body only (shadow, glow and anti-aliased edge pixels are left out), so shading,
    glass transparency and soft effects do not move the answer.
    """
    rgb = body_colour(rgba)
    return NO_OBJECT if rgb is None else nearest_colour(rgb)


# --------------------------------------------------------------------------------------------
# alpha quality


def edge_band(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Pixels within `width` pixels of the mask's boundary (both sides)."""
    k = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    m = mask.astype(np.uint8)
    return (cv2.dilate(m, k) > 0) & ~(cv2.erode(m, k, borderType=cv2.BORDER_REPLICATE) > 0)


def alpha_cleanliness(alpha, band: int = 2) -> float:
    """Fraction of the pixels outside the object's edge band whose alpha is in (0.05, 0.95).

    0 = a clean cut-out (opaque inside, transparent outside, soft only at the edges). Glass
    bodies and soft shadows/glows raise it legitimately; stray haze and speckles raise it too.
    The edge band is `band` pixels either side of the alpha = 0.5 contour.
    """
    a = _as_alpha(alpha)
    outside = ~edge_band(a >= 0.5, band)
    if not outside.any():
        return 0.0
    partial = (a > 0.05) & (a < 0.95)
    return float(partial[outside].mean())


def _distance_to_segments(points: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Distance of each point (N x 3) to the segment from `p0` (3,) to its own end point `p1` (N x 3)."""
    d = p1 - p0
    denom = (d * d).sum(1)
    t = np.clip(((points - p0) * d).sum(1) / np.maximum(denom, 1e-12), 0.0, 1.0)
    return np.linalg.norm(points - (p0 + t[:, None] * d), axis=1)


def _local_body_colour(px: np.ndarray, mask: np.ndarray, fallback: np.ndarray, sigma: float = 3.0) -> np.ndarray:
    """Per-pixel body colour near the body (normalised convolution of the inner pixels), so shading
    across the object is not mistaken for a fringe. H x W x 3; `fallback` where no body is near."""
    inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(np.float32)
    if inner.sum() < 8:
        inner = mask.astype(np.float32)
    w = cv2.GaussianBlur(inner, (0, 0), sigma)
    rgb = cv2.GaussianBlur(px[..., :3] * inner[..., None], (0, 0), sigma)
    ok = w > 1e-3
    out = np.broadcast_to(fallback.astype(np.float32), rgb.shape).copy()
    out[ok] = rgb[ok] / w[ok][:, None]
    return out


def fringe_check(rgba, band: int = 2) -> dict:
    """Fringes at the object's edge, measured on composites over black and over white.

    An anti-aliased edge pixel composited over a background should be a mix of the background
    and the body colour, i.e. lie on the line segment between them; a grey/dark halo (colour
    under partial alpha that is not the body's) moves it off that line. Returns the mean
    distance off the line in 0-255 RGB units for `black` and `white` backgrounds (and their
    `max`), the number of `edge_pixels` measured, and the `body_rgb` used (0-255).
    Alpha errors alone (a too-wide or too-narrow edge) move pixels along the line and are
    not counted. Pixels of a soft shadow/glow right at the edge do count.
    """
    px = _as_rgba(rgba)
    mask = match_shape(px).mask
    return _fringe(px, mask, body_colour(px, mask), band)


def _fringe(px: np.ndarray, mask: np.ndarray, body: np.ndarray | None, band: int) -> dict:
    if body is None or not mask.any():
        return {"black": 0.0, "white": 0.0, "max": 0.0, "edge_pixels": 0, "body_rgb": None}
    a = px[..., 3]
    sel = edge_band(mask, band) & (a > 0.05) & (a < 0.95)
    n = int(sel.sum())
    out = {"edge_pixels": n, "body_rgb": [round(float(c) * 255, 1) for c in body]}
    local = _local_body_colour(px, mask, body)[sel]
    for name, bg in (("black", 0.0), ("white", 1.0)):
        if n == 0:
            out[name] = 0.0
            continue
        aa = a[sel][:, None]
        comp = px[..., :3][sel] * aa + bg * (1 - aa)
        out[name] = float(_distance_to_segments(comp, np.full(3, bg), local).mean() * 255)
    out["max"] = max(out["black"], out["white"])
    return out


def cut_off(mask: np.ndarray) -> bool:
    """Whether a body mask runs into the canvas edge, i.e. the layer holds only part of its object."""
    m = np.asarray(mask, bool)
    return bool(m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())


# --------------------------------------------------------------------------------------------
# everything at once


@dataclass
class LayerAnalysis:
    shape: str
    shape_confidence: float
    colour: str
    alpha_cleanliness: float
    fringe_black: float
    fringe_white: float
    coverage: float  # fraction of the canvas covered by the body
    cut_off: bool  # the body runs into the canvas edge: part of the object is missing from the layer

    def to_dict(self) -> dict:
        return asdict(self)


def analyse_layer(rgba, include_extra: bool = True) -> LayerAnalysis:
    """Shape, colour, alpha cleanliness and fringes of one RGBA layer (uint8 or float H x W x 4, PIL, Layer)."""
    px = _as_rgba(rgba)
    match = match_shape(px, include_extra)
    body = body_colour(px, match.mask)
    fringe = _fringe(px, match.mask, body, 2)
    return LayerAnalysis(shape=match.shape, shape_confidence=round(match.confidence, 4),
                         colour=NO_OBJECT if body is None else nearest_colour(body),
                         alpha_cleanliness=alpha_cleanliness(px[..., 3]), fringe_black=fringe["black"],
                         fringe_white=fringe["white"], coverage=float(match.mask.mean()),
                         cut_off=cut_off(match.mask))


__all__ = ["LayerAnalysis", "ShapeMatch", "alpha_cleanliness", "analyse_layer", "body_colour", "body_level",
           "body_mask", "classify_colour", "classify_shape", "cut_off", "edge_band", "fringe_check", "match_shape",
           "nearest_colour", "srgb_to_lab"]
