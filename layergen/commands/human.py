"""`layergen human`: generate a layered 3D human (body first, then clothing layers)."""
from __future__ import annotations

import argparse
import json

from ..seeds import seed_arg

ORDER = 45


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "human",
        help="generate a layered 3D human: body, then clothing layers (meshes, turntables, tri-planes)",
        description="Sample a body tri-plane, then each clothing layer conditioned on the one below\n"
                    "(HumanLiff-style), and write per-layer coloured meshes (.glb/.obj), turntable views\n"
                    "(PNG + GIF), the tri-planes and summary.json.",
        epilog="examples:\n"
               "  layergen human --layers body,pants,shirt,shoes --seed 3 -o human/\n"
               "  layergen human --layers body,pants,shirt,hat --seed 3 --body human/triplanes.safetensors -o dressed/\n"
               "layers (in this order): body, pants, shirt, shoes, hat",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--layers", default="body,pants,shirt,shoes",
                   help="comma-separated layers, body first, in the order body,pants,shirt,shoes,hat "
                        "(default: body,pants,shirt,shoes)")
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("-o", "--output", default="human", metavar="DIR", help="output folder (default: ./human)")
    p.add_argument("--model", help="LayeredHumanPipeline folder (default: bundled layergen-mini human model)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps per layer (default 25)")
    p.add_argument("--views", type=int, default=8, help="turntable views per layer (default 8)")
    p.add_argument("--size", type=int, default=64, help="view size in pixels (default 64)")
    p.add_argument("--mesh-resolution", type=int, default=64, help="marching-cubes grid (default 64)")
    p.add_argument("--mesh-format", choices=["glb", "obj"], default="glb")
    p.add_argument("--body", metavar="TRIPLANES",
                   help="triplanes.safetensors from an earlier run: keep its body (layer 0) and dress it")
    p.add_argument("--no-keep-uncovered", action="store_true",
                   help="ablation: raw tri-plane layers (no texel masking, no 3D layer supports, no "
                        "garment re-draws), so a garment can change uncovered parts")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import LayergenError
    from ..pipelines.pipeline_layered_human import (MAX_MESH_RESOLUTION, MAX_VIEW_SIZE, MAX_VIEWS,
                                                    check_human_folder, generate_human)

    for name, value, lo, hi in (("--steps", args.steps, 1, None), ("--views", args.views, 1, MAX_VIEWS),
                                ("--size", args.size, 8, MAX_VIEW_SIZE),
                                ("--mesh-resolution", args.mesh_resolution, 8, MAX_MESH_RESOLUTION)):
        if value < lo:
            raise LayergenError(f"{name} must be at least {lo}, got {value}")
        if hi is not None and value > hi:
            raise LayergenError(f"{name} must be at most {hi}, got {value}")
    check_human_folder(args.output)  # an output that is a file, or a folder of other files: before sampling
    files = generate_human(layers=args.layers, seed=args.seed, output_dir=args.output, model_path=args.model,
                           num_inference_steps=args.steps, num_views=args.views, size=args.size,
                           mesh_resolution=args.mesh_resolution, mesh_format=args.mesh_format, body=args.body,
                           keep_uncovered=not args.no_keep_uncovered, progress=True)
    for layer in files["layers"]:
        print(f"{layer['name']:>6}: {layer['mesh'] or '(empty mesh)'}  {layer['gif']}  {len(layer['views'])} views")
    print(f"summary: {files['summary']}  ({files['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps({"usage": "layergen human --help"}))
