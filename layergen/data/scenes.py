"""Procedural layered scenes: the training and benchmark data of the mini family.

Why procedural: nothing can be downloaded here, and layered ground truth
(per-object RGBA with its shadow/glow, the clean background, boxes, captions)
is exactly what layered models need and what photos never come with.

Every sample is a pure function of its seed and size. Train on seeds below
`HELDOUT_SEED_START`, evaluate on seeds at or above it.

Objects are drawn at 4x and box-filtered down, so edges are anti-aliased.
Effects live in the object's own layer (LayerDecomp convention): a drop shadow
or a glow is part of the instance, not of the background.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..layers import Layer, LayerStack

HELDOUT_SEED_START = 1_000_000
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "star", "heart", "ring", "cross", "crescent")
# Shapes the generator can draw but never samples by default: "unseen" classes for fine-tuning experiments.
EXTRA_SHAPES = ("hexagon", "arrow")
GLYPHS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")

COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 215, 40),
    "green": (40, 165, 60),
    "teal": (25, 150, 150),
    "blue": (40, 80, 220),
    "purple": (135, 55, 195),
    "pink": (240, 115, 185),
    "brown": (125, 75, 35),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "grey": (128, 128, 128),
}
MATERIALS = ("solid", "glass")
EFFECTS = ("none", "shadow", "glow")
BACKGROUNDS = ("gradient", "noise", "stripes", "horizon")
# Shape x colour pairs that training sets never contain, so benchmarks can test unseen combinations.
HELDOUT_COMBINATIONS = frozenset({("star", "green"), ("heart", "blue"), ("ring", "yellow"), ("cross", "pink"),
                                  ("crescent", "red"), ("triangle", "purple"), ("square", "orange"),
                                  ("circle", "teal")})

_EFFECT_PHRASES = {"shadow": ("with a drop shadow", "with a soft shadow"), "glow": ("with a soft glow", "glowing")}


@dataclass
class SceneObject:
    """One instance layer: the object and its effect, on a full canvas."""

    rgba: np.ndarray  # H x W x 4 uint8, straight alpha
    body_alpha: np.ndarray  # H x W float32, alpha of the object body only
    effect_alpha: np.ndarray  # H x W float32, alpha of the shadow/glow only
    shape: str
    colour: str
    material: str
    effect: str
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) of the body
    caption: str

    def to_layer(self, name: str | None = None) -> Layer:
        meta = {"kind": "instance", "prompt": self.caption, "shape": self.shape, "colour": self.colour,
                "material": self.material, "effect": self.effect, "box": list(self.box)}
        return Layer(self.rgba, name=name or f"{self.colour} {self.shape}", metadata=meta)


@dataclass
class Scene:
    seed: int
    size: int
    background: np.ndarray  # H x W x 3 uint8
    background_caption: str
    objects: list[SceneObject] = field(default_factory=list)
    composite: np.ndarray | None = None  # H x W x 3 uint8
    caption: str = ""

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        return [o.box for o in self.objects]

    def to_stack(self) -> LayerStack:
        stack = LayerStack(self.size, self.size, metadata={"caption": self.caption, "seed": self.seed})
        stack.add(Layer(self.background, name="background",
                        metadata={"kind": "background", "prompt": self.background_caption}))
        for i, obj in enumerate(self.objects):
            stack.add(obj.to_layer(f"{i + 1}: {obj.colour} {obj.shape}"))
        return stack


# ---------------------------------------------------------------------------------------------
# shape masks


def _polygon(points, cx, cy, r, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (px * c - py * s), cy + r * (px * s + py * c)) for px, py in points]


def _star_points(n=5, inner=0.45):
    pts = []
    for i in range(2 * n):
        rad = 1.0 if i % 2 == 0 else inner
        a = -math.pi / 2 + i * math.pi / n
        pts.append((rad * math.cos(a), rad * math.sin(a)))
    return pts


def _heart_points(n=64):
    pts = []
    for i in range(n):
        t = 2 * math.pi * i / n
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        pts.append((x / 17.0, (y + 2.5) / 17.0))
    return pts


_CROSS = [(-0.33, -1), (0.33, -1), (0.33, -0.33), (1, -0.33), (1, 0.33), (0.33, 0.33), (0.33, 1), (-0.33, 1),
          (-0.33, 0.33), (-1, 0.33), (-1, -0.33), (-0.33, -0.33)]
_TRIANGLE = [(0, -1), (0.95, 0.75), (-0.95, 0.75)]
_SQUARE = [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]
_HEXAGON = [(math.cos(math.pi / 3 * i), math.sin(math.pi / 3 * i)) for i in range(6)]
_ARROW = [(-1, -0.3), (0.2, -0.3), (0.2, -0.75), (1, 0), (0.2, 0.75), (0.2, 0.3), (-1, 0.3)]


def shape_mask(shape: str, size: int, cx: float, cy: float, r: float, angle: float = 0.0) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] (H x W float32) of `shape` centred at (cx, cy) with radius r (pixels)."""
    s = SUPERSAMPLE
    img = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(img)
    cx, cy, r = cx * s, cy * s, r * s
    polys = {"triangle": _TRIANGLE, "star": _star_points(), "heart": _heart_points(), "cross": _CROSS,
             "square": _SQUARE, "hexagon": _HEXAGON, "arrow": _ARROW}
    if shape in polys:
        draw.polygon(_polygon(polys[shape], cx, cy, r, angle), fill=255)
    elif shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ri = r * 0.55
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif shape == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        dx, dy = 0.45 * r * math.cos(angle), 0.45 * r * math.sin(angle)
        ri = r * 0.85
        draw.ellipse([cx + dx - ri, cy + dy - ri, cx + dx + ri, cy + dy + ri], fill=0)
    elif shape in GLYPHS:
        font = ImageFont.load_default(size=max(8, int(2.2 * r)))
        glyph = Image.new("L", img.size, 0)
        ImageDraw.Draw(glyph).text((cx, cy), shape, fill=255, font=font, anchor="mm",
                                   stroke_width=max(1, int(r * 0.08)), stroke_fill=255)
        img = glyph.rotate(math.degrees(-angle), resample=Image.BILINEAR, center=(cx, cy))
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES + EXTRA_SHAPES} or a letter/digit")
    small = img.resize((size, size), Image.BOX)
    return np.asarray(small, np.float32) / 255.0


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(a, (0, 0), sigmaX=max(sigma, 0.1), borderType=cv2.BORDER_CONSTANT)


def _shift(a: np.ndarray, dx: int, dy: int) -> np.ndarray:
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(a, m, (a.shape[1], a.shape[0]), flags=cv2.INTER_LINEAR, borderValue=0)


def _over(top_rgb, top_a, bot_rgb, bot_a):
    """Straight-alpha source-over of two float layers (H x W x 3, H x W)."""
    a = top_a + bot_a * (1 - top_a)
    num = top_rgb * top_a[..., None] + bot_rgb * (bot_a * (1 - top_a))[..., None]
    rgb = np.where(a[..., None] > 0, num / np.maximum(a[..., None], 1e-8), 0.0)
    return rgb, a


def _object_caption(shape, colour, material, effect, rng) -> str:
    noun = f"letter {shape}" if shape.isalpha() and len(shape) == 1 else (
        f"digit {shape}" if shape.isdigit() else shape)
    words = [colour] + (["glass"] if material == "glass" else []) + [noun]
    text = ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
    if effect != "none":
        phrases = _EFFECT_PHRASES[effect]
        text += " " + phrases[int(rng.integers(len(phrases)))]
    return text


def render_object(size: int, shape: str, colour: str, material: str, effect: str, cx: float, cy: float,
                  r: float, angle: float, rng: np.random.Generator) -> SceneObject:
    """Draw one object (with its effect) on a transparent `size x size` canvas."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {tuple(COLOURS)}")
    if material not in MATERIALS or effect not in EFFECTS:
        raise ValueError(f"material must be one of {MATERIALS} and effect one of {EFFECTS}")
    cover = shape_mask(shape, size, cx, cy, r, angle)
    base = np.asarray(COLOURS[colour], np.float32) / 255.0
    yy = (np.arange(size, dtype=np.float32)[:, None] - cy) / max(r, 1.0)
    shade = np.clip(1.0 + 0.08 * (-yy), 0.9, 1.1)[..., None] * np.ones((1, size, 1), np.float32)
    body_rgb = np.clip(base[None, None] * shade, 0, 1)
    body_a = cover.copy()
    if material == "glass":
        body_a = cover * float(rng.uniform(0.3, 0.7))
        edge = np.clip(cover - _blur(cover, max(1.0, r * 0.06)) * 1.0, 0, 1) * 2.0  # bright rim at the border
        rim = np.clip(edge, 0, 1)
        body_a = np.maximum(body_a, rim * 0.9 * cover)
        body_rgb = np.clip(body_rgb * 0.85 + 0.15, 0, 1)
    eff_rgb = np.zeros_like(body_rgb)
    eff_a = np.zeros_like(body_a)
    if effect == "shadow":
        off = max(2, int(round(r * rng.uniform(0.12, 0.2))))
        eff_a = _blur(_shift(cover, off, off), max(1.0, r * 0.08)) * float(rng.uniform(0.45, 0.6))
    elif effect == "glow":
        eff_a = _blur(cover, max(1.5, r * 0.18)) * 1.6
        eff_a = np.clip(eff_a, 0, 1) * float(rng.uniform(0.55, 0.75))
        eff_rgb[:] = np.clip(base * 0.6 + 0.4, 0, 1)
    eff_a = (eff_a * (1.0 - cover)).astype(np.float32)  # the effect lives outside the body
    rgb, a = _over(body_rgb, body_a, eff_rgb, eff_a)
    rgba = np.concatenate([rgb, a[..., None]], axis=-1)
    rgba_u8 = np.floor(np.clip(rgba, 0, 1) * 255 + 0.5).astype(np.uint8)
    rgba_u8[rgba_u8[..., 3] == 0, :3] = 0
    ys, xs = np.nonzero(cover > 0.02)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else (0, 0, 0, 0)
    return SceneObject(rgba_u8, body_a.astype(np.float32), eff_a, shape, colour, material, effect, box,
                       _object_caption(shape, colour, material, effect, rng))


# ---------------------------------------------------------------------------------------------
# backgrounds


def _pick_colour(rng, exclude=()):
    names = [c for c in COLOURS if c not in exclude]
    return names[int(rng.integers(len(names)))]


def _soft(colour, rng, amount=0.35):
    """A muted version of a named colour so objects stand out from backgrounds."""
    c = np.asarray(COLOURS[colour], np.float32) / 255.0
    return c * (1 - amount) + amount * float(rng.uniform(0.4, 0.9))


def render_background(size: int, rng: np.random.Generator, kind: str | None = None) -> tuple[np.ndarray, str]:
    kind = kind or BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    c1, c2 = _pick_colour(rng), _pick_colour(rng)
    a, b = _soft(c1, rng), _soft(c2, rng)
    if kind == "gradient":
        theta = rng.uniform(0, 2 * math.pi)
        t = (xx - 0.5) * math.cos(theta) + (yy - 0.5) * math.sin(theta)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = a * (1 - t[..., None]) + b * t[..., None]
        caption = f"a {c1} to {c2} gradient background"
    elif kind == "noise":
        cells = int(rng.integers(4, 12))
        noise = rng.random((cells, cells)).astype(np.float32)
        t = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
        t = np.clip(t + rng.normal(0, 0.04, (size, size)).astype(np.float32), 0, 1)
        img = a * (1 - t[..., None]) + b * t[..., None]
        caption = f"a {c1} and {c2} noise texture background"
    elif kind == "stripes":
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(0.08, 0.25)
        t = (xx * math.cos(theta) + yy * math.sin(theta)) / period
        t = np.clip(np.sin(2 * math.pi * t) * 3.0, -1, 1) * 0.5 + 0.5
        img = a * (1 - t[..., None]) + b * t[..., None]
        caption = f"a {c1} and {c2} striped background"
    elif kind == "horizon":
        sky_top = np.array([0.25, 0.45, 0.85], np.float32) * rng.uniform(0.8, 1.1)
        sky_bot = np.array([0.75, 0.85, 0.95], np.float32)
        ground = _soft(c2, rng, 0.2) * 0.8
        h = rng.uniform(0.5, 0.75)
        sky = sky_top * (1 - (yy / h)[..., None]) + sky_bot * (yy / h)[..., None]
        grd = ground * (1 - 0.3 * ((yy - h) / (1 - h))[..., None])
        m = np.clip((yy - h) * size, 0, 1)[..., None]
        img = sky * (1 - m) + grd * m
        caption = f"a horizon with a blue sky and {c2} ground"
    else:
        raise ValueError(f"unknown background {kind!r}; expected one of {BACKGROUNDS}")
    return np.floor(np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), caption


# ---------------------------------------------------------------------------------------------
# samplers


def _check_size(size: int) -> int:
    size = int(size)
    if not 32 <= size <= 1024:
        raise ValueError(f"size must be in [32, 1024], got {size}")
    return size


def _sample_attrs(rng, shape, colour, material, effect, glyph_prob, exclude_heldout=False):
    if shape is None:
        shape = GLYPHS[int(rng.integers(len(GLYPHS)))] if rng.random() < glyph_prob else \
            SHAPES[int(rng.integers(len(SHAPES)))]
    if colour is None:
        colour = _pick_colour(rng)
        while exclude_heldout and (shape, colour) in HELDOUT_COMBINATIONS:
            colour = _pick_colour(rng)
    material = material or ("glass" if rng.random() < 0.3 else "solid")
    if effect is None:
        u = rng.random()
        effect = "shadow" if u < 0.3 else "glow" if u < 0.5 else "none"
    return shape, colour, material, effect


def make_object_layer(seed: int, size: int = 128, shape: str | None = None, colour: str | None = None,
                      material: str | None = None, effect: str | None = None, glyph_prob: float = 0.1,
                      centred: bool = True, exclude_heldout: bool = False) -> SceneObject:
    """One object on a transparent canvas, roughly centred (`centred=False`: anywhere it fits whole): the
    text -> layer training sample.

    `exclude_heldout` never samples a pair in `HELDOUT_COMBINATIONS` (training sets use it)."""
    size = _check_size(size)
    rng = np.random.default_rng([seed, 1])
    shape, colour, material, effect = _sample_attrs(rng, shape, colour, material, effect, glyph_prob,
                                                    exclude_heldout)
    r = size * rng.uniform(0.24, 0.36)
    # uncentred: anywhere the whole object fits (with room for its shadow), never cut off by the canvas edge -
    # a model trained on cut-off layers draws cut-off layers
    jitter = 0.08 if centred else max(0.0, 0.5 - 1.2 * r / size - 0.02)
    cx = size * (0.5 + rng.uniform(-jitter, jitter))
    cy = size * (0.5 + rng.uniform(-jitter, jitter))
    angle = math.radians(rng.uniform(-15, 15))
    return render_object(size, shape, colour, material, effect, cx, cy, r, angle, rng)


def make_scene(seed: int, size: int = 128, num_objects=(1, 3), glyph_prob: float = 0.1,
               background: str | None = None) -> Scene:
    """Background + 1..N overlapping object layers + exact composite + captions + boxes."""
    size = _check_size(size)
    rng = np.random.default_rng([seed, 2])
    lo, hi = (num_objects, num_objects) if isinstance(num_objects, int) else num_objects
    n = int(rng.integers(lo, hi + 1))
    bg, bg_caption = render_background(size, rng, background)
    objects = []
    for _ in range(n):
        shape, colour, material, effect = _sample_attrs(rng, None, None, None, None, glyph_prob)
        r = size * rng.uniform(0.12, 0.24)
        cx, cy = size * rng.uniform(0.2, 0.8), size * rng.uniform(0.2, 0.8)
        angle = math.radians(rng.uniform(-15, 15))
        objects.append(render_object(size, shape, colour, material, effect, cx, cy, r, angle, rng))
    scene = Scene(seed, size, bg, bg_caption, objects)
    scene.composite = scene.to_stack().composite()[..., :3]
    scene.caption = ", ".join(o.caption for o in objects) + f" on {bg_caption}" if objects else bg_caption
    return scene


def object_on_neutral(rgba_u8: np.ndarray, grey: float = 0.5) -> np.ndarray:
    """Premultiply an RGBA layer onto mid-grey: what the frozen base VAE sees (LayerDiffuse convention)."""
    rgba = rgba_u8.astype(np.float32) / 255.0
    return rgba[..., :3] * rgba[..., 3:4] + grey * (1 - rgba[..., 3:4])
