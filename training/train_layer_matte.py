#!/usr/bin/env python
"""Train the learned layer matte (`layergen.decompose.matte_net.LayerMatteNet`) for decomposition.

Each sample is a fresh procedural composite (shadows, glows, glass, occlusion; training seeds
only, below HELDOUT_SEED_START) and one of its instances, given as its body box (jittered by
up to `--box_jitter` px per side, as a user's box would be) plus the boxes of the others.
Targets, all from the generator's ground-truth layers:
  amodal   the instance's alpha with its shadow/glow, complete where others cover it
  visible  that alpha times what the instances above let through
  colour   the layer's straight colour (weighted by its alpha)
Loss: L1 on both alphas + soft-IoU on the amodal alpha (the benchmark's metric) + colour L1.

    accelerate launch training/train_layer_matte.py --output_dir runs/layer_matte --max_train_steps 4000

`--resume_from_checkpoint latest` resumes (the data stream continues from the step). The final
model is `<output_dir>/layer_matte`; `scripts/install_mini_decomposer.py --matte <it>` installs it
into assets/layergen-mini/layer_matte (fp16), where `load_decomposition_pipeline()` finds it.
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
from tqdm.auto import tqdm

from layergen.atomic import atomic_dir
from layergen.data.scenes import HELDOUT_SEED_START, make_scene
from layergen.decompose.matte_net import LayerMatteNet
from layergen.errors import LayergenError
from layergen.training_utils import (add_training_args, averaged_copy, due, finish_step, local_model,
                                     optimizer_step, prepare_training, rgba_preview, run_script, save_image_grid,
                                     start_accelerator, step_schedule)

logger = logging.getLogger(__name__)
VALIDATION_SEED_START = HELDOUT_SEED_START + 500_000  # held out, and apart from the benchmark's seeds


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the learned layer matte for decomposition.")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--patch_size", type=int, default=4)
    p.add_argument("--block_out_channels", type=int, nargs="+", default=[64, 128, 192])
    p.add_argument("--layers_per_block", type=int, default=1)
    p.add_argument("--box_jitter", type=int, default=2, help="max px each box side moves in training")
    p.add_argument("--dataloader_num_workers", type=int, default=0,
                   help="processes drawing scenes (~14 ms each on one core): on a GPU a single one is the bottleneck")
    add_training_args(p, train_batch_size=12, max_train_steps=4000, learning_rate=5e-4,
                      lr_warmup_steps=100, checkpointing_steps=250, validation_steps=500, ema_decay=0.995)
    p.add_argument("--iou_weight", type=float, default=1.0)
    p.add_argument("--colour_weight", type=float, default=0.5)
    p.add_argument("--num_validation", type=int, default=48, help="held-out scenes scored at each validation")
    p.add_argument("--init_matte", default=None,
                   help="Start from these LayerMatteNet weights (e.g. assets/layergen-mini/layer_matte) instead of a "
                        "fresh network; the architecture flags are then ignored. Lets a new session continue the "
                        "shipped matte when its checkpoints are gone (give it another --seed for new scenes).")
    return p.parse_args(argv)


def scene_samples(seed: int, resolution: int, jitter: int = 0, rng=None):
    """Every instance of scene `seed` as (composite, instance box, other boxes, amodal, visible, colour) uint8."""
    scene = make_scene(seed, resolution)
    boxes = []
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        if jitter and rng is not None:
            x0, y0, x1, y1 = (v + int(rng.integers(-jitter, jitter + 1)) for v in (x0, y0, x1, y1))
        boxes.append((x0, y0, x1, y1))
    out = []
    for k, o in enumerate(scene.objects):
        amodal = o.rgba[..., 3].astype(np.float32) / 255
        visible = amodal.copy()
        for upper in scene.objects[k + 1:]:
            visible *= 1 - upper.rgba[..., 3].astype(np.float32) / 255
        inst = np.zeros((resolution, resolution), np.uint8)
        others = np.zeros_like(inst)
        for j, (x0, y0, x1, y1) in enumerate(boxes):
            target = inst if j == k else others
            target[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = 255
        out.append((scene.composite, inst, others, o.rgba[..., 3], np.round(visible * 255).astype(np.uint8),
                    o.rgba[..., :3]))
    return out


class SceneStream(torch.utils.data.IterableDataset):
    """Training samples from fresh procedural scenes, forever: one stream per (seed, start step, process,
    DataLoader worker), so processes and workers never draw the same scenes and a resumed run continues with
    new ones instead of replaying the first."""

    def __init__(self, resolution: int, jitter: int, *seed):
        self.resolution, self.jitter, self.seed = resolution, jitter, seed

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([*self.seed, worker.id if worker else 0])
        pool: list = []
        while True:
            if not pool:
                pool = scene_samples(int(rng.integers(0, HELDOUT_SEED_START)), self.resolution, self.jitter, rng)
            yield pool.pop(int(rng.integers(len(pool))))


def to_batch(samples, device):
    def stack(i, channels):
        x = torch.from_numpy(np.stack([s[i] for s in samples])).float() / 255
        return (x.permute(0, 3, 1, 2) if channels == 3 else x[:, None]).to(device)

    return {"composite": stack(0, 3), "instance": stack(1, 1), "others": stack(2, 1), "amodal": stack(3, 1),
            "visible": stack(4, 1), "colour": stack(5, 3)}


def soft_iou(a, b):
    return (torch.minimum(a, b).sum((1, 2, 3)) + 1e-6) / (torch.maximum(a, b).sum((1, 2, 3)) + 1e-6)


def compute_loss(pred, batch, iou_weight: float, colour_weight: float):
    a = batch["amodal"]
    loss = F.l1_loss(pred["amodal"], a) + F.l1_loss(pred["visible"], batch["visible"])
    loss = loss + iou_weight * (1 - soft_iou(pred["amodal"], a)).mean()
    colour = (torch.abs(pred["colour"] - batch["colour"]) * a).sum() / (a.sum() * 3 + 1e-6)
    return loss + colour_weight * colour


@torch.no_grad()
def validate(model, args, path=None) -> float:
    """Mean soft IoU of the predicted amodal alpha on held-out scenes (exact boxes); a figure when `path`."""
    ious, rows = [], []
    for i in range(args.num_validation):
        samples = scene_samples(VALIDATION_SEED_START + i, args.resolution)
        batch = to_batch(samples, model.device)
        pred = model(batch["composite"], batch["instance"], batch["others"])
        ious += soft_iou(pred["amodal"], batch["amodal"]).tolist()
        if path is not None and i < 4:
            rgba = torch.cat([pred["colour"], pred["amodal"]], 1)[-1].permute(1, 2, 0).cpu().numpy()
            true = np.concatenate([samples[-1][5], samples[-1][3][..., None]], -1).astype(np.float32) / 255
            rows += [samples[-1][0], rgba_preview(true), rgba_preview(rgba)]
    if rows:
        save_image_grid(rows, path, cols=3)
    return float(np.mean(ious))


def cosine_to_tenth(optimizer, args, num_processes: int = 1):
    """Linear warm-up, then a cosine from the full rate down to a tenth of it at --max_train_steps (a floor
    that keeps a resumed run learning). In optimisation steps: a prepared scheduler steps once per process."""
    warm, total = args.lr_warmup_steps, args.max_train_steps

    return step_schedule(optimizer, lambda s: min(1.0, (s + 1) / max(1, warm)) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, max(0, s - warm) / max(1, total - warm))))), num_processes)


def main(argv=None):
    args = parse_args(argv)
    accelerator = start_accelerator(args, "train_layer_matte")
    set_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    if args.init_matte:
        model = LayerMatteNet.from_pretrained(local_model(args.init_matte, "--init_matte"), torch_dtype=torch.float32)
        if model.config.sample_size != args.resolution:
            raise LayergenError(f"--init_matte was trained at {model.config.sample_size} px, not --resolution "
                                f"{args.resolution}")
    else:
        model = LayerMatteNet(sample_size=args.resolution, patch_size=args.patch_size,
                              block_out_channels=tuple(args.block_out_channels), layers_per_block=args.layers_per_block)
    model, optimizer, lr_sched, ema, global_step = prepare_training(
        accelerator, args, model, out, lr_scheduler=lambda opt, n: cosine_to_tenth(opt, args, n))

    stream = SceneStream(args.resolution, args.box_jitter, args.seed, global_step, accelerator.process_index)
    loader = iter(torch.utils.data.DataLoader(stream, batch_size=args.train_batch_size, collate_fn=list,
                                              num_workers=args.dataloader_num_workers))
    flips = torch.Generator().manual_seed(args.seed * 1000 + global_step * accelerator.num_processes
                                          + accelerator.process_index)
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="layer matte",
                    disable=not accelerator.is_local_main_process)
    model.train()
    while global_step < args.max_train_steps:
        batch = to_batch(next(loader), accelerator.device)
        if torch.rand((), generator=flips) < 0.5:  # horizontal flip: the generator draws both orientations equally
            batch = {k: v.flip(-1) for k, v in batch.items()}
        with accelerator.accumulate(model):
            pred = model(batch["composite"], batch["instance"], batch["others"])
            loss = compute_loss(pred, batch, args.iou_weight, args.colour_weight)
            accelerator.backward(loss)
            optimizer_step(accelerator, model.parameters(), optimizer, lr_sched, args.max_grad_norm)
        if accelerator.sync_gradients:
            global_step = finish_step(accelerator, args, out, global_step, progress, {"loss": loss}, ema,
                                      model.parameters())
            if accelerator.is_main_process and due(global_step, args.validation_steps):
                eval_model = averaged_copy(accelerator, model, ema)
                iou = validate(eval_model, args, out / f"validation-{global_step}.png")
                logger.info("step %d: held-out amodal alpha IoU %.3f", global_step, iou)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = averaged_copy(accelerator, model, ema)
        with atomic_dir(out / "layer_matte") as tmp:
            final.save_pretrained(tmp)
        iou = validate(final, args, out / "validation-final.png")
        accelerator.print(f"saved {out / 'layer_matte'} (held-out amodal alpha IoU {iou:.3f})")
    accelerator.end_training()


if __name__ == "__main__":
    run_script(main)
