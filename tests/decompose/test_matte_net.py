import numpy as np
import pytest
import torch

from layergen.data.scenes import make_scene
from layergen.decompose.learned import load_decomposition_pipeline
from layergen.decompose.matte_net import LayerMatteNet, box_mask, predict_layer, visibility_order
from layergen.decompose.metrics import evaluate
from layergen.errors import LayergenError


def tiny_matte(size=32):
    torch.manual_seed(0)
    return LayerMatteNet(sample_size=size, patch_size=4, block_out_channels=(8, 16), norm_num_groups=4).eval()


def test_outputs_are_bounded_and_visible_never_exceeds_amodal():
    model = tiny_matte()
    out = model(torch.rand(2, 3, 32, 32), torch.ones(2, 1, 32, 32), torch.zeros(2, 1, 32, 32))
    assert out["amodal"].shape == out["visible"].shape == (2, 1, 32, 32) and out["colour"].shape == (2, 3, 32, 32)
    assert (out["visible"] <= out["amodal"] + 1e-7).all()
    assert out["amodal"].min() >= 0 and out["amodal"].max() <= 1
    # every output pixel has its own value (pixel_shuffle, not an upsampled 8 x 8 grid)
    assert len(torch.unique(out["amodal"][0, 0, :4, :4])) > 1
    with pytest.raises(LayergenError, match="32 x 32"):
        model(torch.rand(1, 3, 16, 16), torch.ones(1, 1, 16, 16), torch.zeros(1, 1, 16, 16))


def test_predict_layer_works_at_any_size_and_reads_the_box():
    model = tiny_matte()
    img = np.random.default_rng(0).uniform(0, 1, (48, 80, 3)).astype(np.float32)
    a = predict_layer(model, img, box_mask([(10, 5, 20, 20)], 48, 80), np.zeros((48, 80), bool))
    b = predict_layer(model, img, box_mask([(40, 20, 20, 20)], 48, 80), np.zeros((48, 80), bool))
    assert a["amodal"].shape == (48, 80) and a["colour"].shape == (48, 80, 3) and a["amodal"].dtype == np.float32
    assert not np.allclose(a["amodal"], b["amodal"])  # the instance box is an input, not ignored


def test_box_mask_clips_and_fills():
    m = box_mask([(-3, 2, 5, 4), (6, 6, 10, 10)], 8, 8)
    assert m[2:6, 0:2].all() and not m[2:6, 2:6].any() and m[6:, 6:].all() and m.sum() == 8 + 4


def _pred(amodal, visible, colour=(1.0, 0.0, 0.0)):
    return {"amodal": amodal.astype(np.float32), "visible": visible.astype(np.float32),
            "colour": np.broadcast_to(np.float32(colour), amodal.shape + (3,)).copy()}


def test_visibility_order_puts_the_visible_layer_on_top():
    a = np.zeros((16, 16))
    a[2:10, 2:10] = 1
    b = np.zeros((16, 16))
    b[6:14, 6:14] = 1
    b_vis = b.copy()
    b_vis[6:10, 6:10] = 0  # a covers b in the overlap
    far = np.zeros((16, 16))
    far[0:2, 14:16] = 1
    above = visibility_order([_pred(a, a), _pred(b, b_vis), _pred(far, far)])
    assert above[0, 1] and not above[1, 0]
    assert not above[2].any() and not above[:, 2].any()  # no overlap, no relation


def _oracle(scene):
    """A `predict_layer` stand-in that answers with the ground-truth layer of the object in the box."""
    def predict(model, image, instance, others):
        ys, xs = np.nonzero(instance)
        box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        k = next(i for i, o in enumerate(scene.objects) if tuple(o.box) == box)
        o = scene.objects[k]
        amodal = o.rgba[..., 3] / 255.0
        vis = amodal.copy()
        for upper in scene.objects[k + 1:]:
            vis = vis * (1 - upper.rgba[..., 3] / 255.0)
        return {"amodal": amodal.astype(np.float32), "visible": vis.astype(np.float32),
                "colour": (o.rgba[..., :3] / 255.0).astype(np.float32)}

    return predict


def _occluded_scene():
    for seed in range(200):
        sc = make_scene(seed, 64, num_objects=2)
        lo, hi = sc.objects
        hidden = (lo.rgba[..., 3] > 128) & (hi.rgba[..., 3] == 255)
        if hidden.sum() > 30 and lo.material == hi.material == "solid":
            return sc
    raise AssertionError("no occluded scene")


def test_pipeline_with_a_perfect_matte_orders_completes_and_stays_exact(tmp_path, monkeypatch):
    """The pipeline's use of the matte (order, prior, amodal completion) is right: with ground-truth
    predictions the occluded lower layer comes back whole, on the bottom, and the stack re-composites."""
    import layergen.decompose.matte_net as matte_net

    sc = _occluded_scene()
    boxes = [(o.box[0], o.box[1], o.box[2] - o.box[0], o.box[3] - o.box[1]) for o in sc.objects][::-1]
    tiny_matte(64).save_pretrained(tmp_path / "m" / "layer_matte")
    pipe = load_decomposition_pipeline(tmp_path / "m")
    assert pipe.matte is not None and not pipe.learned
    pipe.set_progress_bar_config(disable=True)
    classical = evaluate(type(pipe)()(sc.composite, boxes=boxes).stack, sc)
    monkeypatch.setattr(matte_net, "predict_layer", _oracle(sc))
    out = pipe(sc.composite, boxes=boxes)
    r = evaluate(out.stack, sc)
    assert out.psnr == 100.0
    assert r["order_ok"] == r["order_n"] == 1
    assert r["alpha_iou"] > 0.9 and r["alpha_iou"] > classical["alpha_iou"] + 0.1
    lower = out.stack[1].pixels[..., 3] / 255.0
    truth = sc.objects[0].rgba[..., 3] / 255.0
    hidden = sc.objects[1].rgba[..., 3] == 255
    assert np.abs(lower - truth)[hidden].mean() < 0.02  # the part the upper object hides comes back
    assert out.stack[1].metadata["decomposer"] == "learned"


def test_untrained_matte_pipeline_still_recomposites(tmp_path):
    tiny_matte(32).save_pretrained(tmp_path / "lm")
    pipe = load_decomposition_pipeline(tmp_path / "lm")  # a bare LayerMatteNet folder works too
    pipe.set_progress_bar_config(disable=True)
    sc = make_scene(5, 32, num_objects=2)
    boxes = [(o.box[0], o.box[1], o.box[2] - o.box[0], o.box[3] - o.box[1]) for o in sc.objects]
    out = pipe(sc.composite, boxes=boxes)
    assert out.psnr == 100.0  # exact whatever the (here random) matte says
    assert all(layer.metadata["decomposer"] == "learned" for layer in out.stack.layers[1:])


def test_install_script_writes_the_matte_in_fp16_where_the_loader_finds_it(tmp_path, install_script):
    from safetensors.torch import load_file

    model = tiny_matte()
    model.save_pretrained(tmp_path / "run" / "layer_matte")
    install_script.main([str(tmp_path / "run"), "--dest", str(tmp_path / "mini" / "layer_matte")])
    state = load_file(tmp_path / "mini" / "layer_matte" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float16 for v in state.values())
    pipe = load_decomposition_pipeline(tmp_path / "mini")
    assert pipe.matte.dtype == torch.float32
    assert torch.equal(pipe.matte.unet.conv_in.weight, model.unet.conv_in.weight.detach().half().float())


def test_studio_loads_a_layer_matte_folder(tmp_path):
    from layergen.studio.backends import _load_decomposer

    tiny_matte().save_pretrained(tmp_path / "layer_matte")
    pipe, name = _load_decomposer(str(tmp_path))
    assert pipe.matte is not None and name == str(tmp_path)


def test_visibility_order_reads_the_colour_when_visibility_is_undecided():
    a = np.zeros((16, 16))
    a[2:10, 2:10] = 1
    b = np.zeros((16, 16))
    b[6:14, 6:14] = 1
    image = np.zeros((16, 16, 3), np.float32)
    image[6:10, 6:10] = (0, 0, 1)  # the overlap shows b's blue
    preds = [_pred(a, a, (1, 0, 0)), _pred(b, b, (0, 0, 1))]  # both claim to be visible there
    assert not visibility_order(preds).any()
    above = visibility_order(preds, image)
    assert above[1, 0] and not above[0, 1]


def test_bundled_matte_beats_the_classical_pipeline_on_held_out_scenes():
    """The shipped `assets/layergen-mini/layer_matte` on 12 held-out scenes (apart from the benchmark's):
    better alpha IoU than the classical pipeline, shadows in their layer, exact re-composite."""
    from layergen.data.scenes import HELDOUT_SEED_START
    from layergen.decompose.metrics import summarise
    from layergen.pipelines.pipeline_decomposition import DecompositionPipeline

    learned, classical = load_decomposition_pipeline(), DecompositionPipeline()
    assert learned.matte is not None
    rows = {"learned": [], "classical": []}
    for i in range(12):
        sc = make_scene(HELDOUT_SEED_START + 900_000 + i, 128)
        boxes = [(o.box[0], o.box[1], o.box[2] - o.box[0], o.box[3] - o.box[1]) for o in sc.objects]
        for name, pipe in (("learned", learned), ("classical", classical)):
            pipe.set_progress_bar_config(disable=True)
            rows[name].append(evaluate(pipe(sc.composite, boxes=boxes).stack, sc))
    got = {k: summarise(v) for k, v in rows.items()}
    assert got["learned"]["alpha_iou"] > 0.75 and got["learned"]["alpha_iou"] > got["classical"]["alpha_iou"]
    assert got["learned"]["shadow_in_layer"] > 0.7
    assert got["learned"]["bg_psnr_occluded"] > 28
    assert min(r["recomposite_psnr"] for name in rows for r in rows[name]) == 100.0  # bit-exact


def test_pipeline_save_pretrained_round_trips_the_matte(tmp_path):
    from layergen.pipelines.pipeline_decomposition import DecompositionPipeline

    model = tiny_matte()
    DecompositionPipeline(matte=model).save_pretrained(tmp_path / "pipe")
    back = DecompositionPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(back.matte, LayerMatteNet)
    assert torch.equal(back.matte.unet.conv_in.weight, model.unet.conv_in.weight)
