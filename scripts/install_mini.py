"""Copy a trained pipeline folder into assets/layergen-mini, storing the UNet in fp16 (it loads back as fp32).

    python scripts/install_mini.py runs/layer_unet/pipeline
"""
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

src, dst = Path(sys.argv[1]), Path(__file__).resolve().parents[1] / "assets" / "layergen-mini"
for name in ("model_index.json", "scheduler", "tokenizer", "text_encoder", "unet", "vae", "transparent_encoder",
             "transparent_decoder"):
    s, d = src / name, dst / name
    if d.is_dir():
        shutil.rmtree(d)
    (shutil.copytree if s.is_dir() else shutil.copy)(s, d)
weights = dst / "unet" / "diffusion_pytorch_model.safetensors"
save_file({k: v.half().contiguous() for k, v in load_file(weights).items()}, str(weights))
print(f"installed {src} -> {dst}")
