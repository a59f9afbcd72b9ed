"""Launch the layergen studio: `python apps/studio.py [--port 8000] [--model PATH] ...` (same as `layergen studio`)."""
import sys

from layergen.cli import main

sys.exit(main(["studio", *sys.argv[1:]]))
