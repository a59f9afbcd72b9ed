import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "training"))


def run(out, steps, *extra):
    cmd = [sys.executable, str(ROOT / "training" / "train_layer_matte.py"), "--output_dir", str(out),
           "--resolution", "32", "--block_out_channels", "16", "32", "--train_batch_size", "3",
           "--max_train_steps", str(steps), "--checkpointing_steps", "2", "--validation_steps", "2",
           "--num_validation", "2", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_train_layer_matte_saves_loads_and_resumes(tmp_path):
    from safetensors.torch import load_file

    from layergen.decompose.learned import load_decomposition_pipeline

    out = tmp_path / "run"
    run(out, 4, "--use_ema")
    assert (out / "checkpoint-4").is_dir() and (out / "validation-2.png").is_file()
    first = load_file(out / "layer_matte" / "diffusion_pytorch_model.safetensors")
    res = run(out, 6, "--use_ema", "--resume_from_checkpoint", "latest", "--dataloader_num_workers", "2")
    assert "4/6" in res.stderr  # continued from step 4, not from scratch
    second = load_file(out / "layer_matte" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(first[k], second[k]) for k in first)  # the two resumed steps trained
    pipe = load_decomposition_pipeline(out / "layer_matte")
    assert pipe.matte.config.sample_size == 32 and pipe.matte.config.block_out_channels == [16, 32]
    # a new session continues a shipped matte without its checkpoints: its weights and architecture, not the flags'
    run(tmp_path / "continued", 0, "--init_matte", str(out / "layer_matte"), "--block_out_channels", "8", "16")
    third = load_file(tmp_path / "continued" / "layer_matte" / "diffusion_pytorch_model.safetensors")
    assert third.keys() == second.keys() and all(torch.equal(second[k], third[k]) for k in second)


def test_training_targets_match_the_composite():
    from train_layer_matte import scene_samples

    for seed in range(30):
        samples = scene_samples(seed, 64)
        for k, (comp, inst, others, amodal, visible, colour) in enumerate(samples):
            assert (visible <= amodal).all()
            if k == len(samples) - 1:
                assert np.array_equal(visible, amodal)  # nothing above the top instance
            solid = visible == 255  # fully visible, opaque: the composite shows the layer's own colour
            assert np.abs(comp[solid].astype(int) - colour[solid].astype(int)).max(initial=0) <= 1
            assert inst.dtype == np.uint8 and inst.max() == 255
            if (amodal > 250).any():  # the opaque body lies in its own box (glass bodies are never > 0.9)
                assert (inst[amodal > 250] == 255).mean() > 0.95
            assert not (others & inst).all()


def test_box_jitter_moves_boxes_but_not_targets():
    from train_layer_matte import scene_samples

    a = scene_samples(3, 64)
    b = scene_samples(3, 64, jitter=3, rng=np.random.default_rng(0))
    assert all(np.array_equal(x[3], y[3]) and np.array_equal(x[0], y[0]) for x, y in zip(a, b))
    assert any(not np.array_equal(x[1], y[1]) for x, y in zip(a, b))


def test_scene_stream_differs_per_worker_and_start_step_and_is_reproducible():
    from train_layer_matte import SceneStream

    def first(n, stream, workers=0):
        loader = torch.utils.data.DataLoader(stream, batch_size=n, collate_fn=list, num_workers=workers)
        return [s[0] for s in next(iter(loader))]  # the composites

    def same(a, b):
        return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))

    a = first(4, SceneStream(32, 2, 0, 0, 0))
    assert same(a, first(4, SceneStream(32, 2, 0, 0, 0)))  # a run is reproducible
    assert not same(a, first(4, SceneStream(32, 2, 0, 10, 0)))  # a resumed run draws new scenes
    assert not same(a, first(4, SceneStream(32, 2, 0, 0, 1)))  # so does every other process
    loader = torch.utils.data.DataLoader(SceneStream(32, 2, 0, 0, 0), batch_size=4, collate_fn=list, num_workers=2)
    batches = iter(loader)
    w0, w1 = [[s[0] for s in next(batches)] for _ in range(2)]  # batches alternate between the two workers
    assert same(w0, a) and not same(w0, w1)
