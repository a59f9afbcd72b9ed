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
        assert len(out.stack) == 2 and out.psnr > 40, mode  # unblending keeps it exact, even untrained
        assert out.stack[1].metadata["decomposer"] == "learned"
        outs.append(out.stack[0].pixels)
    assert not np.array_equal(outs[0], outs[2])  # the modes really differ


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="training/train_decomposer.py"):
        load_decomposition_pipeline(tmp_path / "nothing")
