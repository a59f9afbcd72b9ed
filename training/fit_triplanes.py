#!/usr/bin/env python
"""Stage 1 of layered 3D humans (HumanLiff): fit tri-planes and the shared decoder.

Phase A (joint):       a shared `TriplaneDecoder` and the tri-planes of `--num_subjects`
                       procedural mannequins (every layer) are fitted together.
Phase B (planes only): the decoder is frozen; tri-planes of `--num_new_subjects` more
                       mannequins (the diffusion training set) and of `--num_eval_subjects`
                       held-out mannequins are fitted, in groups (each group file is a
                       resumable unit).
Phase C (evaluation):  held-out subjects are rendered from views never used anywhere and
                       compared with ground-truth renders: masked PSNR / SSIM.

Layer planes are stored as body planes + one residual per garment slot: layer k of a
subject is `P_body + sum of its garment residuals up to k`. The L1 pull of a residual to
zero is the pull of layer k to layer k-1, so garments change few texels, which is what
stage 2 learns to generate. All planes are clamped to [-1, 1] after every step.

Supervision: our ground truth is an analytic field, so instead of HumanLiff's per-pixel
losses on rendered images we supervise densities and colours at 3D points (opacity of one
reference step, colour near the surface), which costs ~100x less per useful sample on a
CPU; `--ray_loss_weight` adds HumanLiff's image-space loss (RGB + 0.1 * mask) on random
rays rendered from the ground-truth field. `--no_shift` is the tri-plane-shift ablation.

    python training/fit_triplanes.py --output_dir runs/human_stage1
    accelerate launch training/fit_triplanes.py --output_dir runs/human_stage1   # multi-process
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from layergen.atomic import atomic_dir, atomic_path, write_text_atomic
from layergen.data.mannequins import (HELDOUT_SEED_START, LAYER_NAMES, REF_STEP, body_box, render_mannequin,
                                      sample_mannequin, sample_training_points)
from layergen.models.triplane import TriplaneDecoder, clamp_planes_, plane_l1, plane_tv
from layergen.models.volume_renderer import (VolumeRenderer, get_rays, intrinsics, masked_psnr, masked_ssim,
                                             orbit_cameras, ray_box_intersect)
from layergen.training_utils import due, resume_step, run_script, save_checkpoint, start_accelerator

logger = logging.getLogger("fit_triplanes")
NUM_SLOTS = len(LAYER_NAMES)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", default="runs/human_stage1")
    p.add_argument("--decoder_path", default=None, help="skip phase A and fit planes only with this decoder folder")
    p.add_argument("--num_subjects", type=int, default=24, help="phase A: subjects that train the decoder")
    p.add_argument("--subject_seed_start", type=int, default=0)
    p.add_argument("--num_new_subjects", type=int, default=0, help="phase B: more subjects, planes only")
    p.add_argument("--new_subject_seed_start", type=int, default=10_000)
    p.add_argument("--num_eval_subjects", type=int, default=6, help="held-out subjects (planes only) for PSNR/SSIM")
    p.add_argument("--hat_prob", type=float, default=0.35)
    p.add_argument("--garment_prob", type=float, default=0.85, help="probability of each of pants/shirt/shoes")
    p.add_argument("--plane_resolution", type=int, default=32)
    p.add_argument("--plane_channels", type=int, default=9)
    p.add_argument("--hidden_dim", type=int, default=64)
    p.add_argument("--no_shift", action="store_true", help="ablation: read all sub-planes at the same point")
    p.add_argument("--init_planes", default="random", choices=["random", "template"],
                   help="phase B start for body planes: 'random' N(0, 0.1) as in HumanLiff, or 'template': the mean "
                        "phase-A body plane, so every subject's code is a deviation from one template (far less "
                        "arbitrary per-subject content for stage 2 to model)")
    p.add_argument("--template_from", default=None,
                   help="tri-plane file whose mean body plane is the template (default: triplanes_joint.safetensors "
                        "next to the decoder)")
    p.add_argument("--joint_steps", type=int, default=1500)
    p.add_argument("--planes_steps", type=int, default=500)
    p.add_argument("--group_size", type=int, default=32, help="phase B subjects fitted together")
    p.add_argument("--points_per_layer", type=int, default=256, help="points per subject-layer per step")
    p.add_argument("--pool_size", type=int, default=16384, help="pre-sampled supervision points per subject-layer")
    p.add_argument("--ray_loss_weight", type=float, default=0.0)
    p.add_argument("--rays_per_step", type=int, default=256)
    p.add_argument("--lr_planes", type=float, default=0.05)
    p.add_argument("--lr_decoder", type=float, default=5e-3)
    p.add_argument("--tv_weight", type=float, default=1e-2)
    p.add_argument("--l1_weight", type=float, default=5e-4)
    p.add_argument("--residual_l1_weight", type=float, default=2e-3)
    p.add_argument("--residual_shrink", type=float, default=0.1,
                   help="proximal L1 after each step: residuals shrink towards 0 by this fraction of the planes lr")
    p.add_argument("--body_shrink", type=float, default=0.02, help="same for body planes")
    p.add_argument("--density_noise", type=float, default=0.5)
    p.add_argument("--fog_step", type=float, default=0.25,
                   help="second opacity loss at this step length: penalises faint density in empty space")
    p.add_argument("--eval_views", type=int, default=4)
    p.add_argument("--eval_joint_subjects", type=int, default=2)
    p.add_argument("--skip_eval", action="store_true", help="merge only; keep an existing metrics.json")
    p.add_argument("--eval_size", type=int, default=64)
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--checkpoints_total_limit", type=int, default=2)
    p.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report_to", default=None)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data
def make_subjects(seeds, args):
    return [sample_mannequin(s, hat_prob=args.hat_prob, garment_prob=args.garment_prob) for s in seeds]


def present_matrix(subjects) -> torch.Tensor:
    """(S, NUM_SLOTS) bool: which layer slots (body, pants, shirt, shoes, hat) each subject has."""
    out = torch.zeros(len(subjects), NUM_SLOTS, dtype=torch.bool)
    for i, m in enumerate(subjects):
        for name in m.layers:
            out[i, LAYER_NAMES.index(name)] = True
    return out


def build_pools(subjects, pool_size, seed, desc="sampling points", disable=False):
    """Pre-sampled supervision points for every (subject, layer): stacked tensors + the pair index."""
    pairs, pts, rgb, surf, sig = [], [], [], [], []
    for i, m in enumerate(tqdm(subjects, desc=desc, disable=disable)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + m.seed)
        for k, name in enumerate(m.layers):
            d = sample_training_points(m, k, pool_size, g)
            pairs.append((i, LAYER_NAMES.index(name), k))
            pts.append(d["points"]), rgb.append(d["rgb"]), surf.append(d["surface"]), sig.append(d["sigma"])
    return {"pairs": torch.tensor(pairs, dtype=torch.long), "points": torch.stack(pts), "sigma": torch.stack(sig),
            "rgb": torch.stack(rgb), "surface": torch.stack(surf)}


# ----------------------------------------------------------------------------- model
class PlaneBank(nn.Module):
    """Tri-planes of many subjects as (S, slots, 3, C, R, R): slot 0 body, slot j a garment residual."""

    def __init__(self, num_subjects, plane_shape, init_std=0.1, generator=None, template=None):
        super().__init__()
        p = torch.zeros(num_subjects, NUM_SLOTS, *plane_shape)
        if template is not None:  # every body starts at the same template code
            p[:, 0] = template.to(p.dtype)
        else:
            p[:, 0] = torch.randn(num_subjects, *plane_shape, generator=generator) * init_std
        self.planes = nn.Parameter(p)

    def cumulative(self, present: torch.Tensor) -> torch.Tensor:
        """Layer planes for every slot: P_body + residuals of present garments up to that slot."""
        mask = present.to(self.planes.dtype).view(*present.shape, 1, 1, 1, 1)
        return (self.planes * mask).cumsum(1)

    def regularisers(self, present: torch.Tensor):
        body = self.planes[:, 0]
        res = self.planes[:, 1:][present[:, 1:]]
        tv = plane_tv(body) + (plane_tv(res) if res.numel() else 0.0)
        return tv, plane_l1(body), (plane_l1(res) if res.numel() else body.new_zeros(()))


class FitModel(nn.Module):
    """Decoder + plane bank; forward returns the losses (one module so DDP syncs both)."""

    def __init__(self, decoder: TriplaneDecoder, bank: PlaneBank, present: torch.Tensor):
        super().__init__()
        self.decoder, self.bank = decoder, bank
        self.register_buffer("present", present, persistent=False)

    def forward(self, pairs, pts, sigma_gt, rgb, surf, args, rays=None):
        cum = self.bank.cumulative(self.present)
        planes = cum[pairs[:, 0], pairs[:, 1]]
        dirs = F.normalize(torch.randn_like(pts), dim=-1)
        sigma, rgb_hat = self.decoder.query(planes, pts, dirs, density_noise=args.density_noise)
        # opacity of one render step (the surface) and of a long step (faint fog adds up along a ray)
        l_alpha = sum(F.mse_loss(1.0 - torch.exp(-sigma * step), 1.0 - torch.exp(-sigma_gt * step))
                      for step in (REF_STEP, args.fog_step))
        l_rgb = (surf[..., None] * (rgb_hat - rgb) ** 2).sum() / (3 * surf.sum()).clamp_min(1.0)
        tv, l1, rl1 = self.bank.regularisers(self.present)
        loss = l_alpha + l_rgb + args.tv_weight * tv + args.l1_weight * l1 + args.residual_l1_weight * rl1
        out = {"alpha": l_alpha.detach(), "rgb": l_rgb.detach(), "tv": tv.detach()}
        if rays is not None:
            l_ray = ray_loss(self.decoder, cum, rays, args)
            loss = loss + args.ray_loss_weight * l_ray
            out["ray"] = l_ray.detach()
        out["loss"] = loss
        return out


def make_ray_batch(subjects, pairs, n_rays, generator):
    """Random rays (orbit cameras at random angles) with ground truth rendered from the analytic field."""
    renderer = VolumeRenderer(num_coarse=64, num_importance=64, chunk=8192)
    j = int(torch.randint(len(pairs), (1,), generator=generator))
    si, slot, k = (int(v) for v in pairs[j])
    m = subjects[si]
    az, el = float(torch.rand((), generator=generator) * 360), float(torch.rand((), generator=generator) * 40 - 10)
    o, d = get_rays(orbit_cameras(1, elevation_deg=el, azimuth_offset_deg=az), intrinsics(64), 64, 64)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    bmin, bmax = body_box(m)
    near, far = ray_box_intersect(o, d, bmin, bmax)
    hit = (far > near).nonzero(as_tuple=True)[0]
    sel = hit[torch.randint(len(hit), (n_rays,), generator=generator)]
    with torch.no_grad():
        gt = renderer.render_rays(m.field(k), o[sel], d[sel], near[sel], far[sel])
    return {"pair": (si, slot), "o": o[sel], "d": d[sel], "near": near[sel], "far": far[sel],
            "rgb": gt["rgb"], "acc": gt["acc"]}


def ray_loss(decoder, cum, rays, args):
    renderer = VolumeRenderer(num_coarse=32, num_importance=32, chunk=1 << 20)
    planes = cum[rays["pair"][0], rays["pair"][1]]
    out = renderer.render_rays(decoder.field(planes), rays["o"], rays["d"], rays["near"], rays["far"],
                               perturb=True, reuse_coarse=False)
    return F.mse_loss(out["rgb"], rays["rgb"]) + 0.1 * F.mse_loss(out["acc"], rays["acc"])


def batch_from_pools(pools, n, generator, device):
    B, P = pools["points"].shape[:2]
    idx = torch.randint(P, (B, n), generator=generator)
    take = lambda t: torch.gather(t, 1, idx.view(B, n, *([1] * (t.dim() - 2))).expand(B, n, *t.shape[2:]))  # noqa: E731
    return (pools["pairs"].to(device), take(pools["points"]).to(device), take(pools["sigma"]).to(device),
            take(pools["rgb"]).to(device), take(pools["surface"]).to(device))


@torch.no_grad()
def shrink_planes_(planes: torch.Tensor, lr: float, args) -> None:
    """Proximal step of the L1 pull (soft threshold) and the [-1, 1] clamp, in place.

    Adam rescales every gradient to a full step, so a plain L1 term cannot leave a texel at
    zero; soft-thresholding after the step does. Garment residuals thus stay exactly zero
    where the garment changes nothing: layer k keeps layer k-1's texels there.
    """
    for sl, frac in ((slice(0, 1), args.body_shrink), (slice(1, None), args.residual_shrink)):
        t = planes[:, sl]
        t.copy_(torch.sign(t) * (t.abs() - frac * lr).clamp_min(0.0))
    clamp_planes_(planes)


def cosine_factor(step, total, floor=0.1):
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))


# ----------------------------------------------------------------------------- phases
def fit_planes_only(decoder, subjects, args, accelerator, seed, desc, template=None):
    """Phase B for one group: frozen decoder, planes of `subjects` only. Returns (planes, present)."""
    device = accelerator.device
    present = present_matrix(subjects)
    g = torch.Generator().manual_seed(seed)
    bank = PlaneBank(len(subjects), decoder.plane_shape, generator=g, template=template)
    model = FitModel(decoder, bank, present).to(device)
    decoder.requires_grad_(False)
    pools = build_pools(subjects, args.pool_size, seed, desc=f"{desc}: points",
                        disable=not accelerator.is_local_main_process)
    opt = torch.optim.Adam(bank.parameters(), lr=args.lr_planes)
    bar = tqdm(range(args.planes_steps), desc=desc, disable=not accelerator.is_local_main_process)
    for step in bar:
        for grp in opt.param_groups:
            grp["lr"] = args.lr_planes * cosine_factor(step, args.planes_steps)
        batch = batch_from_pools(pools, args.points_per_layer, g, device)
        rays = (make_ray_batch(subjects, pools["pairs"], args.rays_per_step, g)
                if args.ray_loss_weight > 0 else None)
        out = model(*batch, args, rays=rays)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        shrink_planes_(bank.planes.data, opt.param_groups[0]["lr"], args)
        if step % 20 == 0:
            bar.set_postfix(alpha=f"{out['alpha'].item():.4f}", rgb=f"{out['rgb'].item():.4f}")
    return bank.planes.detach().cpu(), present


def save_planes(path, planes, present, subjects):
    tensors = {"planes": planes.half().contiguous(), "present": present.to(torch.uint8).contiguous(),
               "seeds": torch.tensor([m.seed for m in subjects], dtype=torch.int64)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    write_text_atomic(Path(path).with_suffix(".json"), json.dumps([m.describe() for m in subjects], indent=1))


@torch.no_grad()
def evaluate(decoder, planes, present, subjects, args, out_dir=None, max_images=4):
    """Masked PSNR / SSIM of every layer of `subjects` on held-out views (never used in fitting)."""
    cams = orbit_cameras(args.eval_views, elevation_deg=5.0, azimuth_offset_deg=22.5)
    K = intrinsics(args.eval_size)
    renderer = VolumeRenderer(num_coarse=32, num_importance=32, chunk=16384)
    cum = (planes.float() * present.float().view(*present.shape, 1, 1, 1, 1)).cumsum(1)
    rows, shown = [], []
    for i, m in enumerate(tqdm(subjects, desc="evaluating")):
        bmin, bmax = body_box(m)
        for k, name in enumerate(m.layers):
            slot = LAYER_NAMES.index(name)
            gt = render_mannequin(m, k, cams, K, args.eval_size, num_coarse=64, num_importance=64)["rgba"].numpy()
            pred = renderer.render_views(decoder.field(cum[i, slot].to(decoder.dtype)), cams, K, args.eval_size,
                                         args.eval_size, box_min=bmin, box_max=bmax)["rgba"].numpy()
            ps = [masked_psnr(gt[v], pred[v]) for v in range(len(cams))]
            ss = [masked_ssim(gt[v], pred[v]) for v in range(len(cams))]
            rows.append({"seed": m.seed, "layer": name, "psnr": float(np.mean(ps)), "ssim": float(np.mean(ss))})
            if len(shown) < max_images:
                shown.append(np.concatenate([np.concatenate(list(gt), 1), np.concatenate(list(pred), 1)], 0))
    if out_dir is not None and shown:
        from layergen.training_utils import rgba_preview, save_image_grid
        save_image_grid([rgba_preview(s) for s in shown], Path(out_dir) / "eval_gt_vs_pred.png", cols=1)
    psnr = [r["psnr"] for r in rows]
    return {"psnr": float(np.mean(psnr)), "psnr_min": float(np.min(psnr)),
            "ssim": float(np.mean([r["ssim"] for r in rows])),
            "per_layer": {n: float(np.mean([r["psnr"] for r in rows if r["layer"] == n]))
                          for n in LAYER_NAMES if any(r["layer"] == n for r in rows)},
            "rows": rows}


def load_template(args, out) -> torch.Tensor:
    """Mean body plane (3, C, R, R) of phase A's subjects: the common start of every phase-B body."""
    path = Path(args.template_from) if args.template_from else (
        Path(args.decoder_path).parent if args.decoder_path else out) / "triplanes_joint.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no phase-A planes for --init_planes template (pass --template_from)")
    return load_file(str(path))["planes"][:, 0].float().mean(0)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir)
    accelerator = start_accelerator(args, "fit_triplanes")
    set_seed(args.seed + accelerator.process_index)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "args.json", json.dumps(vars(args), indent=1))
    t_start = time.process_time()

    # ---- phase A: joint decoder + planes
    if args.decoder_path:
        decoder = TriplaneDecoder.from_pretrained(args.decoder_path)
        if accelerator.is_main_process:  # the output is a complete stage-1 folder for train_triplane_diffusion.py
            with atomic_dir(out / "decoder") as tmp:
                decoder.save_pretrained(tmp)
    elif (out / "decoder" / "config.json").is_file() and (out / "triplanes_joint.safetensors").is_file():
        accelerator.print("phase A already done; loading its decoder")
        decoder = TriplaneDecoder.from_pretrained(out / "decoder")
    else:
        decoder = TriplaneDecoder(plane_channels=args.plane_channels, plane_resolution=args.plane_resolution,
                                  hidden_dim=args.hidden_dim, use_shift=not args.no_shift, density_bias=-4.0)
        subjects = make_subjects(range(args.subject_seed_start, args.subject_seed_start + args.num_subjects), args)
        present = present_matrix(subjects)
        bank = PlaneBank(len(subjects), decoder.plane_shape, generator=torch.Generator().manual_seed(args.seed))
        model = FitModel(decoder, bank, present)
        opt = torch.optim.Adam([{"params": decoder.parameters(), "lr": args.lr_decoder},
                                {"params": bank.parameters(), "lr": args.lr_planes}])
        model, opt = accelerator.prepare(model, opt)
        start = resume_step(accelerator, out, args.resume_from_checkpoint)
        pools = build_pools(subjects, args.pool_size, args.seed, desc="phase A: points",
                            disable=not accelerator.is_local_main_process)
        g = torch.Generator().manual_seed(args.seed * 7919 + accelerator.process_index + start)
        bar = tqdm(range(start, args.joint_steps), initial=start, total=args.joint_steps, desc="phase A: joint fit",
                   disable=not accelerator.is_local_main_process)
        for step in bar:
            f = cosine_factor(step, args.joint_steps)
            opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = args.lr_decoder * f, args.lr_planes * f
            batch = batch_from_pools(pools, args.points_per_layer, g, accelerator.device)
            rays = (make_ray_batch(subjects, pools["pairs"], args.rays_per_step, g)
                    if args.ray_loss_weight > 0 else None)
            res = model(*batch, args, rays=rays)
            accelerator.backward(res["loss"])
            opt.step()
            opt.zero_grad(set_to_none=True)
            shrink_planes_(accelerator.unwrap_model(model).bank.planes.data, opt.param_groups[1]["lr"], args)
            if step % 20 == 0:
                losses = {"alpha": res["alpha"].item(), "rgb": res["rgb"].item()}
                bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items()})
                accelerator.log({f"phase_a/{k}": v for k, v in losses.items()}, step=step)
            if due(step + 1, args.checkpointing_steps) and step + 1 < args.joint_steps:
                save_checkpoint(accelerator, out, step + 1, args.checkpoints_total_limit)
        accelerator.wait_for_everyone()
        unwrapped = accelerator.unwrap_model(model)
        decoder = unwrapped.decoder
        if accelerator.is_main_process:
            with atomic_dir(out / "decoder") as tmp:
                decoder.save_pretrained(tmp)
            save_planes(out / "triplanes_joint.safetensors", unwrapped.bank.planes.detach().cpu(), present, subjects)
        accelerator.wait_for_everyone()
    decoder = decoder.to(accelerator.device).eval()
    template = load_template(args, out) if args.init_planes == "template" else None

    # ---- phase B: planes only, in groups (new training subjects, then held-out subjects)
    new_seeds = list(range(args.new_subject_seed_start, args.new_subject_seed_start + args.num_new_subjects))
    eval_seeds = list(range(HELDOUT_SEED_START, HELDOUT_SEED_START + args.num_eval_subjects))
    groups = [("train", j, new_seeds[i:i + args.group_size])
              for j, i in enumerate(range(0, len(new_seeds), args.group_size))]
    groups += [("heldout", j, eval_seeds[i:i + args.group_size])
               for j, i in enumerate(range(0, len(eval_seeds), args.group_size))]
    (out / "planes").mkdir(parents=True, exist_ok=True)
    for gi, (kind, j, seeds) in enumerate(groups):
        # file names carry the seed range, so changing --num_new_subjects later reuses finished groups
        path = out / "planes" / f"{kind}-{seeds[0]:07d}-{seeds[-1]:07d}.safetensors"
        if gi % accelerator.num_processes != accelerator.process_index or path.is_file():
            continue
        subjects = make_subjects(seeds, args)
        planes, present = fit_planes_only(decoder, subjects, args, accelerator, args.seed + 101 * (gi + 1),
                                          desc=f"phase B: group {gi + 1}/{len(groups)} ({kind})", template=template)
        save_planes(path, planes, present, subjects)
    accelerator.wait_for_everyone()

    # ---- merge + phase C: evaluation (main process)
    if accelerator.is_main_process:
        train_parts = [out / "triplanes_joint.safetensors"] if (out / "triplanes_joint.safetensors").is_file() else []
        train_parts += sorted((out / "planes").glob("train-*.safetensors"))
        if train_parts:
            merged = [load_file(str(p)) for p in train_parts]
            descs = sum([json.loads(p.with_suffix(".json").read_text()) for p in train_parts], [])
            tensors = {k: torch.cat([m[k] for m in merged]) for k in ("planes", "present", "seeds")}
            with atomic_path(out / "triplanes.safetensors") as tmp:
                save_file(tensors, str(tmp))
            write_text_atomic(out / "triplanes.json", json.dumps(descs, indent=1))
        if args.skip_eval:
            accelerator.end_training()
            return
        metrics = {"use_shift": bool(decoder.config.use_shift), "plane_resolution": decoder.config.plane_resolution,
                   "fit_cpu_seconds": time.process_time() - t_start}
        held = sorted((out / "planes").glob("heldout-*.safetensors"))
        if held:
            tens = [load_file(str(p)) for p in held]
            planes = torch.cat([t["planes"] for t in tens]).float()
            present = torch.cat([t["present"] for t in tens]).bool()
            subjects = make_subjects([int(s) for s in torch.cat([t["seeds"] for t in tens])], args)
            metrics["heldout"] = evaluate(decoder, planes, present, subjects, args, out_dir=out)
            accelerator.print(f"held-out masked PSNR {metrics['heldout']['psnr']:.2f} dB, "
                              f"SSIM {metrics['heldout']['ssim']:.4f} ({len(subjects)} subjects, all layers)")
        if (out / "triplanes_joint.safetensors").is_file() and args.eval_joint_subjects:
            t = load_file(str(out / "triplanes_joint.safetensors"))
            n = min(args.eval_joint_subjects, t["seeds"].shape[0])
            subjects = make_subjects([int(s) for s in t["seeds"][:n]], args)
            metrics["joint_subjects"] = evaluate(decoder, t["planes"][:n].float(), t["present"][:n].bool(), subjects,
                                                 args)
        write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=1))
    accelerator.end_training()


if __name__ == "__main__":
    run_script(main)
