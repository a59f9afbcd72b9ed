import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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
