"""Smoke runs of the action-domain training scripts on tiny components (base UNet, VAE fine-tune, judges)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from layergen.testing import tiny_text_encoder, tiny_tokenizer, tiny_vae

ROOT = Path(__file__).resolve().parents[2]


def load(name):
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", ROOT / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    d = tmp_path_factory.mktemp("parts")
    tiny_vae().save_pretrained(d / "vae")
    tiny_text_encoder(32).save_pretrained(d / "text")
    tiny_tokenizer().save_pretrained(d / "text")
    return d


def test_base_unet_trains_saves_linked_pipeline_and_resumes(parts, tmp_path, capsys):
    out = tmp_path / "base"
    args = ["--vae", str(parts / "vae"), "--text_encoder", str(parts / "text"), "--output_dir", str(out),
            "--resolution", "32", "--num_samples", "12", "--block_out_channels", "8", "16",
            "--attention_head_dim", "4", "--train_batch_size", "4", "--checkpointing_steps", "2",
            "--validation_steps", "2", "--use_ema", "--vae_link", str(parts / "vae")]
    res = subprocess.run([sys.executable, str(ROOT / "training" / "train_action_base.py"), *args,
                          "--max_train_steps", "2"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "checkpoint-2").is_dir() and (out / "validation-2.png").is_file()
    cache = torch.load(out / "cache-12-32.pt")
    heldout = {"jumping", "waving", "kicking", "bowing"}
    assert not any(set(c.split()) & heldout for c in cache["captions"])
    assert json.loads((out / "pipeline" / "vae" / "linked.json").read_text())["path"] == str(parts / "vae")
    from layergen.pipelines.pipeline_action import ActionPipeline

    pipe = ActionPipeline.from_pretrained(out / "pipeline")
    assert pipe.unet.config.in_channels == 4 and pipe.tokenizer.model_max_length == 32
    assert torch.equal(pipe.vae.decoder.conv_out.weight, tiny_vae().decoder.conv_out.weight)
    img = np.asarray(pipe("a red cat in the snow", num_inference_steps=2, seed=0).images[0])
    assert img.shape == (32, 32, 3)

    load("train_action_base").main(args + ["--max_train_steps", "3", "--resume_from_checkpoint", "latest",
                                           "--checkpointing_steps", "1"])
    assert "resumed from" in capsys.readouterr().out
    pipe2 = ActionPipeline.from_pretrained(out / "pipeline")
    assert not torch.equal(pipe.unet.conv_in.weight, pipe2.unet.conv_in.weight)


def test_init_unet_continues_from_a_trained_unet(parts, tmp_path):
    """--init_unet takes architecture and weights from the given UNet (a pipeline folder works), not from the flags."""
    from diffusers import UNet2DConditionModel

    train = load("train_action_base")
    common = ["--vae", str(parts / "vae"), "--text_encoder", str(parts / "text"), "--resolution", "32",
              "--num_samples", "8", "--attention_head_dim", "4", "--train_batch_size", "4",
              "--checkpointing_steps", "100", "--validation_steps", "100"]
    train.main(common + ["--output_dir", str(tmp_path / "a"), "--block_out_channels", "8", "16",
                         "--max_train_steps", "1"])
    first = UNet2DConditionModel.from_pretrained(tmp_path / "a" / "pipeline" / "unet")
    train.main(common + ["--output_dir", str(tmp_path / "b"), "--block_out_channels", "16", "32",
                         "--init_unet", str(tmp_path / "a" / "pipeline"), "--max_train_steps", "0"])
    second = UNet2DConditionModel.from_pretrained(tmp_path / "b" / "pipeline" / "unet")
    assert tuple(second.config.block_out_channels) == (8, 16)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_vae_finetune_and_classifiers(parts, tmp_path):
    load("train_action_vae").main(["--pretrained_vae", str(parts / "vae"), "--output_dir", str(tmp_path / "vae"),
                                   "--resolution", "32", "--crop_size", "16", "--num_samples", "8",
                                   "--train_batch_size", "2", "--max_train_steps", "2", "--validation_steps", "2"])
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tmp_path / "vae" / "vae")
    assert vae.config.scaling_factor != tiny_vae().config.scaling_factor  # re-measured on figures

    clf = load("train_pose_classifier")
    common = ["--resolution", "32", "--input_size", "32", "--channels", "8", "8", "--num_samples", "24",
              "--num_eval", "8", "--train_batch_size", "4", "--max_train_steps", "2", "--data_cache",
              str(tmp_path / "data"), "--vae", str(parts / "vae")]
    clf.main(["--task", "pose", "--output_dir", str(tmp_path / "pose"), *common])
    clf.main(["--task", "subject", "--output_dir", str(tmp_path / "subject"), *common])
    clf.main(["--task", "scene", "--output_dir", str(tmp_path / "scene"), *common])
    assert len(list((tmp_path / "data").glob("figures-*.pt"))) == 1  # one render cache for every judge
    from layergen.data.figures import ACTIONS, make_figure
    from layergen.models.figure_classifier import FigureClassifier

    pose = FigureClassifier.from_pretrained(tmp_path / "pose" / "classifier")
    subject = FigureClassifier.from_pretrained(tmp_path / "subject" / "classifier")
    assert list(pose.config.heads) == ["action"] and list(pose.config.heads["action"]) == list(ACTIONS)
    pred = subject.predict([make_figure(s, 32).image for s in range(3)])
    assert set(pred) == {"species", "colour"} and len(pred["species"]) == 3
    scene = FigureClassifier.from_pretrained(tmp_path / "scene" / "classifier")
    assert scene.config.pooling == "global" and set(scene.predict([make_figure(0, 32).image])) == {"background"}
    metrics = json.loads((tmp_path / "pose" / "classifier" / "metrics.json").read_text())
    assert 0 <= metrics["heldout_accuracy"]["action"] <= 1
    # subjects are judged translation-invariantly, poses by where the limbs are
    assert pose.config.pooling == "flatten" and subject.config.pooling == "global"
    sm = json.loads((tmp_path / "subject" / "classifier" / "metrics.json").read_text())
    split = [k for k in ("heldout_accuracy_clean", "heldout_accuracy_vae") if k in sm]
    assert split and all(set(sm[k]) == {"species", "colour"} for k in split)
