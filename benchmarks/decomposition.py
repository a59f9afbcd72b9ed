"""Decomposition benchmark: flat procedural composites -> background + instance layers, against ground truth.

What it compares (side by side, one run, same inputs):
  * learned   — DecompositionPipeline with the learned mini decomposer (`--model`, default the bundled
                assets/layergen-mini: its layer matte, `layer_matte/`; skipped with a note when missing)
  * classical — DecompositionPipeline defaults: box/residual proposals, closed-form matting,
                StructureFill completion (1-D profiles, biharmonic fallback), unblending
  * naive     — the same proposals, hard mask cut + OpenCV Telea fill, no unblending

Data: `--num` (default 200) held-out procedural scenes (`make_scene(seed)`, seeds from
HELDOUT_SEED_START, 128 px, 1-3 objects; solid/glass, shadow/glow/none; gradient, noise, stripes,
horizon backgrounds). Every method gets the same guidance: the ground-truth body boxes (x, y, w, h),
in shuffled order (`--guidance automatic` gives none).

Metrics (see layergen/decompose/metrics.py): per-layer soft alpha IoU and premultiplied RGB L1 after
one-to-one matching (unmatched ground-truth layers score 0 / full L1), background PSNR inside the area
the objects covered (mean of per-image PSNR capped at 60 dB, and pooled over all pixels), the share of
visible shadow alpha that lands in its object's layer, occlusion-order accuracy of overlapping pairs,
re-composite PSNR (capped at 100 dB), seconds per image (this machine, OMP_NUM_THREADS as set).

    python benchmarks/decomposition.py                 # 200 images, all methods
    python benchmarks/decomposition.py --num 20 --methods classical naive
    python benchmarks/decomposition.py --max_minutes 20  # stop early on a slow machine; n is recorded

With `--max_minutes` the run stops after the image that crosses the limit; every method has then
seen the same first n images, and the JSON records n (`num_images`) next to the requested `--num`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from layergen.atomic import write_text_atomic  # noqa: E402
from layergen.data.scenes import HELDOUT_SEED_START, make_scene  # noqa: E402
from layergen.decompose.metrics import evaluate, summarise  # noqa: E402

DEFAULT_MODEL = ROOT / "assets" / "layergen-mini"
COLUMNS = [("alpha_iou", "alpha IoU ↑", "{:.3f}"), ("rgb_l1", "RGB L1 ↓", "{:.4f}"),
           ("bg_psnr_occluded", "bg PSNR occl. ↑", "{:.2f}"), ("bg_psnr_occluded_pooled", "(pooled)", "{:.2f}"),
           ("shadow_in_layer", "shadow in layer ↑", "{:.3f}"), ("order_accuracy", "order acc. ↑", "{:.3f}"),
           ("recomposite_psnr", "re-comp. PSNR ↑", "{:.1f}"), ("seconds_per_image", "s / image ↓", "{:.2f}"),
           ("cpu_seconds_per_image", "CPU s / image ↓", "{:.2f}")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num", type=int, default=200, help="number of held-out scenes")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed_start", type=int, default=HELDOUT_SEED_START)
    p.add_argument("--methods", nargs="+", default=["learned", "classical", "naive"],
                   choices=["learned", "classical", "naive"])
    p.add_argument("--guidance", choices=["boxes", "automatic"], default="boxes")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="learned decomposer folder")
    p.add_argument("--steps", type=int, default=20, help="denoising steps of the learned decomposer")
    p.add_argument("--max_minutes", type=float, default=None, help="stop after this much wall time (n is recorded)")
    p.add_argument("--learned_images", type=int, default=None,
                   help="run the (slow, CPU) learned decomposer on the first N images only; every method is then "
                        "also summarised on those N (`subset` in the JSON) for a like-for-like comparison")
    p.add_argument("--learned_minutes", type=float, default=None,
                   help="stop running the learned decomposer after this much of its own wall time")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "decomposition.json"))
    return p.parse_args(argv)


def build(method, args):
    from layergen.pipelines.pipeline_decomposition import DecompositionPipeline, naive_pipeline

    if method == "classical":
        pipe = DecompositionPipeline()
    elif method == "naive":
        pipe = naive_pipeline()
    else:
        from layergen.decompose.learned import load_decomposition_pipeline

        pipe = load_decomposition_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None):
    args = parse_args(argv)
    import torch
    from tqdm.auto import tqdm

    pipes, notes = {}, {}
    for m in args.methods:
        try:
            pipes[m] = build(m, args)
        except Exception as exc:  # noqa: BLE001 - a missing model must not stop the other columns
            notes[m] = f"skipped: {exc}"
    rows = {m: [] for m in pipes}
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    done, learned_wall = 0, 0.0
    for i in tqdm(range(args.num), desc="decomposition benchmark"):
        if args.max_minutes is not None and time.perf_counter() - start > 60 * args.max_minutes:
            break
        scene = make_scene(args.seed_start + i, args.size)
        boxes = [(o.box[0], o.box[1], o.box[2] - o.box[0], o.box[3] - o.box[1]) for o in scene.objects]
        boxes = [boxes[k] for k in rng.permutation(len(boxes))]
        for m, pipe in pipes.items():
            if m == "learned" and ((args.learned_images is not None and i >= args.learned_images) or
                                   (args.learned_minutes is not None and learned_wall > 60 * args.learned_minutes)):
                continue
            t, c = time.perf_counter(), time.process_time()
            out = pipe(scene.composite, boxes=boxes if args.guidance == "boxes" else None,
                       num_inference_steps=args.steps, generator=torch.Generator("cpu").manual_seed(i))
            r = evaluate(out.stack, scene)
            r["seconds"] = time.perf_counter() - t
            r["cpu_seconds"] = time.process_time() - c
            learned_wall += r["seconds"] if m == "learned" else 0.0
            rows[m].append(r)
        done += 1
    def table(rows_by_method, title):
        out = {}
        for m, v in rows_by_method.items():
            if not v:
                continue
            out[m] = summarise(v)
            # wall time depends on what else the machine runs; CPU time less so
            out[m]["cpu_seconds_per_image"] = float(np.mean([r["cpu_seconds"] for r in v]))
        print(f"\n{title}")
        print(f"{'method':<10} " + " ".join(f"{c[1]:>17}" for c in COLUMNS))
        for m, s in out.items():
            print(f"{m:<10} " + " ".join(f"{c[2].format(s[c[0]]):>17}" for c in COLUMNS) + f"   (n={s['images']})")
        return out

    setting = (f"({args.size} px, seeds {args.seed_start}+, guidance: {args.guidance}, "
               f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    results = table(rows, f"Decomposition on {done} held-out procedural scenes {setting}")
    subset = None
    n_learned = len(rows.get("learned", []))
    if "learned" in rows and 0 < n_learned < done:
        subset = table({m: v[:n_learned] for m, v in rows.items()},
                       f"Same, on the first {n_learned} scenes (where the learned decomposer ran)")
        subset = {"num_images": n_learned, "results": subset}
    for m, note in notes.items():
        print(f"{m:<10} {note}")
    payload = {"benchmark": "decomposition", "num_images": done, "num_requested": args.num, "size": args.size,
               "seed_start": args.seed_start, "guidance": args.guidance, "steps": args.steps,
               "model": args.model if "learned" in pipes else None,
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "max_minutes": args.max_minutes,
               "results": results, "subset": subset, "notes": notes,
               "metrics": "see layergen/decompose/metrics.py; bg PSNR capped at 60 dB per image"}
    write_text_atomic(args.output, json.dumps(payload, indent=2))
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
