"""`layergen generate PROMPT -o OUT`: text -> transparent RGBA layer, optionally conditioned on a background or
a foreground, saved as an RGBA PNG or as a layered document (background + layer).

The command is a dispatch on *mode*: each mode is chosen by at most one flag (`MODE_FLAGS`)
and implemented by one function in `MODES` that takes the loaded pipeline and a `Request` and
returns `Result`s (a LayerStack + which layer a flat PNG holds). Adding a mode (e.g. a layout)
is: add its flag in `register`, one entry in `MODE_FLAGS`, one function in `MODES`.
"""
from __future__ import annotations

import argparse
import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..seeds import check_seed, seed_arg

ORDER = 10

DEFAULT_BG_PROMPT = "a soft gradient background"
SCHEDULERS = {  # name -> diffusers class; swapped in with from_config, so the model's noise schedule is kept
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "unipc": "UniPCMultistepScheduler",
}
OUTPUT_FORMATS = ("png", "webp", "ora", "psd", "zip", "dir")
FLAT_FORMATS = ("png", "webp")
FORMAT_SUFFIX = {"png": ".png", "webp": ".webp", "ora": ".ora", "psd": ".psd", "zip": ".zip", "dir": ""}

# mode name -> the argparse dest of the flag that selects it (plain text -> layer has no flag)
MODE_FLAGS = {"background": "bg", "foreground": "fg", "layout": "layout", "boxes": "box"}
LAYOUT_MODES = ("layout", "boxes")
LAYOUT_SEED_STRIDE = 65  # image k of a layout run uses seed + 65 k: its background and <= 64 layers use seed .. seed + 64


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate transparent RGBA layers from text: one layer (optionally on a background / behind a "
             "foreground), or one per box of a layout",
        description="Generate a transparent RGBA layer from a text prompt with a latent-transparency model\n"
                    "(the bundled layergen-mini by default, or any compatible diffusers folder via --model).\n\n"
                    "Output: a .png/.webp holds the generated layer alone (RGBA). A layered format\n"
                    "(.ora, .psd, .zip, folder) holds a real 2-layer document: a background is generated\n"
                    "behind the layer from --bg-prompt (skip it with --no-background). With --layout/--box\n"
                    "the document holds the background + one layer per box, and a .png/.webp the composite.\n\n"
                    "Conditional modes (at most one):\n"
                    "  --bg IMAGE        the layer is generated to fit onto IMAGE (background-conditioned\n"
                    "                    foreground); the document is IMAGE + the new layer.\n"
                    "  --fg RGBA_IMAGE   PROMPT describes a background generated to fit behind the\n"
                    "                    transparent RGBA_IMAGE; the document is the new background + RGBA_IMAGE,\n"
                    "                    and a .png output holds the new background.\n\n"
                    "Files are written atomically: on any error nothing is left behind.",
        epilog="examples:\n"
               "  layergen generate \"a red glass star with a soft shadow\" -o star.png\n"
               "  layergen generate \"a blue ring\" -o ring.psd --bg-prompt \"a horizon with a blue sky\"\n"
               "  layergen generate \"a yellow heart\" --bg photo.jpg -o heart_on_photo.ora\n"
               "  layergen generate \"a purple and teal striped background\" --fg star.png -o scene.psd\n"
               "  layergen generate \"a green cross\" -o cross.png --num-images 4 --seed 7  # cross_0..3.png\n"
               "  layergen generate \"a red star and a blue ring on a grey gradient background\" -o scene.psd \\\n"
               "      --box 8,8,48,48 --box \"64,56,56,56:a blue glass ring\"     # background + 2 layers\n"
               "  layergen generate \"a red star, a blue ring on a sky\" --layout layout.json -o scene.ora",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompt", metavar="PROMPT", help="what to generate (the layer; with --fg: the background)")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output path; the format comes from its extension unless --format is given")
    p.add_argument("--format", choices=OUTPUT_FORMATS,
                   help="png/webp: the generated layer alone; ora/psd/zip/dir: the layered document")

    cond = p.add_argument_group("conditioning (at most one)")
    cond.add_argument("--bg", metavar="IMAGE", help="generate the layer to fit onto this background image")
    cond.add_argument("--fg", metavar="RGBA_IMAGE",
                      help="generate a background (described by PROMPT) behind this transparent foreground")
    cond.add_argument("--bg-prompt", default=DEFAULT_BG_PROMPT, metavar="TEXT",
                      help=f"prompt of the background generated behind the layer for layered outputs "
                           f"(default: {DEFAULT_BG_PROMPT!r})")
    cond.add_argument("--no-background", action="store_true",
                      help="layered outputs hold the layer alone (no background is generated)")

    lay = p.add_argument_group(
        "layout: multi-layer generation (PROMPT is the global prompt; background + one layer per box; "
        "a .png/.webp gets the composite; docs/multilayer.md)")
    lay.add_argument("--layout", metavar="LAYOUT_JSON",
                     help="the boxes (and optional per-box prompts) from a layout.json; it sets the canvas size")
    lay.add_argument("--box", action="append", metavar="X,Y,W,H[:PROMPT]",
                     help="one layer's box in canvas pixels, optionally with its own prompt (otherwise it takes "
                          "a phrase of PROMPT); repeat for up to 64 layers, bottom -> top")

    gen = p.add_argument_group("sampling")
    gen.add_argument("--model", metavar="PATH",
                     help="local diffusers folder of a latent-transparency pipeline (default: bundled layergen-mini)")
    gen.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    gen.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default: 5.0)")
    gen.add_argument("--seed", type=seed_arg, default=0,
                     help="random seed, 0 .. 2**63-1; image k uses seed + k (with a layout: seed + 65 k) (default: 0)")
    gen.add_argument("--negative-prompt", default=None, metavar="TEXT", help="what the layer should not show")
    gen.add_argument("--scheduler", choices=sorted(SCHEDULERS),
                     help="sampler (default: the model's own; the mini uses dpm)")
    gen.add_argument("--no-tta", action="store_true",
                     help="decode alpha with one pass instead of 8 flipped/rotated passes (faster, rougher edges)")
    gen.add_argument("--size", metavar="N|WxH",
                     help="canvas size, e.g. 128 or 192x128 (default: the model's native size; with --bg/--fg "
                          "the image's aspect ratio at the model's native size)")
    gen.add_argument("--width", type=int, help="canvas width (overrides --size)")
    gen.add_argument("--height", type=int, help="canvas height (overrides --size)")
    gen.add_argument("--num-images", type=int, default=1, metavar="N",
                     help="images to generate; N > 1 writes OUT_0, OUT_1, ... (default: 1)")
    gen.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


# --------------------------------------------------------------------------------------------
# request: everything checked before the (slow) model load


@dataclass
class Request:
    mode: str
    prompt: str
    outputs: list[Path]
    format: str
    steps: int
    guidance: float
    seed: int
    negative_prompt: str | None
    tta: bool
    width: int | None
    height: int | None
    num_images: int
    bg_prompt: str
    background: bool  # layered outputs get a generated background (text mode)
    condition: object = None  # uint8 RGBA array of --bg / --fg
    extra: dict = field(default_factory=dict)  # room for modes with their own inputs (layouts, boxes)

    @property
    def layered(self) -> bool:
        return self.format not in FLAT_FORMATS


@dataclass
class Result:
    stack: object  # LayerStack, bottom -> top
    primary: int | None  # index of the layer a flat output holds; None = the composite


def select_mode(args) -> str:
    """The mode picked by the flags; an error if two conditioning flags are given."""
    chosen = [mode for mode, dest in MODE_FLAGS.items() if getattr(args, dest, None)]
    if len(chosen) > 1:
        flags = " and ".join(f"--{MODE_FLAGS[m].replace('_', '-')}" for m in chosen)
        raise _error(f"{flags} cannot be combined; pick one conditioning mode")
    return chosen[0] if chosen else "text"


def parse_size(text: str | None) -> tuple[int | None, int | None]:
    if text is None:
        return None, None
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX\u00d7,]\s*(\d+))?\s*", text)
    if not m:
        raise _error(f"--size {text!r}: expected N or WxH, e.g. 128 or 192x128")
    w = int(m.group(1))
    return w, int(m.group(2)) if m.group(2) else w


def output_format(path: str, fmt: str | None) -> str:
    if fmt:
        return fmt
    from ..layers.formats import detect_format

    return detect_format(path)


def output_paths(path: str, fmt: str, n: int) -> list[Path]:
    """OUT, or OUT_0 .. OUT_{n-1} (suffix kept); a missing suffix is added for file formats."""
    path = Path(path)
    if fmt != "dir" and not path.suffix:
        path = path.with_suffix(FORMAT_SUFFIX[fmt])
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{k}{path.suffix}") for k in range(n)]


def read_image(path: str, flag: str):
    """An 8-bit image file (any Pillow format, or a layered file: its composite) -> uint8 H x W x 4."""
    from ..errors import FormatError
    from ..layers.formats import FORMATS, load
    from ..layers.formats._common import decode_image

    p = Path(path)
    if not p.exists():
        raise _error(f"{flag} {path}: no such file")
    known = {ext for info in FORMATS.values() for ext in info.extensions}
    try:
        if p.is_dir() or p.suffix.lower() in known:
            return load(p).composite()
        return decode_image(p.read_bytes(), str(p))
    except FormatError as exc:
        raise _error(f"{flag} {exc}") from exc
    except OSError as exc:
        raise _error(f"{flag} {path}: cannot read ({exc.strerror or exc})") from exc


def build_request(args) -> Request:
    from ..atomic import check_writable
    from ..layout import MAX_LAYERS

    mode = select_mode(args)
    prompt = (args.prompt or "").strip()
    if not prompt:
        raise _error("PROMPT is empty; describe the layer, e.g. 'a red glass star with a soft shadow'")
    for name in ("steps", "num_images"):
        if getattr(args, name) < 1:
            raise _error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.guidance == args.guidance or abs(args.guidance) == float("inf"):
        raise _error(f"--guidance must be a finite number, got {args.guidance}")
    width, height = parse_size(args.size)
    width = args.width if args.width is not None else width
    height = args.height if args.height is not None else height
    for name, v in (("width", width), ("height", height)):
        if v is not None and not 8 <= v <= 4096:
            raise _error(f"{name} must be in [8, 4096], got {v}")
    if (width is None) != (height is None) and mode == "text":
        width, height = width or height, height or width  # one side given: square
    span = LAYOUT_SEED_STRIDE * args.num_images if mode in LAYOUT_MODES else args.num_images
    check_seed(args.seed, "--seed", span)
    fmt = output_format(args.output, args.format)
    outputs = output_paths(args.output, fmt, args.num_images)
    for out in outputs:
        if fmt != "dir" and out.is_dir():
            raise _error(f"{out}: is a folder; cannot write a .{fmt} file there")
    check_writable(outputs[0])
    if mode in ("background", "foreground"):
        ignored = [f for f, given in (("--no-background", args.no_background),
                                      ("--bg-prompt", (args.bg_prompt or "").strip() not in ("", DEFAULT_BG_PROMPT)))
                   if given]
        if ignored:
            raise _error(f"{' and '.join(ignored)} cannot be used with --{MODE_FLAGS[mode]}: "
                         + ("the document is IMAGE + the new layer" if mode == "background" else
                            "PROMPT describes the background"))
    if args.box and len(args.box) > MAX_LAYERS:
        raise _error(f"at most {MAX_LAYERS} --box flags, got {len(args.box)}")
    condition = None
    if mode == "background":
        condition = read_image(args.bg, "--bg")
    elif mode == "foreground":
        condition = read_image(args.fg, "--fg")
        if (condition[..., 3] == 255).all():
            raise _error(f"--fg {args.fg}: the image has no transparency; pass an RGBA foreground "
                         "(e.g. one written by 'layergen generate')")
        if not condition[..., 3].any():
            raise _error(f"--fg {args.fg}: the image is fully transparent")
    extra = {}
    if mode in LAYOUT_MODES:
        extra["layout"] = read_layout(args, prompt, width, height)
    return Request(mode=mode, prompt=prompt, outputs=outputs, format=fmt, steps=args.steps,
                   guidance=float(args.guidance), seed=args.seed, negative_prompt=args.negative_prompt,
                   tta=not args.no_tta, width=width, height=height, num_images=args.num_images,
                   bg_prompt=(args.bg_prompt or "").strip() or DEFAULT_BG_PROMPT,
                   background=not args.no_background, condition=condition, extra=extra)


def read_layout(args, prompt: str, width, height):
    """--layout: a validated Layout (PROMPT replaces its prompt); --box: parsed boxes (the canvas is known
    once the model is loaded, the pipeline validates them then). --bg-prompt, if given, names the background."""
    from ..layout import Layout, load_layout, parse_box

    bg = (args.bg_prompt or "").strip()
    bg = bg if bg and bg != DEFAULT_BG_PROMPT else None
    if args.box:
        boxes = [parse_box(b) for b in args.box]
        if width and height:  # the canvas is known: check the boxes now, not after the model load
            Layout(width, height, boxes, prompt, bg)
        return {"boxes": boxes, "background": bg}
    if Path(args.layout).is_dir():
        raise _error(f"--layout {args.layout}: is a folder; pass a layout.json file")
    if not Path(args.layout).is_file():
        raise _error(f"--layout {args.layout}: no such file")
    layout = load_layout(args.layout)
    if (width and width != layout.width) or (height and height != layout.height):
        raise _error(f"--size/--width/--height disagree with the {layout.width}x{layout.height} canvas of "
                     f"{args.layout}; leave them out (the layout sets the canvas)")
    return Layout(layout.width, layout.height, layout.boxes, prompt, bg or layout.background)


# --------------------------------------------------------------------------------------------
# pipeline


def load_pipeline(model: str | None, scheduler: str | None = None, quiet: bool = False):
    """TransparentLayerPipeline from a local folder (default: the bundled mini), scheduler swapped if asked."""
    from ..mini import mini_path
    from ..pipelines import TransparentLayerPipeline

    path = Path(model) if model else mini_path()
    if not model and not (path / "model_index.json").is_file():
        from ..errors import ModelNotFoundError

        raise ModelNotFoundError(f"the bundled layergen-mini at {path} is incomplete (no model_index.json); "
                                 "pass --model PATH (a local diffusers pipeline folder)")
    with _loading_bars(not quiet):
        pipe = TransparentLayerPipeline.from_pretrained(path)
    if scheduler:
        import diffusers

        pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=quiet, leave=False)
    return pipe


@contextlib.contextmanager
def _loading_bars(enabled: bool):
    """diffusers/transformers show loading bars globally; switch them off for --quiet, then restore."""
    if enabled:
        yield
        return
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    d_was, t_was = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if d_was:
            dlog.enable_progress_bar()
        if t_was:
            tlog.enable_progress_bar()


def sibling(pipe, cls):
    """Another task pipeline sharing the loaded components (no second load, no extra memory)."""
    other = cls(**pipe.components)
    other.register_to_config(_name_or_path=pipe.config.get("_name_or_path"))  # layers record the model they came from
    other.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return other


def takes_condition(pipe) -> bool:
    return pipe.unet.config.in_channels == 2 * pipe.vae.config.latent_channels


def conditioned_size(req: Request, pipe) -> tuple[int, int]:
    """Canvas for --bg/--fg: the explicit size, else the image's aspect at the model's native size."""
    if req.width and req.height:
        return req.width, req.height
    h, w = req.condition.shape[:2]
    native, f = pipe.default_size(), pipe.vae_scale_factor
    if req.width or req.height:  # one side given: keep the aspect
        scale = (req.width / w) if req.width else (req.height / h)
    else:
        scale = native / max(w, h)
    return (req.width or max(f, round(w * scale / f) * f)), (req.height or max(f, round(h * scale / f) * f))


def _common(req: Request, width, height) -> dict:
    return dict(height=height, width=width, num_inference_steps=req.steps, guidance_scale=req.guidance,
                negative_prompt=req.negative_prompt)


def generate_text(pipe, req: Request) -> list[Result]:
    """Text -> layer; for layered outputs a background is generated behind it (a real 2-layer document)."""
    out = pipe(req.prompt, num_images_per_prompt=req.num_images, seed=req.seed, tta=req.tta, output_type="stack",
               **_common(req, req.width, req.height))
    stacks = out.stacks
    if not (req.layered and req.background):
        return [Result(s, 0) for s in stacks]
    if not takes_condition(pipe):
        _note("this model has no background-behind-foreground task (its UNet takes no condition); "
              "the document holds the layer alone")
        return [Result(s, 0) for s in stacks]
    from ..pipelines import BackgroundBehindForegroundPipeline

    bg_pipe = sibling(pipe, BackgroundBehindForegroundPipeline)
    results = []
    for k, stack in enumerate(stacks):
        layer = stack[0]
        doc = bg_pipe(req.bg_prompt, layer, seed=req.seed + k, output_type="stack",
                      **_common(req, stack.width, stack.height)).stacks[0]
        doc.metadata.update(stack.metadata)
        results.append(Result(doc, 1))
    return results


def _require_condition(pipe, flag: str, task: str) -> None:
    if not takes_condition(pipe):
        from ..errors import LayergenError

        raise LayergenError(
            f"{flag} needs a model trained for {task} (a UNet with {2 * pipe.vae.config.latent_channels} input "
            f"channels); this one has {pipe.unet.config.in_channels}. Use the bundled layergen-mini or a "
            "LayerDiffuse-style conditional model")


def generate_on_background(pipe, req: Request) -> list[Result]:
    """--bg: a layer that fits onto the given background; document = background + layer."""
    from ..pipelines import ForegroundOnBackgroundPipeline

    _require_condition(pipe, "--bg", "background-conditioned foregrounds")
    width, height = conditioned_size(req, pipe)
    fg_pipe = sibling(pipe, ForegroundOnBackgroundPipeline)
    out = fg_pipe(req.prompt, req.condition, num_images_per_prompt=req.num_images, seed=req.seed, tta=req.tta,
                  output_type="stack", **_common(req, width, height))
    return [Result(s, 1) for s in out.stacks]


def generate_behind_foreground(pipe, req: Request) -> list[Result]:
    """--fg: a background (PROMPT) behind the given RGBA foreground; document = background + foreground."""
    from ..pipelines import BackgroundBehindForegroundPipeline

    _require_condition(pipe, "--fg", "foreground-conditioned backgrounds")
    width, height = conditioned_size(req, pipe)
    bg_pipe = sibling(pipe, BackgroundBehindForegroundPipeline)
    out = bg_pipe(req.prompt, req.condition, num_images_per_prompt=req.num_images, seed=req.seed,
                  output_type="stack", **_common(req, width, height))
    return [Result(s, 0) for s in out.stacks]


def generate_layout(pipe, req: Request) -> list[Result]:
    """--layout / --box: background + one layer per box (MultiLayerPipeline); flat outputs get the composite."""
    from ..layout import Layout
    from ..pipelines import MultiLayerPipeline

    spec = req.extra["layout"]
    if not isinstance(spec, Layout):
        size = pipe.default_size()
        w, h = req.width or req.height or size, req.height or req.width or size
        spec = Layout.from_boxes(spec["boxes"], w, h, prompt=req.prompt, background=spec["background"])
    ml = sibling(pipe, MultiLayerPipeline)
    results = []
    for k in range(req.num_images):
        stack = ml(layout=spec, seed=req.seed + LAYOUT_SEED_STRIDE * k, num_inference_steps=req.steps,
                   guidance_scale=req.guidance, negative_prompt=req.negative_prompt, tta=req.tta,
                   output_type="stack").stacks[0]
        if req.layered and not req.background:
            stack.remove(0)
        results.append(Result(stack, None))
    return results


MODES = {"text": generate_text, "background": generate_on_background, "foreground": generate_behind_foreground,
         "layout": generate_layout, "boxes": generate_layout}


# --------------------------------------------------------------------------------------------
# output


def to_output_stack(result: Result, req: Request):
    """What gets written: the whole document, or for png/webp the primary layer alone."""
    from ..layers import LayerStack

    stack = result.stack
    if req.layered or result.primary is None:
        return stack
    return LayerStack(stack.width, stack.height, [stack[result.primary]], metadata=dict(stack.metadata))


def write_results(results: list[Result], req: Request) -> list[Path]:
    from ..layers.formats import save

    written = []
    for result, path in zip(results, req.outputs):
        stack = to_output_stack(result, req)
        written.append(save(stack, path, format=req.format))
        n = len(stack)
        meta = result.stack[result.primary if result.primary is not None else 0].metadata
        seed = result.stack.metadata.get("seed", meta.get("seed"))  # a layout's seed, not its top layer's
        seed = f", seed {seed}" if seed is not None else ""
        what = (f"{n} layer{'s' * (n != 1)}" if req.layered else
                f"composite of {n} layers" if n > 1 else "1 layer")
        print(f"wrote {path} ({what}, {stack.width}x{stack.height}{seed})")
    return written


def run(args) -> int:
    req = build_request(args)  # every cheap check first: no model load for a bad argument
    pipe = load_pipeline(args.model, args.scheduler, quiet=args.quiet)
    results = MODES[req.mode](pipe, req)
    stamp = {"mode": req.mode, "steps": req.steps, "guidance_scale": req.guidance,
             "scheduler": type(pipe.scheduler).__name__, "model": str(args.model or "layergen-mini")}
    for r in results:
        r.stack.metadata.setdefault("generator", stamp)
    write_results(results, req)
    return 0


def _error(message: str):
    from ..errors import LayergenError

    return LayergenError(message)


def _note(message: str) -> None:
    import sys

    print(f"layergen: note: {message}", file=sys.stderr)
