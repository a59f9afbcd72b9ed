#!/usr/bin/env python
"""Multi-layer generation cost: layer-wise region crop vs full-canvas attention, 2 / 8 / 32 / 64 layers.

What: `MultiLayerPipeline` from `--model` (default: the bundled layergen-mini; `--tiny` uses the
tiny random test components, for a smoke run) generates N box layers on a `--canvas` px canvas
(default 512), for N in `--layers` (default 2 8 32 64), once with ``attention="region"`` (each
layer denoised on a crop of about box / 0.65 around its box; with the pipeline's default
`min_region_size` a crop smaller than the model's native size - 128 px for the mini - is denoised
at that size) and once with ``attention="full"`` (the identical per-layer denoising on the whole
canvas latent, box masked the same way). Both
modes run in the same process, interleaved (region then full for each N), with the same seed,
prompts, steps, CFG, batch size (`--max-batch`, default 16) and TTA off.

Layout (seed `--seed`, default 0): an 8 x 8 grid of cells over the canvas, one `--box` px
(default 48) box jittered inside each cell; N boxes are N cells drawn by a seeded permutation,
so boxes never overlap and every N uses the same box size (the cost should grow with the
total box area). Box k gets the prompt "a <colour> <shape>" from the procedural vocabulary.
A fixed background image is passed in both modes, so the timing covers the layers only (the
background is one full-canvas denoise, the same in both modes; its cost is reported once).

Measured per (N, mode): wall seconds of the pipeline call, peak resident memory above the
pre-call level (Linux VmHWM, reset through /proc/self/clear_refs; on CUDA the peak allocated
memory), and the machine-independent count of latent cells the UNet processed (sum over UNet
calls of batch x h x w). The table prints region/full ratios of both.

    python benchmarks/multilayer.py [--model PATH | --tiny] [--canvas 512] [--box 48] [--steps 4]

Writes benchmarks/results/multilayer.json. Done bar: region crop >= 4x faster than full
attention at 32 layers, in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from layergen.atomic import write_text_atomic  # noqa: E402
from layergen.data.scenes import COLOURS, SHAPES  # noqa: E402

SPEEDUP_MIN_AT_32 = 4.0
GRID = 8  # 8 x 8 cells: room for 64 disjoint boxes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Region-crop vs full-attention cost of multi-layer generation.")
    p.add_argument("--model", default=None, help="pipeline folder (default: bundled assets/layergen-mini)")
    p.add_argument("--tiny", action="store_true", help="tiny random components (smoke run; numbers meaningless)")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32, 64])
    p.add_argument("--canvas", type=int, default=512, help="canvas side in pixels (default: 512)")
    p.add_argument("--box", type=int, default=48, help="box side in pixels (default: 48)")
    p.add_argument("--min-region-size", type=int, default=None,
                   help="pipeline min_region_size (default: the pipeline's, the model's native size; 0 = off)")
    p.add_argument("--steps", type=int, default=4,
                   help="denoising steps (default: 4; both modes scale alike, so the ratio barely depends on it)")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--max-batch", type=int, default=16, help="layers per UNet call in both modes (default: 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "multilayer.json"))
    args = p.parse_args(argv)
    if args.canvas < GRID * args.box / 0.9 or args.box < 8:
        p.error(f"--canvas must leave room for an {GRID}x{GRID} grid of --box sized boxes (box >= 8)")
    if max(args.layers) > GRID * GRID or min(args.layers) < 1:
        p.error(f"--layers must be in [1, {GRID * GRID}]")
    return args


def make_layout(n: int, canvas: int, box: int, seed: int) -> list[tuple[int, int, int, int, str]]:
    rng = np.random.default_rng([seed, 17])
    cell = canvas // GRID
    cells = rng.permutation(GRID * GRID)[:n]
    colours = list(COLOURS)
    out = []
    for k, c in enumerate(sorted(cells)):
        gx, gy = c % GRID, c // GRID
        x = gx * cell + int(rng.integers(0, cell - box + 1))
        y = gy * cell + int(rng.integers(0, cell - box + 1))
        prompt = f"a {colours[k % len(colours)]} {SHAPES[k % len(SHAPES)]}"
        out.append((x, y, box, box, prompt))
    return out


def load_pipe(args):
    import torch

    from layergen.pipelines import MultiLayerPipeline

    if args.tiny:
        from layergen.testing import tiny_layer_components

        pipe = MultiLayerPipeline(**tiny_layer_components())
    else:
        from layergen.mini import mini_path

        pipe = MultiLayerPipeline.from_pretrained(args.model or mini_path())
    pipe.to(torch.device(args.device))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _status_kb(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


class PeakMemory:
    """Peak memory of a block in MiB: CUDA peak allocated, else Linux VmHWM above the starting RSS."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.mib = None

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            import ctypes
            import gc

            gc.collect()
            try:  # hand freed heap pages back to the OS, so an earlier run's high-water mark does not hide this one's
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except (OSError, AttributeError):
                pass
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            except OSError:
                pass
            self.start = (_status_kb("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            hwm = _status_kb("VmHWM")
            peak = hwm * 1024 if hwm is not None else None
        self.mib = None if peak is None else max(0.0, (peak - self.start) / 2 ** 20)
        return False


def measure(pipe, args, boxes, attention, background):
    cells = []
    hook = pipe.unet.register_forward_hook(
        lambda m, a, o: cells.append(int(a[0].shape[0] * a[0].shape[-2] * a[0].shape[-1])))
    try:
        with PeakMemory(args.device) as mem:
            t0 = time.perf_counter()
            out = pipe("", layout=boxes, width=args.canvas, height=args.canvas, background=background,
                       num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                       attention=attention, max_batch=args.max_batch, tta=False, output_type="stack",
                       min_region_size=args.min_region_size)
            if args.device.startswith("cuda"):
                import torch

                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
    finally:
        hook.remove()
    stack = out.stacks[0]
    assert len(stack) == len(boxes) + 1
    region = stack[1].metadata["region"]
    return {"seconds": seconds, "peak_mib": mem.mib, "unet_calls": len(cells), "latent_cells": sum(cells),
            "crop_px": region[2:], "min_region_size": stack[1].metadata["min_region_size"]}


def main(argv=None):
    args = parse_args(argv)
    import torch

    torch.manual_seed(args.seed)
    pipe = load_pipe(args)
    rng = np.random.default_rng([args.seed, 3])
    background = (rng.random((args.canvas, args.canvas, 3)) * 60 + 150).astype(np.uint8)
    # warm-up (allocator, kernels), not timed
    measure(pipe, args, make_layout(2, args.canvas, args.box, args.seed), "region", background)
    t0 = time.perf_counter()
    pipe("", layout=[(0, 0, args.box, args.box, "a red star")], width=args.canvas, height=args.canvas,
         num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed, tta=False,
         output_type="stack", max_batch=args.max_batch)
    one_layer_with_bg = time.perf_counter() - t0
    rows = []
    for n in args.layers:
        boxes = make_layout(n, args.canvas, args.box, args.seed)
        row = {"layers": n}
        for attention in ("region", "full"):
            row[attention] = measure(pipe, args, boxes, attention, background)
            print(f"  {n:>2} layers {attention:<6} {row[attention]['seconds']:8.2f} s "
                  f"{row[attention]['peak_mib'] or 0:8.1f} MiB", flush=True)
        r, f = row["region"], row["full"]
        row["speedup"] = f["seconds"] / max(r["seconds"], 1e-9)
        row["cell_ratio"] = f["latent_cells"] / max(r["latent_cells"], 1)
        row["memory_ratio"] = (f["peak_mib"] / r["peak_mib"]) if r["peak_mib"] and f["peak_mib"] else None
        rows.append(row)

    print()
    r0 = rows[0]["region"]
    print(f"MultiLayerPipeline cost, {args.canvas}px canvas, {args.box}px boxes (region crop {r0['crop_px']} px, "
          f"denoised at >= {r0['min_region_size']} px), {args.steps} steps, "
          f"CFG {args.guidance}, max_batch {args.max_batch}, seed {args.seed}, device {args.device}"
          f"{' (TINY random components)' if args.tiny else ''}")
    head = f"{'layers':>6} | {'region s':>9} {'full s':>9} {'speedup':>8} | {'region MiB':>10} {'full MiB':>9} " \
           f"{'mem x':>6} | {'cells x':>7}"
    print(head)
    print("-" * len(head))
    for row in rows:
        r, f = row["region"], row["full"]
        mem = f"{row['memory_ratio']:.1f}" if row["memory_ratio"] else "-"
        print(f"{row['layers']:>6} | {r['seconds']:>9.2f} {f['seconds']:>9.2f} {row['speedup']:>7.1f}x | "
              f"{r['peak_mib'] or 0:>10.1f} {f['peak_mib'] or 0:>9.1f} {mem:>6} | {row['cell_ratio']:>6.1f}x")
    at32 = next((r for r in rows if r["layers"] == 32), None)
    verdict = None
    if at32:
        verdict = at32["speedup"] >= SPEEDUP_MIN_AT_32
        print(f"\nregion crop at 32 layers: {at32['speedup']:.1f}x faster than full attention "
              f"(bar {SPEEDUP_MIN_AT_32:.0f}x): {'PASS' if verdict else 'FAIL'}")
    print(f"(one layer + generated background, for scale: {one_layer_with_bg:.2f} s)")
    result = {
        "benchmark": "multilayer", "what": "MultiLayerPipeline region-crop vs full-attention cost",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "model": "tiny-random" if args.tiny else str(args.model or "assets/layergen-mini"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
        "rows": rows, "one_layer_with_background_seconds": one_layer_with_bg,
        "bar": {"speedup_at_32": SPEEDUP_MIN_AT_32, "pass": verdict},
    }
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
