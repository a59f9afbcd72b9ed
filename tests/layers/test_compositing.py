"""Compositing against numbers computed here by hand from the W3C Compositing & Blending formulas.

The reference below is plain Python scalar maths written straight from the
spec (float64), independent of layergen.layers.compositing:

    Cs' = (1 - ab) * Cs + ab * B(Cb, Cs)
    co  = as * Cs' + ab * Cb * (1 - as);  ao = as + ab * (1 - as);  C = co / ao
"""
import math

import numpy as np
import pytest

from layergen.errors import LayerError
from layergen.layers import BLEND_MODES, Layer, LayerStack


def _hardlight(cb, cs):
    return cb * 2 * cs if cs <= 0.5 else cb + (2 * cs - 1) - cb * (2 * cs - 1)


REFERENCE_B = {
    "normal": lambda cb, cs: cs,
    "multiply": lambda cb, cs: cb * cs,
    "screen": lambda cb, cs: cb + cs - cb * cs,
    "overlay": lambda cb, cs: _hardlight(cs, cb),
    "darken": min,
    "lighten": max,
    "add": lambda cb, cs: min(1.0, cb + cs),  # linear dodge
}


def ref_over(backdrop, source, mode, opacity=1.0):
    """One pixel: straight 8-bit RGBA backdrop and source -> straight 8-bit RGBA, rounded half up."""
    ab, a_s = backdrop[3] / 255, source[3] / 255 * opacity
    ao = a_s + ab * (1 - a_s)
    out = []
    for c in range(3):
        cb, cs = backdrop[c] / 255, source[c] / 255
        cs2 = (1 - ab) * cs + ab * REFERENCE_B[mode](cb, cs)
        co = a_s * cs2 + ab * cb * (1 - a_s)
        out.append(co / ao if ao > 0 else 0.0)
    return [math.floor(v * 255 + 0.5) for v in out] + [math.floor(ao * 255 + 0.5)]


def composite_pixel(backdrop, source, mode, opacity=1.0):
    stack = LayerStack(1, 1)
    stack.add(Layer(np.array([[backdrop]], np.uint8), "b"))
    stack.add(Layer(np.array([[source]], np.uint8), "s", opacity=opacity, blend_mode=mode))
    return stack.composite()[0, 0].tolist()


CASES = [
    # (backdrop, source, opacity)
    ((200, 100, 30, 255), (100, 180, 240, 255), 1.0),   # both opaque
    ((200, 100, 30, 255), (100, 180, 240, 0), 1.0),     # source alpha 0: backdrop unchanged
    ((200, 100, 30, 255), (100, 180, 240, 77), 1.0),    # partial source alpha over opaque
    ((60, 140, 220, 100), (230, 20, 90, 160), 1.0),     # partial alpha both
    ((60, 140, 220, 100), (230, 20, 90, 255), 0.3),     # layer opacity
    ((0, 0, 0, 0), (230, 20, 90, 160), 1.0),            # transparent backdrop: blend mode irrelevant
    ((90, 201, 129, 255), (140, 60, 250, 200), 0.55),
]


def test_reference_is_hand_checkable():
    # Spot values worked out on paper, to make sure the reference itself is right.
    assert ref_over((200, 100, 30, 255), (100, 180, 240, 255), "multiply") == [78, 71, 28, 255]  # 200*100/255=78.4
    assert ref_over((200, 100, 30, 255), (100, 180, 240, 255), "screen") == [222, 209, 242, 255]  # 1-(55*155)/255^2
    assert ref_over((200, 100, 30, 255), (100, 180, 240, 255), "add") == [255, 255, 255, 255]
    assert ref_over((0, 0, 0, 255), (255, 255, 255, 255), "normal", opacity=0.5) == [128, 128, 128, 255]


@pytest.mark.parametrize("mode", BLEND_MODES)
@pytest.mark.parametrize("backdrop,source,opacity", CASES)
def test_blend_matches_w3c_reference(mode, backdrop, source, opacity):
    assert composite_pixel(backdrop, source, mode, opacity) == ref_over(backdrop, source, mode, opacity)


def test_every_mode_has_a_reference():
    assert set(BLEND_MODES) == set(REFERENCE_B)


@pytest.mark.parametrize("mode", BLEND_MODES)
def test_source_alpha_zero_and_opacity_zero_leave_backdrop(mode):
    b = (17, 99, 201, 180)
    assert composite_pixel(b, (255, 255, 255, 0), mode) == list(b)
    assert composite_pixel(b, (255, 0, 255, 255), mode, opacity=0.0) == list(b)


def test_eight_bit_rounding_half_up():
    # 50% white over black = 127.5 -> 128 (half up), not banker's 128/127 alternation.
    assert composite_pixel((0, 0, 0, 255), (255, 255, 255, 255), "normal", 0.5) == [128, 128, 128, 255]
    # Straight colour survives partial alpha over a transparent canvas exactly (no premultiply loss).
    stack = LayerStack(1, 1, [Layer(np.array([[[255, 3, 129, 1]]], np.uint8))])
    assert stack.composite()[0, 0].tolist() == [255, 3, 129, 1]
    # Fully transparent result has colour 0 (no garbage under alpha 0).
    stack = LayerStack(1, 1, [Layer(np.array([[[255, 3, 129, 0]]], np.uint8))])
    assert stack.composite()[0, 0].tolist() == [0, 0, 0, 0]


def test_three_layer_stack_matches_chained_reference():
    a, b, c = (10, 200, 50, 255), (240, 120, 60, 128), (30, 30, 220, 200)
    stack = LayerStack(1, 1)
    stack.add(Layer(np.array([[a]], np.uint8)))
    stack.add(Layer(np.array([[b]], np.uint8), blend_mode="screen"))
    stack.add(Layer(np.array([[c]], np.uint8), blend_mode="multiply", opacity=0.4))
    # Chain in float64 without intermediate rounding (the library rounds once, at the end).
    ab, a_s = 1.0, 128 / 255
    mid = []
    for i in range(3):
        cb, cs = a[i] / 255, b[i] / 255
        mid.append(a_s * ((1 - ab) * cs + ab * (cb + cs - cb * cs)) + ab * cb * (1 - a_s))
    a_mid = a_s + ab * (1 - a_s)  # = 1 (opaque backdrop)
    a_s = 200 / 255 * 0.4
    out = []
    for i in range(3):
        cb, cs = mid[i] / a_mid, c[i] / 255
        out.append(a_s * ((1 - a_mid) * cs + a_mid * cb * cs) + a_mid * cb * (1 - a_s))
    ao = a_s + a_mid * (1 - a_s)
    expected = [math.floor(v / ao * 255 + 0.5) for v in out] + [math.floor(ao * 255 + 0.5)]
    assert stack.composite()[0, 0].tolist() == expected


def test_offsets_clip_to_canvas_and_hidden_layers_ignored():
    stack = LayerStack(4, 3)
    stack.add(Layer(np.full((2, 2, 4), 255, np.uint8), x=-1, y=2))  # only pixel (0, 2) lands on canvas
    stack.add(Layer(np.full((3, 4, 4), 9, np.uint8), visible=False))
    out = stack.composite()
    assert out[2, 0].tolist() == [255, 255, 255, 255]
    assert out[..., 3].sum() == 255


def test_unknown_blend_mode_is_a_clear_error():
    with pytest.raises(LayerError, match="unknown blend mode 'dodge'"):
        Layer(np.zeros((1, 1, 4), np.uint8), blend_mode="dodge")
