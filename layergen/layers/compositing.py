"""Exact compositing: W3C Compositing and Blending Level 1, source-over.

Why float and premultiplied: blending in 8 bit accumulates rounding error
across layers, and "over" is only associative in premultiplied form. Files and
`Layer.pixels` hold *straight* 8-bit sRGB; we convert to float in [0, 1],
composite premultiplied, and round once at the end (round half up).

For a backdrop (Cb, ab) and a source (Cs, as) — straight colours — the spec's
general formula is

    Cs' = (1 - ab) * Cs + ab * B(Cb, Cs)           # blending
    co  = as * Cs' + ab * Cb * (1 - as)            # source-over, premultiplied
    ao  = as + ab * (1 - as)

with `as` already multiplied by the layer opacity. `add` is the separable
linear-dodge blend function B = min(1, Cb + Cs) under source-over, which is
what Photoshop and Krita call "Linear Dodge (Add)".
"""
from __future__ import annotations

import numpy as np

from ..errors import LayerError


def _normal(cb, cs):
    return cs


def _multiply(cb, cs):
    return cb * cs


def _screen(cb, cs):
    return cb + cs - cb * cs


def _overlay(cb, cs):
    # overlay(Cb, Cs) = hard-light(Cs, Cb): the backdrop decides multiply vs screen.
    return np.where(cb <= 0.5, cs * 2.0 * cb, _screen(2.0 * cb - 1.0, cs))


def _darken(cb, cs):
    return np.minimum(cb, cs)


def _lighten(cb, cs):
    return np.maximum(cb, cs)


def _add(cb, cs):
    return np.minimum(1.0, cb + cs)


BLEND_FUNCTIONS = {
    "normal": _normal,
    "multiply": _multiply,
    "screen": _screen,
    "overlay": _overlay,
    "darken": _darken,
    "lighten": _lighten,
    "add": _add,
}
BLEND_MODES = tuple(BLEND_FUNCTIONS)


def check_blend_mode(mode: str) -> str:
    if mode not in BLEND_FUNCTIONS:
        raise LayerError(f"unknown blend mode {mode!r}; expected one of {', '.join(BLEND_MODES)}")
    return mode


def to_float(rgba_u8: np.ndarray) -> np.ndarray:
    """Straight uint8 RGBA -> straight float32 in [0, 1]."""
    return rgba_u8.astype(np.float32) / 255.0


def premultiply(rgba: np.ndarray) -> np.ndarray:
    out = rgba.copy()
    out[..., :3] *= out[..., 3:4]
    return out


def unpremultiply(rgba_premul: np.ndarray) -> np.ndarray:
    """Premultiplied float -> straight float; colour is 0 where alpha is 0."""
    out = rgba_premul.copy()
    a = out[..., 3:4]
    np.divide(out[..., :3], a, out=out[..., :3], where=a > 0)
    out[..., :3] = np.where(a > 0, np.clip(out[..., :3], 0.0, 1.0), 0.0)
    return out


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Float in [0, 1] -> uint8, rounding half up (so 0.5/255 steps are deterministic)."""
    return np.floor(np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def blend_over(backdrop: np.ndarray, source: np.ndarray, mode: str = "normal", opacity: float = 1.0) -> np.ndarray:
    """Composite `source` (straight float RGBA) over `backdrop` (premultiplied float RGBA).

    Returns the new premultiplied backdrop. Both arrays have the same shape.
    """
    blend = BLEND_FUNCTIONS[check_blend_mode(mode)]
    a_s = source[..., 3:4] * np.float32(opacity)
    a_b = backdrop[..., 3:4]
    c_s = source[..., :3]
    c_b = np.zeros_like(backdrop[..., :3])
    np.divide(backdrop[..., :3], a_b, out=c_b, where=a_b > 0)
    c_s_blended = (1.0 - a_b) * c_s + a_b * blend(c_b, c_s)
    out = np.empty_like(backdrop)
    out[..., :3] = a_s * c_s_blended + backdrop[..., :3] * (1.0 - a_s)
    out[..., 3:4] = a_s + a_b * (1.0 - a_s)
    return out


def composite_layers(width: int, height: int, layers, background=None) -> np.ndarray:
    """Flatten visible layers (bottom -> top) onto a `height x width` canvas.

    Returns straight uint8 RGBA. `background` (optional straight uint8 RGBA of
    canvas size) is placed below everything, e.g. a checkerboard for previews.
    """
    canvas = np.zeros((height, width, 4), np.float32)
    if background is not None:
        canvas = premultiply(to_float(background))
    for layer in layers:
        if not layer.visible or layer.opacity <= 0:
            continue
        h, w = layer.pixels.shape[:2]
        x0, y0 = max(layer.x, 0), max(layer.y, 0)
        x1, y1 = min(layer.x + w, width), min(layer.y + h, height)
        if x0 >= x1 or y0 >= y1:
            continue
        src = to_float(layer.pixels[y0 - layer.y:y1 - layer.y, x0 - layer.x:x1 - layer.x])
        canvas[y0:y1, x0:x1] = blend_over(canvas[y0:y1, x0:x1], src, layer.blend_mode, layer.opacity)
    return to_uint8(unpremultiply(canvas))
