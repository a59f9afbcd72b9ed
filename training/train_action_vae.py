#!/usr/bin/env python
"""Fine-tune the mini base VAE on procedural figures (the action domain).

The mini VAE is trained on layered scenes of flat shapes; thin limbs, faces and dark night
skies are out of its domain, and poses must survive the 8x bottleneck for the action model
to be judged at all. A short fine-tune from its weights fixes that and re-measures the
latent `scaling_factor` on figures.

    accelerate launch training/train_action_vae.py --pretrained_vae assets/layergen-mini/vae \\
        --output_dir runs/action_vae --max_train_steps 400

Resume with `--resume_from_checkpoint latest`; the result is `<output_dir>/vae`.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from layergen.atomic import atomic_dir
from layergen.data.figures import HELDOUT_SEED_START, make_figure
from layergen.training_utils import (due, finish_step, local_model, resume_step, run_script, save_image_grid,
                                     start_accelerator)

logger = logging.getLogger(__name__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Fine-tune the mini VAE on procedural figures.")
    p.add_argument("--pretrained_vae", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--crop_size", type=int, default=64, help="Random crop trained on (multiple of 8).")
    p.add_argument("--num_samples", type=int, default=4000)
    p.add_argument("--train_batch_size", type=int, default=8)
    p.add_argument("--max_train_steps", type=int, default=400)
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--kl_weight", type=float, default=1e-6)
    p.add_argument("--checkpointing_steps", type=int, default=100)
    p.add_argument("--checkpoints_total_limit", type=int, default=1)
    p.add_argument("--resume_from_checkpoint", default=None)
    p.add_argument("--validation_steps", type=int, default=200)
    p.add_argument("--report_to", default=None, help='"tensorboard", "wandb", ... (needs the package).')
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class VAEWithKL(torch.nn.Module):
    """Forward returns (reconstruction, KL): one forward call per step, so DDP syncs gradients."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.sample()).sample, posterior.kl().mean() / x[0].numel()


def figures_tensor(seeds, size) -> torch.Tensor:
    return torch.from_numpy(np.stack([make_figure(s, size).image for s in seeds])).permute(0, 3, 1, 2)


@torch.no_grad()
def log_validation(vae, xs, path) -> float:
    vae.eval()
    rec = vae(xs).sample.clamp(-1, 1)
    vae.train()
    to_u8 = lambda t: ((t.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    save_image_grid(list(to_u8(xs)) + list(to_u8(rec)), path, cols=len(xs))
    return float(10 * torch.log10(4.0 / F.mse_loss(rec, xs)))


def main(argv=None):
    args = parse_args(argv)
    accelerator = start_accelerator(args, "train_action_vae")
    set_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pretrained_vae_dir = local_model(args.pretrained_vae, "--pretrained_vae")
    vae = AutoencoderKL.from_pretrained(pretrained_vae_dir, local_files_only=True, torch_dtype=torch.float32)
    vae.train()
    cache = out / f"figures-{args.num_samples}-{args.resolution}.pt"
    if cache.exists():
        data = torch.load(cache)
    else:
        data = figures_tensor(tqdm(range(args.num_samples), desc="rendering",
                                   disable=not accelerator.is_local_main_process), args.resolution)
        if accelerator.is_main_process:
            torch.save(data, cache)
    val = figures_tensor(range(HELDOUT_SEED_START, HELDOUT_SEED_START + 8), args.resolution).float() / 127.5 - 1

    model = VAEWithKL(vae)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    step = resume_step(accelerator, out, args.resume_from_checkpoint)
    gen = torch.Generator().manual_seed(args.seed * 1000 + step * accelerator.num_processes + accelerator.process_index)
    progress = tqdm(range(args.max_train_steps), initial=step, desc="action-vae",
                    disable=not accelerator.is_local_main_process)
    c = args.crop_size
    while step < args.max_train_steps:
        idx = torch.randint(0, len(data), (args.train_batch_size,), generator=gen)
        i, j = torch.randint(0, args.resolution - c + 1, (2,), generator=gen).tolist()
        x = data[idx][..., i:i + c, j:j + c].float().div(127.5).sub(1).to(accelerator.device)
        rec, kl = model(x)
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + args.kl_weight * kl
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        step = finish_step(accelerator, args, out, step, progress, {"loss": loss})
        if accelerator.is_main_process and due(step, args.validation_steps):
            psnr = log_validation(accelerator.unwrap_model(model).vae, val, out / f"validation-{step}.png")
            accelerator.print(f"step {step}: held-out PSNR {psnr:.2f} dB")

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model).vae.eval()
        with torch.no_grad():
            z = final.encode(data[:64].float() / 127.5 - 1).latent_dist.mean
        final.register_to_config(scaling_factor=float(1.0 / z.std()))
        with atomic_dir(out / "vae") as tmp:
            final.save_pretrained(tmp)
        psnr = log_validation(final, val, out / "validation-final.png")
        accelerator.print(f"saved {out / 'vae'}; held-out PSNR {psnr:.2f} dB")
    accelerator.end_training()


if __name__ == "__main__":
    run_script(main)
