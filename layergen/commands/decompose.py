"""`layergen decompose IMAGE -o layers.psd`: split a flat image into background + RGBA instance layers."""
from __future__ import annotations

import argparse

from ..seeds import seed_arg

ORDER = 30


def _box(text: str):
    parts = text.replace(" ", "").split(",")
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"expected x,y,w,h (four integers), got {text!r}")
    try:
        return tuple(int(float(p)) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected x,y,w,h (four integers), got {text!r}") from None


def _point(text: str):
    parts = text.replace(" ", "").split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected x,y (two integers), got {text!r}")
    try:
        return tuple(int(float(p)) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected x,y (two integers), got {text!r}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "decompose",
        help="split a flat image into a clean background and RGBA instance layers (keeps shadows/glows)",
        description="Decompose a flat image into a completed background plus one RGBA layer per instance.\n"
                    "Shadows and glows stay in their object's layer; re-compositing the layers reproduces\n"
                    "the 8-bit input exactly (the re-composite PSNR is printed: 100 dB). Without --box/--mask/\n"
                    "--point the instances are found automatically (designs: background-model residual;\n"
                    "photos: salient subject).",
        epilog="examples:\n"
               "  layergen decompose photo.png -o layers.psd\n"
               "  layergen decompose poster.png -o layers.ora --box 10,20,64,48 --box 80,30,40,40\n"
               "  layergen decompose scene.png -o out_dir --layers 3 --recursive\n"
               "  layergen decompose scene.png -o layers.psd --learned   # the learned mini decomposer",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image", metavar="IMAGE",
                   help="input image (PNG, JPEG, WebP, TIFF...; gray, RGB, 16-bit ok; .psd/.ora/.zip: their composite)")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output: .psd, .ora, .zip, or a folder (PNG stack); format from the extension")
    p.add_argument("--box", type=_box, action="append", metavar="X,Y,W,H",
                   help="an instance's bounding box in pixels; repeat for several instances")
    p.add_argument("--point", type=_point, action="append", metavar="X,Y",
                   help="a click on an instance; repeat for several instances")
    p.add_argument("--mask", action="append", metavar="PNG",
                   help="an instance mask image (white = instance) of the input's size; repeat for several")
    p.add_argument("--layers", type=int, metavar="N", help="at most N instance layers")
    p.add_argument("--recursive", action="store_true",
                   help="peel the top layer and search again on what is revealed, up to --layers times")
    p.add_argument("--model", metavar="DIR",
                   help="a learned decomposer folder (layer_matte/, or decomposer/ + vae/); default: the classical "
                        "pipeline, or the bundled mini family (assets/layergen-mini) when --learned is given")
    p.add_argument("--learned", action="store_true", help="use the bundled learned mini decomposer")
    p.add_argument("--steps", type=int, default=20,
                   help="denoising steps of a latent-diffusion decomposer (default 20; the layer matte takes one pass)")
    p.add_argument("--completion", choices=["structure", "biharmonic", "opencv", "pyramid"], default="structure",
                   help="background completion of the classical pipeline (default: structure)")
    p.add_argument("--matting", choices=["closed_form", "hard"], default="closed_form",
                   help="alpha matting of the classical pipeline (default: closed_form)")
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    from ..atomic import check_writable
    from ..errors import LayergenError
    from ..layers.formats import detect_format, save

    if args.layers is not None and args.layers < 1:
        raise LayergenError(f"--layers must be >= 1, got {args.layers}")
    if args.steps < 1:
        raise LayergenError(f"--steps must be >= 1, got {args.steps}")
    if sum(x is not None for x in (args.box, args.point, args.mask)) > 1:
        raise LayergenError("give only one kind of guidance: --box, --point or --mask")
    try:
        fmt = detect_format(args.output)
    except LayergenError as exc:  # its list of formats includes the flat ones, which decompose cannot write
        raise LayergenError(f"{args.output}: unsupported output; use .psd, .ora, .zip or a folder") from exc
    if fmt in ("png", "webp"):
        raise LayergenError(f"{args.output}: a flat image cannot hold layers; use .psd, .ora, .zip or a folder")
    check_writable(args.output)

    import torch

    from ..decompose.completion import COMPLETERS
    from ..decompose.matting import MATTINGS
    from ..pipelines.pipeline_decomposition import DecompositionPipeline, load_image

    masks = None
    if args.mask:
        from PIL import Image

        masks = []
        for path in args.mask:
            try:
                with Image.open(path) as im:
                    masks.append(np.asarray(im.convert("L")))
            except OSError as exc:
                raise LayergenError(f"{path}: cannot read mask ({exc})") from None
    image = load_image(args.image)
    completion = COMPLETERS[args.completion]()
    matting = MATTINGS[args.matting]()
    if args.model or args.learned:
        from ..decompose.learned import load_decomposition_pipeline

        pipe = load_decomposition_pipeline(args.model, completion=completion)
    else:
        pipe = DecompositionPipeline(completion=completion, matting=matting)
    pipe.set_progress_bar_config(disable=args.quiet, desc="decompose", unit="layer")
    out = pipe(image, boxes=args.box, masks=masks, points=args.point, num_layers=args.layers,
               recursive=args.recursive, num_inference_steps=args.steps,
               generator=torch.Generator("cpu").manual_seed(args.seed))
    path = save(out.stack, args.output)
    n = len(out.stack) - 1
    print(f"wrote {path} (background + {n} instance layer{'s' * (n != 1)}, {out.stack.width}x{out.stack.height}; "
          f"re-composite PSNR {out.psnr:.1f} dB, {out.seconds:.1f} s)")
    for note in out.stack.metadata.get("notes", []):
        print(f"note: {note}")
    return 0
