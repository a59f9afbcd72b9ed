"""Install the mini action model (+ its benchmark judges) into assets/layergen-mini/action.

    python scripts/install_mini_action.py                                  # the runs/action/ defaults
    python scripts/install_mini_action.py --pipeline runs/action/base/pipeline \\
        --pose runs/action/pose/classifier --subject runs/action/subject/classifier \\
        --scene runs/action/scene/classifier

Every weight file is stored in fp16 (half the size; `from_pretrained` loads it back as fp32),
so the folder stays under ~20 MB. The folder is built beside the target and swapped in
atomically: a failed install leaves the previous one untouched.
"""
import argparse
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ("model_index.json", "scheduler", "tokenizer", "text_encoder", "unet", "vae")


def to_fp16(folder: Path) -> None:
    for f in folder.rglob("*.safetensors"):
        save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in load_file(f).items()},
                  str(f))
        f.chmod(0o644)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", default=str(ROOT / "runs" / "action" / "base" / "pipeline"))
    p.add_argument("--pose", default=str(ROOT / "runs" / "action" / "pose" / "classifier"))
    p.add_argument("--subject", default=str(ROOT / "runs" / "action" / "subject" / "classifier"))
    p.add_argument("--scene", default=str(ROOT / "runs" / "action" / "scene" / "classifier"),
                   help="Background judge (train_pose_classifier.py --task scene).")
    p.add_argument("--dest", default=str(ROOT / "assets" / "layergen-mini" / "action"))
    args = p.parse_args(argv)

    import sys

    sys.path.insert(0, str(ROOT))
    from layergen.atomic import atomic_dir

    src = Path(args.pipeline)
    with atomic_dir(args.dest) as tmp:
        for name in COMPONENTS:
            s = src / name
            (shutil.copytree if s.is_dir() else shutil.copy)(s, tmp / name)
        for name, folder in (("pose", args.pose), ("subject", args.subject), ("scene", args.scene)):
            shutil.copytree(folder, tmp / "classifiers" / name)
        to_fp16(tmp)
    size = sum(f.stat().st_size for f in Path(args.dest).rglob("*") if f.is_file())
    print(f"installed {src} (+ classifiers) -> {args.dest} ({size / 2 ** 20:.1f} MiB)")


if __name__ == "__main__":
    main()
