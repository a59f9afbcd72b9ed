#!/usr/bin/env python
"""Train the learned mini decomposer (`layergen.decompose.learned.LayerDecomposer`).

Each sample is a procedural composite (shadows, glows, glass, occlusion) and one of its
instances: usually the top one (what the pipeline peels first), sometimes another. Targets:
  background  the scene with that instance removed (everything else kept), base-VAE latent
  layer       the instance with its shadow/glow, complete even where others cover it,
              transparent-codec latent (or its premultiplied-on-grey VAE latent without a codec)
Condition: the composite's latent + the instance mask (tight visible-body mask, or a loose box).
One UNet denoises both latents jointly (v-prediction, shared timestep).

Re-composition consistency (LayerDecomp): for top instances the predicted clean latents are
decoded (base VAE + transparent decoder, frozen, differentiable) and alpha-blended back; the
L1 to the input composite is added with weight `--consistency_weight`. It needs `--codec`.

Latents are computed once into a cache, so a plain step costs one small UNet pass.

    accelerate launch training/train_decomposer.py --vae assets/layergen-mini/vae \\
        --codec assets/layergen-mini --output_dir runs/decomposer --max_train_steps 6000

`--resume_from_checkpoint latest` resumes. The final folder `<output_dir>/pipeline` loads with
`layergen.decompose.learned.load_decomposition_pipeline`; `scripts/install_mini_decomposer.py` installs a
pipeline or a checkpoint (its EMA weights) into assets/layergen-mini/decomposer in fp16, sharing the mini VAE.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler
from tqdm.auto import tqdm

from layergen.data.scenes import HELDOUT_SEED_START, make_scene
from layergen.decompose.learned import LayerDecomposer, decode_rgb, encode_layer, encode_rgb, \
    save_decomposition_pipeline
from layergen.layers import Layer, LayerStack
from layergen.training_utils import (add_training_args, averaged_copy, due, finish_step, local_model, optimizer_step,
                                     prepare_training, rgba_preview, run_script, save_image_grid, start_accelerator)

logger = logging.getLogger(__name__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the mini latent-diffusion layer decomposer.")
    p.add_argument("--vae", required=True, help="Frozen base AutoencoderKL folder.")
    p.add_argument("--codec", default=None,
                   help="Folder with transparent_encoder/ and transparent_decoder/ (optional; without it the "
                        "layer latent is the VAE latent of the layer on grey and there is no consistency loss).")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--num_samples", type=int, default=3000, help="Size of the cached training set.")
    p.add_argument("--top_prob", type=float, default=0.75, help="Share of samples that peel the top instance.")
    p.add_argument("--box_prob", type=float, default=0.3, help="Share of samples conditioned on a loose box.")
    p.add_argument("--block_out_channels", type=int, nargs="+", default=[64, 128, 128])
    p.add_argument("--layers_per_block", type=int, default=1)
    p.add_argument("--attention_levels", type=int, nargs="+", default=None,
                   help="1/0 per block (default: attention only in the lowest-resolution block; CPU-friendly)")
    p.add_argument("--norm_num_groups", type=int, default=16)
    add_training_args(p, train_batch_size=32, max_train_steps=6000, learning_rate=4e-4,
                      lr_warmup_steps=200, checkpointing_steps=500, validation_steps=1000, ema_decay=0.995)
    p.add_argument("--consistency_weight", type=float, default=0.1)
    p.add_argument("--consistency_every", type=int, default=4, help="Apply the pixel-space loss every N steps.")
    p.add_argument("--consistency_batch", type=int, default=4)
    p.add_argument("--num_validation", type=int, default=4)
    args = p.parse_args(argv)
    if args.num_samples >= HELDOUT_SEED_START:
        p.error(f"--num_samples must stay below the held-out seeds ({HELDOUT_SEED_START})")
    return args


def make_sample(seed: int, resolution: int, top_prob: float, box_prob: float):
    """(composite, background target, layer target, mask, is_top) for one training seed, uint8 arrays."""
    rng = np.random.default_rng([seed, 11])
    scene = make_scene(seed, resolution)
    n = len(scene.objects)
    k = n - 1 if (n == 1 or rng.random() < top_prob) else int(rng.integers(0, n - 1))
    obj = scene.objects[k]
    rest = LayerStack(resolution, resolution, [Layer(scene.background)] +
                      [o.to_layer() for j, o in enumerate(scene.objects) if j != k])
    background = rest.composite()[..., :3]
    visible = obj.body_alpha.copy()
    for upper in scene.objects[k + 1:]:
        visible *= 1.0 - upper.rgba[..., 3] / 255.0
    mask = visible > 0.5
    if rng.random() < box_prob or mask.sum() < 4:
        x0, y0, x1, y1 = obj.box
        pad = int(rng.integers(0, 6))
        mask = np.zeros_like(mask)
        mask[max(0, y0 - pad):y1 + pad, max(0, x0 - pad):x1 + pad] = True
    return scene.composite, background, obj.rgba, mask.astype(np.uint8), k == n - 1


@torch.no_grad()
def build_cache(args, vae, encoder, accelerator):
    path = Path(args.output_dir) / f"cache-{args.num_samples}-{args.resolution}-{int(encoder is not None)}.pt"
    if path.exists():
        return torch.load(path)
    zc, zb, zf, masks, comps, tops = [], [], [], [], [], []
    bs = 16
    for start in tqdm(range(0, args.num_samples, bs), desc="caching latents",
                      disable=not accelerator.is_local_main_process):
        samples = [make_sample(s, args.resolution, args.top_prob, args.box_prob)
                   for s in range(start, min(start + bs, args.num_samples))]
        comp = torch.from_numpy(np.stack([s[0] for s in samples])).permute(0, 3, 1, 2).float() / 255
        bg = torch.from_numpy(np.stack([s[1] for s in samples])).permute(0, 3, 1, 2).float() / 255
        fg = torch.from_numpy(np.stack([s[2] for s in samples])).permute(0, 3, 1, 2).float() / 255
        zc.append(encode_rgb(vae, comp).half())
        zb.append(encode_rgb(vae, bg).half())
        zf.append(encode_layer(vae, fg, encoder).half())
        masks.append(torch.from_numpy(np.stack([s[3] for s in samples])))
        comps.append((comp * 255).round().to(torch.uint8))
        tops += [s[4] for s in samples]
    cache = {"zc": torch.cat(zc), "zb": torch.cat(zb), "zf": torch.cat(zf), "mask": torch.cat(masks),
             "composite": torch.cat(comps), "top": torch.tensor(tops)}
    if accelerator.is_main_process:
        torch.save(cache, path)
    return cache


def build_model(args, latent_channels: int, sample_size: int, scale: int) -> LayerDecomposer:
    levels = args.attention_levels or [0] * (len(args.block_out_channels) - 1) + [1]
    return LayerDecomposer(latent_channels=latent_channels, sample_size=sample_size, vae_scale_factor=scale,
                           block_out_channels=tuple(args.block_out_channels), layers_per_block=args.layers_per_block,
                           attention_levels=tuple(bool(a) for a in levels), norm_num_groups=args.norm_num_groups)


def predicted_x0(scheduler, noisy, pred, t):
    """Clean latent from a v-prediction: x0 = sqrt(a) x_t - sqrt(1 - a) v."""
    a = scheduler.alphas_cumprod.to(noisy.device)[t].float().view(-1, 1, 1, 1)
    return a.sqrt() * noisy - (1 - a).sqrt() * pred


def consistency_loss(vae, decoder, z_bg, z_fg, composite01):
    """L1 between the input and the decoded predictions alpha-blended back (pixel space)."""
    from layergen.decompose.learned import latent_norm

    bg = decode_rgb(vae, z_bg)
    scaling, shift = latent_norm(vae)
    z = z_fg / scaling + shift
    pixel = (vae.decode(z).sample * 0.5 + 0.5).clamp(0, 1)
    rgba = decoder(pixel, z).clamp(0, 1)
    a = rgba[:, 3:4]
    recomposite = rgba[:, :3] * a + bg * (1 - a)
    return F.l1_loss(recomposite, composite01)


@torch.no_grad()
def log_validation(args, model, vae, codec, scheduler_config, path):
    from layergen.decompose.metrics import evaluate
    from layergen.pipelines.pipeline_decomposition import DecompositionPipeline

    pipe = DecompositionPipeline(decomposer=model, vae=vae, codec=codec,
                                 scheduler=DDIMScheduler.from_config(scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    rows, scores = [], []
    for i in range(args.num_validation):
        scene = make_scene(HELDOUT_SEED_START + i, args.resolution)
        boxes = [(o.box[0], o.box[1], o.box[2] - o.box[0], o.box[3] - o.box[1]) for o in scene.objects]
        out = pipe(scene.composite, boxes=boxes, num_inference_steps=20,
                   generator=torch.Generator().manual_seed(i))
        scores.append(evaluate(out.stack, scene)["alpha_iou"])
        top = out.stack.layers[-1].pixels.astype(np.float32) / 255
        rows += [scene.composite, out.stack.layers[0].pixels[..., :3], rgba_preview(top)]
    save_image_grid(rows, path, cols=3)
    return float(np.mean(scores))


def main(argv=None):
    args = parse_args(argv)
    accelerator = start_accelerator(args, "train_decomposer")
    set_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    vae_dir = local_model(args.vae, "--vae")
    vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).eval().requires_grad_(False)
    encoder = decoder = None
    if args.codec:
        from layergen.models.transparent_codec import TransparentDecoder, TransparentEncoder

        codec_dir = local_model(args.codec, "--codec")
        encoder = TransparentEncoder.from_pretrained(codec_dir / "transparent_encoder").eval()
        decoder = TransparentDecoder.from_pretrained(codec_dir / "transparent_decoder").eval()
        encoder.requires_grad_(False)
        decoder.requires_grad_(False)
    with accelerator.main_process_first():
        cache = build_cache(args, vae, encoder, accelerator)

    f = 2 ** (len(vae.config.block_out_channels) - 1)
    model = build_model(args, vae.config.latent_channels, args.resolution // f, f)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                    prediction_type="v_prediction", clip_sample=False)
    model, optimizer, lr_sched, ema, global_step = prepare_training(accelerator, args, model, out)

    gen = torch.Generator().manual_seed(args.seed * 1000 + global_step * accelerator.num_processes
                                        + accelerator.process_index)
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="decomposer",
                    disable=not accelerator.is_local_main_process)
    n = cache["zc"].shape[0]
    c = vae.config.latent_channels
    use_consistency = decoder is not None and args.consistency_weight > 0
    model.train()
    while global_step < args.max_train_steps:
        b = args.train_batch_size
        idx = torch.randint(0, n, (b,), generator=gen)
        zc, zb, zf = (cache[k][idx].float().to(accelerator.device) for k in ("zc", "zb", "zf"))
        mask = cache["mask"][idx].float()[:, None].to(accelerator.device)
        flip = torch.rand(b, generator=gen) < 0.5  # horizontal flips: free augmentation, exact in latent space too
        if flip.any():
            fl = flip.to(accelerator.device)[:, None, None, None]
            zc, zb, zf, mask = (torch.where(fl, x.flip(-1), x) for x in (zc, zb, zf, mask))
        target = torch.cat([zb, zf], 1)
        noise = torch.randn(target.shape, generator=gen).to(target)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=gen).to(target.device)
        noisy = noise_scheduler.add_noise(target, noise, t)
        goal = noise_scheduler.get_velocity(target, noise, t)
        with accelerator.accumulate(model):
            unwrapped = accelerator.unwrap_model(model)
            cond = unwrapped.condition(zc, mask)
            pred_bg, pred_fg = model(noisy[:, :c], noisy[:, c:], cond, t)
            pred = torch.cat([pred_bg, pred_fg], 1)
            loss = F.mse_loss(pred.float(), goal.float())
            if use_consistency and global_step % args.consistency_every == 0:
                sel = (cache["top"][idx].to(target.device) & (t < 500)).nonzero().flatten()[:args.consistency_batch]
                if len(sel):
                    x0 = predicted_x0(noise_scheduler, noisy[sel], pred[sel], t[sel])
                    comp = cache["composite"][idx[sel.cpu()]].float().to(target.device) / 255
                    comp = torch.where(flip[sel.cpu()].to(target.device)[:, None, None, None], comp.flip(-1), comp)
                    loss = loss + args.consistency_weight * consistency_loss(vae, decoder, x0[:, :c], x0[:, c:],
                                                                             comp)
            accelerator.backward(loss)
            optimizer_step(accelerator, model.parameters(), optimizer, lr_sched, args.max_grad_norm)
        if accelerator.sync_gradients:
            global_step = finish_step(accelerator, args, out, global_step, progress, {"loss": loss}, ema,
                                      model.parameters())
            if accelerator.is_main_process and due(global_step, args.validation_steps):
                eval_model = averaged_copy(accelerator, model, ema)
                iou = log_validation(args, eval_model, vae, decoder, noise_scheduler.config,
                                     out / f"validation-{global_step}.png")
                logger.info("step %d: validation alpha IoU %.3f", global_step, iou)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = averaged_copy(accelerator, model, ema)
        save_decomposition_pipeline(out / "pipeline", final, vae,
                                    DDIMScheduler.from_config(noise_scheduler.config), decoder)
        iou = log_validation(args, final, vae, decoder, noise_scheduler.config, out / "validation-final.png")
        accelerator.print(f"saved {out / 'pipeline'} (validation alpha IoU {iou:.3f})")
    accelerator.end_training()


if __name__ == "__main__":
    run_script(main)
