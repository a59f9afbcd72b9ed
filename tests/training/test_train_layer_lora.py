"""training/train_layer_lora.py on tiny components: LoRA that `load_lora_weights` loads and that changes the
output, resume from the latest checkpoint, full fine-tuning in conditional mode, bad records counted."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from layergen.data.scenes import make_object_layer, make_scene
from layergen.layers import save
from layergen.pipelines import ForegroundOnBackgroundPipeline, TransparentLayerPipeline
from layergen.testing import tiny_layer_components

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "training" / "train_layer_lora.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    TransparentLayerPipeline(**tiny_layer_components()).save_pretrained(d / "model")
    data = d / "data"
    data.mkdir()
    rows = []
    for i in range(6):
        obj = make_object_layer(i, 32, shape="hexagon")
        Image.fromarray(obj.rgba).save(data / f"hex{i}.png")
        rows.append(json.dumps({"file_name": f"hex{i}.png", "text": obj.caption}))
    (data / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(data / "opaque.png")        # no alpha
    Image.fromarray(np.zeros((32, 32, 4), np.uint8)).save(data / "blank.png")         # fully transparent
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x01" * 30)           # corrupt
    save(make_scene(3, 32, num_objects=2).to_stack(), data / "scene.psd")           # 2 records with backgrounds
    return d


def train(setup, out, *extra):
    cmd = [sys.executable, str(SCRIPT), "--pretrained_model_name_or_path", str(setup / "model"),
           "--train_data_dir", str(setup / "data"), "--output_dir", str(out), "--resolution", "32",
           "--train_batch_size", "4", "--learning_rate", "5e-2", "--seed", "0", *map(str, extra)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONPATH=str(ROOT))
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


def train_in_process(setup, out, *extra):
    """The same script through its `main(argv)` (no interpreter start-up: the tests stay fast)."""
    import importlib.util

    from accelerate.state import AcceleratorState

    spec = importlib.util.spec_from_file_location("train_layer_lora", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.main(["--pretrained_model_name_or_path", str(setup / "model"), "--train_data_dir",
                     str(setup / "data"), "--output_dir", str(out), "--resolution", "32", "--train_batch_size", "4",
                     "--learning_rate", "5e-2", "--seed", "0", *map(str, extra)])
    finally:
        AcceleratorState._reset_state(True)


def generate(pipe, prompt="a red hexagon"):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=3, seed=0, tta=False, output_type="np").images[0].astype(np.int16)


def lora_tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_lora_saves_loads_changes_output_and_resumes(setup, tmp_path):
    out = tmp_path / "run"
    log = train(setup, out, "--max_train_steps", 2, "--checkpointing_steps", 2, "--checkpoints_total_limit", 1,
                "--rank", 4, "--lora_alpha", 8, "--lora_conv", "--validation_prompt", "a red hexagon",
                "--validation_steps", 2, "--validation_inference_steps", 2, "--num_validation_images", 2)
    assert "8 records; skipped 4: 1 background, 1 corrupt, 1 empty, 1 no_alpha" in log
    assert (out / "validation-2.png").is_file() and (out / "validation-final.png").is_file()
    grid = Image.open(out / "validation-final.png")
    assert grid.size == (64, 32)                                          # 1 prompt x 2 images of 32 px
    weights = out / "pytorch_lora_weights.safetensors"
    tensors, meta = lora_tensors(weights)
    assert all(k.startswith("unet.") and ".lora" in k for k in tensors)   # diffusers' LoRA file layout
    # one key format throughout (PEFT): diffusers guesses a file's format from its first key
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert any(".to_q.lora" in k for k in tensors) and any(".conv1.lora" in k for k in tensors)
    assert all(v.shape[0] == 4 for k, v in tensors.items() if ".lora.down." in k or ".lora_A." in k)
    config = json.loads(meta["lora_adapter_metadata"])                  # the LoRA config rides along
    assert config["unet.lora_alpha"] == 8 and config["unet.r"] == 4
    ckpt = out / "checkpoint-2"
    assert (ckpt / "pytorch_lora_weights.safetensors").is_file()
    assert not list(ckpt.glob("model*.safetensors"))                     # checkpoints hold the LoRA, not the UNet

    pipe = TransparentLayerPipeline.from_pretrained(setup / "model")
    base = generate(pipe)
    pipe.load_lora_weights(out)
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="default_0")
    saved = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in tensors.items()})
    assert loaded.keys() == saved.keys()                                 # every module, attention and conv
    for k in saved:
        torch.testing.assert_close(loaded[k], saved[k])
    tuned = generate(pipe)
    assert np.abs(tuned - base).mean() > 1.0, "the LoRA must change the generated layer"
    pipe.unload_lora_weights()
    assert np.array_equal(generate(pipe), base)
    fob = ForegroundOnBackgroundPipeline.from_pretrained(setup / "model")  # any layergen pipeline loads it
    fob.load_lora_weights(out)
    assert "default_0" in fob.get_active_adapters()

    log = train(setup, out, "--max_train_steps", 4, "--checkpointing_steps", 2, "--checkpoints_total_limit", 1,
                "--rank", 4, "--lora_alpha", 8, "--lora_conv", "--resume_from_checkpoint", "latest")
    assert f"resumed from {ckpt}" in log
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]   # rotation kept one
    resumed, _ = lora_tensors(weights)
    assert resumed.keys() == tensors.keys()
    assert any(not torch.equal(resumed[k], tensors[k]) for k in tensors), "resumed training must update the LoRA"

    # a straight 4-step run ends at the same weights as 2 + resume + 2
    straight = tmp_path / "straight"
    train_in_process(setup, straight, "--max_train_steps", 4, "--checkpointing_steps", 100, "--rank", 4,
                     "--lora_alpha", 8, "--lora_conv")
    again, _ = lora_tensors(straight / "pytorch_lora_weights.safetensors")
    for k in tensors:
        torch.testing.assert_close(again[k], resumed[k], rtol=1e-3, atol=1e-4)  # summation-order noise of a few ulps x steps


def test_full_finetune_conditional_writes_a_pipeline(setup, tmp_path, capsys):
    out = tmp_path / "full"
    train_in_process(setup, out, "--full_finetune", "--conditional", "--max_train_steps", 2, "--use_ema",
                     "--gradient_checkpointing", "--mixed_precision", "bf16", "--checkpointing_steps", 1,
                     "--checkpoints_total_limit", 2, "--cache_latents", "no")
    log = capsys.readouterr().out
    assert "full fine-tuning" in log and "streamed" in log
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    tuned = ForegroundOnBackgroundPipeline.from_pretrained(out / "pipeline")
    base = ForegroundOnBackgroundPipeline.from_pretrained(setup / "model")
    changed = [n for n, p in tuned.unet.named_parameters()
               if not torch.equal(p, dict(base.unet.named_parameters())[n])]
    assert "conv_in.weight" in changed and "class_embedding.weight" in changed
    bg = np.asarray(make_scene(1, 32).background)
    out_img = tuned("a red hexagon", bg, num_inference_steps=2, seed=0, tta=False, output_type="stack").images[0]
    assert out_img.layers[-1].pixels.shape == (32, 32, 4)


@pytest.mark.parametrize("kind", ["sdxl", "plain"])
def test_sdxl_class_and_plain_unets(setup, tmp_path, kind):
    """SDXL-class (two text encoders, pooled text + size ids) and SD 1.5-class (4-channel, no task label) UNets."""
    model = tmp_path / kind
    comps = tiny_layer_components(sdxl=True) if kind == "sdxl" else tiny_layer_components(conditional=False)
    TransparentLayerPipeline(**comps).save_pretrained(model)
    train_in_process(setup, tmp_path / "run", "--pretrained_model_name_or_path", model, "--max_train_steps", 2,
                     "--rank", 4)
    pipe = TransparentLayerPipeline.from_pretrained(model)
    base = generate(pipe)
    pipe.load_lora_weights(tmp_path / "run")
    assert np.abs(generate(pipe) - base).mean() > 1.0


def test_every_saved_lora_loads_when_the_first_block_has_no_attention(setup, tmp_path):
    """The bundled mini's layout (DownBlock2D first): a mixed-format file used to lose every attention LoRA."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import get_peft_model_state_dict

    comps = tiny_layer_components()
    torch.manual_seed(0)
    comps["unet"] = UNet2DConditionModel(
        sample_size=4, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=4, num_class_embeds=3)
    model = tmp_path / "model"
    TransparentLayerPipeline(**comps).save_pretrained(model)
    train_in_process(setup, tmp_path / "run", "--pretrained_model_name_or_path", model, "--max_train_steps", 2,
                     "--rank", 4, "--lora_conv")
    tensors, _ = lora_tensors(tmp_path / "run" / "pytorch_lora_weights.safetensors")
    assert next(iter(tensors)).startswith("unet.down_blocks.0.resnets")  # the first key is a convolution
    pipe = TransparentLayerPipeline.from_pretrained(model)
    pipe.load_lora_weights(tmp_path / "run")
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="default_0")
    saved = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in tensors.items()})
    assert any(".attn2.to_k." in k for k in loaded) and loaded.keys() == saved.keys()
    for k in saved:
        torch.testing.assert_close(loaded[k], saved[k])


def test_bad_setups_fail_with_one_clear_error(setup, tmp_path):
    from layergen.errors import LayergenError

    plain = tmp_path / "plain"
    TransparentLayerPipeline(**tiny_layer_components(conditional=False)).save_pretrained(plain)
    with pytest.raises(LayergenError, match="needs a UNet with 8 input channels"):
        train_in_process(setup, tmp_path / "o1", "--pretrained_model_name_or_path", plain, "--conditional",
                         "--max_train_steps", 1)
    with pytest.raises(LayergenError, match="--target_modules 'to_nothing'"):
        train_in_process(setup, tmp_path / "o3", "--target_modules", "to_nothing", "--max_train_steps", 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(empty / "opaque.png")
    with pytest.raises(LayergenError, match=r"no usable training records \(0 records; skipped 1: 1 no_alpha"):
        train_in_process(setup, tmp_path / "o2", "--train_data_dir", empty, "--max_train_steps", 1)
