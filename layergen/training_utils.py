"""Pieces every `training/train_*.py` script shares: checkpoint rotation, resume, previews.

Kept deliberately small; each script stays readable on its own (diffusers examples/ style).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np

logger = logging.getLogger("layergen.training")

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir) -> list[Path]:
    """`checkpoint-N` folders in `output_dir`, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(accelerator, output_dir, step: int, total_limit: int | None = None) -> Path:
    """`accelerator.save_state` into `output_dir/checkpoint-<step>`, keeping at most `total_limit` of them.

    Call on every process (accelerate gathers sharded states, e.g. under FSDP/DeepSpeed);
    rotation happens on the main process only.
    """
    path = Path(output_dir) / f"checkpoint-{step}"
    if accelerator.is_main_process and total_limit is not None:
        old = list_checkpoints(output_dir)
        for stale in old[: max(0, len(old) - total_limit + 1)]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    logger.info("saved %s", path)
    return path


def resume_step(accelerator, output_dir, resume_from: str | None) -> int:
    """Load state from `resume_from` ('latest' or a path) and return the step it was saved at (0 if none)."""
    if not resume_from:
        return 0
    if resume_from == "latest":
        ckpts = list_checkpoints(output_dir)
        if not ckpts:
            accelerator.print(f"no checkpoint in {output_dir}; starting from scratch")
            return 0
        path = ckpts[-1]
    else:
        path = Path(resume_from)
    m = _CKPT.match(path.name)
    if not path.is_dir() or not m:
        raise FileNotFoundError(f"--resume_from_checkpoint {resume_from}: no checkpoint-<step> folder at {path}")
    accelerator.load_state(str(path))
    accelerator.print(f"resumed from {path}")
    return int(m.group(1))


def optimizer_step(accelerator, params, optimizer, lr_scheduler, max_grad_norm: float) -> None:
    """The tail of an `accelerator.accumulate` block: clip on the step that syncs gradients, then step and zero."""
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad()


def averaged_copy(accelerator, model, ema=None):
    """An eval copy of `model` with the EMA weights when there are any: what validation and the saved model
    should see, taken without disturbing the weights that keep training."""
    import copy

    copied = copy.deepcopy(accelerator.unwrap_model(model)).eval()
    if ema is not None:
        ema.copy_to(copied.parameters())
    return copied


def checkerboard(height: int, width: int, cell: int = 8) -> np.ndarray:
    """Light/dark grey checkerboard, float32 H x W x 3 in [0, 1]: the usual transparency backdrop."""
    yy, xx = np.mgrid[0:height, 0:width]
    v = np.where(((yy // cell) + (xx // cell)) % 2 == 0, 0.8, 0.6).astype(np.float32)
    return np.repeat(v[..., None], 3, axis=-1)


def rgba_preview(rgba: np.ndarray) -> np.ndarray:
    """Float RGBA (H x W x 4, [0, 1]) over a checkerboard -> uint8 RGB."""
    a = rgba[..., 3:4]
    rgb = rgba[..., :3] * a + checkerboard(*rgba.shape[:2]) * (1 - a)
    return np.floor(np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


def save_image_grid(images, path, cols: int | None = None) -> None:
    """Save uint8 H x W x 3 images as one grid PNG (atomically)."""
    from PIL import Image

    from .atomic import atomic_path

    images = [np.asarray(i) for i in images]
    cols = cols or len(images)
    rows = (len(images) + cols - 1) // cols
    h, w = images[0].shape[:2]
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = img[..., :3]
    os.makedirs(Path(path).parent, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")


def load_text_encoder(spec: str, max_length: int):
    """(tokenizer, frozen text encoder, its folder) from a local folder, or 'packaged' for the bundled
    all-MiniLM-L6-v2; never downloads."""
    from transformers import AutoModel, AutoTokenizer

    from layergen.mini import packaged_text_encoder_path

    path = packaged_text_encoder_path() if spec == "packaged" else Path(spec)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, model_max_length=max_length)
    enc = AutoModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
    return tok, enc, path


def embed_texts(tokenizer, encoder, texts, batch: int = 64):
    """fp16 last hidden states of `texts` (padded to the tokenizer's max length): procedural captions repeat, so
    training scripts embed each distinct caption once and cache the result."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            t = tokenizer(texts[i:i + batch], padding="max_length", max_length=tokenizer.model_max_length,
                          truncation=True, return_tensors="pt")
            out.append(encoder(t.input_ids, attention_mask=t.attention_mask)[0].half())
    return torch.cat(out)
