"""What the studio asks of a model, and two ways to answer.

The app never imports a pipeline: it calls an injected *backend* with four
small methods, so it can run on the bundled mini pipelines, on a user's
checkpoints, or — in tests and when no weights are present — on
`ProceduralBackend`, which draws layers deterministically with the procedural
scene generator and never needs trained weights.

    generate_layer(prompt, seed, width, height, condition=None) -> Layer
    generate_layout(prompt, boxes, seed, width, height, background=True) -> list[Layer]
    repaint(stack, index, prompt, seed) -> Layer
    decompose(image, boxes=None) -> LayerStack

`LayerBackend` implements `generate_layout` and `repaint` on top of
`generate_layer` (one layer per box, fitted into it; a repaint regenerates the
layer conditioned on the rest of the image and puts it where the old content
was), so a backend only *has* to provide `generate_layer` and `decompose`;
a backend with a true multi-layer or region-repaint model overrides them.
"""
from __future__ import annotations

import inspect
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LayerError, LayergenError
from ..layers import Layer, LayerStack, as_rgba_array

logger = logging.getLogger(__name__)

CONDITIONS = ("background", "foreground")
MAX_BOXES = 32
MAX_PROMPT_CHARS = 500


@dataclass(frozen=True)
class Box:
    """A layout region in canvas pixels, (x0, y0) inclusive, (x1, y1) exclusive, with an optional prompt."""

    x0: int
    y0: int
    x1: int
    y1: int
    prompt: str = ""

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def as_tuple(self) -> tuple[int, int, int, int]:
        return self.x0, self.y0, self.x1, self.y1


def check_boxes(boxes, width: int, height: int, min_side: int = 4) -> list[Box]:
    """Validate boxes against a canvas: clipped to it, at least `min_side` pixels, at most `MAX_BOXES`."""
    out = []
    for k, box in enumerate(boxes or []):
        if not isinstance(box, Box):
            box = Box(*box) if len(box) <= 5 else Box(*box[:5])
        try:
            x0, y0, x1, y1 = (int(round(float(v))) for v in box.as_tuple())
        except (TypeError, ValueError):
            raise LayerError(f"box {k + 1}: coordinates must be numbers, got {box.as_tuple()}") from None
        x0, x1 = sorted((x0, x1))
        y0, y1 = sorted((y0, y1))
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
        if x1 - x0 < min_side or y1 - y0 < min_side:
            raise LayerError(f"box {k + 1} ({x0}, {y0}, {x1}, {y1}) is smaller than {min_side} px or outside "
                             f"the {width}x{height} canvas")
        out.append(Box(x0, y0, x1, y1, str(box.prompt or "").strip()[:MAX_PROMPT_CHARS]))
    if len(out) > MAX_BOXES:
        raise LayerError(f"at most {MAX_BOXES} boxes, got {len(out)}")
    return out


@dataclass
class Condition:
    """Existing content a new layer must fit with (LayerDiffuse's conditional modes).

    kind="background": `image` is the backdrop; generate a foreground for it.
    kind="foreground": `image` is the foreground; generate a background behind it.
    `image` is canvas-sized straight RGBA.
    """

    kind: str
    image: np.ndarray

    def __post_init__(self):
        if self.kind not in CONDITIONS:
            raise LayerError(f"condition must be one of {CONDITIONS}, got {self.kind!r}")
        self.image = as_rgba_array(self.image)


def fit_into_box(layer: Layer, box: Box, name: str | None = None) -> Layer:
    """Crop `layer` to its content and scale it (aspect kept, premultiplied resampling) into `box`, centred."""
    from PIL import Image

    content = layer.content_bbox()
    if content is None:
        raise LayerError("the generated layer is fully transparent")
    cx0, cy0, cx1, cy1 = content
    crop = Image.fromarray(np.ascontiguousarray(layer.pixels[cy0:cy1, cx0:cx1]), "RGBA")
    s = min(box.width / crop.width, box.height / crop.height)
    w, h = max(1, int(round(crop.width * s))), max(1, int(round(crop.height * s)))
    if (w, h) != crop.size:
        crop = crop.resize((w, h), Image.Resampling.LANCZOS)
    x = box.x0 + (box.width - w) // 2
    y = box.y0 + (box.height - h) // 2
    meta = dict(layer.metadata)
    meta["box"] = list(box.as_tuple())
    return Layer(np.asarray(crop), name=name or layer.name, x=x, y=y, metadata=meta)


def _is_background(layer: Layer) -> bool:
    return layer.kind == "background"


class LayerBackend:
    """Base class: subclasses provide `generate_layer` and `decompose`; layouts and repaint come for free."""

    name = "backend"
    description = ""

    def generate_layer(self, prompt: str, seed: int, width: int, height: int,
                       condition: Condition | None = None) -> Layer:
        raise NotImplementedError

    def decompose(self, image: np.ndarray, boxes: list[Box] | None = None) -> LayerStack:
        raise NotImplementedError

    def generate_layout(self, prompt: str, boxes: list[Box], seed: int, width: int, height: int,
                        background: bool = True) -> list[Layer]:
        """One layer per box (its own prompt, else the global prompt), optionally over a generated background.

        Boxes are generated bottom -> top, each conditioned on what is already
        below it, so later boxes fit the earlier ones.
        """
        from tqdm.auto import tqdm

        boxes = check_boxes(boxes, width, height)
        if not boxes and not background:
            raise LayerError("draw or type at least one box, or tick 'background'")
        layers: list[Layer] = []
        steps = tqdm(total=len(boxes) + int(background), desc="layout")
        if background:
            # A background "behind nothing yet": the foreground condition is an empty canvas.
            empty = np.zeros((height, width, 4), np.uint8)
            bg = self.generate_layer(prompt, seed, width, height, condition=Condition("foreground", empty))
            bg.metadata["kind"] = "background"
            layers.append(bg)
            steps.update()
        for k, box in enumerate(boxes):
            below = LayerStack(width, height, layers).composite()
            cond = Condition("background", below) if layers else None
            layer = self.generate_layer(box.prompt or prompt, seed + 1 + k, width, height, condition=cond)
            layers.append(fit_into_box(layer, box, name=f"{box.prompt or prompt or 'object'}"[:60]))
            steps.update()
        steps.close()
        return layers

    def repaint(self, stack: LayerStack, index: int, prompt: str, seed: int) -> Layer:
        """A new version of layer `index` from `prompt`/`seed`, in the same place; other layers are untouched.

        A background is regenerated behind the layers above it; any other
        layer is regenerated on top of the layers below it and fitted into the
        old layer's content box.
        """
        old = stack[index]
        if _is_background(old):
            above = LayerStack(stack.width, stack.height, stack.layers[index + 1:]).composite()
            new = self.generate_layer(prompt, seed, stack.width, stack.height, condition=Condition("foreground", above))
            new.metadata["kind"] = "background"
            return new
        below = LayerStack(stack.width, stack.height, stack.layers[:index]).composite()
        new = self.generate_layer(prompt, seed, stack.width, stack.height,
                                  condition=Condition("background", below) if index > 0 else None)
        content = old.content_bbox()
        if content is None:  # an empty layer: keep the new one where the generator put it
            return new
        x0, y0, x1, y1 = content
        return fit_into_box(new, Box(old.x + x0, old.y + y0, old.x + x1, old.y + y1))


# ---------------------------------------------------------------------------------------------
# Procedural backend: deterministic drawings from the scene generator (no weights needed)

_BACKGROUND_WORDS = ("background", "backdrop", "sky", "horizon", "gradient", "texture", "stripes", "striped",
                     "noise", "wallpaper")


def parse_prompt(prompt: str) -> dict:
    """Pick the scene vocabulary out of a free prompt: shape, colour, material, effect, background kind."""
    from ..data import scenes

    text = prompt.lower()
    words = re.findall(r"[a-z0-9]+", text)
    # What the prompt does not ask for is plain: solid, no effect (shape and colour are left to the seed).
    out = {"shape": None, "colour": None, "material": "solid", "effect": "none", "background": None}
    shapes = tuple(scenes.SHAPES) + tuple(getattr(scenes, "EXTRA_SHAPES", ()))
    for w in words:
        w1 = w[:-1] if w.endswith("s") and w[:-1] in shapes else w
        if out["shape"] is None and w1 in shapes:
            out["shape"] = w1
        colour = "grey" if w == "gray" else w
        if out["colour"] is None and colour in scenes.COLOURS:
            out["colour"] = colour
    m = re.search(r"\b(?:letter|digit|number)\s+([a-z0-9])\b", text)
    if m and out["shape"] is None:
        out["shape"] = m.group(1).upper()
    if "glass" in words or "transparent" in words:
        out["material"] = "glass"
    if "shadow" in words:
        out["effect"] = "shadow"
    elif "glow" in words or "glowing" in words:
        out["effect"] = "glow"
    if any(w in words for w in _BACKGROUND_WORDS):
        kinds = {"gradient": "gradient", "noise": "noise", "texture": "noise", "stripes": "stripes",
                 "striped": "stripes", "horizon": "horizon", "sky": "horizon"}
        out["background"] = next((kinds[w] for w in words if w in kinds), "any")
    return out


def _contrasting_colour(image: np.ndarray) -> str:
    """The named colour farthest from the mean visible colour of `image` (so a new object stands out)."""
    from ..data.scenes import COLOURS

    a = image[..., 3:4].astype(np.float64) / 255.0
    if a.sum() < 1:
        return "red"
    mean = (image[..., :3] * a).sum(axis=(0, 1)) / a.sum()
    return max(COLOURS, key=lambda c: float(np.sum((np.asarray(COLOURS[c], np.float64) - mean) ** 2)))


class ProceduralBackend(LayerBackend):
    """Deterministic layers from `layergen.data.scenes`: shapes and backgrounds named in the prompt.

    Same (prompt, seed, size, condition) -> same pixels. The prompt is read
    for the scene vocabulary ("a red glass star with a drop shadow", "a striped
    background"); everything else is ignored. Decomposition is classical
    (GrabCut inside each box, OpenCV inpainting behind), and re-composites to
    the input exactly.
    """

    name = "procedural"
    description = "procedural demo backend (deterministic shapes; no trained weights)"

    def generate_layer(self, prompt, seed, width, height, condition=None) -> Layer:
        from ..data import scenes

        prompt = str(prompt or "").strip()
        seed = int(seed)
        attrs = parse_prompt(prompt)
        size = int(min(max(width, height, 32), 1024))
        behind = condition is not None and condition.kind == "foreground"
        if behind or (attrs["background"] is not None and attrs["shape"] is None):
            rng = np.random.default_rng([seed, 7])
            kind = attrs["background"] if attrs["background"] not in (None, "any") else None
            rgb, caption = scenes.render_background(size, rng, kind)
            rgb = _fit_canvas(rgb, width, height)
            return Layer(rgb, name=caption.replace("a ", "", 1)[:60] or "background",
                         metadata={"kind": "background", "prompt": prompt, "seed": seed, "caption": caption,
                                   "backend": self.name, "condition": condition.kind if condition else None})
        colour = attrs["colour"]
        if colour is None and condition is not None:
            colour = _contrasting_colour(condition.image)
        # Objects are drawn supersampled: render near the size they will be shown at, not at canvas size.
        obj = scenes.make_object_layer(seed, size=int(np.clip(min(width, height) * 0.8, 128, 512)), shape=attrs["shape"], colour=colour,
                                       material=attrs["material"], effect=attrs["effect"])
        layer = Layer(obj.rgba, name=f"{obj.colour} {obj.shape}",
                      metadata={"kind": "instance", "prompt": prompt, "seed": seed, "caption": obj.caption,
                                "backend": self.name, "condition": condition.kind if condition else None})
        # Like a generator's output the object is about half the canvas; place it at a seeded spot inside.
        rng = np.random.default_rng([seed, 11])
        side = max(8, int(min(width, height) * rng.uniform(0.4, 0.55)))
        x0 = int(rng.uniform(0.05, 0.95) * (width - side))
        y0 = int(rng.uniform(0.05, 0.95) * (height - side))
        return fit_into_box(layer, Box(x0, y0, x0 + side, y0 + side))

    def decompose(self, image, boxes=None) -> LayerStack:
        return classical_decompose(image, boxes)


def _fit_canvas(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Centre-crop (or resize up, then crop) a square image to `width x height`."""
    import cv2

    size = rgb.shape[0]
    if size < max(width, height):
        size = max(width, height)
        rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_CUBIC)
    x0, y0 = (size - width) // 2, (size - height) // 2
    return np.ascontiguousarray(rgb[y0:y0 + height, x0:x0 + width])


# ---------------------------------------------------------------------------------------------
# Classical decomposition (fallback; the learned DecompositionPipeline replaces it)


def _auto_boxes(rgb: np.ndarray, max_boxes: int = 8) -> list[Box]:
    """Boxes around regions whose colour differs from the image border (the likely background)."""
    import cv2

    h, w = rgb.shape[:2]
    ring = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]).astype(np.float32)
    k = min(6, len(ring))
    _, _, centres = cv2.kmeans(ring, k, None, (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 0.5), 2,
                               cv2.KMEANS_PP_CENTERS)
    # A smooth estimate of the background (large blur of the border colours would be too crude;
    # distance to the border palette works for gradients and textures alike).
    flat = rgb.reshape(-1, 3).astype(np.float32)
    dist = np.min(np.linalg.norm(flat[:, None, :] - centres[None], axis=-1), axis=1).reshape(h, w)
    mask = (dist > 40).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    min_area = max(16, (h * w) // 1000)
    comps = sorted((s for s in stats[1:] if s[cv2.CC_STAT_AREA] >= min_area), key=lambda s: -s[cv2.CC_STAT_AREA])
    boxes = []
    for s in comps[:max_boxes]:
        x, y, bw, bh = (int(v) for v in s[:4])
        pad = max(2, int(0.05 * max(bw, bh)))
        boxes.append(Box(max(0, x - pad), max(0, y - pad), min(w, x + bw + pad), min(h, y + bh + pad)))
    return boxes


def classical_decompose(image, boxes=None) -> LayerStack:
    """Flat image (+ optional boxes) -> background + one layer per box; re-composites to the input exactly.

    Each object is cut out with GrabCut initialised from its box; the
    background behind all objects is filled by OpenCV inpainting. Objects are
    opaque where cut, so background + objects reproduce every input pixel.
    Without boxes, regions that differ from the border colours are used.
    """
    import cv2
    from tqdm.auto import tqdm

    rgba = as_rgba_array(image)
    h, w = rgba.shape[:2]
    rgb = np.ascontiguousarray(rgba[..., :3])
    boxes = check_boxes(boxes, w, h) if boxes else _auto_boxes(rgb)
    if not boxes:
        raise LayerError("no objects found to separate; draw or type a box around each object")
    masks = []
    for k, box in enumerate(tqdm(boxes, desc="decompose")):
        mask = np.zeros((h, w), np.uint8)
        rect = (box.x0, box.y0, box.width, box.height)
        if box.width >= w - 1 and box.height >= h - 1:
            fg = np.zeros((h, w), bool)
            fg[box.y0:box.y1, box.x0:box.x1] = True  # box covers the image: GrabCut has no background sample
        else:
            bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
            cv2.setRNGSeed(k)
            cv2.grabCut(rgb, mask, rect, bgd, fgd, 5, cv2.GC_INIT_WITH_RECT)
            fg = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
        if not fg.any():
            fg = np.zeros((h, w), bool)
            fg[box.y0:box.y1, box.x0:box.x1] = True
        masks.append(fg)
    # Later boxes are on top: a pixel belongs to the topmost box that claims it.
    owner = np.full((h, w), -1, np.int32)
    for k, fg in enumerate(masks):
        owner[fg] = k
    hole = (owner >= 0).astype(np.uint8) * 255
    radius = max(3, min(h, w) // 64)
    background = cv2.inpaint(rgb, cv2.dilate(hole, np.ones((3, 3), np.uint8)), radius, cv2.INPAINT_TELEA)
    background[owner < 0] = rgb[owner < 0]
    alpha_bg = np.where(owner >= 0, 255, rgba[..., 3]).astype(np.uint8)
    stack = LayerStack(w, h, metadata={"decomposed_by": "classical (grabcut + inpaint)"})
    stack.add(Layer(np.dstack([background, alpha_bg]), name="background", metadata={"kind": "background"}))
    for k, box in enumerate(boxes):
        sel = owner == k
        if not sel.any():
            continue
        ys, xs = np.nonzero(sel)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        pix = np.zeros((y1 - y0, x1 - x0, 4), np.uint8)
        local = sel[y0:y1, x0:x1]
        pix[local] = rgba[y0:y1, x0:x1][local]
        meta = {"kind": "instance", "box": list(box.as_tuple())}
        if box.prompt:
            meta["prompt"] = box.prompt
        stack.add(Layer(pix, name=box.prompt[:60] if box.prompt else f"object {k + 1}", x=int(x0), y=int(y0),
                        metadata=meta))
    return stack


# ---------------------------------------------------------------------------------------------
# Pipeline backend: the real models


def _to_layers(output) -> list[Layer]:
    """Normalise a pipeline's output (Layer, LayerStack, RGBA image/array, or an output object) to layers."""
    from PIL import Image

    for attr in ("layers", "stacks", "images"):
        if hasattr(output, attr) and not isinstance(output, LayerStack):
            return _to_layers(getattr(output, attr))
    if isinstance(output, Layer):
        return [output]
    if isinstance(output, LayerStack):
        return list(output.layers)
    if isinstance(output, (Image.Image, np.ndarray)):
        return [Layer(as_rgba_array(output))]
    if isinstance(output, (list, tuple)) and output:
        return _to_layers(output[0]) if isinstance(output[0], (LayerStack, list, tuple)) else \
            [l for item in output for l in _to_layers(item)]
    raise LayergenError(f"cannot read layers from a pipeline output of type {type(output).__name__}")


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _call_with_supported(fn, **kwargs):
    """Call `fn` with the keyword arguments its signature accepts (pipelines differ in optional inputs)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(**kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params and v is not None})


class PipelineBackend(LayerBackend):
    """Adapter from the layergen pipelines to the studio interface.

    `generator`: text -> RGBA layer (TransparentLayerPipeline).
    `conditioned`: pipelines per condition kind, `{"background": ForegroundOnBackgroundPipeline,
    "foreground": BackgroundBehindForegroundPipeline}`; a kind without one goes to `generator`.
    `decomposer`: DecompositionPipeline (classical without weights, learned with them).
    `multilayer`: MultiLayerPipeline for layouts and repaint (region-cropped joint denoising,
    box binding, bit-exact repaint); without one, layouts are built layer by layer from
    `generator` / `conditioned` (the `LayerBackend` defaults).
    A missing capability falls back to `fallback` (procedural). `call_kwargs` (e.g.
    `{"num_inference_steps": 20}`) and the condition image (`background=` / `foreground=`) are
    passed only when a pipeline's `__call__` accepts them. Outputs may be a `LayerPipelineOutput`
    (`.stacks`), a LayerStack, a Layer or an RGBA image.
    """

    def __init__(self, generator=None, decomposer=None, conditioned: dict | None = None,
                 fallback: LayerBackend | None = None, call_kwargs: dict | None = None,
                 description: str = "pipelines", multilayer=None):
        self.generator = generator
        self.multilayer = multilayer
        self.conditioned = dict(conditioned or {})
        self.decomposer = decomposer
        self.fallback = fallback or ProceduralBackend()
        self.call_kwargs = dict(call_kwargs or {})
        self.name = "pipeline"
        self.description = description

    def generate_layer(self, prompt, seed, width, height, condition=None) -> Layer:
        pipe = self.conditioned.get(condition.kind, self.generator) if condition is not None else self.generator
        if pipe is None:
            return self.fallback.generate_layer(prompt, seed, width, height, condition)
        kwargs = dict(self.call_kwargs, prompt=prompt, width=int(width), height=int(height), seed=int(seed))
        if _accepts(pipe, "generator") and not _accepts(pipe, "seed"):
            import torch

            kwargs["generator"] = torch.Generator("cpu").manual_seed(int(seed))
        if condition is not None:
            # ForegroundOnBackgroundPipeline takes `background=`, BackgroundBehindForegroundPipeline `foreground=`.
            kwargs[condition.kind] = condition.image
            kwargs[f"{condition.kind}_image"] = condition.image
        layers = _to_layers(_call_with_supported(pipe, **kwargs))
        wants_background = condition is not None and condition.kind == "foreground"
        # A conditioned pipeline may return the whole pair (background + foreground): take the new one.
        picked = [l for l in layers if (l.kind == "background") == wants_background]
        layer = (picked[0] if wants_background else picked[-1]) if picked else layers[-1]
        layer = layer.copy()
        layer.metadata.update({"prompt": prompt, "seed": int(seed), "backend": self.description,
                               "condition": condition.kind if condition else None})
        layer.metadata.setdefault("kind", "background" if wants_background else "instance")
        if layer.name in ("Layer", "", "layer", "background", "foreground"):
            layer.name = (prompt or "layer")[:60]
        return layer

    def generate_layout(self, prompt, boxes, seed, width, height, background: bool = True) -> list[Layer]:
        if self.multilayer is None:
            return super().generate_layout(prompt, boxes, seed, width, height, background)
        boxes = check_boxes(boxes, width, height)
        if not boxes:
            if not background:
                raise LayerError("draw or type at least one box, or tick 'background'")
            # A background alone: the background-behind-nothing task of the same model.
            empty = np.zeros((int(height), int(width), 4), np.uint8)
            return [self.generate_layer(prompt, seed, width, height, Condition("foreground", empty))]
        layout = [(b.x0, b.y0, b.width, b.height) + ((b.prompt,) if b.prompt else ()) for b in boxes]
        kwargs = dict(self.call_kwargs, prompt=prompt or None, layout=layout, width=int(width),
                      height=int(height), seed=int(seed), output_type="stack")
        if not background:  # layers over a neutral canvas; the canvas itself is not returned
            kwargs["background"] = np.full((int(height), int(width), 3), 128, np.uint8)
        stack = _call_with_supported(self.multilayer, **kwargs).stacks[0]
        layers = [_named_by_prompt(layer.copy()) for layer in stack.layers]
        for layer in layers:
            layer.metadata.setdefault("backend", self.description)
        return layers if background else layers[1:]

    def repaint(self, stack: LayerStack, index: int, prompt: str, seed: int) -> Layer:
        old = stack[index]
        # The multi-layer pipeline repaints layers it made (their box and region are in the metadata).
        if self.multilayer is None or ("box" not in old.metadata and not _is_background(old)):
            return super().repaint(stack, index, prompt, seed)
        kwargs = dict(prompt=prompt or None, seed=int(seed), output_type="stack")
        steps = self.call_kwargs.get("num_inference_steps")
        if steps:
            kwargs["num_inference_steps"] = steps
        new = _named_by_prompt(self.multilayer.repaint(stack, index, **kwargs).stacks[0][index].copy())
        new.metadata.setdefault("backend", self.description)
        return new

    def decompose(self, image, boxes=None) -> LayerStack:
        if self.decomposer is None:
            return self.fallback.decompose(image, boxes)
        rgba = as_rgba_array(image)
        xywh = [(b.x0, b.y0, b.width, b.height) for b in check_boxes(boxes, rgba.shape[1], rgba.shape[0])] \
            if boxes else None
        out = self.decomposer(rgba, boxes=xywh)
        stack = getattr(out, "stack", None)
        if isinstance(stack, LayerStack):
            return stack
        if isinstance(out, LayerStack):
            return out
        return LayerStack(rgba.shape[1], rgba.shape[0], _to_layers(out))


def _named_by_prompt(layer: Layer) -> Layer:
    """The studio names instance layers by their prompt, like every other backend: the multi-layer pipeline's
    "2: a red star" carries a position that goes stale as soon as the user reorders layers."""
    prompt = layer.metadata.get("prompt")
    if layer.metadata.get("kind") == "instance" and isinstance(prompt, str) and prompt.strip():
        layer.name = prompt.strip()[:60]
    return layer


# Where the bundled learned decomposer would live (the classical DecompositionPipeline needs no weights).
MINI_DECOMPOSER = "layergen-mini-decomposer"


def _load_generator(model: str | None):
    """(text -> layer pipeline, {condition kind: pipeline}, multi-layer pipeline or None) from `model`
    or the bundled layergen-mini."""
    from .. import mini

    path = mini.check_model_dir(model if model else mini.mini_path())  # cheap checks before heavy imports
    pipe = mini.load_pipeline("transparent", path)
    conditioned, multilayer = {}, None
    try:  # all LayerDiffusion tasks share one component set
        from ..pipelines import BackgroundBehindForegroundPipeline, ForegroundOnBackgroundPipeline, MultiLayerPipeline

        conditioned = {"background": ForegroundOnBackgroundPipeline(**pipe.components),
                       "foreground": BackgroundBehindForegroundPipeline(**pipe.components)}
        multilayer = MultiLayerPipeline(**pipe.components)
    except Exception as exc:  # noqa: BLE001 - conditioning is optional; plain generation still works
        logger.warning("studio: conditioned generation unavailable (%s)", exc)
    return pipe, conditioned, multilayer


def _load_decomposer(model: str | None):
    from .. import mini

    from ..pipelines.pipeline_decomposition import DecompositionPipeline

    if model:
        if not (Path(model) / "model_index.json").is_file():
            from ..decompose.learned import load_decomposition_pipeline  # layer_matte/ or decomposer/ + vae/

            return load_decomposition_pipeline(model), str(model)
        return DecompositionPipeline.from_pretrained(mini.check_model_dir(model)), str(model)
    path = mini.ASSETS / MINI_DECOMPOSER
    if path.is_dir():
        return DecompositionPipeline.from_pretrained(path), "mini"
    return DecompositionPipeline(), "classical"


def default_backends(model: str | None = None, decompose_model: str | None = None) -> LayerBackend:
    """The mini pipelines (or the checkpoints given), else the procedural backend, saying so.

    A checkpoint the user named explicitly must load: its error is raised.
    Only the implicit default falls back, with a logged warning and a
    description that the studio shows in its header.
    """
    notes = []
    generator = decomposer = None
    conditioned, multilayer = {}, None
    decomposer_name = "classical"
    try:
        generator, conditioned, multilayer = _load_generator(model)
    except Exception as exc:  # noqa: BLE001 - any failure of the optional default falls back
        if model:
            raise LayergenError(f"cannot load the layer model from {model}: {exc}") from exc
        notes.append(f"layer generation: {exc.__class__.__name__}: {exc}")
    try:
        decomposer, decomposer_name = _load_decomposer(decompose_model)
    except Exception as exc:  # noqa: BLE001
        if decompose_model:
            raise LayergenError(f"cannot load the decomposition model from {decompose_model}: {exc}") from exc
        notes.append(f"decomposition: {exc.__class__.__name__}: {exc}")
    if notes:
        logger.warning("studio: falling back to the procedural demo backend for %s", "; ".join(notes))
    if generator is None and decomposer is None:
        return ProceduralBackend()
    parts = [f"layers: {model or 'layergen-mini'}" if generator is not None else "layers: procedural demo",
             f"decomposition: {decomposer_name}" if decomposer is not None else "decomposition: grabcut demo"]
    return PipelineBackend(generator, decomposer, conditioned=conditioned, multilayer=multilayer,
                           description=", ".join(parts))
