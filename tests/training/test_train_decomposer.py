import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny base VAE (8x down) and transparent codec, built in code."""
    from diffusers import AutoencoderKL

    from layergen.models.transparent_codec import TransparentDecoder, TransparentEncoder

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=32)
    vae.save_pretrained(root / "vae")
    TransparentEncoder(block_out_channels=(8, 8, 8, 8), latent_channels=4).save_pretrained(
        root / "codec" / "transparent_encoder")
    TransparentDecoder(block_out_channels=(8, 8, 8, 8), latent_channels=4, norm_num_groups=4,
                       down_block_types=("DownBlock2D",) * 4, up_block_types=("UpBlock2D",) * 4,
                       latent_injection_index=3).save_pretrained(root / "codec" / "transparent_decoder")
    return root


def run(tiny, out, steps, *extra):
    cmd = [sys.executable, str(ROOT / "training" / "train_decomposer.py"), "--vae", str(tiny / "vae"),
           "--output_dir", str(out), "--resolution", "32", "--num_samples", "8", "--block_out_channels", "8", "16",
           "--layers_per_block", "1", "--norm_num_groups", "4", "--train_batch_size", "2",
           "--max_train_steps", str(steps), "--checkpointing_steps", "2", "--validation_steps", "2",
           "--num_validation", "1", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_train_decomposer_saves_loads_and_resumes(tiny_models, tmp_path):
    from layergen.decompose.learned import load_decomposition_pipeline

    out = tmp_path / "run"
    run(tiny_models, out, 2, "--codec", str(tiny_models / "codec"), "--consistency_every", "1")
    assert (out / "checkpoint-2").is_dir() and (out / "validation-2.png").is_file()
    pipe = load_decomposition_pipeline(out / "pipeline")
    assert pipe.learned and pipe.codec is not None
    w_before = pipe.decomposer.unet.conv_in.weight.detach().numpy().copy()
    res = run(tiny_models, out, 4, "--codec", str(tiny_models / "codec"), "--resume_from_checkpoint", "latest")
    assert "resumed from" in res.stdout + res.stderr
    w_after = load_decomposition_pipeline(out / "pipeline").decomposer.unet.conv_in.weight.detach().numpy()
    assert not np.allclose(w_before, w_after)


def test_train_decomposer_without_codec(tiny_models, tmp_path):
    from layergen.data.scenes import make_scene
    from layergen.decompose.learned import load_decomposition_pipeline

    out = tmp_path / "run"
    run(tiny_models, out, 1)
    pipe = load_decomposition_pipeline(out / "pipeline")
    assert pipe.codec is None
    pipe.set_progress_bar_config(disable=True)
    sc = make_scene(3, 32, num_objects=1)
    x0, y0, x1, y1 = sc.objects[0].box
    res = pipe(sc.composite, boxes=[(x0, y0, x1 - x0, y1 - y0)], num_inference_steps=2)
    assert len(res.stack) == 2 and res.psnr > 40  # untrained, yet unblending keeps the stack exact


def test_training_sample_targets_are_consistent():
    sys.path.insert(0, str(ROOT / "training"))
    from train_decomposer import make_sample

    from layergen.layers import Layer, LayerStack

    for seed in range(20):
        comp, bg, fg, mask, top = make_sample(seed, 64, top_prob=1.0, box_prob=0.0)
        assert top and mask.any()
        # peeling the top instance: layer over background target == the composite
        stack = LayerStack(64, 64, [Layer(bg), Layer(fg)])
        assert np.abs(stack.composite()[..., :3].astype(int) - comp.astype(int)).max() <= 1
