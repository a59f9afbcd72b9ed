#!/usr/bin/env python
"""Fine-tune the mini layer UNet for layout generation (`MultiLayerPipeline`): task 1 on layer-wise region crops.

Why: the mini UNet learned task 1 ("foreground on background") on full 128 px canvases with a
clean background as condition. `MultiLayerPipeline` asks it for something slightly different:
a layer on a *crop* around its box (about box / 0.65, often 40-96 px: smaller latents than it
ever saw), conditioned on a composite that already holds other objects. This script trains
exactly that, from multi-object procedural scenes:

* a training scene (`make_scene`, seeds below HELDOUT_SEED_START, 1-4 objects); one object k;
* its box = the object's body box; its crop = `region_crop(box, fill=U(fill_min, fill_max))`,
  the pipeline's own function, resized to the pipeline's working size (crops below
  `--min_region_size`, default the model's 128 px, are upsampled), so training matches inference;
* condition = VAE latent of the crop of (background + objects below k), exactly composited;
* target = the object's RGBA in the crop through the transparent encoder; text = its caption.

Samples are cached once (latents + caption indices, grouped by crop shape); a step draws one
crop shape (in proportion to its samples) and a batch of it, so one UNet call sees one size.
`--replay_prob` of the steps replay the original tasks (0: text -> layer, 2: background from
text + layer) on full canvases, so the single-layer pipelines keep working.

    accelerate launch training/train_multilayer.py --pretrained assets/layergen-mini \\
        --output_dir runs/multilayer --max_train_steps 1500 --use_ema

Resume with `--resume_from_checkpoint latest`. The fine-tuned pipeline folder (EMA weights)
is written to `<output_dir>/pipeline`; load it with `MultiLayerPipeline.from_pretrained`.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from diffusers import DDPMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm

from layergen.data.scenes import HELDOUT_SEED_START, make_scene
from layergen.layers.compositing import composite_layers
from layergen.layout import Box
from layergen.pipelines.pipeline_multilayer import crop_pixels, region_crop, resize_rgba
from layergen.training_utils import (add_training_args, averaged_copy, due, finish_step, layer_and_background_latents,
                                     optimizer_step, prepare_training, rgb_latents, rgba_latents, run_script,
                                     save_image_grid, start_accelerator)

logger = logging.getLogger(__name__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Fine-tune the mini layer UNet on layout region crops.")
    p.add_argument("--pretrained", required=True, help="Pipeline folder to start from (e.g. assets/layergen-mini).")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--resolution", type=int, default=128, help="Scene canvas side in pixels.")
    p.add_argument("--num_samples", type=int, default=4000, help="Cached region-crop samples.")
    p.add_argument("--num_replay", type=int, default=1000, help="Cached full-canvas samples of tasks 0 and 2.")
    p.add_argument("--replay_prob", type=float, default=0.25, help="Share of steps that replay tasks 0/2.")
    p.add_argument("--fill_min", type=float, default=0.55)
    p.add_argument("--fill_max", type=float, default=0.75)
    p.add_argument("--max_objects", type=int, default=4)
    p.add_argument("--min_region_size", type=int, default=None,
                   help="Crops smaller than this are trained upsampled to it, as the pipeline denoises them "
                        "(default: --resolution, the pipeline's default for the mini; 0 = native crop sizes).")
    add_training_args(p, train_batch_size=32, max_train_steps=1500, learning_rate=5e-5,
                      lr_warmup_steps=50, checkpointing_steps=250, validation_steps=250, ema_decay=0.999)
    p.add_argument("--caption_dropout", type=float, default=0.1)
    p.add_argument("--condition_dropout", type=float, default=0.05)
    p.add_argument("--validation_inference_steps", type=int, default=20)
    args = p.parse_args(argv)
    if args.min_region_size is None:
        args.min_region_size = args.resolution
    if not 0.05 <= args.fill_min <= args.fill_max <= 1.0:
        p.error("need 0.05 <= --fill_min <= --fill_max <= 1")
    if args.num_samples < 1 or args.num_samples >= HELDOUT_SEED_START:
        p.error("--num_samples must be positive and below the held-out seed range")
    return args


def load_pipeline(path):
    from layergen.pipelines import MultiLayerPipeline

    pipe = MultiLayerPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    for name in ("vae", "text_encoder", "transparent_encoder", "transparent_decoder"):
        getattr(pipe, name).eval().requires_grad_(False)
    return pipe


@torch.no_grad()
def embed_texts(pipe, texts, batch=64):
    tok, enc = pipe.tokenizer, pipe.text_encoder
    max_len = min(int(getattr(tok, "model_max_length", 77) or 77), 77)
    out = []
    for i in range(0, len(texts), batch):
        t = tok(texts[i:i + batch], padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
        kwargs = {} if getattr(enc.config, "model_type", "").startswith("clip") else \
            {"attention_mask": t.attention_mask}
        out.append(enc(t.input_ids, **kwargs)[0].half())
    return torch.cat(out)


def region_sample(seed: int, size: int, f: int, args):
    """(work shape, condition RGB crop, target RGBA crop, caption) for one object of one training scene,
    cropped and resized exactly as `MultiLayerPipeline` does at inference."""
    rng = np.random.default_rng([seed, 41])
    scene = make_scene(seed, size, num_objects=(1, args.max_objects))
    k = int(rng.integers(len(scene.objects)))
    obj = scene.objects[k]
    x0, y0, x1, y1 = obj.box
    box = Box(x0, y0, max(1, x1 - x0), max(1, y1 - y0))
    crop, work = region_crop(box, size, size, f, "region", float(rng.uniform(args.fill_min, args.fill_max)),
                             args.min_region_size or None)
    stack = scene.to_stack()
    below = composite_layers(size, size, stack.layers[:k + 1])[..., :3]
    cond = crop_pixels(below, crop)
    padded = np.zeros((size + 2 * crop[3], size + 2 * crop[2], 4), np.uint8)  # transparent outside the canvas
    padded[crop[3]:crop[3] + size, crop[2]:crop[2] + size] = obj.rgba
    cx, cy = crop[0] + crop[2], crop[1] + crop[3]
    target = padded[cy:cy + crop[3], cx:cx + crop[2]]
    if work != (crop[3], crop[2]):
        c = torch.from_numpy(np.ascontiguousarray(cond)).float().permute(2, 0, 1)[None] / 255.0
        c = F.interpolate(c, size=work, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
        cond = np.floor(c[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        target = resize_rgba(np.ascontiguousarray(target), *work)
    return work, cond, target, obj.caption


@torch.no_grad()
def build_cache(args, pipe, accelerator):
    """Region-crop samples grouped by crop shape, plus full-canvas replay samples, plus text embeddings."""
    path = Path(args.output_dir) / f"cache-{args.num_samples}-{args.num_replay}-{args.resolution}.pt"
    if path.exists():
        return torch.load(path)
    f = pipe.vae_scale_factor
    vae, enc = pipe.vae, pipe.transparent_encoder
    groups: dict = {}
    for seed in tqdm(range(args.num_samples), desc="region crops", disable=not accelerator.is_local_main_process):
        shape, cond, target, caption = region_sample(seed, args.resolution, f, args)
        groups.setdefault(shape, []).append((cond, target, caption))
    captions = {""}
    region = {}
    for shape, items in groups.items():
        conds, targets, caps = [], [], []
        for i in range(0, len(items), 32):
            part = items[i:i + 32]
            conds.append(rgb_latents(vae, [c for c, _, _ in part]))
            targets.append(rgba_latents(vae, enc, [t for _, t, _ in part]))
            caps += [c for _, _, c in part]
        captions.update(caps)
        region[shape] = {"cond": torch.cat(conds), "target": torch.cat(targets), "caps": caps}
    replay = layer_and_background_latents(vae, enc, args.num_replay, args.resolution, desc="replay",
                                          disable=not accelerator.is_local_main_process)
    fg_caps, bg_caps = replay["fg_caps"], replay["bg_caps"]
    captions.update(fg_caps + bg_caps)
    captions = sorted(captions)
    index = {c: i for i, c in enumerate(captions)}
    for g in region.values():
        g["cap"] = torch.tensor([index[c] for c in g.pop("caps")])
    cache = {"region": region, "captions": captions, "text": embed_texts(pipe, captions),
             "replay": {"fg": replay["fg"], "bg": replay["bg"],
                        "fg_cap": torch.tensor([index[c] for c in fg_caps]),
                        "bg_cap": torch.tensor([index[c] for c in bg_caps])}}
    torch.save(cache, path)
    return cache


def draw_batch(cache, args, gen):
    """(target, condition, caption index, task) for one step: a region-crop batch or a replay batch."""
    b = args.train_batch_size
    replay = cache["replay"]
    if replay["fg"] is not None and torch.rand(1, generator=gen).item() < args.replay_prob:
        idx = torch.randint(0, replay["fg"].shape[0], (b,), generator=gen)
        tasks = torch.where(torch.rand(b, generator=gen) < 0.5, 0, 2)
        fg, bg = replay["fg"][idx].float(), replay["bg"][idx].float()
        t2 = (tasks == 2)[:, None, None, None]
        target = torch.where(t2, bg, fg)
        cond = torch.where(t2, fg, torch.zeros_like(fg))
        cap = torch.where(tasks == 2, replay["bg_cap"][idx], replay["fg_cap"][idx])
        return target, cond, cap, tasks
    shapes = sorted(cache["region"])
    counts = torch.tensor([cache["region"][s]["target"].shape[0] for s in shapes], dtype=torch.float)
    g = cache["region"][shapes[int(torch.multinomial(counts, 1, generator=gen))]]
    idx = torch.randint(0, g["target"].shape[0], (b,), generator=gen)
    return g["target"][idx].float(), g["cond"][idx].float(), g["cap"][idx], torch.ones(b, dtype=torch.long)


@torch.no_grad()
def log_validation(pipe, unet, path, steps):
    """Four held-out scene layouts (boxes + captions) generated by the current UNet."""
    from layergen.data.scenes import make_scene as scene_of
    from layergen.layout import Layout

    val = type(pipe)(**{**pipe.components, "unet": unet})
    val.set_progress_bar_config(disable=True)
    images = []
    for k in range(4):
        scene = scene_of(HELDOUT_SEED_START + 900_000 + k, pipe.default_size(), num_objects=(2, 4), glyph_prob=0)
        boxes = [Box(x0, y0, x1 - x0, y1 - y0, prompt=o.caption) for o, (x0, y0, x1, y1)
                 in zip(scene.objects, (o.box for o in scene.objects))]
        layout = Layout(scene.size, scene.size, boxes, scene.caption, scene.background_caption)
        stack = val(layout=layout, num_inference_steps=steps, seed=k, tta=False, output_type="stack").stacks[0]
        images += [scene.composite, stack.composite()[..., :3]]
    save_image_grid(images, path, cols=4)


def save_pipeline(pipe, unet, src: Path, dest: Path):
    """The start pipeline with the fine-tuned UNet; a packaged text-encoder pointer stays a pointer."""
    from layergen.mini import PACKAGED_POINTER

    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pointer = (Path(src) / "text_encoder" / PACKAGED_POINTER).is_file()
    parts = {**pipe.components, "unet": unet}
    if pointer:
        parts["text_encoder"] = None
    type(pipe)(**parts).save_pretrained(tmp)
    if pointer:
        (tmp / "text_encoder").mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(src) / "text_encoder" / PACKAGED_POINTER, tmp / "text_encoder" / PACKAGED_POINTER)
        index = json.loads((tmp / "model_index.json").read_text())
        index["text_encoder"] = json.loads((Path(src) / "model_index.json").read_text())["text_encoder"]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def main(argv=None):
    args = parse_args(argv)
    accelerator = start_accelerator(args, "train_multilayer")
    set_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    pipe = load_pipeline(args.pretrained)
    if pipe.unet.config.in_channels != 2 * pipe.latent_channels or not pipe.unet.config.num_class_embeds:
        raise SystemExit("--pretrained needs the mini layer UNet (condition latent + task class labels)")
    with accelerator.main_process_first():
        cache = build_cache(args, pipe, accelerator)

    unet = UNet2DConditionModel.from_pretrained(Path(args.pretrained) / "unet")
    unet.train()
    sched_cfg = pipe.scheduler.config
    noise_scheduler = DDPMScheduler(num_train_timesteps=sched_cfg.num_train_timesteps,
                                    beta_schedule=sched_cfg.beta_schedule, beta_start=sched_cfg.beta_start,
                                    beta_end=sched_cfg.beta_end, prediction_type=sched_cfg.prediction_type,
                                    clip_sample=False)
    unet, optimizer, lr_sched, ema, global_step = prepare_training(accelerator, args, unet, out)

    gen = torch.Generator().manual_seed(args.seed * 1000 + global_step * accelerator.num_processes
                                        + accelerator.process_index)
    empty = cache["captions"].index("")
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="multilayer",
                    disable=not accelerator.is_local_main_process)
    while global_step < args.max_train_steps:
        target, cond, cap, tasks = draw_batch(cache, args, gen)
        b = target.shape[0]
        drop_cond = (torch.rand(b, generator=gen) < args.condition_dropout)[:, None, None, None]
        cond = torch.where(drop_cond, torch.zeros_like(cond), cond)
        cap = torch.where(torch.rand(b, generator=gen) < args.caption_dropout, torch.full_like(cap, empty), cap)
        text = cache["text"][cap].float()
        target, cond, text, tasks = (x.to(accelerator.device) for x in (target, cond, text, tasks))
        noise = torch.randn(target.shape, generator=gen).to(target)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=gen).to(target.device)
        noisy = noise_scheduler.add_noise(target, noise, t)
        goal = noise if noise_scheduler.config.prediction_type == "epsilon" else \
            noise_scheduler.get_velocity(target, noise, t)
        with accelerator.accumulate(unet):
            pred = unet(torch.cat([noisy, cond], 1), t, encoder_hidden_states=text, class_labels=tasks).sample
            loss = F.mse_loss(pred.float(), goal.float())
            accelerator.backward(loss)
            optimizer_step(accelerator, unet.parameters(), optimizer, lr_sched, args.max_grad_norm)
        if accelerator.sync_gradients:
            global_step = finish_step(accelerator, args, out, global_step, progress, {"loss": loss}, ema,
                                      unet.parameters())
            if accelerator.is_main_process and due(global_step, args.validation_steps):
                eval_unet = averaged_copy(accelerator, unet, ema)
                log_validation(pipe, eval_unet, out / f"validation-{global_step}.png",
                               args.validation_inference_steps)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = averaged_copy(accelerator, unet, ema)
        save_pipeline(pipe, final, Path(args.pretrained), out / "pipeline")
        log_validation(pipe, final, out / "validation-final.png", args.validation_inference_steps)
        accelerator.print(f"saved {out / 'pipeline'}")
    accelerator.end_training()


if __name__ == "__main__":
    run_script(main)
