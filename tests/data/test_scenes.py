import numpy as np
import pytest

from layergen.data.scenes import (COLOURS, EXTRA_SHAPES, GLYPHS, HELDOUT_SEED_START, SHAPES, make_object_layer,
                                  make_scene, object_on_neutral, shape_mask)


def test_scene_is_deterministic_by_seed_and_differs_across_seeds():
    a, b, c = make_scene(42, 96), make_scene(42, 96), make_scene(43, 96)
    assert np.array_equal(a.composite, b.composite) and a.caption == b.caption
    assert all(np.array_equal(x.rgba, y.rgba) for x, y in zip(a.objects, b.objects))
    assert not np.array_equal(a.composite, c.composite)


@pytest.mark.parametrize("size", [64, 200, 512])
def test_scene_sizes_and_structure(size):
    s = make_scene(7, size, num_objects=(2, 4))
    assert s.composite.shape == (size, size, 3) and s.background.shape == (size, size, 3)
    assert 2 <= len(s.objects) <= 4
    for o in s.objects:
        assert o.rgba.shape == (size, size, 4) and o.rgba.dtype == np.uint8
        x0, y0, x1, y1 = o.box
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        assert o.colour in o.caption and o.caption.startswith(("a ", "an "))
    assert s.caption.endswith(s.background_caption)


def test_composite_equals_stack_composite_and_objects_change_pixels():
    s = make_scene(3, 128, num_objects=3)
    stack = s.to_stack()
    assert len(stack) == 4 and stack[0].metadata["kind"] == "background"
    assert np.array_equal(stack.composite()[..., :3], s.composite)
    assert np.abs(s.composite.astype(int) - s.background.astype(int)).sum() > 0


def test_every_shape_colour_and_glyph_renders_antialiased():
    for shape in SHAPES + EXTRA_SHAPES + GLYPHS[:3]:
        m = shape_mask(shape, 64, 32, 32, 20)
        assert m.max() == 1.0 and 0.03 < m.mean() < 0.8, shape
        partial = ((m > 0) & (m < 1)).sum()
        assert partial > 10, f"{shape} edges are not anti-aliased"
    assert len(COLOURS) == 12 and len(SHAPES) >= 8


def test_materials_make_transparency_matter():
    glass = make_object_layer(5, 128, shape="circle", colour="red", material="glass", effect="none")
    body = glass.rgba[..., 3][glass.body_alpha > 0.25]
    assert 0.3 * 255 - 2 <= np.median(body) <= 0.7 * 255 + 2
    shadow = make_object_layer(5, 128, shape="square", colour="blue", material="solid", effect="shadow")
    outside = shadow.effect_alpha[shadow.body_alpha == 0]
    assert outside.max() > 0.3, "drop shadow must live in the object's own layer"
    sh_px = shadow.rgba[(shadow.effect_alpha > 0.2) & (shadow.body_alpha == 0)]
    assert sh_px[:, :3].max() < 40, "shadow is dark"
    glow = make_object_layer(5, 128, shape="star", colour="yellow", effect="glow")
    g = glow.rgba[(glow.effect_alpha > 0.2) & (glow.body_alpha == 0)]
    assert g[:, 0].min() > 150 and g[:, 1].min() > 150, "glow is a light tint of the object colour"
    assert "glass" in glass.caption and "shadow" in shadow.caption and "glow" in glow.caption


def test_object_on_neutral_premultiplies_onto_grey():
    o = make_object_layer(1, 64)
    img = object_on_neutral(o.rgba)
    transparent = o.rgba[..., 3] == 0
    assert np.allclose(img[transparent], 0.5)
    opaque = o.rgba[..., 3] == 255
    assert np.allclose(img[opaque], o.rgba[opaque][:, :3] / 255.0)


def test_extra_shapes_never_sampled_by_default():
    shapes = {make_object_layer(s, 64).shape for s in range(300)}
    assert not shapes & set(EXTRA_SHAPES)
    assert set(SHAPES) <= shapes


def test_heldout_split_is_disjoint():
    from layergen.data.datasets import SceneImageDataset, heldout

    train, test = SceneImageDataset(64, length=10), heldout(SceneImageDataset, 10, size=64)
    assert test.seed_offset == HELDOUT_SEED_START and train.seed_offset + len(train) <= HELDOUT_SEED_START
    x = train[0]["pixel_values"]
    assert x.shape == (3, 64, 64) and -1 <= float(x.min()) and float(x.max()) <= 1
    assert not np.array_equal(train[0]["pixel_values"].numpy(), test[0]["pixel_values"].numpy())


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        make_scene(0, 8)
    with pytest.raises(ValueError):
        make_object_layer(0, 64, shape="dodecahedron")
    with pytest.raises(ValueError):
        make_object_layer(0, 64, colour="mauve")


def test_training_samples_can_exclude_heldout_combinations():
    from layergen.data.scenes import HELDOUT_COMBINATIONS

    pairs = {(o.shape, o.colour) for o in (make_object_layer(s, 64, exclude_heldout=True) for s in range(600))}
    assert not pairs & HELDOUT_COMBINATIONS
    every = {(o.shape, o.colour) for o in (make_object_layer(s, 64) for s in range(600))}
    assert every & HELDOUT_COMBINATIONS, "without the flag, held-out pairs do occur"
