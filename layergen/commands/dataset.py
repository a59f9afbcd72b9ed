"""`layergen dataset build SRC -o DST`: a folder of PSD / ORA / flat images -> layer training records."""
from __future__ import annotations

import argparse

from ..seeds import seed_arg

ORDER = 70


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "dataset",
        help="build layer training data (for training/train_layer_lora.py) from PSD/ORA/flat images",
        description="Training data for fine-tuning on your own layers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="dataset_command", metavar="ACTION")
    b = sub.add_parser(
        "build",
        help="turn a folder of PSD/ORA/PNG-stack/flat images into RGBA layer records",
        description="Turn every file under SRC into training records in DST (an imagefolder:\n"
                    "images/*.png RGBA layers, backgrounds/*.png, metadata.jsonl with captions):\n"
                    "  .psd / .ora / PNG-stack .zip or folder: one record per visible layer, the layers\n"
                    "        below it flattened as its background;\n"
                    "  transparent .png / .webp: one record;\n"
                    "  flat images (.jpg, opaque .png, ...): decomposed into background + instance layers\n"
                    "        first (MuLAn-style), one record per instance.\n"
                    "Captions: SRC/metadata.jsonl ('file_name', 'text'), a .txt beside the file, a layer's\n"
                    "name (unless generic like 'Layer 3'), else the file name. Bad files (corrupt, no\n"
                    "alpha, empty, tiny) are skipped and counted. Re-running resumes: finished sources are\n"
                    "kept. Under `accelerate launch` the files are shared between processes.",
        epilog="examples:\n"
               "  layergen dataset build designs/ -o data/my_layers\n"
               "  layergen dataset build photos/ -o data/photo_layers --layers 3 --learned\n"
               "  accelerate launch -m layergen.cli dataset build big_folder/ -o data/big\n"
               "then: accelerate launch training/train_layer_lora.py --train_data_dir data/my_layers ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("src", metavar="SRC", help="folder of .psd, .ora, .zip, PNG-stack folders and images")
    b.add_argument("-o", "--output", required=True, metavar="DST", help="output folder (created; resumable)")
    b.add_argument("--min-size", type=int, default=8, metavar="PX",
                   help="skip layers whose visible content is smaller than this (default 8)")
    b.add_argument("--caption-column", default="text", help="caption key in SRC/metadata.jsonl (default: text)")
    b.add_argument("--no-decompose", action="store_true", help="skip flat images instead of decomposing them")
    b.add_argument("--layers", type=int, metavar="N", help="at most N instance layers per flat image")
    b.add_argument("--learned", action="store_true", help="decompose with the bundled learned mini decomposer")
    b.add_argument("--model", metavar="DIR", help="a learned decomposer folder (implies --learned)")
    b.add_argument("--matting", choices=["closed_form", "hard"], default="closed_form",
                   help="alpha matting of the classical decomposition (default: closed_form)")
    b.add_argument("--seed", type=seed_arg, default=0)
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=run_build)
    p.set_defaults(func=lambda args: _usage(p))


def _usage(parser) -> int:
    parser.print_help()
    return 2


def make_decomposer(args):
    """image (H x W x 3 uint8) -> LayerStack, or None with --no-decompose. Built lazily (weights, numba)."""
    if args.no_decompose:
        return None
    state = {}

    def decompose(rgb):
        import torch

        if "pipe" not in state:
            from ..decompose.matting import MATTINGS
            from ..pipelines.pipeline_decomposition import DecompositionPipeline

            if args.model or args.learned:
                from ..decompose.learned import load_decomposition_pipeline

                pipe = load_decomposition_pipeline(args.model)
            else:
                pipe = DecompositionPipeline(matting=MATTINGS[args.matting]())
            pipe.set_progress_bar_config(disable=True)
            state["pipe"] = pipe
        out = state["pipe"](rgb, num_layers=args.layers, generator=torch.Generator().manual_seed(args.seed))
        return out.stack

    return decompose


def run_build(args) -> int:
    from ..data.build import DatasetBuilder
    from ..errors import LayergenError

    if args.layers is not None and args.layers < 1:
        raise LayergenError(f"--layers must be >= 1, got {args.layers}")
    if args.min_size < 1:
        raise LayergenError(f"--min-size must be >= 1, got {args.min_size}")
    builder = DatasetBuilder(args.src, args.output, make_decomposer(args), args.min_size, args.caption_column)
    summary = builder.run(progress=not args.quiet)
    if summary is not None:  # main process
        print(summary.line())
    return 0
