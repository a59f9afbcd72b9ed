import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

from layergen import LayergenError, LayerStack
from layergen.pipelines import (BackgroundBehindForegroundPipeline, ForegroundOnBackgroundPipeline,
                                TransparentLayerPipeline)
from layergen.testing import tiny_layer_components

PROMPT = "a red glass star with a soft shadow"


@pytest.fixture(scope="module")
def pipe():
    return TransparentLayerPipeline(**tiny_layer_components())


def run(pipe, **kw):
    kw.setdefault("num_inference_steps", 2)
    kw.setdefault("height", 32)
    kw.setdefault("width", 32)
    kw.setdefault("tta", False)
    return pipe(kw.pop("prompt", PROMPT), **kw)


def test_text_to_layer_returns_rgba_stack_with_provenance(pipe):
    out = run(pipe, seed=3)
    img, stack = out.images[0], out.stacks[0]
    assert img.mode == "RGBA" and img.size == (32, 32)
    assert isinstance(stack, LayerStack) and len(stack) == 1
    meta = stack[0].metadata
    assert meta["prompt"] == PROMPT and meta["seed"] == 3 and meta["steps"] == 2 and meta["kind"] == "instance"
    px = np.asarray(img)
    assert np.array_equal(px, stack.composite())
    assert px.std() > 0, "output should not be constant"
    assert (px[px[..., 3] == 0][:, :3] == 0).all(), "fully transparent pixels carry no hidden colour"


def test_seed_is_reproducible_and_seeds_differ(pipe):
    a = np.asarray(run(pipe, seed=1).images[0])
    b = np.asarray(run(pipe, seed=1).images[0])
    c = np.asarray(run(pipe, seed=2).images[0])
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    g = np.asarray(run(pipe, generator=torch.Generator().manual_seed(1)).images[0])
    assert np.array_equal(a, g)


def test_batch_and_num_images_per_prompt(pipe):
    out = run(pipe, prompt=[PROMPT, "a blue ring"], num_images_per_prompt=2, seed=5)
    assert len(out.images) == 4 and [s[0].metadata["seed"] for s in out.stacks] == [5, 6, 7, 8]
    assert [s[0].metadata["prompt"] for s in out.stacks] == [PROMPT, PROMPT, "a blue ring", "a blue ring"]
    single = np.asarray(run(pipe, seed=7, prompt="a blue ring").images[0])
    assert np.array_equal(np.asarray(out.images[2]), single), "image k of a batch is reproducible alone"


def test_odd_sizes_are_cropped_back(pipe):
    out = run(pipe, height=20, width=36, seed=0)
    assert out.images[0].size == (36, 20) and out.stacks[0].size == (36, 20)


@pytest.mark.parametrize("scheduler_cls", [EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_any_diffusers_scheduler(pipe, scheduler_cls):
    orig = pipe.scheduler
    pipe.scheduler = scheduler_cls.from_config(orig.config)
    try:
        img = np.asarray(run(pipe, seed=0).images[0])
    finally:
        pipe.scheduler = orig
    assert img.shape == (32, 32, 4) and np.isfinite(img).all()


def test_callback_on_step_end_sees_and_changes_latents(pipe):
    seen = []

    def cb(p, i, t, kwargs):
        seen.append(i)
        return {"latents": torch.zeros_like(kwargs["latents"])}

    a = np.asarray(run(pipe, seed=0, callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents"]).images[0])
    b = np.asarray(run(pipe, seed=0).images[0])
    assert seen == [0, 1] and not np.array_equal(a, b)


def test_save_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    loaded = TransparentLayerPipeline.from_pretrained(tmp_path / "p")
    a, b = run(pipe, seed=4).images[0], run(loaded, seed=4).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_bad_inputs_give_clear_errors(pipe):
    for bad in ("", "   ", [], [PROMPT, ""]):
        with pytest.raises(LayergenError):
            run(pipe, prompt=bad)
    with pytest.raises(LayergenError):
        run(pipe, height=4)
    with pytest.raises(LayergenError):
        run(pipe, latents=torch.full((1, 4, 4, 4), float("nan")))
    with pytest.raises(LayergenError):
        run(pipe, num_inference_steps=0)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(LayergenError, match="never downloads"):
        TransparentLayerPipeline.from_pretrained(tmp_path / "nope")


def test_tta_changes_nothing_structural_but_runs(pipe):
    out = run(pipe, seed=0, tta=True)
    assert out.images[0].size == (32, 32)


def test_foreground_on_background_uses_the_background(pipe):
    fg = ForegroundOnBackgroundPipeline(**pipe.components)
    bg1 = np.zeros((32, 32, 3), np.uint8)
    bg2 = np.full((32, 32, 3), 255, np.uint8)
    s1 = fg(PROMPT, bg1, num_inference_steps=2, seed=0, tta=False).stacks[0]
    s2 = fg(PROMPT, bg2, num_inference_steps=2, seed=0, tta=False).stacks[0]
    assert s1.names()[0] == "background" and len(s1) == 2
    assert np.array_equal(s1[0].pixels[..., :3], bg1) and (s1[0].pixels[..., 3] == 255).all()
    assert not np.array_equal(s1[1].pixels, s2[1].pixels), "the background must condition the layer"


def test_background_behind_foreground_keeps_the_foreground(pipe):
    bg = BackgroundBehindForegroundPipeline(**pipe.components)
    fg = np.zeros((32, 32, 4), np.uint8)
    fg[8:24, 8:24] = (200, 30, 30, 255)
    out = bg("a blue sky", fg, num_inference_steps=2, seed=0)
    stack = out.stacks[0]
    assert stack.names() == ["background", "foreground"]
    assert (stack[0].pixels[..., 3] == 255).all()
    assert np.array_equal(stack[1].pixels, fg)
    comp = stack.composite()
    assert np.array_equal(comp[8:24, 8:24], fg[8:24, 8:24]), "opaque foreground stays on top, unchanged"


def test_plain_unet_refuses_a_condition():
    p = ForegroundOnBackgroundPipeline(**tiny_layer_components(conditional=False))
    with pytest.raises(LayergenError, match="input channels"):
        p(PROMPT, np.zeros((32, 32, 3), np.uint8), num_inference_steps=1)


def test_sdxl_class_components_run():
    p = TransparentLayerPipeline(**tiny_layer_components(conditional=False, sdxl=True))
    out = p(PROMPT, height=32, width=32, num_inference_steps=2, seed=0, tta=False)
    assert out.images[0].size == (32, 32)
    neg = p(PROMPT, height=32, width=32, num_inference_steps=2, seed=0, tta=False, guidance_scale=1.0)
    assert not np.array_equal(np.asarray(out.images[0]), np.asarray(neg.images[0])), "CFG must change the result"


# -- what a diffusers user expects of the call (QA pass, session 17) -------------------------------------------
def test_arguments_diffusers_users_pass_are_checked_before_anything_runs(pipe):
    g = torch.Generator().manual_seed
    cases = [
        (dict(height=0), "height must be an integer"),  # 0 is not "the default"
        (dict(num_images_per_prompt=0), "num_images_per_prompt must be a positive integer"),
        (dict(num_images_per_prompt=2.0), "num_images_per_prompt must be a positive integer"),
        (dict(generator=[g(0), g(1)], num_images_per_prompt=3), "got 2 generators for 3 images"),
        (dict(generator=0), "generator must be a torch.Generator"),
        (dict(generator=g(0), seed=1), "pass seed= or generator=, not both"),
        (dict(output_type="pt"), "output_type must be one of 'pil', 'np', 'latent', 'stack'"),
        (dict(num_inference_steps=2000), r"num_inference_steps must be an integer in \[1, 1000\]"),
        (dict(guidance_scale="5"), "guidance_scale must be a finite number"),
        (dict(negative_prompt=3), "negative_prompt must be a string or a list of strings"),
    ]
    for kwargs, message in cases:
        with pytest.raises(LayergenError, match=message):
            run(pipe, **kwargs)
    assert run(pipe, seed=0, height=np.int64(24), width=np.int64(32)).images[0].size == (32, 24)  # numpy ints


def test_a_diverging_sampler_is_an_error_not_an_empty_layer(pipe):
    with pytest.raises(LayergenError, match="denoising diverged .* use a smaller guidance_scale"):
        run(pipe, seed=0, guidance_scale=1e38)


def test_latent_output_from_every_task_pipeline_and_from_pipe(pipe):
    fg = ForegroundOnBackgroundPipeline.from_pipe(pipe)  # diffusers hands the components over
    bg = BackgroundBehindForegroundPipeline.from_pipe(pipe)
    assert fg.unet is pipe.unet and bg.transparent_decoder is pipe.transparent_decoder
    image = np.zeros((32, 32, 4), np.uint8)
    for p, args in ((pipe, ()), (fg, (image[..., :3],)), (bg, (image,))):
        out = p(PROMPT, *args, num_inference_steps=2, seed=0, output_type="latent", return_dict=False)
        assert isinstance(out, tuple) and out[0].shape == (1, 4, 4, 4) and out[1] == []
    decoded = run(pipe, seed=0, output_type="np").images
    assert decoded.dtype == np.uint8 and decoded.shape == (1, 32, 32, 4)  # layers are 8-bit: the exact values


def test_condition_images_of_any_channel_count_are_checked(pipe):
    fg = ForegroundOnBackgroundPipeline(**pipe.components)
    with pytest.raises(LayergenError, match=r"gray \+ alpha, RGB or RGBA, got \(32, 32, 5\)"):
        fg(PROMPT, np.zeros((32, 32, 5), np.uint8), num_inference_steps=1)
    gray = fg(PROMPT, np.full((32, 32, 1), 90, np.uint8), num_inference_steps=1, seed=0).stacks[0]
    assert (gray[0].pixels[..., :3] == 90).all()


def test_cross_attention_kwargs_scale_a_lora_per_call():
    from peft import LoraConfig

    p = TransparentLayerPipeline(**tiny_layer_components())
    base = run(p, seed=0, output_type="np").images
    p.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_k", "to_v"]))
    full = run(p, seed=0, output_type="np").images
    off = run(p, seed=0, output_type="np", cross_attention_kwargs={"scale": 0.0}).images
    assert not np.array_equal(full, base) and np.array_equal(off, base)
    assert np.array_equal(run(p, seed=0, output_type="np").images, full)  # the scale lasts one call
