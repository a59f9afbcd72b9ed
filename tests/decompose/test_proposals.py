import numpy as np
import pytest

from layergen.data.scenes import make_scene
from layergen.decompose.proposals import (AutomaticProposer, BoxProposer, InstanceProposal, MaskProposer,
                                          PointProposer, check_box, order_top_first)
from layergen.errors import LayergenError


def xywh(box):
    x0, y0, x1, y1 = box
    return x0, y0, x1 - x0, y1 - y0


def iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


def contrast(sc, o):
    body = o.body_alpha > 0.5
    return np.percentile(np.abs(sc.composite[body].astype(float) - sc.background[body]).max(-1), 5) / 255


def solid_scene(seed, effect="none"):
    """First seed >= `seed` with one solid, clearly visible object on a 1-D background."""
    for s in range(seed, seed + 500):
        sc = make_scene(s, 96, num_objects=1)
        o = sc.objects[0]
        if o.material == "solid" and o.effect == effect and "noise" not in sc.background_caption \
                and contrast(sc, o) > 0.25:
            return sc
    raise AssertionError("no such scene")


def test_box_proposer_finds_the_body_inside_the_box():
    sc = solid_scene(10)
    o = sc.objects[0]
    img = sc.composite.astype(np.float32) / 255
    (p,) = BoxProposer([xywh(o.box)])(img)
    assert iou(p.mask, o.body_alpha > 0.5) > 0.85
    assert p.region.sum() >= p.mask.sum() and p.source == "box"


def test_box_proposer_keeps_the_shadow_in_the_region():
    sc = solid_scene(0, effect="shadow")
    o = sc.objects[0]
    img = sc.composite.astype(np.float32) / 255
    (p,) = BoxProposer([xywh(o.box)])(img)
    shadow = (o.effect_alpha > 0.2) & (o.body_alpha < 0.01)
    assert shadow.sum() > 10
    assert p.region[shadow].mean() > 0.9 and p.mask[shadow].mean() < 0.2


def test_automatic_proposer_counts_separate_objects():
    rng_ok = 0
    for s in range(200):
        sc = make_scene(s, 96, num_objects=2)
        a, b = sc.objects
        if (a.material, b.material) != ("solid", "solid") or "noise" in sc.background_caption:
            continue
        if "glow" in (a.effect, b.effect):  # a strong glow can come out as an extra instance (documented)
            continue
        if min(contrast(sc, a), contrast(sc, b)) < 0.25:
            continue
        if ((a.rgba[..., 3] > 0) & (b.rgba[..., 3] > 0)).any():
            continue  # want two separate objects
        props = AutomaticProposer()(sc.composite.astype(np.float32) / 255)
        assert len(props) == 2, (s, sc.caption)
        bodies = [o.body_alpha > 0.5 for o in sc.objects]
        for p in props:
            assert max(iou(p.mask, m) for m in bodies) > 0.65
        rng_ok += 1
        if rng_ok == 2:
            break
    assert rng_ok == 2


def test_guidance_is_validated():
    img = np.zeros((40, 60, 3), np.float32)
    with pytest.raises(LayergenError, match="outside the 60x40 image"):
        BoxProposer([(70, 5, 10, 10)])(img)
    with pytest.raises(LayergenError, match="no area"):
        BoxProposer([(5, 5, 0, 10)])(img)
    with pytest.raises(LayergenError, match="four numbers"):
        BoxProposer([("a", 1, 2, 3)])(img)
    with pytest.raises(LayergenError, match="outside the 60x40 image"):
        PointProposer([(10, 40)])(img)
    with pytest.raises(LayergenError, match="mask 0 is 10x10"):
        MaskProposer([np.ones((10, 10), bool)])(img)
    with pytest.raises(LayergenError, match="empty"):
        MaskProposer([np.zeros((40, 60), bool)])(img)
    assert check_box((-5, -5, 20, 20), 40, 60) == (0, 0, 15, 15)  # partly outside: clipped


def test_guidance_is_validated_before_scaling_large_images():
    img = np.zeros((500, 800, 3), np.float32)
    with pytest.raises(LayergenError, match="outside the 800x500 image"):
        BoxProposer([(900, 5, 10, 10)])(img)
    with pytest.raises(LayergenError, match="mask 0 is 400x250"):
        MaskProposer([np.ones((250, 400), bool)])(img)


def test_mask_and_point_proposers():
    sc = solid_scene(30)
    o = sc.objects[0]
    img = sc.composite.astype(np.float32) / 255
    body = o.body_alpha > 0.5
    (pm,) = MaskProposer([body.astype(np.uint8) * 255])(img)
    assert np.array_equal(pm.mask, body)
    ys, xs = np.nonzero(body)
    (pp,) = PointProposer([(int(xs.mean()), int(ys.mean()))])(img)
    assert iou(pp.mask, body) > 0.8


def test_order_top_first_puts_the_unbitten_disc_on_top():
    yy, xx = np.mgrid[0:60, 0:60]
    lower = ((xx - 22) ** 2 + (yy - 30) ** 2) <= 14 ** 2
    upper = ((xx - 38) ** 2 + (yy - 30) ** 2) <= 12 ** 2
    lower_visible = lower & ~upper
    props = [InstanceProposal(lower_visible, lower_visible), InstanceProposal(upper, upper)]
    assert order_top_first(props)[0] is props[1]
    assert order_top_first(props[::-1])[0] is props[1]


def test_faint_shadow_on_stripes_is_not_taken_for_noise():
    # stripe edges inflate a high-pass noise estimate; the effect threshold must follow what the
    # background model actually gets wrong on held-out background (here: almost nothing)
    from layergen.decompose.proposals import fit_background

    sc = solid_scene(0, effect="shadow")
    assert "striped" in sc.background_caption
    img = sc.composite.astype(np.float32) / 255
    model = fit_background(img)
    assert model.flat and model.effect_threshold(0.08) < 0.06


def shadow_on_lower_object_scene():
    for s in range(3000):
        sc = make_scene(s, 96, num_objects=2)
        a, b = sc.objects
        if not (a.material == b.material == "solid" and b.effect == "shadow" and a.effect == "none"
                and "noise" not in sc.background_caption):
            continue
        on = (b.effect_alpha > 0.2) & (a.body_alpha > 0.99) & (b.body_alpha < 0.01)
        if on.sum() >= 30 and np.abs(np.subtract(a.rgba[..., :3].max((0, 1)), b.rgba[..., :3].max((0, 1)),
                                                 dtype=float)).max() >= 60:
            return sc, on
    raise AssertionError("no such scene")


def test_shadow_cast_onto_a_lower_object_joins_the_caster():
    sc, on = shadow_on_lower_object_scene()
    img = sc.composite.astype(np.float32) / 255
    lower, upper = BoxProposer([xywh(o.box) for o in sc.objects])(img)
    assert upper.region[on].mean() > 0.9  # the caster's region holds its shadow on the other object
    assert lower.mask[on].mean() > 0.9  # ... which still belongs to the lower object's body
    assert upper.metadata.get("cast_on") == [0]
