"""LayerStack editing: the operations the studio and the pipelines rely on."""
import numpy as np
import pytest

from layergen.errors import LayerError
from layergen.layers import Layer, LayerStack


def solid(h, w, rgba):
    return np.broadcast_to(np.array(rgba, np.uint8), (h, w, 4)).copy()


def make_stack():
    rng = np.random.default_rng(0)
    s = LayerStack(16, 12)
    s.add(Layer(solid(12, 16, (40, 80, 120, 255)), "bg", metadata={"kind": "background"}))
    s.add(Layer(rng.integers(0, 256, (6, 7, 4), dtype=np.uint8), "a", x=3, y=2))
    s.add(Layer(rng.integers(0, 256, (5, 9, 4), dtype=np.uint8), "b", x=-2, y=8, blend_mode="multiply",
                opacity=0.6))
    return s


def test_add_index_remove_and_lookup():
    s = make_stack()
    top = s.add(Layer(solid(1, 1, (1, 2, 3, 4)), "c"))
    assert s.names() == ["bg", "a", "b", "c"] and s[-1] is top and s["a"] is s[1]
    s.add(Layer(solid(1, 1, (0, 0, 0, 0)), "under"), index=0)
    assert s.names() == ["under", "bg", "a", "b", "c"]
    assert s.remove("under").name == "under" and s.names() == ["bg", "a", "b", "c"]
    with pytest.raises(LayerError, match="no layer named 'zz'"):
        s["zz"]
    with pytest.raises(LayerError, match="out of range"):
        s[7]


def test_move_and_reorder():
    s = make_stack()
    s.move("a", -4, 9)
    assert (s["a"].x, s["a"].y) == (-4, 9)
    s.reorder("b", 0)
    assert s.names() == ["b", "bg", "a"]
    s.reorder("b", -1)
    assert s.names() == ["bg", "a", "b"]
    with pytest.raises(LayerError):
        s.reorder("a", 3)


def test_offsets_no_format_could_store_are_refused():
    s = make_stack()
    s.move("a", -(2**24), 2**24)
    assert s["a"].x == -(2**24)
    with pytest.raises(LayerError, match="too far from the canvas"):
        s.move("a", 2**24 + 1, 0)
    with pytest.raises(LayerError, match="too far from the canvas"):
        Layer(solid(2, 2, (0, 0, 0, 255)), y=-(2**31))


def test_duplicate_is_deep_and_placed_above():
    s = make_stack()
    dup = s.duplicate("a")
    assert s.names() == ["bg", "a", "a copy", "b"]
    assert np.array_equal(dup.pixels, s["a"].pixels) and dup.pixels is not s["a"].pixels
    dup.pixels[0, 0] = 0
    assert not np.array_equal(dup.pixels, s["a"].pixels)


@pytest.mark.parametrize("upper", ["a", "b"])
def test_merge_down_preserves_composite(upper):
    s = make_stack()
    if upper == "b":
        s.reorder("a", 0)  # b (multiply, opacity .6, partly off-canvas) onto an opaque bg
        s["bg"].pixels[...] = solid(12, 16, (200, 150, 90, 255))
    before = s.composite()
    merged = s.merge_down(upper)
    after = s.composite()
    assert len(s) == 2
    # the merged layer is re-quantised to 8 bits once; allow that single rounding step
    assert np.abs(before.astype(int) - after.astype(int)).max() <= 1
    assert merged.name == s.layers[s.index(merged)].name


def test_merge_down_exact_for_opaque_normal_layers():
    s = LayerStack(6, 4)
    s.add(Layer(solid(4, 6, (10, 20, 30, 255)), "bg"))
    s.add(Layer(solid(2, 2, (200, 100, 0, 255)), "top", x=5, y=3))  # extends past the canvas
    before = s.composite()
    merged = s.merge_down("top")
    assert np.array_equal(before, s.composite())
    assert merged.bbox == (0, 0, 7, 5)  # grew to hold the off-canvas part, nothing clipped
    with pytest.raises(LayerError, match="bottom layer"):
        s.merge_down(0)


def test_flatten():
    s = make_stack()
    before = s.composite()
    flat = s.flatten()
    assert len(s) == 1 and flat.kind == "background"
    assert np.array_equal(flat.pixels, before) and np.array_equal(s.composite(), before)


def test_crop_to_content_keeps_canvas_position():
    s = LayerStack(10, 10)
    px = np.zeros((8, 8, 4), np.uint8)
    px[2:5, 3:7] = (9, 8, 7, 100)
    s.add(Layer(px, "p", x=1, y=-1))
    before = s.composite()
    layer = s.crop_to_content("p")
    assert (layer.width, layer.height, layer.x, layer.y) == (4, 3, 4, 1)
    assert np.array_equal(before, s.composite())
    s.add(Layer(np.zeros((2, 2, 4), np.uint8), "empty"))
    with pytest.raises(LayerError, match="fully transparent"):
        s.crop_to_content("empty")


def test_copy_and_equality():
    s = make_stack()
    c = s.copy()
    assert c == s
    c["a"].opacity = 0.5
    assert c != s


def test_invalid_inputs():
    with pytest.raises(LayerError, match="opacity"):
        Layer(solid(1, 1, (0, 0, 0, 0)), opacity=1.5)
    with pytest.raises(LayerError, match="uint8"):
        Layer(np.zeros((2, 2, 4), np.uint16))
    with pytest.raises(LayerError, match="canvas"):
        LayerStack(0, 5)
