import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def run(out, steps, *extra):
    cmd = [sys.executable, str(ROOT / "training" / "train_vae.py"), "--output_dir", str(out),
           "--block_out_channels", "8", "8", "8", "8", "--resolution", "64", "--crop_size", "32",
           "--train_batch_size", "2", "--max_train_steps", str(steps), "--checkpointing_steps", "2",
           "--validation_steps", "2", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_vae_trains_saves_and_resumes(tmp_path):
    from diffusers import AutoencoderKL

    out = tmp_path / "vae"
    run(out, 2)
    vae = AutoencoderKL.from_pretrained(out / "vae")
    assert vae.config.latent_channels == 4 and len(vae.config.block_out_channels) == 4  # 8x down
    assert vae.config.scaling_factor != 1.0, "scaling factor is measured from the data"
    assert (out / "validation-2.png").is_file() and (out / "checkpoint-2").is_dir()
    w_before = vae.encoder.conv_in.weight.detach().numpy().copy()
    res = run(out, 4, "--resume_from_checkpoint", "latest")
    assert "resumed from" in res.stdout + res.stderr
    w_after = AutoencoderKL.from_pretrained(out / "vae").encoder.conv_in.weight.detach().numpy()
    assert not np.allclose(w_before, w_after)


def test_zero_validation_and_checkpoint_intervals_turn_them_off(tmp_path):
    out = tmp_path / "vae"
    run(out, 2, "--validation_steps", "0", "--checkpointing_steps", "0")  # later flags win
    assert (out / "vae" / "config.json").is_file()
    assert not list(out.glob("validation-[0-9]*.png")) and not list(out.glob("checkpoint-*"))
