"""Layouts for multi-layer generation: a canvas, an optional global prompt, and 1..64 boxes.

A box is `x, y, w, h` in canvas pixels (x right, y down, like `Layer` offsets). A box with
its own `prompt` is *bound* (RAG-style: that text generates that layer); a box without one is
*anonymous* (ART-style: the pipeline decides which part of the global prompt goes there).

layout.json schema (version 1)::

    {
      "version": 1,
      "width": 128, "height": 128,                  # canvas in pixels
      "prompt": "a red star and a blue ring on a grey to white gradient background",  # optional
      "background": "a grey to white gradient background",                              # optional
      "boxes": [                                    # bottom -> top, 1..64 entries
        {"box": [10, 12, 40, 40], "prompt": "a red star"},   # bound box
        {"box": [60, 50, 48, 48]},                           # anonymous box
        {"box": [70, 10, 30, 30], "prompt": "a green heart", "seed": 7, "name": "heart"}
      ]
    }

`prompt` and `background` are optional; anonymous boxes need a global prompt at generation
time (from the file, or PROMPT on the command line). A box's
optional `seed` fixes that layer's noise; `name` becomes the layer name.

On the command line a box is written ``"x,y,w,h:prompt"`` (the prompt part is optional, and
may itself contain commas and colons): `parse_box("10,12,40,40:a red star")`.

This module does not import torch.
"""
from __future__ import annotations

import json
import operator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import LayergenError
from .seeds import MAX_SEED

MAX_LAYERS = 64
MAX_CANVAS = 4096
MIN_CANVAS = 8  # one latent pixel of a standard VAE (scale factor 8)
SCHEMA_VERSION = 1


class LayoutError(LayergenError, ValueError):
    """A layout (box list, layout.json, --box string) is invalid; the message says how."""


def _int(value, what: str, unit: str = " of pixels") -> int:
    """Python/numpy integers, or floats holding a whole number -> int; anything else is an error."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            return int(value)
        if isinstance(value, (float, np.floating)) and value == value:
            raise LayoutError(f"{what} must be a whole number{unit}, got {value!r}")
    raise LayoutError(f"{what} must be an integer number{unit}, got {value!r}")


def _text(value, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise LayoutError(f"{what} must be a string, got {type(value).__name__}")
    value = value.strip()
    return value or None


@dataclass
class Box:
    """One layer's region: top-left (x, y) and size (w, h) in canvas pixels, plus optional binding."""

    x: int
    y: int
    w: int
    h: int
    prompt: str | None = None
    seed: int | None = None
    name: str | None = None

    def __post_init__(self):
        self.x, self.y = _int(self.x, "box x"), _int(self.y, "box y")
        self.w, self.h = _int(self.w, "box width"), _int(self.h, "box height")
        if self.w <= 0 or self.h <= 0:
            raise LayoutError(f"box {self.xywh} must have a positive width and height")
        self.prompt = _text(self.prompt, "box prompt")
        self.name = _text(self.name, "box name")
        if self.seed is not None:
            self.seed = _int(self.seed, "box seed", unit="")
            if not 0 <= self.seed <= MAX_SEED:
                raise LayoutError(f"box seed must be in [0, {MAX_SEED}], got {self.seed}")

    @property
    def xywh(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.w, self.h

    @property
    def xyxy(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.x + self.w, self.y + self.h

    @property
    def area(self) -> int:
        return self.w * self.h

    @property
    def bound(self) -> bool:
        """True if the box carries its own prompt (RAG-style), False if anonymous (ART-style)."""
        return self.prompt is not None

    def intersects(self, other: "Box") -> bool:
        ax0, ay0, ax1, ay1 = self.xyxy
        bx0, by0, bx1, by1 = other.xyxy
        return ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1

    def to_dict(self) -> dict:
        d = {"box": list(self.xywh)}
        for key in ("prompt", "seed", "name"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d

    @classmethod
    def from_dict(cls, d, where: str = "box") -> "Box":
        if isinstance(d, (list, tuple)):
            d = {"box": list(d)}
        if not isinstance(d, dict):
            raise LayoutError(f"{where} must be an object like {{\"box\": [x, y, w, h], \"prompt\": ...}}")
        unknown = set(d) - {"box", "prompt", "seed", "name"}
        if unknown:
            raise LayoutError(f"{where}: unknown key(s) {sorted(unknown)}; expected box, prompt, seed, name")
        xywh = d.get("box")
        if not isinstance(xywh, (list, tuple)) or len(xywh) != 4:
            raise LayoutError(f"{where}: 'box' must be [x, y, w, h], got {xywh!r}")
        try:
            return cls(*xywh, prompt=d.get("prompt"), seed=d.get("seed"), name=d.get("name"))
        except LayoutError as exc:
            raise LayoutError(f"{where}: {exc}") from None


def parse_box(text: str) -> Box:
    """``"x,y,w,h"`` or ``"x,y,w,h:prompt"`` -> `Box` (the prompt may contain ':' and ',')."""
    if not isinstance(text, str):
        raise LayoutError(f"a box must be a string 'x,y,w,h:prompt', got {type(text).__name__}")
    coords, _, prompt = text.partition(":")
    parts = [p.strip() for p in coords.split(",")]
    if len(parts) != 4 or not all(parts):
        raise LayoutError(f"bad box {text!r}: expected 'x,y,w,h' or 'x,y,w,h:prompt' (integers in pixels)")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise LayoutError(f"bad box {text!r}: x, y, w, h must be integers in pixels") from None
    return Box(*nums, prompt=prompt or None)


@dataclass
class Layout:
    """A validated layout: canvas size, optional global/background prompts, 1..`MAX_LAYERS` boxes bottom -> top.

    Validation happens on construction (and again in `validate()` after edits), so a bad layout
    fails with one clear `LayoutError` before any model runs.
    """

    width: int
    height: int
    boxes: list[Box] = field(default_factory=list)
    prompt: str | None = None
    background: str | None = None

    def __post_init__(self):
        self.boxes = [b if isinstance(b, Box) else Box.from_dict(b, f"box {i}") for i, b in enumerate(self.boxes)]
        self.prompt = _text(self.prompt, "layout prompt")
        self.background = _text(self.background, "background prompt")
        self.validate()

    def validate(self) -> "Layout":
        self.width, self.height = _int(self.width, "canvas width"), _int(self.height, "canvas height")
        if not (MIN_CANVAS <= self.width <= MAX_CANVAS and MIN_CANVAS <= self.height <= MAX_CANVAS):
            raise LayoutError(f"canvas must be between {MIN_CANVAS}x{MIN_CANVAS} and {MAX_CANVAS}x{MAX_CANVAS}, "
                              f"got {self.width}x{self.height}")
        if not self.boxes:
            raise LayoutError("a layout needs at least one box (x,y,w,h)")
        if len(self.boxes) > MAX_LAYERS:
            raise LayoutError(f"a layout has at most {MAX_LAYERS} boxes, got {len(self.boxes)}")
        for i, b in enumerate(self.boxes):
            x0, y0, x1, y1 = b.xyxy
            if x0 < 0 or y0 < 0 or x1 > self.width or y1 > self.height:
                raise LayoutError(f"box {i} {b.xywh} (x,y,w,h) is not inside the {self.width}x{self.height} canvas")
        return self

    def check_prompts(self) -> "Layout":
        """Every box must get a text: its own, or a phrase of the global prompt (checked at generation time,
        so a layout.json may leave the global prompt to the command line)."""
        if self.prompt is None and not all(b.bound for b in self.boxes):
            raise LayoutError("anonymous boxes (no prompt of their own) need a global prompt to take their "
                              "content from")
        return self

    def __len__(self) -> int:
        return len(self.boxes)

    def to_dict(self) -> dict:
        d = {"version": SCHEMA_VERSION, "width": self.width, "height": self.height}
        if self.prompt is not None:
            d["prompt"] = self.prompt
        if self.background is not None:
            d["background"] = self.background
        d["boxes"] = [b.to_dict() for b in self.boxes]
        return d

    @classmethod
    def from_dict(cls, d, where: str = "layout") -> "Layout":
        if not isinstance(d, dict):
            raise LayoutError(f"{where} must be a JSON object with width, height and boxes")
        unknown = set(d) - {"version", "width", "height", "prompt", "background", "boxes"}
        if unknown:
            raise LayoutError(f"{where}: unknown key(s) {sorted(unknown)}; expected version, width, height, "
                              "prompt, background, boxes")
        if d.get("version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise LayoutError(f"{where}: unsupported layout version {d.get('version')!r} "
                              f"(this layergen reads version {SCHEMA_VERSION})")
        missing = [k for k in ("width", "height", "boxes") if k not in d]
        if missing:
            raise LayoutError(f"{where}: missing {', '.join(missing)}")
        if not isinstance(d["boxes"], list):
            raise LayoutError(f"{where}: 'boxes' must be a list")
        boxes = [Box.from_dict(b, f"{where}: box {i}") for i, b in enumerate(d["boxes"])]
        try:
            return cls(d["width"], d["height"], boxes, d.get("prompt"), d.get("background"))
        except LayoutError as exc:
            raise LayoutError(f"{where}: {exc}") from None

    @classmethod
    def from_boxes(cls, boxes, width: int, height: int, prompt: str | None = None,
                   background: str | None = None) -> "Layout":
        """From `Box`es, (x, y, w, h[, prompt]) tuples, dicts or ``"x,y,w,h:prompt"`` strings."""
        out = []
        for i, b in enumerate(boxes):
            if isinstance(b, str):
                b = parse_box(b)
            elif isinstance(b, (list, tuple)) and len(b) == 5:
                b = Box(*b[:4], prompt=b[4])
            elif not isinstance(b, Box):
                b = Box.from_dict(b, f"box {i}")
            out.append(b)
        return cls(width, height, out, prompt, background)


def load_layout(path) -> Layout:
    """Read and validate a layout.json (schema in this module's docstring)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LayoutError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise LayoutError(f"{path}: not a UTF-8 JSON file") from None
    return Layout.from_dict(data, where=str(path))


def save_layout(layout: Layout, path) -> Path:
    """Write a layout.json atomically."""
    from .atomic import write_text_atomic

    layout.validate()
    write_text_atomic(path, json.dumps(layout.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return Path(path)
