"""`layergen info FILE`: what is inside a layered file (canvas, format, every layer bottom -> top)."""
from __future__ import annotations

import argparse
import json

ORDER = 80


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "info",
        help="show the canvas and layers of a layered file",
        description="Show the canvas size, format and every layer (bottom -> top) of a .ora, .psd,\n"
                    ".zip, PNG-stack folder, or flat .png/.webp file: name, size, offset, opacity,\n"
                    "blend mode, visibility and kind.",
        epilog="example: layergen info assets/samples/sample.ora --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", metavar="FILE", help="layered file or PNG-stack folder to inspect")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    p.set_defaults(func=run)


def describe(stack, path, fmt) -> dict:
    return {
        "file": str(path), "format": fmt, "width": stack.width, "height": stack.height,
        "metadata": stack.metadata,
        "layers": [{
            "index": i, "name": l.name, "width": l.width, "height": l.height, "x": l.x, "y": l.y,
            "opacity": l.opacity, "blend_mode": l.blend_mode, "visible": l.visible, "kind": l.kind,
            "metadata": l.metadata,
        } for i, l in enumerate(stack.layers)],
    }


def run(args) -> int:
    from ..layers.formats import detect_format, load
    from ..layers.formats._common import dumps_metadata

    fmt = detect_format(args.file)
    stack = load(args.file)
    info = describe(stack, args.file, fmt)
    if args.json:
        print(json.dumps(json.loads(dumps_metadata(info)), indent=2, ensure_ascii=False))
        return 0
    print(f"{args.file}: {fmt}, {stack.width}x{stack.height}, {len(stack)} layer{'s' * (len(stack) != 1)}"
          " (bottom -> top)")
    rows = [("#", "name", "size", "offset", "opacity", "blend", "visible", "kind")]
    for e in info["layers"]:
        rows.append((str(e["index"]), e["name"], f"{e['width']}x{e['height']}", f"{e['x']},{e['y']}",
                     f"{e['opacity']:.3f}", e["blend_mode"], "yes" if e["visible"] else "no", e["kind"] or "-"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    for note in stack.metadata.get("notes", []) if isinstance(stack.metadata.get("notes"), list) else []:
        print(f"note: {note}")
    return 0
