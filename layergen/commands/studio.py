"""`layergen studio`: serve the Gradio layer studio on localhost."""
from __future__ import annotations

import argparse

ORDER = 90


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "studio",
        help="launch the layer studio (Gradio app) in your browser",
        description="Serve the layer studio on this machine: generate transparent layers, lay out many at\n"
                    "once, repaint one, decompose a picture, edit the stack, export PSD / OpenRaster; a\n"
                    "'3D human' tab generates layered 3D humans (meshes you can orbit, turntables).\n"
                    "Runs on the bundled mini models unless --model/--decompose-model are given; without\n"
                    "any weights it falls back to a procedural demo backend (say so with --procedural).\n"
                    "It listens on 127.0.0.1 only unless --host says otherwise; no public share links.",
        epilog="examples:\n"
               "  layergen studio                       # then open http://127.0.0.1:7860\n"
               "  layergen studio --port 8000 --open\n"
               "  layergen studio --model path/to/transparent-checkpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1; 0.0.0.0 exposes it to your network)")
    p.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    p.add_argument("--model", metavar="PATH", help="transparent-layer pipeline folder (diffusers layout)")
    p.add_argument("--decompose-model", metavar="PATH", help="decomposition pipeline folder (diffusers layout)")
    p.add_argument("--human-model", metavar="PATH",
                   help="LayeredHumanPipeline folder for the 3D human tab (default: bundled layergen-mini human)")
    p.add_argument("--action-model", metavar="PATH",
                   help="ActionPipeline folder for the Actions tab (default: bundled layergen-mini action model)")
    p.add_argument("--procedural", action="store_true",
                   help="use the procedural demo backend (no weights; deterministic shapes)")
    p.add_argument("--max-upload-mb", type=int, default=64, help="largest file a user may upload (default 64)")
    p.add_argument("--open", action="store_true", help="open the studio in the default web browser")
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    from ..errors import LayergenError

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if args.port is not None and not 1 <= args.port <= 65535:
        raise LayergenError(f"--port must be in 1..65535, got {args.port}")
    if args.max_upload_mb < 1:
        raise LayergenError(f"--max-upload-mb must be at least 1, got {args.max_upload_mb}")
    if args.procedural and (args.model or args.decompose_model):
        raise LayergenError("--procedural cannot be combined with --model/--decompose-model")
    from ..studio.backends import ProceduralBackend, default_backends

    backends = ProceduralBackend() if args.procedural else default_backends(args.model, args.decompose_model)
    print(f"layergen studio: backend = {backends.description or backends.name}")
    from ..studio.app import default_extra_tabs, launch

    from ..mini import check_model_dir

    for path in (args.human_model, args.action_model):
        if path:
            check_model_dir(path)
    launch(backends, host=args.host, port=args.port, inbrowser=args.open, max_upload_bytes=args.max_upload_mb * 2**20,
           extra_tabs=default_extra_tabs(args.human_model, args.action_model))
    return 0
