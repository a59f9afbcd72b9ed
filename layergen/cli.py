"""The `layergen` command line. Thin: parse -> call the library -> save a LayerStack.

Subcommands live in `layergen/commands/<name>.py`; each module defines
`register(subparsers)` (adding one parser with `func=` set) and an `ORDER`
number for `--help`. Modules must be cheap to import: import torch and
pipelines inside the command function, not at module level.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from .errors import LayergenError

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    from . import __version__, commands

    parser = argparse.ArgumentParser(
        prog="layergen",
        description="Generate, decompose, compose and export layered images (PSD, OpenRaster, PNG stacks).",
        epilog="Run 'layergen COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"layergen {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = [importlib.import_module(f"{commands.__name__}.{m.name}")
               for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")]
    for module in sorted(modules, key=lambda m: (getattr(m, "ORDER", 100), m.__name__)):
        module.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    import warnings

    from PIL import Image

    # every reader checks the size itself, with a message naming its own limit: Pillow's two-line warning for
    # images over 89 megapixels would only repeat it
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    try:
        return int(args.func(args) or 0)
    except LayergenError as exc:
        print(f"layergen: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `layergen info --json | head -1`: the reader left; stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # missing/unreadable/unwritable files, full disk: one line naming the file
        name = getattr(exc, "filename", None)
        print(f"layergen: error: {str(name) + ': ' if name else ''}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("layergen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
