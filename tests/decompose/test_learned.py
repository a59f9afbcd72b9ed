import numpy as np
import pytest
import torch

from layergen.data.scenes import make_scene
from layergen.decompose.learned import (BACKGROUND_MODES, LayerDecomposer, alpha_from_grey,
                                        load_decomposition_pipeline, save_decomposition_pipeline)
from layergen.errors import ModelNotFoundError


def tiny_components():
    from diffusers import AutoencoderKL, DDIMScheduler

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=32).eval()
    model = LayerDecomposer(sample_size=4, block_out_channels=(8, 16), layers_per_block=1,
                            attention_levels=(False, True), norm_num_groups=4).eval()
    return model, vae, DDIMScheduler(prediction_type="v_prediction")


def test_decomposer_shapes_and_mask_condition():
    model, vae, _ = tiny_components()
    zc = torch.randn(2, 4, 4, 4)
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:16, 8:16] = 1
    cond = model.condition(zc, mask)
    assert cond.shape == (2, 4 + 1 + 64, 4, 4)
    assert torch.allclose(cond[:, 4], torch.nn.functional.avg_pool2d(mask, 8)[:, 0])
    # space-to-depth keeps the exact pixel mask: it can be put back together
    assert torch.equal(torch.nn.functional.pixel_shuffle(cond[:, 5:], 8), mask)
    bg, fg = model(torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), cond, torch.tensor([10, 500]))
    assert bg.shape == fg.shape == (2, 4, 4, 4)


def test_alpha_from_grey_inverts_both_blends():
    rng = np.random.default_rng(0)
    B = rng.uniform(0.0, 1.0, (16, 16, 3)).astype(np.float32)
    Fc = rng.uniform(0.0, 1.0, (16, 16, 3)).astype(np.float32)
    a = rng.uniform(0.0, 1.0, (16, 16)).astype(np.float32)
    I = a[..., None] * Fc + (1 - a[..., None]) * B
    G = a[..., None] * Fc + (1 - a[..., None]) * 0.5
    est = alpha_from_grey(I, B, G)
    ok = ((0.5 - B) ** 2).sum(-1) > 0.02
    assert np.abs(est - a)[ok].max() < 1e-4


def test_learned_pipeline_saves_loads_and_recomposites(tmp_path):
    model, vae, sched = tiny_components()
    save_decomposition_pipeline(tmp_path / "dec", model, vae, sched)
    pipe = load_decomposition_pipeline(tmp_path / "dec")
    assert pipe.learned and pipe.codec is None
    pipe.set_progress_bar_config(disable=True)
    sc = make_scene(5, 32, num_objects=1)
    x0, y0, x1, y1 = sc.objects[0].box
    outs = []
    for mode in BACKGROUND_MODES:
        pipe.background_mode = mode
        out = pipe(sc.composite, boxes=[(x0, y0, x1 - x0, y1 - y0)], num_inference_steps=2,
                   generator=torch.Generator().manual_seed(0))
        assert len(out.stack) == 2 and out.psnr == 100.0, mode  # exact, even untrained
        assert out.stack[1].metadata["decomposer"] == "learned"
        outs.append(out.stack[0].pixels)
    assert not np.array_equal(outs[0], outs[2])  # the modes really differ


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="training/train_layer_matte.py"):
        load_decomposition_pipeline(tmp_path / "nothing")


def test_mini_layout_shares_the_vae_and_keeps_its_own_scheduler(tmp_path):
    """assets/layergen-mini layout: decomposer/ (fp16 weights + its scheduler_config.json) next to a shared vae/
    and the text-to-layer model's scheduler/, which must not be picked up."""
    from diffusers import DPMSolverMultistepScheduler
    from safetensors.torch import load_file, save_file

    model, vae, _ = tiny_components()
    root = tmp_path / "mini"
    model.save_pretrained(root / "decomposer")
    weights = root / "decomposer" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.half() for k, v in load_file(weights).items()}, str(weights))
    (root / "decomposer" / "scheduler_config.json").write_text(
        '{"_class_name": "DDIMScheduler", "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}')
    vae.save_pretrained(root / "vae")
    DPMSolverMultistepScheduler(beta_schedule="scaled_linear").save_pretrained(root / "scheduler")
    pipe = load_decomposition_pipeline(root)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert pipe.decomposer.dtype == torch.float32
    w = pipe.decomposer.unet.conv_in.weight.detach()
    assert torch.equal(w, model.unet.conv_in.weight.detach().half().float())
    import shutil

    shutil.rmtree(root / "vae")
    with pytest.raises(ModelNotFoundError, match="needs its VAE"):
        load_decomposition_pipeline(root)


def test_install_script_writes_fp16_weights_and_refuses_a_foreign_vae(tmp_path, install_script):
    from safetensors.torch import load_file

    from layergen.errors import LayergenError

    mod = install_script
    model, vae, sched = tiny_components()
    save_decomposition_pipeline(tmp_path / "pipeline", model, vae, sched)
    with pytest.raises(LayergenError, match="not the bundled mini VAE"):
        mod.main([str(tmp_path / "pipeline"), "--dest", str(tmp_path / "out"), "--vae", str(tmp_path / "pipeline" / "vae")])
    mod.main([str(tmp_path / "pipeline"), "--dest", str(tmp_path / "out")])
    state = load_file(tmp_path / "out" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float16 for v in state.values())
    assert torch.equal(state["unet.conv_in.weight"], model.unet.conv_in.weight.detach().half())
    assert (tmp_path / "out" / "scheduler_config.json").is_file()
