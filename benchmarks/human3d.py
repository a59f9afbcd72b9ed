#!/usr/bin/env python
"""Layered 3D humans benchmark: tri-plane reconstruction and layer-wise generation.

1. Reconstruction (stage 1). Held-out mannequins (seeds from HELDOUT_SEED_START, never
   seen by the decoder) are fitted planes-only with the frozen decoder and rendered from
   held-out views (elevation 5 deg, azimuths 22.5 + k*90); masked PSNR / SSIM against the
   ground-truth renders, every layer (numbers read from each run's metrics.json).
   * shipped: runs/human_stage1 (decoder jointly fitted on 24 subjects x 2000 steps; the
     decoder of the shipped model), 6 held-out subjects.
   * shift ablation: runs/human_ablation_small/{shift,no_shift}, both made by
     training/fit_triplanes.py with identical settings and seeds (decoder + planes jointly
     fitted on subjects 0-7 for 600 steps, then planes-only on the same 4 held-out subjects
     for 400 steps); the only difference is --no_shift (commands below). Much smaller than the
     shipped run (a few CPU minutes per arm), so compare the arms with each other:

       COMMON="--num_subjects 8 --joint_steps 600 --planes_steps 400 --num_eval_subjects 4 \
               --eval_joint_subjects 0 --seed 0"
       python training/fit_triplanes.py --output_dir runs/human_ablation_small/shift $COMMON
       python training/fit_triplanes.py --output_dir runs/human_ablation_small/no_shift --no_shift $COMMON

   If a run folder is gone (runs/ is not versioned), its numbers are carried over from the
   previous results file with "carried_from" set, never silently dropped.

2. Generation with the shipped pipeline (assets/layergen-mini/human), `--num_humans`
   humans, layers body,pants,shirt,shoes, generator seeds `--seed + i`, 25 DDIM steps, as the
   CLI makes them (keep_uncovered + compose: each layer rendered from its composed field,
   `render_views(output, layer=k)`) and as the ablation `--no-keep-uncovered` makes them (raw
   cumulative tri-planes). Rendered from 4 views (elevation 10 deg, azimuth 0/90/180/270,
   64 px). Garment *zones* are vertical bands of the silhouette (relative to the layer
   below's bounding box), calibrated on ground-truth region masks of procedural mannequins
   (rows holding 98% of a garment's GT pixels, +-0.02):
     consistency  fraction of the layer below's foreground pixels *outside* the new
                  garment's zone whose RGBA changes by at most 10/255 (also 2/255) when the
                  garment is added
     presence     the garment counts as present in a view if >= 25% of the foreground in
                  its zone changed (> 0.1) and >= 60% of all changed pixels lie in its
                  zone; present in a human if present in >= 2 of 4 views. The detector's
                  true/false positive rates on ground-truth mannequins are reported.
     diversity    mean pairwise L1 between front renders (RGB over black) of different
                  seeds, vs the same on ground-truth mannequins; memorisation check: mean
                  nearest-training-subject distance of generated bodies vs that among
                  training bodies themselves
     seconds      wall and CPU seconds of `generate_human` (4 layers, 8 views at 64 px,
                  4 GLB meshes at 64^3) on this machine, with the load average

    python benchmarks/human3d.py                 # ~20 min on 2 cores
    python benchmarks/human3d.py --quick         # smoke run

Table to stdout, JSON to benchmarks/results/human3d.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from layergen.data.mannequins import (HELDOUT_SEED_START, LAYER_NAMES, render_mannequin,  # noqa: E402
                                      sample_mannequin)
from layergen.models.volume_renderer import intrinsics, orbit_cameras  # noqa: E402

LAYERS = ("body", "pants", "shirt", "shoes")
VIEWS = 4
SIZE = 64
TOL, TOL_STRICT = 10 / 255, 2 / 255
CHANGE, COVER, LOCAL = 0.1, 0.25, 0.6


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="LayeredHumanPipeline folder (default: bundled mini)")
    p.add_argument("--stage1", default=str(ROOT / "runs" / "human_stage1"))
    p.add_argument("--ablation_shift", default=str(ROOT / "runs" / "human_ablation_small" / "shift"))
    p.add_argument("--ablation_noshift", default=str(ROOT / "runs" / "human_ablation_small" / "no_shift"))
    p.add_argument("--num_humans", type=int, default=24,
                   help="humans per arm; 24, not 12: one human is 4 points of a presence rate judged at 90 %")
    p.add_argument("--num_gt", type=int, default=8, help="ground-truth mannequins for calibration")
    p.add_argument("--num_timed", type=int, default=2)
    p.add_argument("--num_train_bodies", type=int, default=32, help="training bodies for the memorisation check")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "human3d.json"))
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- image analysis
def to_float(rgba_u8) -> np.ndarray:
    return np.asarray(rgba_u8, np.float32) / 255.0


def bbox_rows(alpha: np.ndarray):
    rows = np.nonzero((alpha > 0.5).any(1))[0]
    return (rows.min(), rows.max()) if rows.size else (0, alpha.shape[0] - 1)


def norm_rows(alpha_prev: np.ndarray) -> np.ndarray:
    """Per-pixel row position relative to the previous layer's silhouette (0 top, 1 bottom)."""
    top, bot = bbox_rows(alpha_prev)
    r = (np.arange(alpha_prev.shape[0], dtype=np.float32) - top) / max(bot - top, 1)
    return np.repeat(r[:, None], alpha_prev.shape[1], 1)


def in_band(rows, band):
    return (rows >= band[0]) & (rows <= band[1])


def pair_stats(prev, cur, band):
    """prev/cur: float RGBA (H, W, 4). Returns consistency fractions, coverage, locality."""
    diff = np.abs(cur - prev).max(-1)
    rows = norm_rows(prev[..., 3])
    zone = in_band(rows, band)
    fg_prev, fg_cur = prev[..., 3] > 0.5, cur[..., 3] > 0.5
    unc = fg_prev & ~zone
    changed = (diff > CHANGE) & fg_cur
    cov = (changed & zone).sum() / max((fg_cur & zone).sum(), 1)
    loc = (changed & zone).sum() / max(changed.sum(), 1)
    return {"uncovered": int(unc.sum()), "unchanged": int((unc & (diff <= TOL)).sum()),
            "unchanged_strict": int((unc & (diff <= TOL_STRICT)).sum()), "coverage": float(cov),
            "locality": float(loc), "present": bool(cov >= COVER and loc >= LOCAL)}


def chain_stats(views_per_layer, names, bands):
    """views_per_layer: list over layers of (V, H, W, 4) float. Per garment: consistency and presence."""
    out = {}
    for k in range(1, len(names)):
        per_view = [pair_stats(views_per_layer[k - 1][v], views_per_layer[k][v], bands[names[k]])
                    for v in range(len(views_per_layer[k]))]
        unc = sum(s["uncovered"] for s in per_view)
        out[names[k]] = {"uncovered": unc, "unchanged": sum(s["unchanged"] for s in per_view),
                         "unchanged_strict": sum(s["unchanged_strict"] for s in per_view),
                         "present": sum(s["present"] for s in per_view) >= len(per_view) / 2,
                         "coverage": float(np.mean([s["coverage"] for s in per_view]))}
    return out


# ----------------------------------------------------------------------------- ground truth
def gt_chain(seed, garments=("pants", "shirt", "shoes", "hat"), labels=True):
    m = sample_mannequin(seed, garments=garments)
    cams, K = orbit_cameras(VIEWS, elevation_deg=10.0), intrinsics(SIZE)
    renders = [render_mannequin(m, k, cams, K, SIZE, num_coarse=48, num_importance=48, labels=labels)
               for k in range(len(m.layers))]
    # quantise like the pipeline's uint8 renders
    rgba = [np.floor(r["rgba"].numpy() * 255 + 0.5) / 255 for r in renders]
    return m, rgba, [r.get("labels") for r in renders]


def calibrate(num_gt, seed0):
    """Garment zones from GT region masks, then the detectors' rates on GT chains."""
    rows = {g: [] for g in LAYER_NAMES[1:]}
    chains = []
    for i in range(num_gt):
        m, rgba, labs = gt_chain(seed0 + i)
        chains.append((m, rgba))
        for k in range(1, len(m.layers)):
            g = m.layers[k]
            for v in range(VIEWS):
                r = norm_rows(rgba[0][v][..., 3])
                rows[g].append(r[labs[k][v].numpy() == LAYER_NAMES.index(g)])
    bands = {}
    for g, rs in rows.items():
        r = np.concatenate(rs)
        bands[g] = (float(np.quantile(r, 0.01) - 0.02), float(np.quantile(r, 0.99) + 0.02))
    tp = fp = npos = nneg = 0
    unc = unchanged = 0
    for m, rgba in chains:
        st = chain_stats(rgba, m.layers, bands)
        for g, s in st.items():
            npos += 1
            tp += s["present"]
            unc += s["uncovered"]
            unchanged += s["unchanged"]
        for k in range(1, len(m.layers)):  # negatives: nothing added, and the wrong garment's zone
            for v_prev, v_cur, g in [(rgba[k - 1], rgba[k - 1], m.layers[k])] + \
                                    [(rgba[k - 1], rgba[k], o) for o in m.layers[1:] if o != m.layers[k]]:
                nneg += 1
                fp += sum(pair_stats(v_prev[v], v_cur[v], bands[g])["present"] for v in range(VIEWS)) >= VIEWS / 2
    return bands, {"gt_subjects": num_gt, "tpr": tp / max(npos, 1), "fpr": fp / max(nneg, 1),
                   "gt_consistency": unchanged / max(unc, 1), "positives": npos, "negatives": nneg}, chains


# ----------------------------------------------------------------------------- generation
def render_chain(pipe, output):
    """Every layer of a LayeredHumanOutput as the pipeline renders it (composed when it has supports)."""
    cams = orbit_cameras(VIEWS, elevation_deg=10.0)
    return [to_float(pipe.render_views(output, size=SIZE, cameras=cams, layer=k)) for k in range(len(output.layers))]


def on_black(rgba):
    return rgba[..., :3] * rgba[..., 3:4]


def mean_pairwise(images):
    if len(images) < 2:
        return float("nan")
    return float(np.mean([np.abs(a - b).mean() for a, b in combinations(images, 2)]))


def nn_dist(queries, refs, exclude_self=False):
    d = []
    for i, q in enumerate(queries):
        dd = [np.abs(q - r).mean() for j, r in enumerate(refs) if not (exclude_self and i == j)]
        d.append(min(dd))
    return float(np.mean(d))


def generation(pipe, args, bands, keep):
    per = {g: {"uncovered": 0, "unchanged": 0, "unchanged_strict": 0, "present": 0, "n": 0} for g in LAYERS[1:]}
    fronts, bodies, draws = [], [], {g: [] for g in LAYERS[1:]}
    for i in range(args.num_humans):
        gen = torch.Generator().manual_seed(args.seed + i)
        out = pipe(layers=LAYERS, num_inference_steps=args.steps, generator=gen, keep_uncovered=keep, compose=keep)
        for g, d in zip(LAYERS[1:], out.metadata.get("draws", [1] * len(LAYERS))[1:]):
            draws[g].append(d)
        views = render_chain(pipe, out)
        st = chain_stats(views, LAYERS, bands)
        for g, s in st.items():
            for key in ("uncovered", "unchanged", "unchanged_strict"):
                per[g][key] += s[key]
            per[g]["present"] += int(s["present"])
            per[g]["n"] += 1
        fronts.append(on_black(views[-1][0]))
        bodies.append(on_black(views[0][0]))
    res = {g: {"consistency": v["unchanged"] / max(v["uncovered"], 1),
               "consistency_strict": v["unchanged_strict"] / max(v["uncovered"], 1),
               "presence": v["present"] / max(v["n"], 1)} for g, v in per.items()}
    tot_unc = sum(v["uncovered"] for v in per.values())
    summary = {"consistency": sum(v["unchanged"] for v in per.values()) / max(tot_unc, 1),
               "consistency_strict": sum(v["unchanged_strict"] for v in per.values()) / max(tot_unc, 1),
               "presence_min": min(r["presence"] for r in res.values()),
               "diversity_final": mean_pairwise(fronts), "diversity_body": mean_pairwise(bodies),
               "mean_draws": {g: float(np.mean(v)) for g, v in draws.items()}}
    return {"per_garment": res, **summary}, bodies


def training_bodies(pipe, stage1, limit):
    from safetensors.torch import load_file

    path = Path(stage1) / "triplanes.safetensors"
    if not path.is_file():
        return []
    t = load_file(str(path))
    cams = orbit_cameras(1, elevation_deg=10.0)
    return [on_black(to_float(pipe.render_views(t["planes"][i, 0].float(), size=SIZE, cameras=cams))[0])
            for i in range(min(limit, t["planes"].shape[0]))]


def timing(args):
    from layergen.pipelines.pipeline_layered_human import generate_human, load_pipeline

    load_pipeline(args.model)  # load once, like a running studio/CLI process would
    walls, cpus = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.num_timed):
            w, c = time.perf_counter(), time.process_time()
            files = generate_human(",".join(LAYERS), seed=args.seed + i, output_dir=Path(tmp) / str(i),
                                   model_path=args.model, num_inference_steps=args.steps, num_views=8, size=64,
                                   mesh_resolution=64)
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
            assert all(l["mesh"] for l in files["layers"]), "a layer produced no mesh"
    return {"wall_seconds_mean": float(np.mean(walls)), "wall_seconds_max": float(np.max(walls)),
            "cpu_seconds_mean": float(np.mean(cpus)), "load_average": os.getloadavg(),
            "what": "generate_human: 4 layers x 25 DDIM steps, 8 views at 64 px (PNG + GIF), 4 GLB meshes at 64^3"}


def _stage1_metrics(d):
    p = Path(d) / "metrics.json"
    if not p.is_file():
        return None
    m = json.loads(p.read_text())
    h = m.get("heldout") or {}
    rows = h.get("rows", [])
    run_args = Path(d) / "args.json"
    a = json.loads(run_args.read_text()) if run_args.is_file() else {}
    return {"psnr": h.get("psnr"), "ssim": h.get("ssim"), "psnr_min": h.get("psnr_min"),
            "per_layer": h.get("per_layer"), "n_renders": len(rows),
            "heldout_seeds": sorted({r["seed"] for r in rows}),
            "psnr_per_render": {f"{r['seed']}/{r['layer']}": r["psnr"] for r in rows},
            "joint_subjects_psnr": (m.get("joint_subjects") or {}).get("psnr"), "use_shift": m["use_shift"],
            "fit": {k: a.get(k) for k in ("num_subjects", "joint_steps", "planes_steps", "num_new_subjects",
                                          "plane_resolution", "plane_channels", "hidden_dim", "seed")},
            "source": str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p)}


def reconstruction(args):
    previous = {}
    if Path(args.output).is_file():
        previous = json.loads(Path(args.output).read_text()).get("reconstruction", {})
    out = {}
    for key, d in (("shipped", args.stage1), ("shift", args.ablation_shift), ("no_shift", args.ablation_noshift)):
        out[key] = _stage1_metrics(d)
        old = previous.get(key)
        # stage-1 runs cannot be re-made in a benchmark run (runs/ is not versioned); carry their numbers
        if out[key] is None and old and old.get("psnr") is not None:
            out[key] = dict(old, carried_from=old.get("carried_from", "previous benchmarks/results/human3d.json"))
    if out["shift"] and out["no_shift"]:
        a, b = out["shift"], out["no_shift"]
        if a["heldout_seeds"] != b["heldout_seeds"] or {**a["fit"], "seed": 0} != {**b["fit"], "seed": 0}:
            raise SystemExit("the shift ablation arms were not fitted on the same subjects/settings")
        if a["use_shift"] is not True or b["use_shift"] is not False:
            raise SystemExit("the shift ablation arms are not shift / no shift")
        out["shift_gain_db"] = a["psnr"] - b["psnr"]
        out["shift_gain_ssim"] = a["ssim"] - b["ssim"]
        diffs = [v - b["psnr_per_render"][k] for k, v in a["psnr_per_render"].items() if k in b["psnr_per_render"]]
        out["shift_wins"] = f"{sum(d > 0 for d in diffs)}/{len(diffs)} subject-layers"
        out["shift_gain_db_median"] = float(np.median(diffs))
        f = a["fit"]
        out["what"] = (f"same {f['num_subjects']} decoder-fitting subjects ({f['joint_steps']} joint steps), same "
                       f"{len(a['heldout_seeds'])} held-out subjects ({f['planes_steps']} planes-only steps), same "
                       "seed; only --no_shift differs")
    return out


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    if args.quick:
        args.num_humans, args.num_gt, args.num_timed = 3, 3, 1
    from layergen.pipelines.pipeline_layered_human import load_pipeline

    t0 = time.perf_counter()
    res = {"config": {"num_humans": args.num_humans, "seed": args.seed, "steps": args.steps, "views": VIEWS,
                      "size": SIZE, "layers": LAYERS, "tol": TOL, "tol_strict": TOL_STRICT,
                      "presence_thresholds": {"change": CHANGE, "coverage": COVER, "locality": LOCAL},
                      "gt_seeds_from": HELDOUT_SEED_START + 500}}
    res["reconstruction"] = reconstruction(args)
    bands, calib, gt_chains = calibrate(args.num_gt, HELDOUT_SEED_START + 500)
    res["zones"], res["detector_on_ground_truth"] = bands, calib
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    res["generation"], gen_bodies = generation(pipe, args, bands, keep=True)
    res["generation_no_keep"], _ = generation(pipe, args, bands, keep=False)
    gt_fronts = [on_black(rgba[-1][0]) for _, rgba in gt_chains]
    gt_bodies = [on_black(rgba[0][0]) for _, rgba in gt_chains]
    res["diversity_reference"] = {"gt_final": mean_pairwise(gt_fronts), "gt_body": mean_pairwise(gt_bodies)}
    train = training_bodies(pipe, args.stage1, args.num_train_bodies if not args.quick else 8)
    if len(train) > 1:
        res["memorisation"] = {"generated_to_train_nn": nn_dist(gen_bodies, train),
                               "train_to_train_nn": nn_dist(train, train, exclude_self=True),
                               "train_subjects": len(train)}
    res["timing"] = timing(args)
    res["benchmark_seconds"] = time.perf_counter() - t0
    report(res)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    from layergen.atomic import write_text_atomic

    write_text_atomic(args.output, json.dumps(res, indent=1, default=float))
    print(f"\nwrote {args.output}")


def report(res):
    rec = res["reconstruction"]
    print("\n== stage 1: held-out reconstruction (masked, union of foregrounds) ==")
    print(f"{'setting':<22}{'PSNR dB':>9}{'SSIM':>8}{'min PSNR':>10}{'renders':>9}")
    for key, label in (("shipped", "shipped (shift)"), ("shift", "ablation: shift"),
                       ("no_shift", "ablation: no shift")):
        r = rec.get(key)
        if r:
            print(f"{label:<22}{r['psnr']:>9.2f}{r['ssim']:>8.4f}{r['psnr_min']:>10.2f}{r['n_renders']:>9}")
        else:
            print(f"{label:<22}{'(no run)':>9}")
    if "shift_gain_db" in rec:
        print(f"shift gain (ablation arms): {rec['shift_gain_db']:+.2f} dB PSNR, {rec['shift_gain_ssim']:+.4f} SSIM; "
              f"shift better on {rec['shift_wins']} (median {rec['shift_gain_db_median']:+.2f} dB)")
    c = res["detector_on_ground_truth"]
    print(f"\n== checks on ground truth ({c['gt_subjects']} mannequins) ==\npresence detector TPR {c['tpr']:.3f} "
          f"FPR {c['fpr']:.3f}; GT consistency {c['gt_consistency']:.4f}")
    print("\n== generation ({} humans, {}) ==".format(res["config"]["num_humans"], ",".join(LAYERS)))
    print(f"{'variant':<18}{'garment':<8}{'consist.':>9}{'strict':>8}{'present':>9}")
    for key in ("generation", "generation_no_keep"):
        for g, r in res[key]["per_garment"].items():
            print(f"{key:<18}{g:<8}{r['consistency']:>9.3f}{r['consistency_strict']:>8.3f}{r['presence']:>9.2f}")
        print(f"{key:<18}{'all':<8}{res[key]['consistency']:>9.3f}{res[key]['consistency_strict']:>8.3f}"
              f"{res[key]['presence_min']:>9.2f} (min); mean draws per garment {res[key]['mean_draws']}")
    d = res["diversity_reference"]
    print(f"\ndiversity (mean pairwise L1, front views): generated final {res['generation']['diversity_final']:.4f} "
          f"body {res['generation']['diversity_body']:.4f} | ground truth final {d['gt_final']:.4f} body {d['gt_body']:.4f}")
    if "memorisation" in res:
        m = res["memorisation"]
        print(f"nearest training body: generated {m['generated_to_train_nn']:.4f} vs training-to-training "
              f"{m['train_to_train_nn']:.4f}")
    t = res["timing"]
    print(f"\nseconds per human: wall {t['wall_seconds_mean']:.1f} (max {t['wall_seconds_max']:.1f}), "
          f"CPU {t['cpu_seconds_mean']:.1f}; load average {', '.join(f'{x:.1f}' for x in t['load_average'])}")


if __name__ == "__main__":
    main()
