import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from layergen.testing import tiny_codec, tiny_text_encoder, tiny_tokenizer, tiny_vae

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    d = tmp_path_factory.mktemp("parts")
    tiny_vae().save_pretrained(d / "vae")
    enc, dec = tiny_codec()
    enc.save_pretrained(d / "codec" / "transparent_encoder")
    dec.save_pretrained(d / "codec" / "transparent_decoder")
    tiny_text_encoder(32).save_pretrained(d / "text")
    tiny_tokenizer().save_pretrained(d / "text")
    return d


def train(parts, out, steps, *extra):
    cmd = [sys.executable, str(ROOT / "training" / "train_layer_unet.py"), "--vae", str(parts / "vae"),
           "--codec", str(parts / "codec"), "--text_encoder", str(parts / "text"), "--output_dir", str(out),
           "--resolution", "32", "--num_samples", "8", "--block_out_channels", "8", "16", "--layers_per_block", "1",
           "--attention_head_dim", "4", "--train_batch_size", "4", "--max_train_steps", str(steps),
           "--checkpointing_steps", "2", "--validation_steps", "2", "--use_ema", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_trains_saves_a_loadable_pipeline_and_resumes(parts, tmp_path):
    out = tmp_path / "run"
    train(parts, out, 2)
    assert (out / "checkpoint-2").is_dir() and (out / "validation-2.png").is_file()
    assert (out / "pipeline" / "model_index.json").is_file()
    from layergen.pipelines import TransparentLayerPipeline

    pipe = TransparentLayerPipeline.from_pretrained(out / "pipeline")
    assert pipe.unet.config.in_channels == 8 and pipe.unet.config.num_class_embeds == 3
    assert pipe.tokenizer.model_max_length == 32
    img = pipe("a red star", num_inference_steps=2, seed=0, tta=False).images[0]
    assert img.mode == "RGBA" and img.size == (32, 32)

    res = train(parts, out, 4, "--resume_from_checkpoint", "latest")
    assert "resumed from" in res.stdout + res.stderr
    assert (out / "checkpoint-4").is_dir()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    pipe2 = TransparentLayerPipeline.from_pretrained(out / "pipeline")
    w1 = pipe.unet.conv_in.weight.detach().numpy()
    w2 = pipe2.unet.conv_in.weight.detach().numpy()
    assert not np.allclose(w1, w2), "resumed training must keep updating the weights"


def test_init_unet_continues_from_given_weights(parts, tmp_path):
    """--init_unet starts from existing weights and their config, not a fresh UNet built from the flags."""
    first = tmp_path / "first"
    train(parts, first, 2)
    from diffusers import UNet2DConditionModel

    start = UNet2DConditionModel.from_pretrained(first / "pipeline" / "unet")
    second = tmp_path / "second"
    # Zero learning rate: the continued model must equal its starting weights exactly.
    train(parts, second, 2, "--init_unet", str(first / "pipeline"), "--learning_rate", "0",
          "--block_out_channels", "16", "32")
    cont = UNet2DConditionModel.from_pretrained(second / "pipeline" / "unet")
    assert cont.config.block_out_channels == start.config.block_out_channels
    for a, b in zip(start.state_dict().values(), cont.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy())


def test_lr_schedule_warms_up_then_decays_to_zero_counting_every_process():
    sys.path.insert(0, str(ROOT / "training"))
    from train_layer_unet import make_lr_scheduler, parse_args

    def factors(args, num_processes, steps):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched, out = make_lr_scheduler(args, opt, num_processes), []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            for _ in range(num_processes):  # a prepared scheduler steps once per process
                opt.step()
                sched.step()
        return out

    args = parse_args(["--vae", "v", "--codec", "c", "--output_dir", "o", "--max_train_steps", "110",
                       "--lr_warmup_steps", "10", "--lr_scheduler", "cosine"])
    for procs in (1, 2):
        f = factors(args, procs, 111)
        assert f[0] == 0.0 and abs(f[5] - 0.5) < 1e-9 and f[10] == 1.0
        assert abs(f[60] - 0.5) < 1e-9 and f[110] < 1e-9 and all(a >= b for a, b in zip(f[10:], f[11:]))
    args.lr_scheduler = "constant"
    assert factors(args, 1, 101)[100] == 1.0
