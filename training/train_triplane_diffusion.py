#!/usr/bin/env python
"""Stage 2 of layered 3D humans (HumanLiff): diffusion over channel-stacked tri-planes.

Training examples come from stage 1 (`training/fit_triplanes.py`): for every fitted subject
and every layer k it has, the target is what layer k adds (the body planes for k = 0, the
garment residual otherwise) and the condition is the cumulative tri-plane of the layer
below (zeros for the body). The layer index is the UNet's class label; the condition
enters through the zero-initialised side encoder (`LayeredTriplaneUNet`). Mirroring
across x = 0 (`flip_x`) is a free, exact augmentation.

diffusers-examples style: Accelerate (runs unchanged under `accelerate launch`,
multi-process), EMA, checkpoint rotation, `--resume_from_checkpoint latest`, validation
renders, and at the end a complete `LayeredHumanPipeline` folder (unet = EMA weights,
the stage-1 decoder, a DDIM scheduler) in `<output_dir>/pipeline`.

    python training/train_triplane_diffusion.py --data_dir runs/human_stage1 --output_dir runs/human_stage2

CPU notes: `--mixed_precision bf16` runs the UNet under bf16 autocast (~1.5x faster on CPUs
with AVX512-BF16, but 16x slower, 6 s vs 0.37 s per step, on one without: measure first),
`--snr_gamma 5` (Min-SNR weighting) converges several times faster than the plain loss, and
`--pretrained_unet` continues from an earlier run's weights with a fresh optimiser and schedule.
`--layer_weights shoes=3` draws examples of a layer class that many times as often as the others
(small garments, whose residuals are a few texels, learn slowest). The shipped mini model: 1200
steps (lr 3e-4, plain loss), then 2000 steps from that EMA with lr 5e-4, Min-SNR 5, bf16 (see
assets/layergen-mini/human/README.md).
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from layergen.atomic import atomic_dir, write_text_atomic
from layergen.data.mannequins import LAYER_NAMES
from layergen.models.triplane import TriplaneDecoder, flip_x
from layergen.models.triplane_unet import LayeredTriplaneUNet
from layergen.training_utils import (add_training_args, due, finish_step, optimizer_step, resume_step, rgba_preview,
                                     run_script, save_checkpoint, save_image_grid, start_accelerator)

logger = logging.getLogger("train_triplane_diffusion")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", required=True, help="stage-1 output: triplanes.safetensors + decoder/")
    p.add_argument("--output_dir", default="runs/human_stage2")
    p.add_argument("--pretrained_unet", default=None,
                   help="start from this LayeredTriplaneUNet folder (e.g. a checkpoint's unet_ema) instead of scratch")
    p.add_argument("--block_out_channels", default="32,64,64")
    p.add_argument("--layers_per_block", type=int, default=1)
    p.add_argument("--norm_num_groups", type=int, default=8)
    p.add_argument("--no_attention", action="store_true", help="no self-attention in the mid block")
    add_training_args(p, train_batch_size=16, max_train_steps=2000, learning_rate=3e-4, lr_warmup_steps=100,
                      checkpointing_steps=500, validation_steps=1000, ema_decay=0.999)
    p.add_argument("--lr_scheduler", default="cosine")
    p.add_argument("--adam_weight_decay", type=float, default=1e-4)
    p.add_argument("--prediction_type", default="epsilon", choices=["epsilon", "v_prediction", "sample"])
    p.add_argument("--num_train_timesteps", type=int, default=1000)
    p.add_argument("--beta_schedule", default="linear")
    p.add_argument("--target_std", type=float, default=0.5, help="data are scaled to this std per layer class")
    p.add_argument("--snr_gamma", type=float, default=None,
                   help="Min-SNR loss weighting (Hang et al. 2023), e.g. 5.0; converges several times faster")
    p.add_argument("--no_flip", action="store_true", help="disable the mirror augmentation")
    p.add_argument("--layer_weights", default=None,
                   help="sampling weight per layer class, e.g. 'shoes=3,hat=2' (others 1); default: uniform shuffle")
    p.add_argument("--num_validation_humans", type=int, default=2)
    p.add_argument("--validation_inference_steps", type=int, default=25)
    p.add_argument("--dataloader_num_workers", type=int, default=0)
    return p.parse_args(argv)


class TriplaneLayerDataset(Dataset):
    """(target, condition, layer label) triples from stage-1 tri-planes.

    planes: (S, slots, 3, C, R, R) as saved by fit_triplanes (slot 0 body, slot j a garment
    residual), present: (S, slots). Example (s, k): target = planes[s, k]; condition = body
    + residuals of present slots below k (zeros for k = 0).
    """

    def __init__(self, planes: torch.Tensor, present: torch.Tensor, flip: bool = True, shift: bool = True):
        self.planes = planes.float()
        self.present = present.bool()
        self.flip, self.shift = flip, shift
        mask = self.present.float().view(*self.present.shape, 1, 1, 1, 1)
        self.cum = (self.planes * mask).cumsum(1)
        self.items = [(s, k) for s in range(planes.shape[0]) for k in range(planes.shape[1]) if self.present[s, k]]

    def __len__(self):
        return len(self.items)

    def condition(self, s, k):
        if k == 0:
            return torch.zeros_like(self.planes[s, 0])
        below = [j for j in range(k) if self.present[s, j]]
        return self.cum[s, below[-1]]

    def __getitem__(self, i):
        s, k = self.items[i]
        x, c = self.planes[s, k], self.condition(s, k)
        if self.flip and torch.rand(()) < 0.5:
            x, c = flip_x(x, self.shift), flip_x(c, self.shift)
        return {"target": x.reshape(-1, *x.shape[-2:]), "cond": c.reshape(-1, *c.shape[-2:]), "label": k}

    def class_stds(self) -> list:
        out = []
        for k in range(self.planes.shape[1]):
            sel = self.present[:, k]
            out.append(float(self.planes[sel, k].std()) if sel.any() else 1.0)
        return out


def parse_layer_weights(text: str | None) -> list:
    """'shoes=3,hat=2' -> one weight per layer class (LAYER_NAMES order), 1 where not named."""
    weights = [1.0] * len(LAYER_NAMES)
    for item in filter(None, (text or "").split(",")):
        name, _, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = None
        if name.strip() not in LAYER_NAMES or weight is None:
            raise ValueError(f"--layer_weights: {item!r} is not NAME=WEIGHT with NAME in {', '.join(LAYER_NAMES)}")
        weights[LAYER_NAMES.index(name.strip())] = weight
    if any(w < 0 for w in weights) or not any(weights):
        raise ValueError("--layer_weights: weights must be >= 0 and not all zero")
    return weights


def layer_sampler(dataset, text: str | None, seed: int):
    """A with-replacement sampler that draws layer class k with weight w_k per example (None: plain shuffle)."""
    if not text:
        return None
    from torch.utils.data import WeightedRandomSampler

    w = parse_layer_weights(text)
    per_item = torch.tensor([w[k] for _, k in dataset.items], dtype=torch.double)
    return WeightedRandomSampler(per_item, num_samples=len(dataset), replacement=True,
                                 generator=torch.Generator().manual_seed(seed))


def load_stage1(data_dir):
    data_dir = Path(data_dir)
    path = data_dir / "triplanes.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run training/fit_triplanes.py first")
    if not (data_dir / "decoder" / "config.json").is_file():
        raise FileNotFoundError(f"{data_dir / 'decoder'}: no stage-1 decoder folder (fit_triplanes.py writes it)")
    t = load_file(str(path))
    return t["planes"], t["present"], TriplaneDecoder.from_pretrained(data_dir / "decoder")


@torch.no_grad()
def log_validation(unet, decoder, noise_scheduler, args, accelerator, step):
    from layergen.pipelines.pipeline_layered_human import LayeredHumanPipeline

    pipe = LayeredHumanPipeline(unet=accelerator.unwrap_model(unet), decoder=decoder,
                                scheduler=DDIMScheduler.from_config(noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for h in range(args.num_validation_humans):
        gen = torch.Generator().manual_seed(args.seed + h)
        out = pipe(layers=("body", "pants", "shirt", "shoes"), generator=gen,
                   num_inference_steps=args.validation_inference_steps)
        views = [pipe.render_views(tp, num_views=1, size=64)[0] for tp in out.triplanes]
        rows.append(np.concatenate([rgba_preview(v.astype(np.float32) / 255.0) for v in views], 1))
    path = Path(args.output_dir) / "validation" / f"step-{step:06d}.png"
    save_image_grid(rows, path, cols=1)
    accelerator.print(f"validation renders: {path}")


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir)
    accelerator = start_accelerator(args, "train_triplane_diffusion")
    set_seed(args.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "args.json", json.dumps(vars(args), indent=1))

    planes, present, decoder = load_stage1(args.data_dir)
    decoder.requires_grad_(False)
    dataset = TriplaneLayerDataset(planes, present, flip=not args.no_flip, shift=decoder.config.use_shift)
    stds = dataset.class_stds()
    sample_scales = [args.target_std / max(s, 1e-4) for s in stds]
    cond_std = float(torch.stack([dataset.condition(s, k) for s, k in dataset.items if k > 0]).std()) \
        if any(k > 0 for _, k in dataset.items) else 1.0
    boc = tuple(int(c) for c in args.block_out_channels.split(","))
    if args.pretrained_unet:
        src = LayeredTriplaneUNet.from_pretrained(args.pretrained_unet)
        # an EMA folder's config also carries EMAModel's settings (decay, ...): keep only the model's own
        own = set(inspect.signature(LayeredTriplaneUNet.__init__).parameters) - {"self"}
        unet = LayeredTriplaneUNet.from_config({k: v for k, v in src.config.items() if k in own})
        unet.load_state_dict(src.state_dict())
        del src
        unet.train()
        sample_scales = list(unet.config.sample_scales)
    else:
        unet = LayeredTriplaneUNet(plane_channels=planes.shape[3], plane_resolution=planes.shape[-1],
                                   block_out_channels=boc, layers_per_block=args.layers_per_block,
                                   norm_num_groups=args.norm_num_groups, num_layer_classes=len(LAYER_NAMES),
                                   add_attention=not args.no_attention, sample_scales=tuple(sample_scales),
                                   cond_scale=args.target_std / max(cond_std, 1e-4))
    accelerator.print(f"{len(dataset)} examples from {planes.shape[0]} subjects; "
                      f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params; "
                      f"class stds {[round(s, 4) for s in stds]}")
    noise_scheduler = DDPMScheduler(num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule,
                                    prediction_type=args.prediction_type, clip_sample=False)

    ema = None
    if args.use_ema:
        ema = EMAModel(unet.parameters(), decay=args.ema_decay, model_cls=LayeredTriplaneUNet, model_config=unet.config)

    # diffusers-examples checkpoint hooks: the UNet (and its EMA) saved as model folders
    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            if ema is not None:
                ema.save_pretrained(os.path.join(output_dir, "unet_ema"))
            for m in models:
                m.save_pretrained(os.path.join(output_dir, "unet"))
                weights.pop()

    def load_model_hook(models, input_dir):
        if ema is not None:
            loaded = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), LayeredTriplaneUNet)
            ema.load_state_dict(loaded.state_dict())
            del loaded
        for _ in range(len(models)):
            m = models.pop()
            loaded = LayeredTriplaneUNet.from_pretrained(input_dir, subfolder="unet")
            m.register_to_config(**loaded.config)
            m.load_state_dict(loaded.state_dict())
            del loaded

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    sampler = layer_sampler(dataset, args.layer_weights, args.seed)
    loader = DataLoader(dataset, batch_size=args.train_batch_size, shuffle=sampler is None, sampler=sampler,
                        drop_last=len(dataset) >= args.train_batch_size, num_workers=args.dataloader_num_workers)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
    scales = torch.tensor(sample_scales, device=accelerator.device)
    cond_scale = accelerator.unwrap_model(unet).config.cond_scale

    global_step = resume_step(accelerator, out, args.resume_from_checkpoint)
    bar = tqdm(range(args.max_train_steps), initial=global_step, desc="steps",
               disable=not accelerator.is_local_main_process)
    unet.train()
    while global_step < args.max_train_steps:
        for batch in loader:
            label = batch["label"].to(accelerator.device)
            x0 = batch["target"] * scales[label].view(-1, 1, 1, 1)
            cond = batch["cond"] * cond_scale
            noise = torch.randn_like(x0)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
            xt = noise_scheduler.add_noise(x0, noise, t)
            if args.prediction_type == "epsilon":
                target = noise
            elif args.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(x0, noise, t)
            else:
                target = x0
            with accelerator.accumulate(unet):
                pred = unet(xt, t, label, cond).sample
                if args.snr_gamma is None:
                    loss = F.mse_loss(pred.float(), target.float())
                else:
                    snr = snr_of(noise_scheduler, t)
                    w = torch.clamp(snr, max=args.snr_gamma)
                    w = w / snr if args.prediction_type == "epsilon" else (w / (snr + 1) if args.prediction_type ==
                                                                          "v_prediction" else w)
                    loss = (F.mse_loss(pred.float(), target.float(), reduction="none").mean((1, 2, 3)) * w).mean()
                accelerator.backward(loss)
                optimizer_step(accelerator, unet.parameters(), optimizer, lr_scheduler, args.max_grad_norm)
            if accelerator.sync_gradients:
                global_step = finish_step(accelerator, args, out, global_step, bar,
                                          {"loss": loss, "lr": lr_scheduler.get_last_lr()[0]}, ema, unet.parameters())
                if global_step == args.max_train_steps and not due(global_step, args.checkpointing_steps):
                    save_checkpoint(accelerator, out, global_step, args.checkpoints_total_limit)
                if accelerator.is_main_process and due(global_step, args.validation_steps) \
                        and global_step < args.max_train_steps:
                    _validate_with_ema(unet, ema, decoder, noise_scheduler, args, accelerator, global_step)
            if global_step >= args.max_train_steps:
                break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.copy_to(model.parameters())
        from layergen.pipelines.pipeline_layered_human import LayeredHumanPipeline

        sched = DDIMScheduler.from_config(noise_scheduler.config, clip_sample=False, set_alpha_to_one=True)
        pipe = LayeredHumanPipeline(unet=model, decoder=decoder, scheduler=sched)
        with atomic_dir(out / "pipeline") as tmp:
            pipe.save_pretrained(tmp)
        accelerator.print(f"saved pipeline to {out / 'pipeline'}")
        if args.validation_steps:
            log_validation(model, decoder, noise_scheduler, args, accelerator, global_step)
    accelerator.end_training()


def snr_of(noise_scheduler, t):
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at timesteps t."""
    ac = noise_scheduler.alphas_cumprod.to(t.device)[t]
    return ac / (1 - ac)


def _validate_with_ema(unet, ema, decoder, noise_scheduler, args, accelerator, step):
    model = accelerator.unwrap_model(unet)
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    model.eval()
    try:
        log_validation(model, decoder, noise_scheduler, args, accelerator, step)
    finally:
        model.train()
        if ema is not None:
            ema.restore(model.parameters())


if __name__ == "__main__":
    run_script(main)
