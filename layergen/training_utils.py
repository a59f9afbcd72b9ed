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

from .seeds import seed_arg

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


def due(step: int, every: int | None) -> bool:
    """True every `every` steps; 0 or None never (so `--validation_steps 0` turns validation off)."""
    return bool(every) and step % every == 0


def _number(kind, low: float, low_ok: bool, high: float | None = None, high_ok: bool = False):
    """An argparse `type=` for a finite number in a range: a bad value is a usage error (exit 2) before
    anything loads, not a traceback from the optimiser or a run that trains nothing."""
    import argparse
    import math

    span = f"{'[' if low_ok else '('}{low:g}, " + (f"{high:g}{']' if high_ok else ')'}" if high is not None else "inf)")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        inside = math.isfinite(value) and (value >= low if low_ok else value > low) and (
            high is None or (value <= high if high_ok else value < high))
        if not inside:
            raise argparse.ArgumentTypeError(f"must be in {span}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, 1, True)
non_negative_int = _number(int, 0, True)
positive_float = _number(float, 0, False)
non_negative_float = _number(float, 0, True)
unit_float = _number(float, 0, True, 1, False)  # decays, quantiles


def run_script(main) -> None:
    """`if __name__ == "__main__": run_script(main)`: a bad data folder or model path (a `LayergenError`) ends
    the script with one line and exit code 2, like the `layergen` CLI, instead of a traceback."""
    import sys

    from .errors import LayergenError

    try:
        main()
    except LayergenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def local_model(path, flag: str) -> Path:
    """A model folder given on the command line, checked before loading: a missing path is a clear error, never
    a Hub repo id to download."""
    from .errors import ModelNotFoundError

    path = Path(path)
    if not path.is_dir():
        raise ModelNotFoundError(f"{flag} {path}: no such folder (training never downloads; pass a model folder "
                                 "on disk)")
    return path


def add_training_args(parser, *, train_batch_size: int, max_train_steps: int, learning_rate: float,
                      lr_warmup_steps: int, checkpointing_steps: int = 250, validation_steps: int = 500,
                      checkpoints_total_limit: int = 2, ema_decay: float | None = 0.995) -> None:
    """The optimisation, checkpoint and logging flags the training scripts share, named as in diffusers
    examples/; each script passes its own defaults. `ema_decay=None`: the script keeps no EMA."""
    p = parser
    p.add_argument("--train_batch_size", type=positive_int, default=train_batch_size)
    p.add_argument("--max_train_steps", type=non_negative_int, default=max_train_steps)  # 0: save the initial model
    p.add_argument("--learning_rate", type=non_negative_float, default=learning_rate)
    p.add_argument("--lr_warmup_steps", type=non_negative_int, default=lr_warmup_steps)
    if ema_decay is not None:
        p.add_argument("--use_ema", action="store_true", help="Keep an EMA of the weights; it is what is saved.")
        p.add_argument("--ema_decay", type=unit_float, default=ema_decay)
    p.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    p.add_argument("--max_grad_norm", type=positive_float, default=1.0)
    p.add_argument("--checkpointing_steps", type=non_negative_int, default=checkpointing_steps)
    p.add_argument("--checkpoints_total_limit", type=non_negative_int, default=checkpoints_total_limit)
    p.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-N folder.")
    p.add_argument("--validation_steps", type=non_negative_int, default=validation_steps)
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--report_to", default=None, help='"tensorboard", "wandb", ... (needs the package).')
    p.add_argument("--seed", type=seed_arg, default=0)


def start_accelerator(args, project: str):
    """An `Accelerator` from the shared flags, with the `--report_to` trackers started (flags logged as config).

    Logs go to <output_dir>/logs: tensorboard (and any tracker that writes files) refuses to start without a
    logging directory."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out = Path(args.output_dir)
    accelerator = Accelerator(gradient_accumulation_steps=getattr(args, "gradient_accumulation_steps", 1),
                              mixed_precision=getattr(args, "mixed_precision", "no"),
                              log_with=getattr(args, "report_to", None),
                              project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if getattr(args, "report_to", None):
        accelerator.init_trackers(project, config={k: str(v) for k, v in vars(args).items()})
    return accelerator


def step_schedule(optimizer, factor, num_processes: int = 1):
    """`LambdaLR` whose `factor(step)` is called with optimisation steps: once `accelerator.prepare`d, a scheduler
    steps once per process per optimisation step (diffusers convention), which would otherwise run every
    warm-up and decay `num_processes` times too fast."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: factor(s // num_processes))


def prepare_training(accelerator, args, model, output_dir, lr_scheduler=None, weight_decay: float = 1e-2):
    """The set-up the UNet-style scripts share: an EMA of `model` (with --use_ema; saved in checkpoints), AdamW,
    a learning-rate schedule, `accelerator.prepare`, then resume. Returns
    (model, optimizer, lr_scheduler, ema, global_step).

    A prepared scheduler steps once per process per optimisation step (diffusers convention), so schedules
    are built in process-scaled steps: the warm-up lasts --lr_warmup_steps optimisation steps on any number
    of GPUs. `lr_scheduler(optimizer, num_processes)` replaces the default (linear warm-up, then constant).
    """
    import torch
    from diffusers.training_utils import EMAModel

    ema = EMAModel(model.parameters(), decay=args.ema_decay, model_cls=type(model),
                   model_config=model.config) if args.use_ema else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=weight_decay)
    n = accelerator.num_processes
    schedule = (lr_scheduler(optimizer, n) if lr_scheduler is not None else
                step_schedule(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.lr_warmup_steps)), n))
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    return model, optimizer, schedule, ema, resume_step(accelerator, output_dir, args.resume_from_checkpoint)


def finish_step(accelerator, args, output_dir, global_step: int, progress, logs: dict, ema=None,
                params=None) -> int:
    """Bookkeeping once an optimizer step has synced gradients: EMA update of `params`, step count, progress bar
    and tracker logs (tensors averaged over processes, plain numbers such as the learning rate as they are),
    rotating checkpoint. Returns the new step count."""
    import torch

    if ema is not None:
        ema.step(params)
    global_step += 1
    tensors = [k for k, v in logs.items() if not isinstance(v, (int, float))]
    if tensors:  # one collective for all of them: each process's means, averaged (equal batches per process)
        local = torch.stack([logs[k].detach().float().mean() for k in tensors])
        logs = {**logs, **dict(zip(tensors, accelerator.gather(local[None]).mean(0).tolist()))}
    progress.update(1)
    progress.set_postfix({k: f"{v:.4g}" for k, v in logs.items()})
    accelerator.log(logs, step=global_step)
    if due(global_step, args.checkpointing_steps):
        save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
    return global_step


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


def save_text_pipeline(pipe, dest, text_encoder: str, text_path, finish=None) -> None:
    """Save `pipe` (built with `text_encoder=None`) atomically as `dest` with its text encoder: the pointer to
    the packaged MiniLM for `--text_encoder packaged` (its weights ship once, with layergen), else a copy of the
    local folder `text_path`. `finish(folder)` may add to the folder before it is published."""
    import json

    from .atomic import atomic_dir
    from .mini import write_packaged_pointer

    with atomic_dir(dest) as tmp:
        pipe.save_pretrained(tmp)
        if text_encoder == "packaged":
            write_packaged_pointer(tmp / "text_encoder")
        else:
            shutil.copytree(text_path, tmp / "text_encoder", dirs_exist_ok=True)
        index = json.loads((tmp / "model_index.json").read_text())
        index["text_encoder"] = ["transformers", "BertModel"]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        if finish is not None:
            finish(tmp)


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


def rgb_latents(vae, images):
    """fp16 scaled latent means of uint8 HxWx3 `images`: what the training caches store for RGB pictures."""
    import torch

    with torch.no_grad():
        rgb = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        return (vae.encode(rgb).latent_dist.mean * vae.config.scaling_factor).half()


def rgba_latents(vae, encoder, images):
    """fp16 latents of uint8 HxWx4 `images` through the transparent encoder: what the caches store for layers."""
    import torch

    from layergen.models.transparent_codec import encode_rgba

    with torch.no_grad():
        rgba = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
        return encode_rgba(vae, encoder, rgba).half()


def layer_and_background_latents(vae, encoder, count: int, resolution: int, **progress) -> dict:
    """fp16 latents of procedural object layers (through the transparent encoder) and of plain backgrounds, seeds
    0..count-1, with their captions: train_layer_unet's text->layer / text->background data, which
    train_multilayer replays. `progress`: tqdm keywords (desc, disable)."""
    import torch
    from tqdm.auto import tqdm

    from layergen.data.scenes import make_object_layer, make_scene

    fg, bg, fg_caps, bg_caps = [], [], [], []
    with torch.no_grad():
        for start in tqdm(range(0, count, 32), **progress):
            seeds = range(start, min(start + 32, count))
            objs = [make_object_layer(s, resolution, centred=False, exclude_heldout=True) for s in seeds]
            scenes = [make_scene(s, resolution, num_objects=0) for s in seeds]
            fg.append(rgba_latents(vae, encoder, [o.rgba for o in objs]))
            bg.append(rgb_latents(vae, [s.background for s in scenes]))
            fg_caps += [o.caption for o in objs]
            bg_caps += [s.background_caption for s in scenes]
    return {"fg": torch.cat(fg) if fg else None, "bg": torch.cat(bg) if bg else None,
            "fg_caps": fg_caps, "bg_caps": bg_caps}
