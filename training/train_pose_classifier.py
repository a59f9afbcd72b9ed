#!/usr/bin/env python
"""Train the independent judges of the action benchmark on procedural renders.

    python training/train_pose_classifier.py --task pose --output_dir runs/pose_clf
    python training/train_pose_classifier.py --task subject --output_dir runs/subject_clf
    python training/train_pose_classifier.py --task scene --output_dir runs/scene_clf

`--task pose` learns the 11 `ACTIONS` from the renders' known pose labels (position-aware
features); `--task subject` learns species and colour (translation-invariant pooling: a
species cue such as ears or a beak can be anywhere in the frame); `--task scene` learns the 5
backgrounds (global pooling). None ever sees generator output: that independence is what lets
`benchmarks/actions.py` score generators with them. To make them robust to what a latent generator
does to pixels, a fraction of training images goes through the frozen base VAE (`--vae`, encode +
decode) and all get blur, noise and small shifts.

Training seeds are below `HELDOUT_SEED_START`; accuracy on held-out seeds is printed and
saved in `<output_dir>/classifier/metrics.json`, overall and split into clean renders and VAE
round-trips (the latter is what generated images look like). Resume with `--resume_from_checkpoint latest`.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from layergen.atomic import atomic_dir
from layergen.data.figures import ACTIONS, FIGURE_BACKGROUNDS, FIGURE_COLOURS, HELDOUT_SEED_START, SPECIES, make_figure
from layergen.models.figure_classifier import FigureClassifier
from layergen.training_utils import finish_step, local_model, resume_step, run_script, start_accelerator, step_schedule

logger = logging.getLogger(__name__)

TASKS = {"pose": {"action": list(ACTIONS)}, "subject": {"species": list(SPECIES), "colour": list(FIGURE_COLOURS)},
         "scene": {"background": list(FIGURE_BACKGROUNDS)}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a pose, subject or scene classifier of procedural figures.")
    p.add_argument("--task", choices=sorted(TASKS), required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--input_size", type=int, default=64)
    p.add_argument("--channels", type=int, nargs="+", default=[32, 64, 96, 128])
    p.add_argument("--pooling", default=None, choices=["flatten", "global"],
                   help="Feature pooling (default: flatten for pose, global for subject).")
    p.add_argument("--init_features", default=None,
                   help="FigureClassifier folder whose convolutional trunk initialises this one (e.g. the pose "
                        "classifier for the subject task: it already knows where the figure's parts are). "
                        "Also a judge trained only on renders, so independence is kept.")
    p.add_argument("--num_samples", type=int, default=6000)
    p.add_argument("--num_eval", type=int, default=600)
    p.add_argument("--data_cache", default=None, help="Folder for the rendered-data cache (shared by all tasks; "
                                                        "default --output_dir).")
    p.add_argument("--vae", default=None, help="Base VAE folder: round-trip --vae_fraction of the images through it.")
    p.add_argument("--vae_fraction", type=float, default=0.5)
    p.add_argument("--train_batch_size", type=int, default=64)
    p.add_argument("--max_train_steps", type=int, default=1500)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--checkpoints_total_limit", type=int, default=1)
    p.add_argument("--resume_from_checkpoint", default=None)
    p.add_argument("--report_to", default=None, help='"tensorboard", "wandb", ... (needs the package).')
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.pooling is None:
        args.pooling = "flatten" if args.task == "pose" else "global"
    return args


@torch.no_grad()
def vae_roundtrip(vae, images: np.ndarray, batch: int = 32) -> np.ndarray:
    out = []
    for k in range(0, len(images), batch):
        x = torch.from_numpy(images[k:k + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(((y.clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def vae_picks(seeds, fraction: float) -> np.ndarray:
    """Which of `seeds` go through the VAE (a pure function of the seeds, so cached sets can be split)."""
    return np.random.default_rng(seeds[0]).random(len(seeds)) < fraction


def render_set(args, seeds, vae, desc, show):
    figs = [make_figure(s, args.resolution) for s in tqdm(seeds, desc=desc, disable=not show)]
    images = np.stack([f.image for f in figs])
    if vae is not None and args.vae_fraction > 0:
        pick = np.flatnonzero(vae_picks(seeds, args.vae_fraction))
        if len(pick):
            images[pick] = vae_roundtrip(vae, images[pick])
    heads = {h: names for task in TASKS.values() for h, names in task.items()}  # all tasks share one cache
    labels = {head: torch.tensor([names.index(getattr(f, head)) for f in figs]) for head, names in heads.items()}
    return images, labels


def augment(images: np.ndarray, gen: np.random.Generator) -> torch.Tensor:
    """Blur, shift, brightness and noise: what a latent generator's samples differ by."""
    out = []
    for img in images:
        x = img.astype(np.float32) / 255
        sigma = gen.uniform(0, 1.5)
        if sigma > 0.3:
            x = cv2.GaussianBlur(x, (0, 0), sigma)
        dx, dy = gen.integers(-6, 7, 2)
        x = np.roll(x, (int(dy), int(dx)), axis=(0, 1))
        x = x * gen.uniform(0.85, 1.15) + gen.normal(0, gen.uniform(0, 0.05), x.shape)
        out.append(np.clip(x, 0, 1))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float()


@torch.no_grad()
def evaluate(model, images, labels) -> dict:
    model.eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    logits = {k: [] for k in labels}
    for i in range(0, len(x), 128):
        for k, v in model(x[i:i + 128]).items():
            logits[k].append(v)
    model.train()
    return {k: float((torch.cat(logits[k]).argmax(-1) == labels[k]).float().mean()) for k in labels}


def main(argv=None):
    args = parse_args(argv)
    accelerator = start_accelerator(args, "train_pose_classifier")
    set_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    show = accelerator.is_local_main_process

    vae = None
    if args.vae:
        from diffusers import AutoencoderKL

        vae_dir = local_model(args.vae, "--vae")
        vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).eval().requires_grad_(False)
    cache = Path(args.data_cache or out) / f"figures-{args.num_samples}-{args.resolution}-vae{bool(vae)}.pt"
    if cache.exists():
        data = torch.load(cache, weights_only=False)
    else:
        with accelerator.main_process_first():
            train = render_set(args, list(range(args.num_samples)), vae, "rendering", show)
            evals = render_set(args, list(range(HELDOUT_SEED_START, HELDOUT_SEED_START + args.num_eval)), vae,
                               "rendering held-out", show)
        data = {"train": train, "eval": evals}
        if accelerator.is_main_process:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(data, cache)
    images, labels = data["train"]
    labels = {k: v for k, v in labels.items() if k in TASKS[args.task]}
    data["eval"] = (data["eval"][0], {k: v for k, v in data["eval"][1].items() if k in TASKS[args.task]})

    model = FigureClassifier(heads=TASKS[args.task], input_size=args.input_size, channels=tuple(args.channels),
                             pooling=args.pooling)
    if args.init_features:
        donor = FigureClassifier.from_pretrained(args.init_features, torch_dtype=torch.float32)
        if tuple(donor.config.channels) != tuple(args.channels):
            raise ValueError(f"--init_features {args.init_features} has channels {donor.config.channels}, "
                             f"this classifier {args.channels}")
        model.features.load_state_dict(donor.features.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=1e-4)
    sched = step_schedule(
        optimizer, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, args.max_train_steps) / args.max_train_steps)),
        accelerator.num_processes)
    model, optimizer, sched = accelerator.prepare(model, optimizer, sched)
    step = resume_step(accelerator, out, args.resume_from_checkpoint)
    gen = np.random.default_rng([args.seed, step, accelerator.process_index])
    progress = tqdm(range(args.max_train_steps), initial=step, desc=f"{args.task}-classifier", disable=not show)
    model.train()
    while step < args.max_train_steps:
        idx = gen.integers(0, len(images), args.train_batch_size)
        x = augment(images[idx], gen).to(accelerator.device)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[k], labels[k][idx].to(accelerator.device)) for k in labels)
        accelerator.backward(loss)
        optimizer.step()
        sched.step()
        optimizer.zero_grad()
        step = finish_step(accelerator, args, out, step, progress, {"loss": loss})

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model).eval()
        eval_images, eval_labels = data["eval"]
        metrics = evaluate(final, eval_images, eval_labels)
        report = {"heldout_accuracy": metrics, "steps": step, "vae_roundtrip": bool(vae)}
        if vae is not None and args.vae_fraction > 0:
            picked = vae_picks(list(range(HELDOUT_SEED_START, HELDOUT_SEED_START + len(eval_images))),
                               args.vae_fraction)
            for name, sel in (("clean", ~picked), ("vae", picked)):
                if sel.any():
                    report[f"heldout_accuracy_{name}"] = evaluate(
                        final, eval_images[sel], {k: v[torch.from_numpy(sel)] for k, v in eval_labels.items()})
        dest = out / "classifier"
        with atomic_dir(dest) as tmp:
            final.save_pretrained(tmp)
            (tmp / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        accelerator.print(f"held-out accuracy {metrics}; saved {dest}")
    accelerator.end_training()


if __name__ == "__main__":
    run_script(main)
