#!/usr/bin/env python
"""Train the mini base VAE (a diffusers `AutoencoderKL`, RGB, 8x down, 4 latent channels).

Data: procedural scene composites and object layers on neutral grey (see
`layergen.data.datasets.SceneImageDataset`). Trains on random crops for speed —
the VAE is convolutional, so it runs at any size afterwards.

    accelerate launch training/train_vae.py --output_dir runs/vae --max_train_steps 2000

Resume with `--resume_from_checkpoint latest`; the final model is saved to
`<output_dir>/vae` in diffusers layout (`AutoencoderKL.from_pretrained(...)`).
"""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from layergen.atomic import atomic_dir
from layergen.data.datasets import SceneImageDataset
from layergen.data.scenes import HELDOUT_SEED_START
from layergen.training_utils import (add_training_args, due, finish_step, local_model, optimizer_step, resume_step,
                                     run_script, save_image_grid, start_accelerator, step_schedule)

logger = logging.getLogger(__name__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="Start from an existing AutoencoderKL folder instead of a fresh mini config.")
    p.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64, 128, 128])
    p.add_argument("--layers_per_block", type=int, default=1)
    p.add_argument("--latent_channels", type=int, default=4)
    p.add_argument("--resolution", type=int, default=128, help="Size of the generated scenes.")
    p.add_argument("--crop_size", type=int, default=64, help="Random crop trained on (multiple of 8).")
    add_training_args(p, train_batch_size=16, max_train_steps=2000, learning_rate=5e-4, lr_warmup_steps=50,
                      validation_steps=250, ema_decay=None)
    p.add_argument("--kl_weight", type=float, default=1e-6)
    p.add_argument("--dataloader_num_workers", type=int, default=0)
    return p.parse_args(argv)


def build_vae(args) -> AutoencoderKL:
    if args.pretrained_model_name_or_path:
        return AutoencoderKL.from_pretrained(local_model(args.pretrained_model_name_or_path,
                                                         "--pretrained_model_name_or_path"), local_files_only=True)
    n = len(args.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=args.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(args.block_out_channels), layers_per_block=args.layers_per_block,
        norm_num_groups=min(16, min(args.block_out_channels)), sample_size=args.resolution, scaling_factor=1.0,
    )


class VAEWithKL(torch.nn.Module):
    """Forward returns (reconstruction, KL) so DDP/FSDP see one forward call per step."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.sample()).sample, posterior.kl().mean() / x[0].numel()


def random_crop(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    if size >= x.shape[-1]:
        return x
    i, j = torch.randint(0, x.shape[-1] - size + 1, (2,), generator=generator).tolist()
    return x[..., i:i + size, j:j + size]


@torch.no_grad()
def measure_scaling_factor(vae, dataset, n=64) -> float:
    """1 / std of the latents, as diffusers VAEs record in `config.scaling_factor`."""
    xs = torch.stack([dataset[i]["pixel_values"] for i in range(n)])
    z = vae.encode(xs).latent_dist.mean
    return float(1.0 / z.std())


@torch.no_grad()
def log_validation(vae, val_set, path):
    vae.eval()
    xs = torch.stack([val_set[i]["pixel_values"] for i in range(8)])
    rec = vae(xs).sample.clamp(-1, 1)
    vae.train()
    to_u8 = lambda t: ((t.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    save_image_grid(list(to_u8(xs)) + list(to_u8(rec)), path, cols=8)
    return float(10 * torch.log10(4.0 / F.mse_loss(rec, xs)))


def main(argv=None):
    args = parse_args(argv)
    accelerator = start_accelerator(args, "train_vae")
    set_seed(args.seed)
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)

    model = VAEWithKL(build_vae(args))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=1e-4)
    scheduler = step_schedule(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, args.lr_warmup_steps))
        * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, args.max_train_steps)))) * 0.9 + 0.1,
        accelerator.num_processes)
    train_set = SceneImageDataset(args.resolution, length=HELDOUT_SEED_START)
    val_set = SceneImageDataset(args.resolution, length=64, seed_offset=HELDOUT_SEED_START)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.train_batch_size, shuffle=True,
                                         num_workers=args.dataloader_num_workers, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    global_step = resume_step(accelerator, out, args.resume_from_checkpoint)
    crop_gen = torch.Generator().manual_seed(args.seed + global_step + accelerator.process_index)

    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="vae",
                    disable=not accelerator.is_local_main_process)
    data_iter = iter(loader)
    while global_step < args.max_train_steps:
        try:
            batch = next(data_iter)
        except StopIteration:
            data_iter = iter(loader)
            batch = next(data_iter)
        x = random_crop(batch["pixel_values"], args.crop_size, crop_gen)
        with accelerator.accumulate(model):
            rec, kl = model(x)
            rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
            loss = rec_loss + args.kl_weight * kl
            accelerator.backward(loss)
            optimizer_step(accelerator, model.parameters(), optimizer, scheduler, args.max_grad_norm)
        if accelerator.sync_gradients:
            global_step = finish_step(accelerator, args, out, global_step, progress, {"loss": loss})
            if accelerator.is_main_process and due(global_step, args.validation_steps):
                psnr = log_validation(accelerator.unwrap_model(model).vae, val_set,
                                      out / f"validation-{global_step}.png")
                accelerator.print(f"step {global_step}: held-out PSNR {psnr:.2f} dB")

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        vae = accelerator.unwrap_model(model).vae.eval()
        vae.register_to_config(scaling_factor=measure_scaling_factor(vae, val_set))
        with atomic_dir(out / "vae") as tmp:
            vae.save_pretrained(tmp)
        psnr = log_validation(vae, val_set, out / "validation-final.png")
        accelerator.print(f"saved {out / 'vae'}; held-out PSNR {psnr:.2f} dB")
    accelerator.end_training()


if __name__ == "__main__":
    run_script(main)
