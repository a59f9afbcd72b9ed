#!/usr/bin/env python
"""Text -> transparent layer: does the generated layer show the shape and colour the prompt asked for,
with clean alpha and no fringes, and how fast is it on this CPU?

What: `--n` (default 100) held-out prompts from the procedural grammar (shape x colour x
material x effect, e.g. "a green glass star with a soft glow"); about a third use the
shape/colour pairs that training never saw (`layergen.data.scenes.HELDOUT_COMBINATIONS`), the
rest seen pairs in new seeds/material/effect draws. Prompt k is generated with seed
HELDOUT_SEED_START + k (`--seed` moves the start) by `TransparentLayerPipeline` from `--model`
(default: the bundled layergen-mini) at 128 px, 20 steps, CFG 5, the model's scheduler, TTA on.

Scored by the independent classical analyser `layergen.analysis` (no diffusion model):
shape accuracy, colour accuracy, alpha cleanliness (fraction of half-transparent pixels away
from the edges; glass/shadow/glow raise it legitimately), fringe distance of edge pixels over
black and over white (0-255 units), cut off (share of layers whose body runs into the canvas edge:
part of the object is missing). The `reference` row scores the procedural renderer's own
layer for each prompt (what a perfect model would get; it calibrates the analyser). Speed:
seconds per image (one prompt per call, batch 1), mean over the run, warm-up call excluded.

    python benchmarks/generation.py [--model assets/layergen-mini] [--n 100] [--size 128] [--steps 20]

Prints a table (overall, seen vs unseen combinations, reference) and writes
benchmarks/results/generation.json with the settings, the prompt list and per-prompt scores.
Done bar (mini model): shape >= 80 %, colour >= 90 %, <= 5 s per 128 px layer.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from layergen.analysis import analyse_layer  # noqa: E402
from layergen.atomic import write_text_atomic  # noqa: E402
from layergen.data.scenes import (COLOURS, EFFECTS, HELDOUT_COMBINATIONS, HELDOUT_SEED_START, MATERIALS,  # noqa: E402
                                  SHAPES, make_object_layer)

SHAPE_MIN, COLOUR_MIN, SECONDS_MAX = 0.80, 0.90, 5.0
UNSEEN_SHARE = 0.32
WARMUP_PROMPT = "a grey circle"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Text -> transparent layer benchmark (shape/colour/alpha/fringe/speed).")
    p.add_argument("--model", default=None, help="pipeline folder (default: bundled assets/layergen-mini)")
    p.add_argument("--n", type=int, default=100, help="number of prompts (default: 100)")
    p.add_argument("--size", type=int, default=128, help="canvas side in pixels (default: 128)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=HELDOUT_SEED_START,
                   help="seed of prompt 0 (prompt k uses seed + k); must be >= HELDOUT_SEED_START")
    p.add_argument("--scheduler", choices=["dpm", "euler", "ddim", "unipc"], default=None,
                   help="override the model's scheduler")
    p.add_argument("--no-tta", action="store_true", help="single-pass alpha decoding")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--warmup", type=int, default=1, help="untimed generations before the timed run")
    p.add_argument("--samples", default=None, help="also write a PNG grid of the layers (over a checkerboard)")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "generation.json"))
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be at least 1")
    if args.seed < HELDOUT_SEED_START:
        p.error(f"--seed must be >= HELDOUT_SEED_START ({HELDOUT_SEED_START}): lower seeds are training data")
    return args


def build_prompts(n: int, seed: int = HELDOUT_SEED_START) -> list[dict]:
    """n prompt specs, deterministic in (n, seed): a share of unseen shape/colour pairs, the rest seen pairs.

    Captions come from the procedural renderer (`make_object_layer(...).caption`), i.e. exactly the
    training grammar; the material and effect are drawn per prompt so every combination appears.
    """
    rng = np.random.default_rng([seed, 7])
    unseen_pairs = sorted(HELDOUT_COMBINATIONS)
    seen_pairs = [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in HELDOUT_COMBINATIONS]
    seen_pairs = [seen_pairs[i] for i in rng.permutation(len(seen_pairs))]
    n_unseen = min(n - 1, max(1, round(UNSEEN_SHARE * n))) if n >= 2 else 0
    looks = [(m, e) for m in MATERIALS for e in EFFECTS]
    pairs, u = [], 0
    for k in range(n):  # spread the unseen prompts evenly, so a short run (--n 4) has both kinds
        if (k * n_unseen) // n != ((k + 1) * n_unseen) // n:
            c = u % len(unseen_pairs)  # each unseen pair cycles through every material x effect
            pairs.append(unseen_pairs[c] + looks[(u // len(unseen_pairs) + c) % len(looks)])
            u += 1
        else:
            pairs.append(seen_pairs[(k - u) % len(seen_pairs)] + looks[int(rng.integers(len(looks)))])
    specs = []
    for k, (shape, colour, material, effect) in enumerate(pairs):
        s = seed + k
        obj = make_object_layer(s, shape=shape, colour=colour, material=material, effect=effect)
        specs.append({"prompt": obj.caption, "seed": s, "shape": shape, "colour": colour, "material": material,
                      "effect": effect, "unseen": (shape, colour) in HELDOUT_COMBINATIONS})
    return specs


def reference_layer(spec: dict, size: int) -> np.ndarray:
    """The procedural renderer's layer for a prompt: what a perfect model could produce."""
    return make_object_layer(spec["seed"], size=size, shape=spec["shape"], colour=spec["colour"],
                             material=spec["material"], effect=spec["effect"]).rgba


def score(rgba: np.ndarray, spec: dict) -> dict:
    a = analyse_layer(rgba)
    return {"pred_shape": a.shape, "shape_confidence": a.shape_confidence, "pred_colour": a.colour,
            "shape_ok": a.shape == spec["shape"], "colour_ok": a.colour == spec["colour"],
            "alpha_cleanliness": round(a.alpha_cleanliness, 5), "fringe_black": round(a.fringe_black, 3),
            "fringe_white": round(a.fringe_white, 3), "coverage": round(a.coverage, 4), "cut_off": a.cut_off}


def summarise(rows: list[dict]) -> dict:
    if not rows:
        return {"n": 0}
    out = {"n": len(rows),
           "shape_accuracy": float(np.mean([r["shape_ok"] for r in rows])),
           "colour_accuracy": float(np.mean([r["colour_ok"] for r in rows])),
           "alpha_cleanliness": float(np.mean([r["alpha_cleanliness"] for r in rows])),
           "fringe_black": float(np.mean([r["fringe_black"] for r in rows])),
           "fringe_white": float(np.mean([r["fringe_white"] for r in rows])),
           "cut_off": float(np.mean([r["cut_off"] for r in rows]))}
    secs = [r["seconds"] for r in rows if r.get("seconds") is not None]
    if secs:
        out["seconds_per_image"] = float(np.mean(secs))
    return out


def load(args):
    from layergen.commands.generate import load_pipeline

    return load_pipeline(args.model, args.scheduler, quiet=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load(args)
    specs = build_prompts(args.n, args.seed)
    call = dict(height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=args.guidance,
                tta=not args.no_tta)
    for _ in range(args.warmup):
        pipe(WARMUP_PROMPT, seed=0, **call)

    rows, ref_rows, layers = [], [], []
    for k, spec in enumerate(specs):
        t0 = time.perf_counter()
        out = pipe(spec["prompt"], seed=spec["seed"], output_type="np", **call)
        seconds = time.perf_counter() - t0
        rgba = np.asarray(out.images[0])
        layers.append(rgba)
        row = dict(spec, seconds=round(seconds, 4), **score(rgba, spec))
        rows.append(row)
        ref_rows.append(dict(spec, **score(reference_layer(spec, args.size), spec)))
        print(f"[{k + 1:>3}/{len(specs)}] {spec['prompt']:<45} -> {row['pred_colour']:>6} {row['pred_shape']:<8} "
              f"{seconds:6.2f} s", file=sys.stderr, flush=True)

    summary = {"overall": summarise(rows), "seen": summarise([r for r in rows if not r["unseen"]]),
               "unseen": summarise([r for r in rows if r["unseen"]]), "reference": summarise(ref_rows)}
    summary["by_effect"] = {e: summarise([r for r in rows if r["effect"] == e]) for e in EFFECTS}
    summary["by_material"] = {m: summarise([r for r in rows if r["material"] == m]) for m in MATERIALS}
    overall = summary["overall"]
    done = {"shape_accuracy>=0.80": overall["shape_accuracy"] >= SHAPE_MIN,
            "colour_accuracy>=0.90": overall["colour_accuracy"] >= COLOUR_MIN,
            "seconds_per_image<=5": overall["seconds_per_image"] <= SECONDS_MAX}
    model = str(args.model) if args.model else "assets/layergen-mini"
    result = {
        "benchmark": "generation",
        "what": "text -> transparent RGBA layer on held-out procedural prompts, scored by layergen.analysis",
        "settings": {"model": model, "n": args.n, "size": args.size, "steps": args.steps,
                     "guidance_scale": args.guidance, "scheduler": type(pipe.scheduler).__name__,
                     "tta": not args.no_tta, "seed_start": args.seed, "seeds": "seed_start + k for prompt k",
                     "batch_size": 1, "warmup": args.warmup, "threads": torch.get_num_threads(),
                     "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                     "torch": torch.__version__},
        "done_bar": {"thresholds": {"shape_accuracy": SHAPE_MIN, "colour_accuracy": COLOUR_MIN,
                                    "seconds_per_image": SECONDS_MAX}, "pass": done},
        "summary": summary,
        "prompts": [s["prompt"] for s in specs],
        "rows": rows,
        "reference_rows": ref_rows,
    }
    write_text_atomic(args.output, json.dumps(result, indent=2) + "\n")
    if args.samples:
        from layergen.training_utils import rgba_preview, save_image_grid

        save_image_grid([rgba_preview(l.astype(np.float32) / 255) for l in layers], args.samples,
                        cols=min(10, len(layers)))

    print(f"\ntext -> layer: {args.n} held-out prompts, {model}, {args.size} px, {args.steps} steps, "
          f"CFG {args.guidance:g}, {result['settings']['scheduler']}, TTA {'on' if call['tta'] else 'off'}, "
          f"seeds {args.seed}+k, {result['settings']['threads']} CPU threads")
    cols = [("n", "n", "{:>5d}"), ("shape_accuracy", "shape acc", "{:>10.1%}"),
            ("colour_accuracy", "colour acc", "{:>11.1%}"), ("alpha_cleanliness", "alpha haze", "{:>11.4f}"),
            ("fringe_black", "fringe/black", "{:>13.2f}"), ("fringe_white", "fringe/white", "{:>13.2f}"),
            ("cut_off", "cut off", "{:>9.1%}"), ("seconds_per_image", "s/image", "{:>9.2f}")]
    print(f"{'':<12}" + "".join(f"{title:>{len(fmt.format(0 if key == 'n' else 0.0))}}" for key, title, fmt in cols))
    for name in ("overall", "seen", "unseen", "reference"):
        s = summary[name]
        cells = []
        for key, _title, fmt in cols:
            width = len(fmt.format(0 if key == "n" else 0.0))
            cells.append(fmt.format(s[key]) if key in s else f"{'-':>{width}}")
        print(f"{name:<12}" + "".join(cells))
    print("(reference = the procedural renderer's own layer for each prompt; alpha haze = fraction of "
          "half-transparent pixels away from edges; fringe in 0-255 units; cut off = the object's body runs into "
          "the canvas edge, so part of it is missing from the layer)")
    print(f"done bar: shape >= {SHAPE_MIN:.0%}, colour >= {COLOUR_MIN:.0%}, <= {SECONDS_MAX:g} s/image -> "
          + ", ".join(f"{k}: {'PASS' if v else 'FAIL'}" for k, v in done.items()))
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    from layergen.errors import LayergenError

    try:
        main()
    except LayergenError as exc:  # e.g. the bundled model is missing: say what to pass, no traceback
        print(f"generation benchmark: error: {exc}", file=sys.stderr)
        sys.exit(2)
