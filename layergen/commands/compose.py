"""`layergen compose IN OUT`: convert between layered formats, optionally hiding layers or flattening."""
from __future__ import annotations

import argparse

ORDER = 70


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compose",
        help="convert a layered file to another format (ora, psd, zip, folder, png, webp)",
        description="Read a layered file and write it in another format (any to any).\n"
                    "Layered targets (.ora, .psd, .zip, folder) keep every layer; .png and .webp get the\n"
                    "flattened composite. PSD stores opacity in 8 bits (rounded to k/255).\n"
                    "The output is written atomically: on any error no file is left behind.",
        epilog="examples:\n"
               "  layergen compose assets/samples/sample.ora out.psd\n"
               "  layergen compose out.psd preview.png --hide Shadow\n"
               "  layergen compose in.ora stack_dir --format dir",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="IN", help="input file (.ora, .psd, .zip, .png, .webp) or PNG-stack folder")
    p.add_argument("output", metavar="OUT", help="output path; the format comes from its extension "
                                                 "(no extension = PNG-stack folder) unless --format is given")
    p.add_argument("--format", choices=["ora", "psd", "png", "webp", "zip", "dir"],
                   help="output format, overriding the extension of OUT")
    p.add_argument("--flatten", action="store_true",
                   help="merge all visible layers into one before writing (even to a layered format)")
    p.add_argument("--hide", metavar="NAME", action="append", default=[],
                   help="hide the layer(s) named NAME before writing; repeat for several layers")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import LayerError
    from ..layers.formats import load, save

    stack = load(args.input)
    for name in args.hide:
        matches = [l for l in stack.layers if l.name == name]
        if not matches:
            raise LayerError(f"{args.input}: no layer named {name!r}; layers: {', '.join(stack.names())}")
        for layer in matches:
            layer.visible = False
    if args.flatten:
        stack.flatten()
    out = save(stack, args.output, format=args.format)
    print(f"wrote {out} ({len(stack)} layer{'s' * (len(stack) != 1)}, {stack.width}x{stack.height})")
    return 0
