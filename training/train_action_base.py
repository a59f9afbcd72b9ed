#!/usr/bin/env python
"""Train the mini action-domain text-to-image UNet (figures of `layergen.data.figures`).

Captions name the subject and the background ("a red cat in a meadow") and, at random, the
verb of a *seen* action ("a red cat sitting in a meadow"). Held-out actions
(`HELDOUT_ACTIONS`: jump, wave, kick, bow) are rendered in the training images but never
named, so the trained model can draw them yet no prompt reaches them: an action can enter
only through a learned identifier (`train_action_identifier.py`). That is what makes the
ADI benchmark (`benchmarks/actions.py`) meaningful.

Latents and text embeddings are computed once into a cache, so a step costs one UNet
forward/backward. Min-SNR loss weighting (Hang et al. 2023) speeds up convergence.

    accelerate launch training/train_action_base.py --vae assets/layergen-mini/vae \\
        --output_dir runs/action_base --max_train_steps 3000

Resume with `--resume_from_checkpoint latest`. The final pipeline folder (EMA weights) is
written to `<output_dir>/pipeline`, loadable with `ActionPipeline.from_pretrained`.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from tqdm.auto import tqdm

from layergen.data.figures import (FIGURE_BACKGROUNDS, FIGURE_COLOURS, HELDOUT_SEED_START, SPECIES, make_figure,
                                   subject_caption)
from layergen.training_utils import (add_training_args, averaged_copy, due, embed_texts, finish_step, load_text_encoder,
                                     local_model, optimizer_step, prepare_training, rgb_latents, run_script,
                                     save_image_grid, save_text_pipeline, start_accelerator)

logger = logging.getLogger(__name__)


def validation_prompts() -> list[str]:
    cols, bgs = list(FIGURE_COLOURS), list(FIGURE_BACKGROUNDS)
    return [subject_caption(SPECIES[i % 4], cols[(i * 5) % len(cols)], bgs[i % len(bgs)]) for i in range(6)] + [
        "a blue cat sitting in the snow", "a red robot running on a beach"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the mini action-domain text-to-image UNet.")
    p.add_argument("--vae", required=True, help="Frozen base AutoencoderKL folder.")
    p.add_argument("--vae_link", default=None,
                   help="Write the saved pipeline's vae/ as a link to this path (relative to vae/, e.g. "
                        "'../../vae') instead of a copy of the weights.")
    p.add_argument("--text_encoder", default="packaged",
                   help="Text encoder folder (transformers), or 'packaged' for the offline all-MiniLM-L6-v2.")
    p.add_argument("--tokenizer_max_length", type=int, default=32)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--num_samples", type=int, default=6000, help="Size of the cached training set.")
    p.add_argument("--action_word_prob", type=float, default=0.5,
                   help="How often a caption names the action (seen actions only; held-out ones never).")
    p.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--cross_attention_levels", type=int, nargs="+", default=None,
                   help="Indices of the resolution levels that get (cross-)attention; default all but the "
                        "coarsest. On CPU, '1' (8x8 latents only) halves the step time: self-attention over the "
                        "16x16 level dominates it.")
    p.add_argument("--layers_per_block", type=int, default=1)
    p.add_argument("--init_unet", default=None,
                   help="continue from a trained UNet (a `unet` folder or a pipeline folder holding one); "
                        "the architecture flags are then ignored")
    p.add_argument("--attention_head_dim", type=int, default=8)
    p.add_argument("--prediction_type", default="v_prediction", choices=["epsilon", "v_prediction"])
    p.add_argument("--min_snr_gamma", type=float, default=5.0, help="0 disables min-SNR weighting.")
    add_training_args(p, train_batch_size=32, max_train_steps=3000, learning_rate=5e-4,
                      lr_warmup_steps=100, checkpointing_steps=250, validation_steps=500, ema_decay=0.995)
    p.add_argument("--caption_dropout", type=float, default=0.1)
    args = p.parse_args(argv)
    if not 0 < args.num_samples < HELDOUT_SEED_START:
        p.error("--num_samples must be positive and below the held-out seed range")
    return args


@torch.no_grad()
def build_cache(args, vae, tokenizer, text_encoder, accelerator):
    """Latents of `num_samples` figures (seeds 0..N-1) and embeddings of both caption variants."""
    path = Path(args.output_dir) / f"cache-{args.num_samples}-{args.resolution}.pt"
    if path.exists():
        return torch.load(path)
    lat, plain, verbed, actions = [], [], [], []
    bs = 32
    for start in tqdm(range(0, args.num_samples, bs), desc="caching latents",
                      disable=not accelerator.is_local_main_process):
        figs = [make_figure(s, args.resolution) for s in range(start, min(start + bs, args.num_samples))]
        lat.append(rgb_latents(vae, [f.image for f in figs]))
        plain += [f.caption(with_action=False) for f in figs]
        verbed += [f.caption(with_action=True) for f in figs]
        actions += [f.action for f in figs]
    captions = sorted(set(plain + verbed) | {""})
    index = {c: i for i, c in enumerate(captions)}
    cache = {"latents": torch.cat(lat), "captions": captions, "text": embed_texts(tokenizer, text_encoder, captions),
             "plain": torch.tensor([index[c] for c in plain]), "verbed": torch.tensor([index[c] for c in verbed]),
             "actions": actions}
    torch.save(cache, path)
    return cache


def build_unet(args, cross_attention_dim: int, latent_channels: int, sample_size: int) -> UNet2DConditionModel:
    n = len(args.block_out_channels)
    levels = set(range(n - 1) if args.cross_attention_levels is None else args.cross_attention_levels)
    down = tuple("CrossAttnDownBlock2D" if i in levels else "DownBlock2D" for i in range(n))
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels,
        layers_per_block=args.layers_per_block, block_out_channels=tuple(args.block_out_channels),
        down_block_types=down, up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
        cross_attention_dim=cross_attention_dim, attention_head_dim=args.attention_head_dim,
        norm_num_groups=min(32, args.block_out_channels[0] // 2))


def snr_weights(scheduler, t, prediction_type: str, gamma: float) -> torch.Tensor:
    if gamma <= 0:
        return torch.ones_like(t, dtype=torch.float)
    ac = scheduler.alphas_cumprod.to(t.device)[t]
    snr = ac / (1 - ac)
    w = torch.clamp(snr, max=gamma)
    return w / (snr + 1) if prediction_type == "v_prediction" else w / snr


def make_pipeline(unet, vae, tokenizer, text_encoder, scheduler_config):
    from layergen.pipelines.pipeline_action import ActionPipeline

    pipe = ActionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                          scheduler=DPMSolverMultistepScheduler.from_config(scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def log_validation(unet, vae, tokenizer, text_encoder, scheduler_config, path, steps=20):
    pipe = make_pipeline(unet, vae, tokenizer, text_encoder, scheduler_config)
    out = pipe(validation_prompts(), num_inference_steps=steps, seed=0, output_type="np")
    save_image_grid(list(out.images), path, cols=8)


def save_pipeline(args, unet, vae, tokenizer, text_path, scheduler_config, dest: Path):
    from layergen.pipelines.pipeline_action import LINK_FILE

    def link_vae(folder):  # point at a shared VAE instead of a copy
        shutil.rmtree(folder / "vae")
        (folder / "vae").mkdir()
        (folder / "vae" / LINK_FILE).write_text(json.dumps({"path": args.vae_link, "class": "AutoencoderKL"}))

    save_text_pipeline(make_pipeline(unet, vae, tokenizer, None, scheduler_config), dest, args.text_encoder,
                       text_path, finish=link_vae if args.vae_link else None)


def main(argv=None):
    args = parse_args(argv)
    accelerator = start_accelerator(args, "train_action_base")
    set_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    vae_dir = local_model(args.vae, "--vae")
    vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).eval().requires_grad_(False)
    tokenizer, text_encoder, text_path = load_text_encoder(args.text_encoder, args.tokenizer_max_length)
    with accelerator.main_process_first():
        cache = build_cache(args, vae, tokenizer, text_encoder, accelerator)

    if args.init_unet:
        init = Path(args.init_unet)
        unet = UNet2DConditionModel.from_pretrained(init / "unet" if (init / "unet").is_dir() else init,
                                                    local_files_only=True, torch_dtype=torch.float32)
    else:
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        unet = build_unet(args, text_encoder.config.hidden_size, vae.config.latent_channels, args.resolution // f)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012, prediction_type=args.prediction_type, clip_sample=False)
    unet, optimizer, lr_sched, ema, global_step = prepare_training(accelerator, args, unet, out)

    gen = torch.Generator().manual_seed(args.seed * 1000 + global_step * accelerator.num_processes
                                        + accelerator.process_index)
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="action-base",
                    disable=not accelerator.is_local_main_process)
    n = cache["latents"].shape[0]
    empty = cache["captions"].index("")
    unet.train()
    while global_step < args.max_train_steps:
        b = args.train_batch_size
        idx = torch.randint(0, n, (b,), generator=gen)
        verb = torch.rand(b, generator=gen) < args.action_word_prob
        cap = torch.where(verb, cache["verbed"][idx], cache["plain"][idx])
        cap = torch.where(torch.rand(b, generator=gen) < args.caption_dropout, torch.full_like(cap, empty), cap)
        target = cache["latents"][idx].float().to(accelerator.device)
        text = cache["text"][cap].float().to(accelerator.device)
        noise = torch.randn(target.shape, generator=gen).to(target)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=gen).to(target.device)
        noisy = noise_scheduler.add_noise(target, noise, t)
        goal = noise if args.prediction_type == "epsilon" else noise_scheduler.get_velocity(target, noise, t)
        with accelerator.accumulate(unet):
            pred = unet(noisy, t, encoder_hidden_states=text).sample
            per = F.mse_loss(pred.float(), goal.float(), reduction="none").mean(dim=(1, 2, 3))
            loss = (per * snr_weights(noise_scheduler, t, args.prediction_type, args.min_snr_gamma)).mean()
            accelerator.backward(loss)
            optimizer_step(accelerator, unet.parameters(), optimizer, lr_sched, args.max_grad_norm)
        if accelerator.sync_gradients:
            global_step = finish_step(accelerator, args, out, global_step, progress, {"loss": per}, ema,
                                      unet.parameters())
            if accelerator.is_main_process and due(global_step, args.validation_steps):
                eval_unet = averaged_copy(accelerator, unet, ema)
                log_validation(eval_unet, vae, tokenizer, text_encoder, noise_scheduler.config,
                               out / f"validation-{global_step}.png")

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = averaged_copy(accelerator, unet, ema)
        save_pipeline(args, final, vae, tokenizer, text_path, noise_scheduler.config, out / "pipeline")
        log_validation(final, vae, tokenizer, text_encoder, noise_scheduler.config, out / "validation-final.png")
        accelerator.print(f"saved {out / 'pipeline'}")
    accelerator.end_training()


if __name__ == "__main__":
    run_script(main)
