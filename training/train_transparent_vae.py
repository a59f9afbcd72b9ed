#!/usr/bin/env python
"""Train the LayerDiffuse-style transparent codec around a frozen base VAE.

`TransparentEncoder` learns a latent offset that hides alpha inside the base VAE's posterior
(``z = mean + std * offset``, the VAE having encoded the layer premultiplied onto mid-grey);
`TransparentDecoder` learns to read the base VAE's decoded RGB plus ``z`` back into straight
RGBA. The base VAE never changes, so the diffusion model that shares it keeps working.

Data: transparent object layers from the procedural generator — single objects
(`make_object_layer`: random shape, colour, solid/glass material, shadow/glow effect) and the
object layers of full scenes (`make_scene`), with random flips/quarter turns.

Losses: L1 on alpha, L1 on straight RGB weighted by the true alpha, and L1 on the re-composite
over a random solid background per sample (this is what punishes grey fringes/halos: a wrong
colour under partial alpha shows on any background but mid-grey).

    accelerate launch training/train_transparent_vae.py --pretrained_vae assets/layergen-mini/vae \\
        --output_dir runs/transparent_vae --resolution 128 --crop_size 64 --final_full_res_steps 200 \\
        --train_batch_size 16 --max_train_steps 1200

(~0.8 s/step on 2 free CPU cores: 64 px crops around the object for speed, then the last
steps on whole 128 px layers so GroupNorm statistics match full-size inference.)

Decoder-only runs keep the latents (and so the diffusion model) valid: `--pretrained_codec DIR
--freeze_encoder` fine-tunes the shipped decoder, `--new_decoder` trains a fresh one of another size
behind the frozen encoder, `--latent_noise S` trains it on latents perturbed by up to S
posterior stds, as generated latents are, and `--alpha_teacher_weight W` holds its alpha to the starting decoder's
on those same latents (how the shipped decoder was fine-tuned for RGB without hazier generated alpha).

Writes `<output_dir>/transparent_encoder/` and `<output_dir>/transparent_decoder/`
(`from_pretrained` folders), `checkpoint-N/` folders and `validation/step-N.png` previews
(true vs decoded RGBA over a checkerboard, decoded alpha).
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
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from layergen.atomic import atomic_dir
from layergen.data.scenes import HELDOUT_SEED_START, make_object_layer, make_scene
from layergen.models.transparent_codec import (
    MINI_DECODER_CONFIG, MINI_ENCODER_CONFIG, TransparentDecoder, TransparentEncoder, premultiply_on_grey,
    vae_scale_factor)
from layergen.training_utils import (add_training_args, due, finish_step, local_model, optimizer_step, resume_step,
                                     rgba_preview, run_script, save_image_grid, start_accelerator)

logger = logging.getLogger(__name__)

# Validation layers come from their own held-out range, clear of the benchmark's first seeds.
VALIDATION_SEED_START = HELDOUT_SEED_START + 500_000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--pretrained_vae", required=True, help="Frozen AutoencoderKL folder (from_pretrained layout).")
    p.add_argument("--pretrained_codec", default=None,
                   help="Start from a folder with transparent_encoder/ and transparent_decoder/ (fine-tuning).")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--resolution", type=int, default=128, help="Size of the generated layers.")
    p.add_argument("--crop_size", type=int, default=None,
                   help="Train on crops of this size around the object (multiple of 8; faster). Default: no crop.")
    p.add_argument("--final_full_res_steps", type=int, default=0,
                   help="Train the last N steps on uncropped layers (batch shrunk to keep the pixel count), so "
                        "the decoder's GroupNorm statistics match full-size inference.")
    p.add_argument("--scene_fraction", type=float, default=0.5,
                   help="Share of samples that are object layers of full scenes (the rest: single objects).")
    p.add_argument("--encoder_block_out_channels", type=int, nargs="+",
                   default=list(MINI_ENCODER_CONFIG["block_out_channels"]))
    p.add_argument("--decoder_block_out_channels", type=int, nargs="+",
                   default=list(MINI_DECODER_CONFIG["block_out_channels"]))
    p.add_argument("--decoder_layers_per_block", type=int, default=MINI_DECODER_CONFIG["layers_per_block"])
    p.add_argument("--decoder_attention_blocks", type=int, default=1,
                   help="How many of the lowest-resolution decoder blocks get self-attention.")
    p.add_argument("--norm_num_groups", type=int, default=4)
    p.add_argument("--offset_scale", default="auto",
                   help="Encoder output scale; 'auto' = 1 / (scaling_factor * mean posterior std), so an "
                        "offset of 1 moves the latent by about one latent standard deviation.")
    p.add_argument("--alpha_loss_weight", type=float, default=1.0)
    p.add_argument("--rgb_loss_weight", type=float, default=1.0)
    p.add_argument("--composite_loss_weight", type=float, default=1.0)
    p.add_argument("--rgb_mse_weight", type=float, default=0.0,
                   help="Extra alpha-weighted MSE on straight RGB: PSNR is MSE-based and most of the error sits in "
                        "the anti-aliased edge band, where L1 alone tolerates large misses.")
    p.add_argument("--offset_l2_weight", type=float, default=0.0,
                   help="Penalty on the offset (in posterior stds) keeping latents near the VAE's posterior.")
    p.add_argument("--freeze_encoder", action="store_true",
                   help="Train the decoder only (with --pretrained_codec): the latents stay exactly the same, so a "
                        "diffusion model trained on them needs no retraining.")
    p.add_argument("--new_decoder", action="store_true",
                   help="With --pretrained_codec --freeze_encoder: keep the trained encoder but train a fresh decoder "
                        "built from the --decoder_* flags (e.g. a wider one), so the latents do not change.")
    p.add_argument("--latent_noise", type=float, default=0.0,
                   help="Largest std of Gaussian noise (in posterior stds; each sample draws its own std uniformly "
                        "from [0, this]) added to the latent before decoding in training: generated latents are "
                        "never exact codec latents (the mini UNet's are ~1-1.8 stds off), and a decoder that only "
                        "saw exact ones turns their error into alpha haze.")
    p.add_argument("--alpha_teacher_weight", type=float, default=0.0,
                   help="With --pretrained_codec: L1 between the decoder's alpha and the starting decoder's alpha on "
                        "the same (noisy) latents. A fine-tune aimed at RGB then keeps the alpha behaviour the "
                        "diffusion model was tuned against (an RGB-only fine-tune made generated alpha hazier).")
    p.add_argument("--backprop_through_vae", action="store_true",
                   help="Let gradients reach the encoder through the frozen VAE decoder too (slower).")
    add_training_args(p, train_batch_size=8, max_train_steps=1500, learning_rate=1e-3,
                      lr_warmup_steps=50, checkpointing_steps=250, validation_steps=250, ema_decay=None)
    p.add_argument("--adam_weight_decay", type=float, default=0.0)
    p.add_argument("--num_validation_images", type=int, default=4)
    p.add_argument("--validation_tta", action="store_true", help="Use the 8-pass TTA for validation previews.")
    p.add_argument("--dataloader_num_workers", type=int, default=0)
    args = p.parse_args(argv)
    if args.freeze_encoder and not args.pretrained_codec:
        p.error("--freeze_encoder needs --pretrained_codec (a trained encoder to keep)")
    if args.new_decoder and not args.freeze_encoder:
        p.error("--new_decoder needs --freeze_encoder (and --pretrained_codec): it keeps the trained encoder")
    if args.alpha_teacher_weight and not args.pretrained_codec:
        p.error("--alpha_teacher_weight needs --pretrained_codec (the decoder whose alpha to keep)")
    if args.latent_noise < 0:
        p.error("--latent_noise must be >= 0")
    if args.crop_size is not None and (args.crop_size % 8 or args.crop_size > args.resolution):
        p.error("--crop_size must be a multiple of 8 and at most --resolution")
    if not 0.0 <= args.scene_fraction <= 1.0:
        p.error("--scene_fraction must be in [0, 1]")
    return args


class TransparentLayerDataset(Dataset):
    """Straight RGBA object layers (4 x S x S float in [0, 1]); sample i is a pure function of seed_offset + i."""

    def __init__(self, size=128, length=HELDOUT_SEED_START, seed_offset=0, scene_fraction=0.5, crop_size=None,
                 augment=True):
        self.size, self.length, self.seed_offset = size, length, seed_offset
        self.scene_fraction, self.crop_size, self.augment = scene_fraction, crop_size, augment

    def __len__(self):
        return self.length

    def layer(self, seed: int) -> np.ndarray:
        rng = np.random.default_rng([seed, 31])
        if rng.random() < self.scene_fraction:
            objects = make_scene(seed, self.size).objects
            if objects:
                return objects[int(rng.integers(len(objects)))].rgba
        return make_object_layer(seed, self.size, centred=bool(rng.random() < 0.5)).rgba

    def __getitem__(self, i):
        seed = self.seed_offset + int(i)
        rng = np.random.default_rng([seed, 32])
        rgba = self.layer(seed).astype(np.float32) / 255.0
        if self.augment:  # the decoder's TTA assumes no preferred orientation
            if rng.random() < 0.5:
                rgba = rgba[:, ::-1]
            rgba = np.rot90(rgba, k=int(rng.integers(4)))
        if self.crop_size and self.crop_size < self.size:
            rgba = self._crop(rgba, rng)
        return {"rgba": torch.from_numpy(np.ascontiguousarray(rgba.transpose(2, 0, 1)))}

    def _crop(self, rgba, rng):
        """A crop (on the 8-px latent grid) around a random visible pixel, so most crops hold an edge."""
        c, s = self.crop_size, rgba.shape[0]
        ys, xs = np.nonzero(rgba[..., 3] > 0.05)
        if len(ys):
            k = int(rng.integers(len(ys)))
            cy, cx = ys[k] + rng.integers(-c // 4, c // 4 + 1), xs[k] + rng.integers(-c // 4, c // 4 + 1)
        else:
            cy = cx = s // 2
        y0 = int(np.clip(cy - c // 2, 0, s - c)) // 8 * 8
        x0 = int(np.clip(cx - c // 2, 0, s - c)) // 8 * 8
        return rgba[y0:y0 + c, x0:x0 + c]


def build_codec(args, vae):
    """Encoder/decoder sized for this VAE: same latent channels, latent injected at the VAE's scale."""
    if args.pretrained_codec:
        root = Path(args.pretrained_codec)
        encoder = TransparentEncoder.from_pretrained(root / "transparent_encoder")
        if not args.new_decoder:
            return encoder, TransparentDecoder.from_pretrained(root / "transparent_decoder")
        return encoder, build_codec_from_flags(args, vae)[1]
    return build_codec_from_flags(args, vae)


def build_codec_from_flags(args, vae):
    f = vae_scale_factor(vae)
    levels = int(round(math.log2(f)))
    enc_ch = tuple(args.encoder_block_out_channels)
    dec_ch = tuple(args.decoder_block_out_channels)
    if len(enc_ch) != levels + 1:
        raise SystemExit(f"--encoder_block_out_channels needs {levels + 1} entries for a {f}x VAE")
    if len(dec_ch) <= levels:
        raise SystemExit(f"--decoder_block_out_channels needs more than {levels} entries for a {f}x VAE")
    n, k = len(dec_ch), args.decoder_attention_blocks
    encoder = TransparentEncoder(block_out_channels=enc_ch, latent_channels=vae.config.latent_channels)
    decoder = TransparentDecoder(
        latent_channels=vae.config.latent_channels, latent_injection_index=levels, block_out_channels=dec_ch,
        down_block_types=("DownBlock2D",) * (n - k) + ("AttnDownBlock2D",) * k,
        up_block_types=("AttnUpBlock2D",) * k + ("UpBlock2D",) * (n - k),
        layers_per_block=args.decoder_layers_per_block, norm_num_groups=args.norm_num_groups)
    return encoder, decoder


@torch.no_grad()
def auto_offset_scale(vae, dataset, n=16) -> float:
    """1 / (scaling_factor * mean posterior std): encoder output 1 ~ one latent std of movement."""
    x = torch.stack([dataset[i]["rgba"] for i in range(n)]).to(vae.device, vae.dtype)
    std = vae.encode(premultiply_on_grey(x)).latent_dist.std.float().mean().item()
    scaling = getattr(vae.config, "scaling_factor", None) or 1.0
    return float(1.0 / max(scaling * std, 1e-6))


def codec_forward(vae, encoder, decoder, rgba, backprop_through_vae=False, latent_noise=0.0, generator=None,
                  teacher=None):
    """rgba -> (decoder's raw RGBA prediction, offset, teacher's prediction or None). Mirrors `encode_rgba` +
    `decode_rgba` without TTA.

    ``latent_noise`` > 0 perturbs the latent by up to that many posterior stds (a uniform draw per
    sample) before decoding; the VAE's decoded pixels see the same perturbed latent, as they would
    for a generated one. ``teacher`` (a frozen decoder) decodes the very same inputs.
    """
    with torch.no_grad():
        dist = vae.encode(premultiply_on_grey(rgba).to(vae.dtype)).latent_dist
    offset = encoder(rgba)
    z = dist.mean.float() + dist.std.float() * offset.float()
    if latent_noise > 0:
        eps = torch.randn(z.shape, generator=generator).to(z)
        level = latent_noise * torch.rand(z.shape[0], 1, 1, 1, generator=generator).to(z)
        z = z + level * dist.std.float() * eps
    if backprop_through_vae:
        pixel = vae.decode(z.to(vae.dtype)).sample.float()
    else:
        with torch.no_grad():
            pixel = vae.decode(z.detach().to(vae.dtype)).sample.float()
    pixel = (pixel * 0.5 + 0.5).clamp(0, 1)
    teacher_pred = None
    if teacher is not None:
        with torch.no_grad():
            teacher_pred = teacher(pixel, z.detach()).float()
    return decoder(pixel, z), offset, teacher_pred


def codec_losses(pred, rgba, generator=None):
    """L1 alpha, alpha-weighted L1 straight RGB, L1 re-composite over one random colour per sample."""
    a, rgb = rgba[:, 3:], rgba[:, :3]
    pa, prgb = pred[:, 3:], pred[:, :3]
    alpha = F.l1_loss(pa, a)
    rgb_l = ((prgb - rgb).abs() * a).sum() / (3 * a.sum() + 1.0)
    bg = torch.rand(rgba.shape[0], 3, 1, 1, generator=generator).to(rgba)
    pac = pa.clamp(0, 1)
    comp = F.l1_loss(prgb * pac + bg * (1 - pac), rgb * a + bg * (1 - a))
    return alpha, rgb_l, comp


def rgb_mse_loss(pred, rgba):
    """Alpha-weighted MSE of straight RGB (same weighting as the L1 term)."""
    a = rgba[:, 3:]
    return ((pred[:, :3] - rgba[:, :3]).square() * a).sum() / (3 * a.sum() + 1.0)


@torch.no_grad()
def log_validation(vae, encoder, decoder, val_set, path, tta=False):
    """Save [true | decoded] RGBA over a checkerboard and the decoded alpha; return the alpha MAE."""
    from layergen.models.transparent_codec import decode_rgba, encode_rgba
    encoder.eval()
    decoder.eval()
    x = torch.stack([val_set[i]["rgba"] for i in range(len(val_set))]).to(vae.device)
    out = decode_rgba(vae, decoder, encode_rgba(vae, encoder, x), tta=tta)[..., :x.shape[-2], :x.shape[-1]]
    encoder.train()
    decoder.train()
    true = x.permute(0, 2, 3, 1).cpu().numpy()
    pred = out.permute(0, 2, 3, 1).cpu().numpy()
    tiles = []
    for t, p in zip(true, pred):
        alpha = np.floor(np.repeat(p[..., 3:], 3, axis=-1) * 255 + 0.5).astype(np.uint8)
        tiles += [rgba_preview(t), rgba_preview(p), alpha]
    save_image_grid(tiles, path, cols=3)
    return float(np.abs(pred[..., 3] - true[..., 3]).mean())


def main(argv=None):
    args = parse_args(argv)
    accelerator = start_accelerator(args, "train_transparent_vae")
    set_seed(args.seed)
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae = AutoencoderKL.from_pretrained(local_model(args.pretrained_vae, "--pretrained_vae"), local_files_only=True)
    vae.requires_grad_(False)
    vae.eval()
    vae.to(accelerator.device)
    if weight_dtype != torch.float32:
        vae.to(dtype=weight_dtype)

    train_set = TransparentLayerDataset(args.resolution, scene_fraction=args.scene_fraction,
                                        crop_size=args.crop_size)
    val_set = TransparentLayerDataset(args.resolution, length=args.num_validation_images,
                                      seed_offset=VALIDATION_SEED_START, scene_fraction=args.scene_fraction,
                                      augment=False)
    encoder, decoder = build_codec(args, vae)
    if not args.pretrained_codec:
        scale = auto_offset_scale(vae, val_set) if args.offset_scale == "auto" else float(args.offset_scale)
        encoder.register_to_config(offset_scale=scale)
    accelerator.print(f"codec: encoder {sum(p.numel() for p in encoder.parameters()) / 1e6:.2f}M, decoder "
                      f"{sum(p.numel() for p in decoder.parameters()) / 1e6:.2f}M params, "
                      f"offset_scale {encoder.config.offset_scale:.4g}")
    teacher = None
    if args.alpha_teacher_weight:
        teacher = TransparentDecoder.from_pretrained(Path(args.pretrained_codec) / "transparent_decoder")
        teacher.requires_grad_(False).eval().to(accelerator.device)
    decoder.train()
    if args.freeze_encoder:
        encoder.requires_grad_(False).eval().to(accelerator.device)
        params = list(decoder.parameters())
    else:
        encoder.train()
        params = list(encoder.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    # The prepared scheduler steps once per process per optimisation step (diffusers convention).
    warmup, total = args.lr_warmup_steps * accelerator.num_processes, args.max_train_steps * accelerator.num_processes
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup))
        * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, total))))))
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.train_batch_size, shuffle=True,
                                         num_workers=args.dataloader_num_workers, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    if args.freeze_encoder:  # DDP refuses a module without trainable parameters
        decoder, optimizer, loader, scheduler = accelerator.prepare(decoder, optimizer, loader, scheduler)
    else:
        encoder, decoder, optimizer, loader, scheduler = accelerator.prepare(encoder, decoder, optimizer, loader,
                                                                             scheduler)
    full_loader = None
    if args.crop_size and args.final_full_res_steps > 0:
        full_bs = max(1, args.train_batch_size * args.crop_size ** 2 // args.resolution ** 2)
        full_set = TransparentLayerDataset(args.resolution, scene_fraction=args.scene_fraction, seed_offset=0)
        full_loader = accelerator.prepare(torch.utils.data.DataLoader(
            full_set, batch_size=full_bs, shuffle=True, num_workers=args.dataloader_num_workers, drop_last=True,
            generator=torch.Generator().manual_seed(args.seed + 1)))
    full_from = args.max_train_steps - args.final_full_res_steps

    global_step = resume_step(accelerator, out, args.resume_from_checkpoint)
    # Continue with unseen samples after a resume instead of replaying the first batches.
    skip = (global_step * args.gradient_accumulation_steps) % len(loader)
    active = accelerator.skip_first_batches(loader, skip) if skip else loader
    loss_gen = torch.Generator().manual_seed(args.seed * 1000 + accelerator.process_index + global_step)

    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="transparent vae",
                    disable=not accelerator.is_local_main_process)
    data_iter = iter(active)
    while global_step < args.max_train_steps:
        if full_loader is not None and global_step >= full_from and active is not full_loader:
            active = full_loader
            data_iter = iter(active)
            accelerator.print(f"step {global_step}: switching to uncropped {args.resolution}px layers")
        try:
            batch = next(data_iter)
        except StopIteration:
            data_iter = iter(active if active is full_loader else loader)
            batch = next(data_iter)
        rgba = batch["rgba"].to(accelerator.device)
        with accelerator.accumulate(encoder, decoder):
            pred, offset, teacher_pred = codec_forward(vae, encoder, decoder, rgba, args.backprop_through_vae,
                                                       args.latent_noise, loss_gen, teacher)
            pred = pred.float()
            l_alpha, l_rgb, l_comp = codec_losses(pred, rgba, loss_gen)
            loss = args.alpha_loss_weight * l_alpha + args.rgb_loss_weight * l_rgb \
                + args.composite_loss_weight * l_comp
            if args.rgb_mse_weight:
                loss = loss + args.rgb_mse_weight * rgb_mse_loss(pred, rgba)
            if teacher_pred is not None:
                loss = loss + args.alpha_teacher_weight * F.l1_loss(pred[:, 3:], teacher_pred[:, 3:])
            if args.offset_l2_weight:
                loss = loss + args.offset_l2_weight * offset.float().pow(2).mean()
            accelerator.backward(loss)
            optimizer_step(accelerator, params, optimizer, scheduler, args.max_grad_norm)
        if accelerator.sync_gradients:
            global_step = finish_step(accelerator, args, out, global_step, progress,
                                      {"loss": loss, "alpha": l_alpha, "rgb": l_rgb, "composite": l_comp})
            if accelerator.is_main_process and due(global_step, args.validation_steps):
                mae = log_validation(vae, accelerator.unwrap_model(encoder), accelerator.unwrap_model(decoder),
                                     val_set, out / "validation" / f"step-{global_step:06d}.png",
                                     tta=args.validation_tta)
                accelerator.print(f"step {global_step}: validation alpha MAE {mae:.4f}")
                accelerator.log({"val_alpha_mae": mae}, step=global_step)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        encoder = accelerator.unwrap_model(encoder).eval()
        decoder = accelerator.unwrap_model(decoder).eval()
        for name, model in (("transparent_encoder", encoder), ("transparent_decoder", decoder)):
            with atomic_dir(out / name) as tmp:
                model.save_pretrained(tmp)
        mae = log_validation(vae, encoder, decoder, val_set, out / "validation" / "final.png", tta=True)
        accelerator.print(f"saved {out / 'transparent_encoder'} and {out / 'transparent_decoder'}; "
                          f"validation alpha MAE (TTA) {mae:.4f}")
    accelerator.end_training()


if __name__ == "__main__":
    run_script(main)
