import numpy as np

from layergen.data.scenes import make_scene
from layergen.decompose.metrics import alpha_iou, evaluate, match_layers, rgb_l1, summarise
from layergen.layers import Layer, LayerStack


def test_alpha_iou_and_l1():
    a = np.zeros((4, 4), np.uint8)
    a[:2] = 255
    b = np.zeros((4, 4), np.uint8)
    b[:1] = 255
    assert alpha_iou(a, a) == 1.0 and np.isclose(alpha_iou(a, b), 0.5)
    assert alpha_iou(np.zeros(3), np.zeros(3)) == 1.0
    la = np.zeros((4, 4, 4), np.uint8)
    la[..., 3] = a
    lb = la.copy()
    lb[..., 0] = 255
    assert rgb_l1(la, la) == 0.0 and np.isclose(rgb_l1(lb, la), 1 / 3)


def test_match_layers_is_order_free():
    x = [np.zeros((8, 8, 4), np.uint8) for _ in range(3)]
    for i, l in enumerate(x):
        l[i * 2:i * 2 + 2, :, 3] = 255
    assert sorted(match_layers([x[2], x[0], x[1]], x)) == [(0, 2), (1, 0), (2, 1)]


def test_ground_truth_scores_perfectly_and_empty_prediction_scores_zero():
    sc = None
    for s in range(100):
        sc = make_scene(s, 64, num_objects=2)
        if any(o.effect == "shadow" for o in sc.objects):
            break
    r = evaluate(sc.to_stack(), sc)
    assert r["alpha_iou"] == 1.0 and r["rgb_l1"] == 0.0 and r["bg_psnr_occluded"] == 60.0
    assert r["shadow_num"] == r["shadow_den"] > 0 and r["recomposite_psnr"] == 100.0
    flat = LayerStack(64, 64, [Layer(sc.composite, name="bg", metadata={"kind": "background"})])
    r0 = evaluate(flat, sc)
    assert r0["alpha_iou"] == 0.0 and r0["shadow_num"] == 0 and r0["recomposite_psnr"] == 100.0
    assert r0["bg_psnr_occluded"] < 30
    s = summarise([dict(r, seconds=1.0), dict(r0, seconds=3.0)])
    assert s["alpha_iou"] == 0.5 and s["seconds_per_image"] == 2.0 and s["shadow_in_layer"] == 0.5
