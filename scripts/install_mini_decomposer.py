"""Install a trained learned decomposer into the bundled mini family (assets/layergen-mini).

    python scripts/install_mini_decomposer.py runs/layer_matte/layer_matte     # -> assets/layergen-mini/layer_matte
    python scripts/install_mini_decomposer.py runs/decomposer/checkpoint-1800  # -> assets/layergen-mini/decomposer
    python scripts/install_mini_decomposer.py runs/decomposer/pipeline --dest runs/dec_export/try

A `LayerMatteNet` folder (what training/train_layer_matte.py saves, or its output_dir) is written in fp16 to
assets/layergen-mini/layer_matte (or --dest). For the latent-diffusion decomposer:

SOURCE is either an accelerate checkpoint of training/train_decomposer.py (its EMA weights are used when
it has them, else the raw model) or a pipeline folder that script wrote (`<output_dir>/pipeline`).
Only the decomposer is written, in fp16 (it loads back as fp32), with its own scheduler config
(`decomposer/scheduler_config.json`: the mini's scheduler/ belongs to the text-to-layer UNet). The VAE is
not copied: the decomposer must have been trained with the bundled assets/layergen-mini/vae, which this
checks by content hash (`--vae` names the VAE it was trained with; default: the bundled one).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from layergen.atomic import atomic_dir  # noqa: E402
from layergen.decompose.learned import LayerDecomposer  # noqa: E402
from layergen.decompose.matte_net import find_layer_matte  # noqa: E402
from layergen.errors import LayergenError  # noqa: E402

MINI = ROOT / "assets" / "layergen-mini"
# training/train_decomposer.py: DDPM squaredcos_cap_v2, v-prediction; sampled with DDIM
SCHEDULER = {"_class_name": "DDIMScheduler", "beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000,
             "prediction_type": "v_prediction", "clip_sample": False}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", help="accelerate checkpoint folder or pipeline folder")
    p.add_argument("--dest", default=None,
                   help="folder to write (default: assets/layergen-mini/layer_matte or .../decomposer)")
    p.add_argument("--config", default=None,
                   help="folder with the decomposer's config.json (checkpoints do not hold it); default: "
                        "<source>/decomposer, then <source>/../pipeline/decomposer, then runs/dec_export/pipeline/decomposer")
    p.add_argument("--vae", default=str(MINI / "vae"), help="the VAE the decomposer was trained with")
    p.add_argument("--no_ema", action="store_true", help="use the raw weights of a checkpoint, not its EMA")
    return p.parse_args(argv)


def load_weights(source: Path, model: LayerDecomposer, use_ema: bool) -> str:
    if (source / "decomposer" / "config.json").is_file():
        state = load_file(source / "decomposer" / "diffusion_pytorch_model.safetensors")
        model.load_state_dict({k: v.float() for k, v in state.items()})
        return "pipeline weights"
    ema_path = source / "custom_checkpoint_0.pkl"
    if use_ema and ema_path.is_file():
        ema = torch.load(ema_path, map_location="cpu", weights_only=False)
        params = list(model.parameters())
        if len(ema["shadow_params"]) != len(params):
            raise LayergenError(f"{ema_path}: {len(ema['shadow_params'])} EMA tensors, the model has {len(params)}")
        with torch.no_grad():
            for p, s in zip(params, ema["shadow_params"]):
                p.copy_(s.float())
        return f"EMA weights (step {ema.get('optimization_step')})"
    state = load_file(source / "model.safetensors")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return "raw weights"


def install_matte(source: Path, dest: Path) -> None:
    """A `LayerMatteNet` folder (training/train_layer_matte.py writes `<output_dir>/layer_matte`) -> fp16 copy."""
    from layergen.decompose.matte_net import LayerMatteNet

    model = LayerMatteNet.from_pretrained(source).eval()
    with atomic_dir(dest) as tmp:
        model.to(torch.float16).save_pretrained(tmp)
        (Path(tmp) / "source.json").write_text(json.dumps({"source": str(source)}, indent=2) + "\n")
    size = (dest / "diffusion_pytorch_model.safetensors").stat().st_size / 2 ** 20
    print(f"installed {source} -> {dest} ({size:.1f} MB fp16)")


def main(argv=None):
    args = parse_args(argv)
    source = Path(args.source)
    matte = find_layer_matte(source)
    if matte is not None:
        return install_matte(matte, Path(args.dest or MINI / "layer_matte"))
    dest = Path(args.dest or MINI / "decomposer")
    vae_weights = Path(args.vae) / "diffusion_pytorch_model.safetensors"
    mini_weights = MINI / "vae" / "diffusion_pytorch_model.safetensors"
    if _sha(vae_weights) != _sha(mini_weights):
        raise LayergenError(f"{args.vae} is not the bundled mini VAE; a decomposer trained with it cannot share "
                            "assets/layergen-mini/vae — save a full pipeline folder instead")
    configs = [Path(args.config)] if args.config else [source / "decomposer", source.parent / "pipeline" / "decomposer",
                                                       ROOT / "runs" / "dec_export" / "pipeline" / "decomposer"]
    config = next((c for c in configs if (c / "config.json").is_file()), None)
    if config is None:
        raise LayergenError(f"no decomposer config.json in {', '.join(map(str, configs))}; pass --config")
    model = LayerDecomposer.from_config(LayerDecomposer.load_config(config)).eval()
    what = load_weights(source, model, not args.no_ema)
    with atomic_dir(dest) as tmp:
        tmp = Path(tmp)
        model.save_pretrained(tmp)
        weights = tmp / "diffusion_pytorch_model.safetensors"
        save_file({k: v.half().contiguous() for k, v in load_file(weights).items()}, str(weights))
        (tmp / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2) + "\n")
        (tmp / "source.json").write_text(json.dumps({"source": str(source), "weights": what}, indent=2) + "\n")
    size = (dest / "diffusion_pytorch_model.safetensors").stat().st_size / 2 ** 20
    print(f"installed {source} ({what}) -> {dest} ({size:.1f} MB fp16)")


if __name__ == "__main__":
    main()
