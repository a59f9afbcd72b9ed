"""Stage 1 (fit_triplanes.py) and stage 2 (train_triplane_diffusion.py) run 2 steps in a subprocess, then resume."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


def run(script, *args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "training" / script), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_fit_triplanes_then_diffusion_two_steps_and_resume(tmp_path):
    s1 = tmp_path / "stage1"
    run("fit_triplanes.py", "--output_dir", s1, "--num_subjects", 1, "--joint_steps", 2, "--planes_steps", 2,
        "--num_new_subjects", 1, "--num_eval_subjects", 1, "--eval_views", 1, "--eval_size", 16,
        "--eval_joint_subjects", 0, "--pool_size", 256, "--points_per_layer", 16, "--plane_resolution", 8,
        "--hidden_dim", 16, "--no_shift")
    assert (s1 / "decoder" / "config.json").is_file()
    assert json.loads((s1 / "decoder" / "config.json").read_text())["use_shift"] is False
    t = load_file(str(s1 / "triplanes.safetensors"))
    assert t["planes"].shape == (2, 5, 3, 9, 8, 8)                      # joint subject + new subject, 5 slots
    assert t["present"][:, 0].all() and t["planes"].abs().max() <= 1.0  # body always present; clamped planes
    metrics = json.loads((s1 / "metrics.json").read_text())
    assert metrics["use_shift"] is False and metrics["heldout"]["rows"]
    assert all(0 < r["psnr"] < 100 and -1 <= r["ssim"] <= 1 for r in metrics["heldout"]["rows"])

    s2 = tmp_path / "stage2"
    common = ["--data_dir", s1, "--output_dir", s2, "--train_batch_size", 2, "--block_out_channels", "8,16",
              "--norm_num_groups", 4, "--checkpointing_steps", 1, "--validation_steps", 0, "--use_ema"]
    run("train_triplane_diffusion.py", *common, "--max_train_steps", 2)
    assert sorted(p.name for p in s2.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert (s2 / "checkpoint-2" / "unet_ema" / "config.json").is_file()
    index = json.loads((s2 / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == "LayeredHumanPipeline" and index["unet"][1] == "LayeredTriplaneUNet"
    log = run("train_triplane_diffusion.py", *common, "--max_train_steps", 3, "--resume_from_checkpoint", "latest")
    assert "resumed from" in log and (s2 / "checkpoint-3").is_file() is False and (s2 / "checkpoint-3").is_dir()

    # continue from an EMA folder: the saved model carries only the UNet's own config
    s2b = tmp_path / "stage2b"
    run("train_triplane_diffusion.py", *common[:2], "--output_dir", s2b, *common[4:], "--max_train_steps", 1,
        "--pretrained_unet", s2 / "checkpoint-2" / "unet_ema")
    cfg = json.loads((s2b / "pipeline" / "unet" / "config.json").read_text())
    assert "decay" not in cfg and "optimization_step" not in cfg and cfg["block_out_channels"] == [8, 16]

    # phase B from the template: every new body starts at the mean phase-A body plane
    s1t = tmp_path / "stage1t"
    run("fit_triplanes.py", "--output_dir", s1t, "--decoder_path", s1 / "decoder", "--init_planes", "template",
        "--template_from", s1 / "triplanes_joint.safetensors", "--num_new_subjects", 2, "--num_eval_subjects", 1,
        "--planes_steps", 0, "--skip_eval", "--pool_size", 64)
    t = load_file(str(s1t / "triplanes.safetensors"))
    template = load_file(str(s1 / "triplanes_joint.safetensors"))["planes"][:, 0].float().mean(0)
    assert t["planes"].shape[0] == 2
    assert torch.equal(t["planes"][:, 0].float(), template.half().float().expand(2, *template.shape))
    assert not t["planes"][:, 1:].any()                                 # garment residuals start at zero
    # a planes-only run is a complete stage-1 folder: stage 2 trains on it with the given decoder
    from layergen.models.triplane import TriplaneDecoder

    copied, given = TriplaneDecoder.from_pretrained(s1t / "decoder"), TriplaneDecoder.from_pretrained(s1 / "decoder")
    assert all(torch.equal(a, b) for a, b in zip(copied.state_dict().values(), given.state_dict().values()))

    from layergen.pipelines.pipeline_layered_human import LayeredHumanPipeline

    pipe = LayeredHumanPipeline.from_pretrained(s2 / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.sample_scales[0] > 0 and pipe.decoder.config.use_shift is False
    out = pipe(layers=("body", "pants"), num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.triplanes.shape == (2, 3, 9, 8, 8) and torch.isfinite(out.triplanes).all()


def test_layer_weights_draw_a_layer_class_that_much_more_often():
    sys.path.insert(0, str(ROOT / "training"))
    import pytest
    from train_triplane_diffusion import TriplaneLayerDataset, layer_sampler, parse_layer_weights

    assert parse_layer_weights("shoes=3, hat=0.5") == [1.0, 1.0, 1.0, 3.0, 0.5]
    for bad in ("boots=2", "shoes", "shoes=many", "shoes=-1", "body=0,pants=0,shirt=0,shoes=0,hat=0"):
        with pytest.raises(ValueError, match="--layer_weights"):
            parse_layer_weights(bad)
    present = torch.ones(40, 5, dtype=torch.bool)
    present[:, 4] = False                                                 # no hats: 4 classes x 40 examples
    dataset = TriplaneLayerDataset(torch.zeros(40, 5, 3, 2, 4, 4), present)
    assert layer_sampler(dataset, None, 0) is None
    sampler = layer_sampler(dataset, "shoes=3", 0)                       # one sampler, 50 epochs
    draws = torch.tensor([dataset.items[i][1] for _ in range(50) for i in sampler])
    share = torch.bincount(draws, minlength=5).float() / len(draws)
    assert len(draws) == 50 * 160 and abs(share[3].item() - 0.5) < 0.03   # 3 / (1 + 1 + 1 + 3)
    assert all(abs(share[k].item() - 1 / 6) < 0.03 for k in range(3)) and share[4] == 0
    again = [dataset.items[i][1] for i in layer_sampler(dataset, "shoes=3", 0)]
    assert again == draws[:160].tolist()                                  # seeded: reproducible order
