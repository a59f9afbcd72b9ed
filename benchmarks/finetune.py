#!/usr/bin/env python
"""Does LoRA fine-tuning teach the mini model a shape it has never seen, without breaking the ones it knows?

What: the procedural generator draws `--num_images` (64) RGBA layers of a shape that is never
sampled in the mini's training data (`EXTRA_SHAPES`: hexagon by default; `--shape arrow` or both),
in all 12 colours, solid (the eval prompts' material; `--material mix` for the grammar's 30 % glass), random
effect, captions from the training grammar ("a teal hexagon with a soft glow"); seeds 0..N-1.
`training/train_layer_lora.py` then LoRA-fine-tunes the bundled layergen-mini on them on this CPU (latents
cached; rank 32 on attention and resnet convolutions, 3000 steps, lr 1e-3 annealed by a cosine schedule,
Min-SNR weighting, EMA of the LoRA weights). `--replay` (64) procedural
layers of the 8 original shapes (training seed range) join the folder: DreamBooth-style prior
preservation, so the model keeps what it knew.

Measured before and after, with the same held-out seeds (`HELDOUT_SEED_START + 500000 + k`), 20
steps, CFG 5, TTA on, scored by the independent classical analyser `layergen.analysis` (all 10
shapes in its vocabulary):
* new-shape rate: "a {colour} hexagon" for every colour x `--eval_seeds` seeds -> how often the
  analyser sees a hexagon (and the asked colour);
* original-shape accuracy: "a {colour} {shape}" for the 8 original shapes x `--orig_colours`
  colours (held-out shape/colour pairs left out) -> how often it sees the asked shape;
* false positives: how often an original-shape prompt (and a circle prompt alone) is seen as the
  new shape. Before fine-tuning this is the honest baseline: the hexagon template also matches
  blobby circles, so "hexagon" answers are not all new knowledge.
* reference: the analyser on the renderer's own layers for the same prompts (what a perfect
  model gets; e.g. how often a true circle is called a hexagon).

    python benchmarks/finetune.py [--steps 600] [--rank 8]      # ~30 min training + ~10 min sampling (2 cores)

Prints a table and writes benchmarks/results/finetune.json (settings, seeds, per-prompt rows) and
finetune.png beside it: the first 12 new-shape prompts (one per colour) before (top) and after.
Done bar (issue #10): new shape >= 70 % after, original accuracy drops <= 5 points.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from layergen.atomic import write_text_atomic  # noqa: E402
from layergen.data.scenes import (COLOURS, EXTRA_SHAPES, HELDOUT_COMBINATIONS, HELDOUT_SEED_START,  # noqa: E402
                                  SHAPES, make_object_layer)

NEW_MIN, DROP_MAX = 0.70, 0.05
STRICT_MARGIN = 0.05  # new-shape template IoU must beat every original shape's by this much (see `score`)
EVAL_SEED_START = HELDOUT_SEED_START + 500_000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="LoRA fine-tuning benchmark: an unseen shape before vs after.")
    p.add_argument("--shape", action="append", choices=EXTRA_SHAPES, default=None,
                   help="new shape(s) to teach (default: hexagon; repeat for several)")
    p.add_argument("--model", default=None, help="pipeline folder (default: bundled assets/layergen-mini)")
    p.add_argument("--num_images", type=int, default=64, help="training layers per new shape")
    p.add_argument("--replay", type=int, default=64,
                   help="procedural layers of the 8 original shapes added to the data (prior preservation)")
    p.add_argument("--material", choices=["solid", "glass", "mix"], default="solid",
                   help="material of the new-shape layers (default solid, as in the eval prompts; mix: the "
                        "training grammar's)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--lora_alpha", type=float, default=None)
    p.add_argument("--no_lora_conv", dest="lora_conv", action="store_false",
                   help="LoRA on attention only (default: attention + resnet convolutions)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--lr_scheduler", default="cosine", choices=["constant_with_warmup", "cosine"],
                   help="learning-rate schedule after 50 warm-up steps (cosine: anneal to 0 by the last step)")
    p.add_argument("--snr_gamma", type=float, default=5.0, help="Min-SNR loss weighting (0: off)")
    p.add_argument("--ema_decay", type=float, default=0.99, help="EMA of the LoRA weights (0: off)")
    p.add_argument("--train_seed", type=int, default=0)
    p.add_argument("--eval_seeds", type=int, default=4, help="seeds per new-shape prompt (one prompt per colour)")
    p.add_argument("--orig_colours", type=int, default=12, help="colours per original shape")
    p.add_argument("--num_inference_steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--work_dir", default=str(ROOT / "runs" / "finetune_benchmark"))
    p.add_argument("--skip_training", action="store_true", help="reuse the LoRA already in --work_dir/lora")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "finetune.json"))
    args = p.parse_args(argv)
    args.shape = list(dict.fromkeys(args.shape or ["hexagon"]))
    return args


# ---------------------------------------------------------------------------------------------
# data


def write_training_data(folder: Path, shapes, num_images: int, size: int, replay: int,
                        material: str | None = None) -> list[dict]:
    """`num_images` layers per new shape (colours cycle, seeds 0..) + `replay` original-shape layers, as an
    imagefolder (RGBA PNGs + metadata.jsonl)."""
    folder.mkdir(parents=True, exist_ok=True)
    colours = list(COLOURS)
    rows = []
    for shape in shapes:
        for k in range(num_images):
            obj = make_object_layer(k, size, shape=shape, colour=colours[k % len(colours)], material=material)
            rows.append({"file_name": f"{shape}_{k:03d}.png", "text": obj.caption, "seed": k, "shape": shape})
            _save_png(obj.rgba, folder / rows[-1]["file_name"])
    for k in range(replay):  # the original distribution (training seed range, held-out pairs excluded)
        obj = make_object_layer(100_000 + k, size, glyph_prob=0.0, exclude_heldout=True)
        rows.append({"file_name": f"replay_{k:03d}.png", "text": obj.caption, "seed": 100_000 + k,
                     "shape": obj.shape})
        _save_png(obj.rgba, folder / rows[-1]["file_name"])
    write_text_atomic(folder / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _save_png(rgba, path: Path) -> None:
    from PIL import Image

    from layergen.atomic import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(rgba, "RGBA").save(tmp, format="PNG")


def eval_specs(shapes, eval_seeds: int, orig_colours: int) -> list[dict]:
    """Prompt specs: every colour x `eval_seeds` for each new shape; 8 original shapes x `orig_colours`."""
    specs, k = [], 0
    colours = list(COLOURS)
    for shape in shapes:
        for s in range(eval_seeds):
            for colour in colours:
                specs.append({"group": "new", "shape": shape, "colour": colour, "seed": EVAL_SEED_START + k})
                k += 1
    rng = np.random.default_rng(7)
    for shape in SHAPES:
        allowed = [c for c in colours if (shape, c) not in HELDOUT_COMBINATIONS]
        for colour in [allowed[i] for i in sorted(rng.permutation(len(allowed))[:orig_colours])]:
            specs.append({"group": "original", "shape": shape, "colour": colour, "seed": EVAL_SEED_START + k})
            k += 1
    for spec in specs:
        spec["prompt"] = make_object_layer(spec["seed"], shape=spec["shape"], colour=spec["colour"],
                                           material="solid", effect="none").caption
    return specs


# ---------------------------------------------------------------------------------------------
# evaluation


def score(rgba, spec: dict, new_shapes) -> dict:
    """Analyser verdict + `new_shape_margin`: IoU of the best new-shape template minus the best original-shape
    template on the same body mask. A blob that happens to match a hexagon a bit better than a circle has a
    margin near 0; a rendered hexagon has ~0.10-0.18 (a rendered circle about -0.1)."""
    from layergen.analysis import _best_template, _normalise, analyse_layer, match_shape

    a = analyse_layer(rgba)
    norm = _normalise(match_shape(np.asarray(rgba)).mask)
    margin = None
    if norm is not None:
        margin = round(_best_template(norm, tuple(new_shapes))[1] - _best_template(norm, SHAPES)[1], 4)
    return dict(spec, pred_shape=a.shape, shape_confidence=a.shape_confidence, pred_colour=a.colour,
                new_shape_margin=margin)


def generate_and_score(pipe, specs, args, label: str, keep: int = 0) -> tuple[list[dict], list]:
    """Scored rows for every spec, and the first `keep` images (float RGBA) for the figure."""
    rows, kept = [], []
    batch = 4
    t0 = time.perf_counter()
    for i in range(0, len(specs), batch):
        chunk = specs[i:i + batch]
        import torch

        gens = [torch.Generator().manual_seed(s["seed"]) for s in chunk]
        out = pipe([s["prompt"] for s in chunk], generator=gens, num_inference_steps=args.num_inference_steps,
                   guidance_scale=args.guidance, height=args.size, width=args.size, output_type="np")
        for spec, img in zip(chunk, out.images):
            rows.append(score(np.asarray(img), spec, args.shape))
            if len(kept) < keep:
                kept.append(np.asarray(img, np.float32) / 255.0)   # the pipeline's np output is uint8 RGBA
        print(f"[{label}] {min(i + batch, len(specs))}/{len(specs)} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    return rows, kept


def reference_rows(specs, size: int, new_shapes) -> list[dict]:
    rows = []
    for spec in specs:
        obj = make_object_layer(spec["seed"], size, shape=spec["shape"], colour=spec["colour"], material="solid",
                                effect="none")
        rows.append(score(obj.rgba, spec, new_shapes))
    return rows


def summarise(rows, new_shapes) -> dict:
    new = [r for r in rows if r["group"] == "new"]
    orig = [r for r in rows if r["group"] == "original"]
    circles = [r for r in orig if r["shape"] == "circle"]

    def rate(rs, pred):
        return float(np.mean([pred(r) for r in rs])) if rs else float("nan")

    def strict(r):
        return r["pred_shape"] == r["shape"] and (r["new_shape_margin"] or 0.0) >= STRICT_MARGIN

    out = {
        "new_shape_rate": rate(new, lambda r: r["pred_shape"] == r["shape"]),
        "new_shape_rate_strict": rate(new, strict),
        "new_shape_colour_accuracy": rate(new, lambda r: r["pred_colour"] == r["colour"]),
        "original_shape_accuracy": rate(orig, lambda r: r["pred_shape"] == r["shape"]),
        "original_colour_accuracy": rate(orig, lambda r: r["pred_colour"] == r["colour"]),
        "original_seen_as_new_shape": rate(orig, lambda r: r["pred_shape"] in new_shapes),
        "circle_seen_as_new_shape": rate(circles, lambda r: r["pred_shape"] in new_shapes),
        "original_seen_as_new_shape_strict": rate(
            orig, lambda r: r["pred_shape"] in new_shapes and (r["new_shape_margin"] or 0.0) >= STRICT_MARGIN),
        "n_new": len(new), "n_original": len(orig), "n_circle": len(circles),
    }
    for shape in new_shapes:
        rs = [r for r in new if r["shape"] == shape]
        out[f"{shape}_rate"] = rate(rs, lambda r: r["pred_shape"] == shape)
    out["original_by_shape"] = {s: rate([r for r in orig if r["shape"] == s], lambda r: r["pred_shape"] == s)
                                for s in SHAPES}
    return out


def train(args, data: Path, lora_dir: Path) -> float:
    cmd = [sys.executable, str(ROOT / "training" / "train_layer_lora.py"), "--train_data_dir", str(data),
           "--output_dir", str(lora_dir), "--resolution", str(args.size), "--rank", str(args.rank),
           "--train_batch_size", str(args.batch_size), "--max_train_steps", str(args.steps),
           "--learning_rate", str(args.learning_rate), "--lr_scheduler", args.lr_scheduler,
           "--lr_warmup_steps", "50",
           "--checkpointing_steps", str(max(100, args.steps // 3)), "--checkpoints_total_limit", "1",
           "--seed", str(args.train_seed), "--cache_latents", "yes", "--validation_prompt",
           f"a red {args.shape[0]}", "--validation_steps", "0", "--num_validation_images", "4",
           "--resume_from_checkpoint", "latest"]
    if args.model:
        cmd += ["--pretrained_model_name_or_path", args.model]
    if args.lora_alpha:
        cmd += ["--lora_alpha", str(args.lora_alpha)]
    if args.lora_conv:
        cmd.append("--lora_conv")
    if args.snr_gamma:
        cmd += ["--snr_gamma", str(args.snr_gamma)]
    if args.ema_decay:
        cmd += ["--use_ema", "--ema_decay", str(args.ema_decay)]
    import resource

    t0 = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(cmd, check=True, env=env)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return time.perf_counter() - t0, cpu


def unet_fingerprint(model) -> str:
    """sha256 (first 16 hex) of the UNet weights: the mini is retrained now and then; results name the one used."""
    import hashlib

    from layergen.mini import mini_path

    folder = (Path(model) if model else mini_path()) / "unet"
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from layergen.commands.generate import load_pipeline

    unet_before = unet_fingerprint(args.model)
    work = Path(args.work_dir)
    data, lora_dir = work / "data", work / "lora"
    train_rows = write_training_data(data, args.shape, args.num_images, args.size, args.replay,
                                     None if args.material == "mix" else args.material)
    specs = eval_specs(args.shape, args.eval_seeds, args.orig_colours)

    train_seconds = train_cpu = None
    if not args.skip_training:
        train_seconds, train_cpu = train(args, data, lora_dir)

    pipe = load_pipeline(args.model, quiet=True)
    n_fig = min(len(COLOURS), sum(s["group"] == "new" for s in specs))
    before, fig_before = generate_and_score(pipe, specs, args, "before", keep=n_fig)
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # "no LoRA keys for the text encoder" is expected: only the UNet is adapted
    pipe.load_lora_weights(str(lora_dir))
    dlog.set_verbosity(level)
    after, fig_after = generate_and_score(pipe, specs, args, "after", keep=n_fig)
    reference = reference_rows(specs, args.size, args.shape)
    if unet_fingerprint(args.model) != unet_before:
        from layergen.errors import LayergenError

        raise LayergenError("the model's UNet changed on disk during the run (retrained?); run the benchmark again")

    summary = {"before": summarise(before, args.shape), "after": summarise(after, args.shape),
               "reference": summarise(reference, args.shape)}
    b, a = summary["before"], summary["after"]
    drop = b["original_shape_accuracy"] - a["original_shape_accuracy"]
    summary["original_accuracy_drop_points"] = round(100 * drop, 2)
    done = {"new_shape_rate_after>=0.70": a["new_shape_rate"] >= NEW_MIN,
            "original_accuracy_drop<=5_points": drop <= DROP_MAX}
    model = str(args.model) if args.model else "assets/layergen-mini"
    result = {
        "benchmark": "finetune",
        "what": "LoRA fine-tuning of the mini on procedurally drawn layers of a never-seen shape; new-shape rate and "
                "original-shape accuracy before vs after, scored by layergen.analysis",
        "settings": {"model": model, "unet_sha256": unet_before, "new_shapes": args.shape,
                     "strict_margin": STRICT_MARGIN, "num_images": args.num_images, "replay": args.replay,
                     "material": "grammar mix (30 % glass)" if args.material == "mix" else args.material,
                     "size": args.size, "rank": args.rank, "lora_alpha": args.lora_alpha or args.rank,
                     "lora_conv": args.lora_conv, "steps": args.steps, "batch_size": args.batch_size,
                     "learning_rate": args.learning_rate, "lr_scheduler": f"{args.lr_scheduler} (50 warmup)",
                     "snr_gamma": args.snr_gamma or None, "ema_decay": args.ema_decay or None,
                     "train_seed": args.train_seed, "training_seeds": f"0..{args.num_images - 1} per new shape",
                     "eval_seed_start": EVAL_SEED_START, "eval_seeds": "eval_seed_start + k for prompt k",
                     "eval_seeds_per_new_prompt": args.eval_seeds, "orig_colours": args.orig_colours,
                     "num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance,
                     "scheduler": type(pipe.scheduler).__name__, "tta": True,
                     "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                     "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                     "torch": torch.__version__},
        "train_seconds": None if train_seconds is None else round(train_seconds, 1),
        "train_cpu_seconds": None if train_cpu is None else round(train_cpu, 1),
        "done_bar": {"new_shape_rate_after": NEW_MIN, "original_accuracy_drop_max_points": 100 * DROP_MAX,
                     "pass": done},
        "summary": summary,
        "training_data": train_rows,
        "rows": {"before": before, "after": after, "reference": reference},
    }
    write_text_atomic(args.output, json.dumps(result, indent=2) + "\n")
    from layergen.training_utils import rgba_preview, save_image_grid

    figure = Path(args.output).with_suffix(".png")
    save_image_grid([rgba_preview(x) for x in fig_before + fig_after], figure, cols=n_fig)

    names = "/".join(args.shape)
    print(f"\nLoRA fine-tuning on {args.num_images} {names} layers (+{args.replay} replay), rank {args.rank}, "
          f"{args.steps} steps x batch {args.batch_size}, lr {args.learning_rate:g}"
          + (f", training {train_seconds / 60:.1f} min wall / {train_cpu / 60:.1f} min CPU" if train_seconds else ""))
    print(f"eval: {b['n_new']} new-shape prompts, {b['n_original']} original-shape prompts, seeds "
          f"{EVAL_SEED_START}+k, {args.num_inference_steps} steps, CFG {args.guidance:g}")
    cols = [("new_shape_rate", f"{names} rate"), ("new_shape_rate_strict", "strict"),
            ("new_shape_colour_accuracy", "its colour"),
            ("original_shape_accuracy", "orig shape acc"), ("original_seen_as_new_shape", f"orig->{names}"),
            ("circle_seen_as_new_shape", f"circle->{names}")]
    print(f"{'':<11}" + "".join(f"{t:>{max(len(t) + 2, 10)}}" for _, t in cols))
    for name in ("before", "after", "reference"):
        s = summary[name]
        print(f"{name:<11}" + "".join(f"{s[k]:>{max(len(t) + 2, 10)}.1%}" for k, t in cols))
    print(f"original-shape accuracy drop: {100 * drop:+.1f} points (before - after)")
    print("(reference = the procedural renderer's own layers for the same prompts, scored by the same analyser; "
          f"strict = {names} and its template beats every original shape's IoU by >= {STRICT_MARGIN})")
    print(f"done bar: new shape >= {NEW_MIN:.0%} after, drop <= {100 * DROP_MAX:g} points -> "
          + ", ".join(f"{k}: {'PASS' if v else 'FAIL'}" for k, v in done.items()))
    print(f"wrote {args.output} and {figure}")
    return result


if __name__ == "__main__":
    from layergen.errors import LayergenError

    try:
        main()
    except LayergenError as exc:
        print(f"finetune benchmark: error: {exc}", file=sys.stderr)
        sys.exit(2)
