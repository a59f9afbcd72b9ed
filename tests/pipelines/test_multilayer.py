import numpy as np
import pytest

from layergen import LayergenError, LayerStack
from layergen.layout import Box, Layout
from layergen.pipelines import MultiLayerPipeline
from layergen.pipelines.pipeline_multilayer import (RegionSettings, _Region, assign_prompts, fit_to_box,
                                                    region_crop, split_prompt)
from layergen.testing import tiny_layer_components

PROMPT = "a red star, a blue ring and a green heart on a grey to white gradient background"
BOXES = [(2, 3, 20, 20), (30, 28, 24, 24), (8, 40, 18, 16)]


def components(**kw):
    comps = tiny_layer_components(**kw)
    tok = comps["tokenizer"]
    if tok("a red star").input_ids == tok("a blue ring").input_ids:
        # layergen.testing builds its tokenizer with `vocab_file=`, which transformers 5 ignores (every word
        # becomes [UNK]); prompts must differ here, so build the same vocabulary the supported way.
        from transformers import BertTokenizerFast

        from layergen.testing import _WORDS

        words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(_WORDS)
        comps["tokenizer"] = BertTokenizerFast(vocab={w: i for i, w in enumerate(dict.fromkeys(words))},
                                               model_max_length=16)
    return comps


@pytest.fixture(scope="module")
def pipe():
    p = MultiLayerPipeline(**components())
    p.set_progress_bar_config(disable=True)
    return p


def run(pipe, layout=BOXES, prompt=PROMPT, **kw):
    kw.setdefault("num_inference_steps", 1)
    kw.setdefault("width", 64)
    kw.setdefault("height", 64)
    kw.setdefault("tta", False)
    kw.setdefault("seed", 0)
    return pipe(prompt, layout=layout, **kw)


@pytest.fixture(scope="module")
def result(pipe):
    return run(pipe)


def unet_input_shapes(pipe, fn):
    shapes = []
    handle = pipe.unet.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        fn()
    finally:
        handle.remove()
    return shapes


# -- prompt handling ---------------------------------------------------------------------------

def test_split_prompt_into_object_phrases_and_background():
    assert split_prompt(PROMPT) == (["a red star", "a blue ring", "a green heart"], "a grey to white gradient background")
    assert split_prompt("a cat; a dog") == (["a cat", "a dog"], None)
    assert split_prompt("a star on a sky", background="a sky") == (["a star"], "a sky")
    assert split_prompt("a star on a sky", background="a meadow") == (["a star on a sky"], "a meadow")


def test_anonymous_boxes_take_phrases_in_layout_or_reading_order_and_bound_boxes_keep_theirs():
    lay = Layout(64, 64, [Box(40, 40, 8, 8), Box(0, 0, 8, 8, prompt="a pink cross"), Box(0, 30, 8, 8),
                          Box(30, 0, 8, 8)], prompt="a red star, a blue ring and a green heart, a cross on a sky")
    prompts, bound, unassigned = assign_prompts(lay)
    assert prompts == ["a red star", "a pink cross", "a blue ring", "a green heart"]
    assert bound == [False, True, False, False] and unassigned == ["a cross"]
    prompts, _, _ = assign_prompts(lay, order="reading")  # top-to-bottom, left-to-right: box 3, box 2, box 0
    assert prompts == ["a green heart", "a pink cross", "a blue ring", "a red star"]
    few = Layout(64, 64, [Box(0, 0, 8, 8), Box(9, 0, 8, 8), Box(18, 0, 8, 8)], prompt="a star and a ring")
    assert assign_prompts(few)[0] == ["a star", "a ring", "a star"], "more boxes than phrases: cycle"


# -- generation --------------------------------------------------------------------------------

def test_stack_has_background_plus_one_layer_per_box_in_order(result):
    stack = result.stacks[0]
    assert isinstance(stack, LayerStack) and stack.size == (64, 64) and len(stack) == 4
    assert [l.kind for l in stack] == ["background", "instance", "instance", "instance"]
    assert (stack[0].pixels[..., 3] == 255).all() and stack[0].bbox == (0, 0, 64, 64)
    assert [l.metadata["layout_index"] for l in stack.layers[1:]] == [0, 1, 2]
    assert [l.metadata["prompt"] for l in stack] == ["a grey to white gradient background", "a red star",
                                                     "a blue ring", "a green heart"]
    assert [l.metadata["seed"] for l in stack] == [0, 1, 2, 3]
    assert all(l.metadata["steps"] == 1 for l in stack)


def test_each_layer_is_cropped_to_its_box(result):
    for layer, (x, y, w, h) in zip(result.stacks[0].layers[1:], BOXES):
        assert layer.bbox == (x, y, x + w, y + h) and layer.metadata["box"] == [x, y, w, h]
        cb = layer.content_bbox()
        assert cb is None or (cb[2] <= w and cb[3] <= h)
        assert (layer.pixels[layer.pixels[..., 3] == 0][:, :3] == 0).all()


def test_output_image_is_the_stack_composite(result):
    stack = result.stacks[0]
    img = np.asarray(result.images[0])
    assert img.shape == (64, 64, 4) and np.array_equal(img, stack.composite())
    assert (img[..., 3] == 255).all()


def test_per_box_prompts_reach_layer_metadata(pipe):
    lay = [Box(0, 0, 24, 24, prompt="a pink cross"), Box(30, 30, 24, 24), "40,0,20,20:a white crescent"]
    stack = run(pipe, layout=lay, prompt="a blue ring on a sky", output_type="stack").stacks[0]
    assert [l.metadata["prompt"] for l in stack.layers[1:]] == ["a pink cross", "a blue ring", "a white crescent"]
    assert [l.metadata["bound"] for l in stack.layers[1:]] == [True, False, True]
    assert stack[0].metadata["prompt"] == "a sky" and stack.metadata["layout"]["boxes"][0]["prompt"] == "a pink cross"


def test_same_seed_reproduces_and_other_seed_differs(pipe, result):
    again = run(pipe)
    other = run(pipe, seed=1)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))
    assert not np.array_equal(other.stacks[0][1].pixels, result.stacks[0][1].pixels)


def test_batching_does_not_change_a_layers_noise(pipe, result):
    one_by_one = run(pipe, max_batch=1).stacks[0]
    for a, b in zip(one_by_one, result.stacks[0]):
        assert np.abs(a.pixels.astype(int) - b.pixels.astype(int)).max() <= 2


def test_region_crop_runs_the_unet_on_crop_sized_latents(pipe):
    region = unet_input_shapes(pipe, lambda: run(pipe))
    full = unet_input_shapes(pipe, lambda: run(pipe, attention="full"))
    canvas = (64 // 8, 64 // 8)
    # background: full canvas; layers: crops of about box / 0.65 (here 32x32 and 40x40 px -> 4x4, 5x5 latents)
    assert region[0][-2:] == canvas  # 1 background step
    layer_shapes = {s[-2:] for s in region[1:]}
    assert layer_shapes == {(4, 4), (5, 5)}
    assert all(s[1] == 8 for s in region), "noisy latent + condition latent are concatenated"
    assert {s[-2:] for s in full} == {canvas}
    # the two 32-px crops of the disjoint boxes 0 and 2 share one UNet call (2 layers x CFG = batch 4)
    assert (4, 8, 4, 4) in region


def test_full_attention_baseline_also_gives_box_cropped_layers(pipe):
    stack = run(pipe, attention="full").stacks[0]
    assert [l.bbox for l in stack.layers[1:]] == [(x, y, x + w, y + h) for x, y, w, h in BOXES]
    assert all(l.metadata["region"] == [0, 0, 64, 64] for l in stack.layers[1:])


def test_overlapping_boxes_wait_for_the_layer_below_and_see_it(pipe):
    lay = [Box(0, 0, 40, 40, prompt="a red star"), Box(20, 20, 40, 40, prompt="a blue ring"),
           Box(44, 0, 20, 16, prompt="a green heart")]
    a = run(pipe, layout=lay, num_inference_steps=2).stacks[0]
    assert [l.metadata["wave"] for l in a.layers[1:]] == [0, 1, 0]
    lay_b = [Box(0, 0, 40, 40, prompt="a yellow square")] + lay[1:]
    b = run(pipe, layout=lay_b, num_inference_steps=2).stacks[0]
    assert not np.array_equal(a[1].pixels, b[1].pixels)
    assert not np.array_equal(a[2].pixels, b[2].pixels), "the upper layer is conditioned on the one below"
    assert np.array_equal(a[3].pixels, b[3].pixels), "a disjoint layer of the first wave does not see it"
    seq = run(pipe, layout=lay, joint=False).stacks[0]
    assert [l.metadata["wave"] for l in seq.layers[1:]] == [0, 1, 2]


def test_min_region_size_upsamples_small_crops_but_keeps_box_sized_layers(pipe):
    out = []
    shapes = unet_input_shapes(pipe, lambda: out.append(run(pipe, min_region_size=48)))
    assert {s[-2:] for s in shapes[1:]} == {(6, 6)}
    stack = out[0].stacks[0]
    assert [(l.width, l.height) for l in stack.layers[1:]] == [(w, h) for _, _, w, h in BOXES]


def test_given_background_is_kept_and_conditions_the_layers(pipe):
    bg = np.zeros((64, 64, 3), np.uint8)
    bg[:, 32:] = (200, 180, 20)
    stack = run(pipe, background=bg, num_inference_steps=2).stacks[0]
    assert np.array_equal(stack[0].pixels[..., :3], bg) and stack[0].metadata["source"] == "input"
    other = run(pipe, background=255 - bg, num_inference_steps=2).stacks[0]
    assert not np.array_equal(stack[1].pixels, other[1].pixels)


def test_sixty_four_layers(pipe):
    boxes = [(8 * (i % 8), 8 * (i // 8), 8, 8) for i in range(64)]
    out = []
    shapes = unet_input_shapes(
        pipe, lambda: out.append(run(pipe, layout=boxes, num_inference_steps=1, guidance_scale=1.0,
                                     min_region_size=0, output_type="stack")))
    stack = out[0].stacks[0]
    assert len(stack) == 65
    assert [l.bbox for l in stack.layers[1:]] == [(x, y, x + 8, y + 8) for x, y, _, _ in boxes]
    assert [l.metadata["prompt"] for l in stack.layers[1:4]] == ["a red star", "a blue ring", "a green heart"]
    # one wave, 64 equal 16-px crops, max_batch 16 -> background + 4 batched calls
    assert shapes == [(1, 8, 8, 8)] + [(16, 8, 2, 2)] * 4


def test_invalid_layouts_raise_clear_errors(pipe):
    with pytest.raises(LayergenError, match="at most 64"):
        run(pipe, layout=[(0, 0, 4, 4)] * 65)
    with pytest.raises(LayergenError, match="not inside"):
        run(pipe, layout=[(50, 50, 20, 20)])
    with pytest.raises(LayergenError, match="positive"):
        run(pipe, layout=[(0, 0, 0, 4)])
    with pytest.raises(LayergenError, match="global prompt"):
        run(pipe, layout=[(0, 0, 4, 4)], prompt=None)
    with pytest.raises(LayergenError, match="layout is needed"):
        run(pipe, layout=None)
    with pytest.raises(LayergenError, match="attention"):
        run(pipe, attention="sparse")
    with pytest.raises(LayergenError, match="disagree"):
        run(pipe, layout=Layout(64, 64, [Box(0, 0, 8, 8)], prompt="x"), width=32)


# -- repaint -----------------------------------------------------------------------------------

def test_repaint_one_layer_leaves_every_other_layer_bit_identical(pipe, result):
    stack = result.stacks[0]
    before = stack.copy()
    new = pipe.repaint(stack, 2, prompt="a pink cross", seed=11, tta=False).stacks[0]
    assert stack == before, "the input stack is not modified"
    assert len(new) == len(stack)
    for k in (0, 1, 3):
        assert np.array_equal(new[k].pixels, stack[k].pixels) and new[k].bbox == stack[k].bbox
        assert new[k] is not stack[k]
    assert not np.array_equal(new[2].pixels, stack[2].pixels)
    meta = new[2].metadata
    assert meta["prompt"] == "a pink cross" and meta["seed"] == 11 and meta["box"] == list(BOXES[1])
    assert new[2].bbox == stack[2].bbox


def test_repaint_with_a_new_box_moves_only_that_layer(pipe, result):
    stack = result.stacks[0]
    new = pipe.repaint(stack, 1, seed=3, box=(40, 4, 16, 12), tta=False).stacks[0]
    assert new[1].bbox == (40, 4, 56, 16) and new[1].metadata["box"] == [40, 4, 16, 12]
    assert new[1].metadata["prompt"] == "a red star", "prompt reused from metadata"
    assert all(np.array_equal(new[k].pixels, stack[k].pixels) for k in (0, 2, 3))


def test_repaint_same_seed_is_reproducible_and_conditions_on_layers_below(pipe, result):
    stack = result.stacks[0]
    a = pipe.repaint(stack, 3, seed=5, num_inference_steps=2, tta=False).stacks[0]
    b = pipe.repaint(stack, 3, seed=5, num_inference_steps=2, tta=False).stacks[0]
    assert np.array_equal(a[3].pixels, b[3].pixels)
    changed = stack.copy()
    changed.layers[0].pixels[:] = 255 - changed.layers[0].pixels
    changed.layers[0].pixels[..., 3] = 255
    c = pipe.repaint(changed, 3, seed=5, num_inference_steps=2, tta=False).stacks[0]
    assert not np.array_equal(a[3].pixels, c[3].pixels)


def test_repaint_background_keeps_all_layers(pipe, result):
    stack = result.stacks[0]
    new = pipe.repaint(stack, 0, prompt="a blue sky", seed=9).stacks[0]
    assert not np.array_equal(new[0].pixels, stack[0].pixels)
    assert (new[0].pixels[..., 3] == 255).all() and new[0].metadata["prompt"] == "a blue sky"
    assert all(np.array_equal(new[k].pixels, stack[k].pixels) and new[k] == stack[k] for k in (1, 2, 3))
    with pytest.raises(LayergenError, match="no box"):
        pipe.repaint(stack, 0, box=(0, 0, 4, 4))


def test_repaint_errors(pipe, result):
    stack = result.stacks[0]
    with pytest.raises(LayergenError, match="out of range"):
        pipe.repaint(stack, 7)
    with pytest.raises(LayergenError, match="not inside"):
        pipe.repaint(stack, 1, box=(60, 60, 10, 10))
    bare = stack.copy()
    bare.layers[1].metadata = {}
    with pytest.raises(LayergenError, match="no prompt"):
        pipe.repaint(bare, 1)
    assert pipe.repaint(bare, 1, prompt="a red star", seed=1, tta=False).stacks[0][1].bbox == stack[1].bbox


def test_plain_unet_without_condition_or_tasks_still_generates():
    p = MultiLayerPipeline(**components(conditional=False))
    p.set_progress_bar_config(disable=True)
    stack = run(p).stacks[0]
    assert len(stack) == 4 and [l.bbox for l in stack.layers[1:]] == [(x, y, x + w, y + h) for x, y, w, h in BOXES]


def test_callback_sees_every_loop(pipe):
    calls = []
    run(pipe, num_inference_steps=2, callback_on_step_end=lambda p, i, t, kw: calls.append(kw["latents"].shape) or {})
    assert len(calls) == 3 * 2, "the background loop and two layer loops (the 32-px pair, the 40-px crop) x 2 steps"
    assert sorted(c[0] for c in calls) == [1, 1, 1, 1, 2, 2]
    assert pipe.num_timesteps == 2  # diffusers callbacks (e.g. CFG cutoff) read it


# -- box binding -------------------------------------------------------------------------------

def test_fit_to_box_scales_and_centres_the_object():
    crop = np.zeros((40, 40, 4), np.uint8)
    crop[5:11, 20:30] = (200, 10, 10, 255)         # a 10 x 6 object off-centre
    crop[11:13, 22:32] = (0, 0, 0, 40)              # a faint shadow under it comes along
    out = fit_to_box(crop, 20, 20)
    ys, xs = np.nonzero(out[..., 3] >= 128)
    assert (xs.min(), xs.max() + 1) == (0, 20), "uniform scale x2: the width fills the box"
    assert ys.max() + 1 - ys.min() == 12 and ys.min() == 4, "height 6 -> 12, centred vertically"
    assert (out[6:14, 2:18] == (200, 10, 10, 255)).all(), "the inside keeps its colour"
    glass = np.zeros((40, 40, 4), np.uint8)
    glass[10:30, 10:20] = (40, 80, 220, 100)        # a 40 %-opaque glass body is an object too
    g = fit_to_box(glass, 10, 20)
    assert (g[..., 3] > 90).all()
    assert fit_to_box(np.zeros((16, 16, 4), np.uint8), 8, 8) is None


def test_scale_fit_holds_only_the_grown_box_empty():
    box = Box(40, 40, 40, 40)
    crop, work = region_crop(box, 128, 128, 8, "region", 0.65)  # 64 px crop, box at 12..52 px
    hard = _Region(0, box, "a star", 0, crop, work, RegionSettings(box_fit="crop")).mask(8)
    soft = _Region(0, box, "a star", 0, crop, work, RegionSettings(box_fit="scale", margin=0.25)).mask(8)
    assert hard.sum() == 36 and soft.sum() == 64 and bool(((hard == 1) <= (soft == 1)).all())


def test_region_settings_go_into_metadata_and_repaint_reuses_them(pipe):
    stack = run(pipe, box_fit="crop", margin=0.1, min_region_size=40, output_type="stack").stacks[0]
    meta = stack[1].metadata
    assert (meta["box_fit"], meta["margin"], meta["min_region_size"], meta["fill"]) == ("crop", 0.1, 40, 0.65)
    assert run(pipe, output_type="stack").stacks[0][1].metadata["min_region_size"] == 32, "default: native size"
    new = pipe.repaint(stack, 1, seed=2, tta=False).stacks[0]
    assert (new[1].metadata["box_fit"], new[1].metadata["min_region_size"]) == ("crop", 40)
    with pytest.raises(LayergenError, match="box_fit"):
        run(pipe, box_fit="stretch")


def test_one_generator_reproduces_a_layout_with_any_scheduler(pipe):
    import torch
    from diffusers import EulerAncestralDiscreteScheduler

    gen = torch.Generator().manual_seed
    orig = pipe.scheduler
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(orig.config)  # draws noise in every step
    try:
        torch.manual_seed(1)
        a = run(pipe, seed=None, generator=[gen(5)], num_inference_steps=2).stacks[0]
        torch.manual_seed(2)  # the global RNG must not matter
        b = run(pipe, seed=None, generator=gen(5), num_inference_steps=2).stacks[0]
    finally:
        pipe.scheduler = orig
    assert a.metadata["seed"] == b.metadata["seed"] == 5
    assert all(np.array_equal(x.pixels, y.pixels) for x, y in zip(a.layers, b.layers))
    with pytest.raises(LayergenError, match="generator must be one torch.Generator"):
        run(pipe, seed=None, generator=[gen(0), gen(1)])
    with pytest.raises(LayergenError, match="output_type must be one of 'pil', 'np', 'stack'"):
        run(pipe, output_type="latent")
    with pytest.raises(LayergenError, match="canvas must be between 8x8 and 4096x4096, got 64x0"):
        run(pipe, height=0)  # 0 is not "the default size"
    assert len(run(pipe, num_inference_steps=np.int64(1), max_batch=np.int64(4)).stacks[0]) == 4  # numpy ints
