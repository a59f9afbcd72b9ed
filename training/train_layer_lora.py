#!/usr/bin/env python
"""Fine-tune a layer UNet on your own transparent layers: LoRA (PEFT) or full fine-tuning.

Works on any layergen pipeline folder (the bundled layergen-mini by default, or an SD 1.5 /
SDXL-class folder that has the transparent codec), in diffusers examples/ style. Layers go
through the same path as at inference: the frozen base VAE + transparent encoder give the
latent of each RGBA layer, the UNet learns to denoise it from the caption.

Data (`--train_data_dir`, see `layergen.data.folders`): RGBA images with captions
(`metadata.jsonl` or `.txt` beside each image), and/or PSD / ORA / PNG-stack files (every
layer is a sample, the layers below it its background). Bad records are skipped and counted.

Conditional mode (`--conditional`, needs a UNet whose `conv_in` takes latent + condition, like
the mini): records that have a background train "foreground on background" (task 1, the
background latent concatenated to the input); the others train plain text -> layer (task 0).

    accelerate launch training/train_layer_lora.py --train_data_dir my_layers \\
        --output_dir runs/my_lora --rank 8 --max_train_steps 1000 \\
        --validation_prompt "a red hexagon"

Output: `<output_dir>/pytorch_lora_weights.safetensors` (diffusers format), loadable with

    pipe = layergen.mini.load_pipeline(); pipe.load_lora_weights("runs/my_lora")

or, with `--full_finetune`, a complete pipeline folder `<output_dir>/pipeline`. Resume with
`--resume_from_checkpoint latest`. When the data set is small (`--cache_latents auto`),
latents and text embeddings are computed once, so a step costs one UNet forward/backward.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from layergen.training_utils import (due, finish_step, non_negative_float, optimizer_step, positive_int, resume_step,
                                     rgba_preview, run_script, save_image_grid)

logger = logging.getLogger(__name__)

ATTENTION_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
CONV_MODULES = ("conv1", "conv2", "conv_shortcut")
TIME_MODULES = ("time_emb_proj",)
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def parse_args(argv=None):
    from layergen.data.folders import CAPTION_COLUMN

    p = argparse.ArgumentParser(description="LoRA / full fine-tuning of a layer UNet on your transparent layers.")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="A layergen pipeline folder (default: the bundled assets/layergen-mini).")
    p.add_argument("--train_data_dir", required=True,
                   help="Folder of RGBA images with captions and/or PSD / ORA / PNG-stack files.")
    p.add_argument("--caption_column", default=CAPTION_COLUMN, help="Caption key in metadata.jsonl.")
    p.add_argument("--min_size", type=int, default=8, help="Skip layers whose visible content is smaller (px).")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--resolution", type=positive_int, default=None,
                   help="Training size (default: the model's native size).")
    p.add_argument("--resize_mode", default="pad", choices=["pad", "crop", "stretch"])
    p.add_argument("--random_flip", action="store_true")
    # what to train
    p.add_argument("--full_finetune", action="store_true", help="Train every UNet weight instead of a LoRA.")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    p.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank, i.e. scale 1).")
    p.add_argument("--lora_dropout", type=float, default=0.0)
    p.add_argument("--target_modules", default=",".join(ATTENTION_MODULES),
                   help="Comma-separated module names that get a LoRA (default: attention projections).")
    p.add_argument("--lora_conv", action="store_true", help="Also put LoRAs on the resnet convolutions.")
    p.add_argument("--lora_time", action="store_true", help="Also put LoRAs on the time-embedding projections.")
    p.add_argument("--conditional", action="store_true",
                   help="Records with a background train the background-conditioned foreground task.")
    p.add_argument("--condition_dropout", type=float, default=0.15,
                   help="Zero the background latent this often in conditional mode (keeps text-only generation).")
    p.add_argument("--caption_dropout", type=float, default=0.05,
                   help="Train with the empty caption this often (keeps classifier-free guidance working).")
    # optimisation
    p.add_argument("--train_batch_size", type=positive_int, default=4)
    p.add_argument("--num_train_epochs", type=int, default=100)
    p.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    p.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--learning_rate", type=non_negative_float, default=1e-4)
    p.add_argument("--scale_lr", action="store_true", help="Multiply the LR by batch x accumulation x processes.")
    p.add_argument("--lr_scheduler", default="constant",
                   help='"constant", "constant_with_warmup", "linear", "cosine", ... (diffusers get_scheduler).')
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--adam_weight_decay", type=float, default=1e-2)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR loss weighting (5.0 is common).")
    p.add_argument("--use_ema", action="store_true", help="Keep an EMA of the trained weights; it is what is saved.")
    p.add_argument("--ema_decay", type=float, default=0.995)
    p.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="Default: accelerate's config. Frozen weights run in this dtype, trained ones stay fp32.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataloader_num_workers", type=int, default=0)
    p.add_argument("--cache_latents", default="auto", choices=["auto", "yes", "no"],
                   help="Encode every record once up front (auto: when there are at most --cache_max_records).")
    p.add_argument("--cache_max_records", type=int, default=4096)
    # checkpoints, validation, logging
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--resume_from_checkpoint", default=None, help='A checkpoint folder or "latest".')
    p.add_argument("--validation_prompt", action="append", default=None,
                   help="Prompt for validation images (repeat for several).")
    p.add_argument("--validation_background", default=None,
                   help="Conditional mode: validate on this background image (foreground-on-background).")
    p.add_argument("--num_validation_images", type=int, default=2, help="Images per validation prompt.")
    p.add_argument("--validation_steps", type=int, default=500, help="Validate every N steps (0: only at the end).")
    p.add_argument("--validation_inference_steps", type=int, default=20)
    p.add_argument("--validation_seed", type=int, default=0, help="Fixed seed: images are comparable across steps.")
    p.add_argument("--report_to", default=None, help='"tensorboard", "wandb", ... (needs the package).')
    p.add_argument("--logging_dir", default="logs")
    args = p.parse_args(argv)
    if args.rank < 1:
        p.error("--rank must be >= 1")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        p.error("--max_train_steps must be >= 1")
    if not 0 <= args.caption_dropout <= 1 or not 0 <= args.condition_dropout <= 1:
        p.error("dropout probabilities must be in [0, 1]")
    if args.validation_background and not args.conditional:
        p.error("--validation_background needs --conditional")
    return args


def target_modules(args) -> list[str]:
    names = [m.strip() for m in args.target_modules.split(",") if m.strip()]
    if args.lora_conv:
        names += CONV_MODULES
    if args.lora_time:
        names += TIME_MODULES
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------
# encoding


def encode_text(pipe, captions: list[str]):
    """Frozen text encoder(s) -> (embeds, pooled or None), exactly as the pipeline encodes prompts."""
    pipe._guidance_scale = 1.0  # encode_prompt returns negatives only under CFG
    embeds, _, pooled, _ = pipe.encode_prompt(captions)
    return embeds, pooled


def encode_batch(pipe, rgba: torch.Tensor, background: torch.Tensor | None):
    """RGBA (B x 4 x H x W, [0, 1]) -> layer latents; background (B x 3 x H x W) -> condition latents
    (zeros when `background` is None: only the conditional task reads them)."""
    latents = pipe.encode_condition_rgba(rgba)
    cond = torch.zeros_like(latents) if background is None else pipe.encode_condition_rgb(background)
    return latents, cond


@torch.no_grad()
def build_cache(args, pipe, records, accelerator, out: Path):
    """Latents of every record (both flips with --random_flip) and embeddings of every caption, once."""
    from layergen.data.folders import LayerFolderDataset

    key = hashlib.sha1(json.dumps([str(args.pretrained_model_name_or_path), args.resolution, args.resize_mode,
                                   args.conditional, str(accelerator.mixed_precision),
                                   args.random_flip, [r.source for r in records],
                                   [r.caption for r in records]]).encode()).hexdigest()[:12]
    path = out / f"latent-cache-{key}.pt"
    if path.is_file():
        return torch.load(path)
    ds = LayerFolderDataset(records=records, resolution=args.resolution, resize_mode=args.resize_mode)
    fg, bg, has_bg, fg_flip, bg_flip = [], [], [], [], []
    bs = 16
    for start in tqdm(range(0, len(ds), bs), desc="caching latents", disable=not accelerator.is_local_main_process):
        items = [ds[i] for i in range(start, min(start + bs, len(ds)))]
        rgba = torch.stack([it["rgba"] for it in items]).to(accelerator.device)
        back = torch.stack([it["background"] for it in items]).to(accelerator.device)
        needs_bg = args.conditional and any(it["has_background"] for it in items)
        for flip in ([False, True] if args.random_flip else [False]):
            x, b = (rgba.flip(-1), back.flip(-1)) if flip else (rgba, back)
            b = b if needs_bg else None
            z, c = encode_batch(pipe, x, b)
            (fg_flip if flip else fg).append(z.float().cpu())
            (bg_flip if flip else bg).append(c.float().cpu())
        has_bg += [bool(it["has_background"]) for it in items]
    captions = sorted({r.caption for r in records} | {""})
    embeds, pooled = [], []
    for start in range(0, len(captions), 64):
        e, pl = encode_text(pipe, captions[start:start + 64])
        embeds.append(e.float().cpu())
        if pl is not None:
            pooled.append(pl.float().cpu())
    index = {c: i for i, c in enumerate(captions)}
    cache = {"fg": torch.cat(fg), "bg": torch.cat(bg), "has_bg": torch.tensor(has_bg), "captions": captions,
             "text": torch.cat(embeds), "pooled": torch.cat(pooled) if pooled else None,
             "cap": torch.tensor([index[r.caption] for r in records])}
    if args.random_flip:
        cache["fg_flip"], cache["bg_flip"] = torch.cat(fg_flip), torch.cat(bg_flip)
    if accelerator.is_main_process:
        from layergen.atomic import atomic_path

        with atomic_path(path) as tmp:
            torch.save(cache, tmp)
    return cache


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def _collate_records(items):
    return {"rgba": torch.stack([i["rgba"] for i in items]),
            "background": torch.stack([i["background"] for i in items]),
            "has_background": torch.tensor([bool(i["has_background"]) for i in items]),
            "caption": [i["caption"] for i in items]}


# ---------------------------------------------------------------------------------------------
# saving


def lora_state_dict(unet) -> dict:
    """PEFT keys (``...lora_A.weight``) for every module, attention and convolution alike.

    Not `convert_state_dict_to_diffusers`: it renames only attention projections (``to_q.lora.down``)
    and leaves convolutions as ``lora_A``, and diffusers' loader guesses the format of such a mixed
    file from its first key, so a UNet whose first block has no attention silently lost every
    attention LoRA on `load_lora_weights`.
    """
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


def save_lora(pipe_cls, unet, directory: Path) -> Path:
    """`pytorch_lora_weights.safetensors` in the diffusers format (with the LoRA config as metadata, so a
    `lora_alpha` different from the rank loads with the right scale), written atomically."""
    from layergen.atomic import atomic_path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / LORA_WEIGHT_NAME
    tmpdir = Path(tempfile.mkdtemp(prefix=".lora-", dir=directory))
    try:
        state = {k: v.detach().float().cpu().contiguous() for k, v in lora_state_dict(unet).items()}
        pipe_cls.save_lora_weights(tmpdir, unet_lora_layers=state, safe_serialization=True,
                                   unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
        with atomic_path(target) as tmp:
            os.replace(tmpdir / LORA_WEIGHT_NAME, tmp)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return target


def load_lora_into(pipe_cls, unet, directory) -> None:
    """Put a saved LoRA back into a PEFT-wrapped training UNet (resume)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state = pipe_cls.lora_state_dict(str(directory))[0]
    state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"checkpoint LoRA does not match the model: unexpected keys {unexpected[:4]}")


def save_full_pipeline(src: Path, unet, dest: Path) -> None:
    """A complete pipeline folder: the source folder's other components (hard-linked when possible) + the new UNet."""
    from layergen.atomic import atomic_dir

    def link_or_copy(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    with atomic_dir(dest) as tmp:
        for child in src.iterdir():
            if child.name == "unet" or child.name.startswith("."):
                continue
            if child.is_dir():
                shutil.copytree(child, tmp / child.name, copy_function=link_or_copy)
            else:
                link_or_copy(child, tmp / child.name)
        unet.save_pretrained(tmp / "unet")


# ---------------------------------------------------------------------------------------------
# validation


@torch.no_grad()
def log_validation(args, pipe, accelerator, step_name: str, out: Path):
    """Validation images with a fixed seed (comparable across steps): a grid PNG + trackers."""
    from PIL import Image

    from layergen.pipelines import ForegroundOnBackgroundPipeline, TransparentLayerPipeline

    comps = dict(pipe.components)
    if args.validation_background:
        vpipe = ForegroundOnBackgroundPipeline(**comps)
        background = Image.open(args.validation_background).convert("RGB")
    else:
        vpipe, background = TransparentLayerPipeline(**comps), None
    vpipe.set_progress_bar_config(disable=True)
    was_training = pipe.unet.training
    pipe.unet.eval()
    images = []
    size = args.resolution
    for prompt in args.validation_prompt:
        kw = dict(num_inference_steps=args.validation_inference_steps, seed=args.validation_seed, tta=False,
                  num_images_per_prompt=args.num_validation_images, output_type="stack", height=size, width=size)
        if background is not None:
            stacks = vpipe(prompt, background, **kw).images
        else:
            stacks = vpipe(prompt, **kw).images
        images += [stack.layers[-1].pixels for stack in stacks]
    pipe.unet.train(was_training)
    previews = [rgba_preview(img.astype(np.float32) / 255) for img in images]
    save_image_grid(previews, out / f"validation-{step_name}.png", cols=args.num_validation_images)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack(previews), 0, dataformats="NHWC")
    return images


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    from accelerate.utils import ProjectConfiguration
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, cast_training_params, compute_snr

    from layergen.data.folders import LayerFolderDataset, scan_folder
    from layergen.errors import LayergenError
    from layergen.mini import mini_path
    from layergen.pipelines import TransparentLayerPipeline

    out = Path(args.output_dir)
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision, log_with=args.report_to,
                              project_config=ProjectConfiguration(project_dir=str(out),
                                                                  logging_dir=str(out / args.logging_dir)))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING)
    logging.getLogger("layergen.data.folders").setLevel(logging.WARNING)  # one summary line instead
    set_seed(args.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    # -- model ------------------------------------------------------------------------------
    src = Path(args.pretrained_model_name_or_path) if args.pretrained_model_name_or_path else mini_path()
    args.pretrained_model_name_or_path = str(src)
    pipe = TransparentLayerPipeline.from_pretrained(src)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    latent_c = pipe.latent_channels
    takes_condition = unet.config.in_channels == 2 * latent_c
    has_tasks = bool(getattr(unet.config, "num_class_embeds", None))
    if args.conditional and not takes_condition:
        raise LayergenError(f"--conditional needs a UNet with {2 * latent_c} input channels (latent + condition); "
                            f"this one has {unet.config.in_channels}")
    args.resolution = args.resolution or pipe.default_size()
    if args.resolution % pipe.vae_scale_factor:
        raise LayergenError(f"--resolution must be a multiple of {pipe.vae_scale_factor}")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    cast = {} if weight_dtype == torch.float32 else {"dtype": weight_dtype}
    for name in ("vae", "text_encoder", "text_encoder_2", "transparent_encoder", "transparent_decoder"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False).eval().to(accelerator.device, **cast)
    if args.full_finetune:
        unet.requires_grad_(True).to(accelerator.device)
    else:
        from peft import LoraConfig

        unet.requires_grad_(False).to(accelerator.device, **cast)
        try:
            unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.lora_alpha or args.rank,
                                        lora_dropout=args.lora_dropout, init_lora_weights="gaussian",
                                        target_modules=target_modules(args)))
        except ValueError as exc:  # PEFT: no module matches
            raise LayergenError(f"--target_modules {args.target_modules!r}: {exc}") from exc
        if weight_dtype != torch.float32:
            cast_training_params(unet, dtype=torch.float32)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise LayergenError(f"no UNet module matches --target_modules {args.target_modules!r}")
    n_params = sum(p.numel() for p in params)
    ema = EMAModel(params, decay=args.ema_decay) if args.use_ema else None
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    # -- data -------------------------------------------------------------------------------
    records, report = scan_folder(args.train_data_dir, args.min_size, args.caption_column)
    accelerator.print(f"data {args.train_data_dir}: {report.summary()}")
    for reason, examples in sorted(report.examples.items()):
        logger.info("skipped (%s), e.g. %s", reason, "; ".join(examples[:3]))
    if not records:
        raise LayergenError(f"{args.train_data_dir}: no usable training records ({report.summary()})")
    use_cache = args.cache_latents == "yes" or (args.cache_latents == "auto" and len(records) <= args.cache_max_records)
    cache = None
    if use_cache:
        with accelerator.main_process_first():
            cache = build_cache(args, pipe, records, accelerator, out)
        for key in ("fg", "bg", "text", "pooled", "fg_flip", "bg_flip"):
            if cache.get(key) is not None:
                cache[key] = cache[key].to(accelerator.device)
        dataset, collate = _Indices(len(records)), None
    else:
        dataset = LayerFolderDataset(records=records, resolution=args.resolution, resize_mode=args.resize_mode,
                                     random_flip=args.random_flip)
        collate = _collate_records
    if args.conditional and cache is not None and not bool(cache["has_bg"].any()):
        accelerator.print("note: --conditional, but no record has a background; training text -> layer only")
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True,
                                         collate_fn=collate, num_workers=args.dataloader_num_workers, drop_last=False)

    # -- optimisation ----------------------------------------------------------------------------
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    steps_per_epoch = math.ceil(math.ceil(len(dataset) / (args.train_batch_size * accelerator.num_processes))
                                / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)

    if not args.full_finetune:  # checkpoints hold the LoRA only, not a copy of the whole UNet
        def save_hook(models, weights, output_dir):
            if accelerator.is_main_process:
                for model in models:
                    save_lora(TransparentLayerPipeline, accelerator.unwrap_model(model), output_dir)
                    if weights:
                        weights.pop()

        def load_hook(models, input_dir):
            while models:
                model = accelerator.unwrap_model(models.pop())
                load_lora_into(TransparentLayerPipeline, model, input_dir)
                if weight_dtype != torch.float32:
                    cast_training_params(model, dtype=torch.float32)

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    if accelerator.is_main_process:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) or v is None}
        accelerator.init_trackers("train_layer_lora", config=config)

    global_step = resume_step(accelerator, out, args.resume_from_checkpoint)
    first_epoch = global_step // steps_per_epoch
    skip_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    accelerator.print(f"{'full fine-tuning' if args.full_finetune else f'LoRA rank {args.rank}'}: {n_params:,} "
                      f"trained parameters; {len(records)} records, {'cached' if cache else 'streamed'}; "
                      f"batch {total_batch}, {args.max_train_steps} steps")

    def batch_tensors(batch):
        """-> target latents, condition latents (or None), text embeds, pooled (or None), has_background."""
        if cache is not None:
            idx = batch.to(cache["fg"].device)
            fg, bg = cache["fg"][idx], cache["bg"][idx]
            if args.random_flip:
                flip = (torch.rand(len(idx)) < 0.5).to(idx.device)[:, None, None, None]
                fg = torch.where(flip, cache["fg_flip"][idx], fg)
                bg = torch.where(flip, cache["bg_flip"][idx], bg)
            cap = cache["cap"].to(idx.device)[idx]
            drop = (torch.rand(len(idx)) < args.caption_dropout).to(idx.device)
            cap = torch.where(drop, torch.full_like(cap, cache["captions"].index("")), cap)
            text = cache["text"][cap]
            pooled = None if cache["pooled"] is None else cache["pooled"][cap]
            return fg, bg, text, pooled, cache["has_bg"].to(idx.device)[idx]
        with torch.no_grad():
            rgba = batch["rgba"].to(accelerator.device, weight_dtype)
            back = batch["background"].to(accelerator.device, weight_dtype)
            fg, bg = encode_batch(pipe, rgba, back if args.conditional and bool(batch["has_background"].any())
                                  else None)
            drop = torch.rand(len(batch["caption"])) < args.caption_dropout
            captions = ["" if d else c for d, c in zip(drop.tolist(), batch["caption"])]
            text, pooled = encode_text(pipe, captions)
        return fg.float(), bg.float(), text.float(), None if pooled is None else pooled.float(), \
            batch["has_background"].to(accelerator.device)

    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="layer-lora" if not args.full_finetune
                    else "layer-finetune", disable=not accelerator.is_local_main_process)
    in_dtype = torch.float32 if args.full_finetune else weight_dtype  # frozen LoRA base weights run in weight_dtype
    unet.train()
    done = global_step >= args.max_train_steps
    for epoch in range(first_epoch, num_epochs):
        if done:
            break
        epoch_loader = loader
        if epoch == first_epoch and skip_batches:
            epoch_loader = accelerator.skip_first_batches(loader, skip_batches)
        for batch in epoch_loader:
            target, bg, text, pooled, has_bg = batch_tensors(batch)
            b = target.shape[0]
            noise = torch.randn_like(target)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), device=target.device).long()
            noisy = noise_scheduler.add_noise(target, noise, t)
            tasks = torch.zeros(b, dtype=torch.long, device=target.device)
            x = noisy
            if takes_condition:
                cond = torch.zeros_like(target)
                if args.conditional:
                    use = has_bg.bool()
                    tasks = torch.where(use, torch.ones_like(tasks), tasks)  # task 1: foreground on background
                    keep = use & (torch.rand(b, device=target.device) >= args.condition_dropout)
                    cond = torch.where(keep[:, None, None, None], bg, cond)
                x = torch.cat([noisy, cond], dim=1)
            if noise_scheduler.config.prediction_type == "v_prediction":
                goal = noise_scheduler.get_velocity(target, noise, t)
            else:
                goal = noise
            added = None
            if getattr(accelerator.unwrap_model(unet).config, "addition_embed_type", None) == "text_time":
                added = pipe._added_cond_kwargs(pooled.to(weight_dtype), args.resolution, args.resolution, b)
            with accelerator.accumulate(unet):
                pred = unet(x.to(in_dtype), t, encoder_hidden_states=text.to(in_dtype),
                            class_labels=tasks if has_tasks else None, added_cond_kwargs=added).sample
                if args.snr_gamma is None:
                    loss = F.mse_loss(pred.float(), goal.float())
                else:  # Min-SNR weighting (Hang et al. 2023), as in diffusers' examples
                    snr = compute_snr(noise_scheduler, t)
                    w = torch.stack([snr, args.snr_gamma * torch.ones_like(snr)], 1).min(1)[0]
                    w = w / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else w / snr
                    loss = (F.mse_loss(pred.float(), goal.float(), reduction="none").mean((1, 2, 3)) * w).mean()
                accelerator.backward(loss)
                optimizer_step(accelerator, params, optimizer, lr_scheduler, args.max_grad_norm)
            if not accelerator.sync_gradients:
                continue
            global_step = finish_step(accelerator, args, out, global_step, progress,
                                      {"loss": loss, "lr": lr_scheduler.get_last_lr()[0]}, ema, params)
            if (args.validation_prompt and due(global_step, args.validation_steps)
                    and accelerator.is_main_process):
                if ema is not None:
                    ema.store(params)
                    ema.copy_to(params)
                log_validation(args, pipe, accelerator, str(global_step), out)
                if ema is not None:
                    ema.restore(params)
            if global_step >= args.max_train_steps:
                done = True
                break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.copy_to(params)
        if args.full_finetune:
            save_full_pipeline(src, final, out / "pipeline")
            accelerator.print(f"saved {out / 'pipeline'}")
        else:
            path = save_lora(TransparentLayerPipeline, final, out)
            accelerator.print(f"saved {path}")
        if args.validation_prompt:
            log_validation(args, pipe, accelerator, "final", out)
    accelerator.end_training()


if __name__ == "__main__":
    run_script(main)
