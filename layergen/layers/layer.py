"""`Layer` and `LayerStack`: the document model every producer returns and every consumer takes.

Design choice: **mutable**. A `LayerStack` is an editable document (the studio
edits it in place, pipelines build it up layer by layer); operations mutate the
stack and return the affected layer. Use `copy()` for snapshots (undo, repaint
comparisons). Pixels are straight-alpha uint8 RGBA, `H x W x 4`, sRGB, the same
convention as PNG/PSD/ORA files; compositing converts to premultiplied float.

Canvas coordinates: x grows right, y grows down, offsets are in pixels and may
be negative or put a layer partly outside the canvas (it is clipped when
composited, never when stored).

This module does not import torch.
"""
from __future__ import annotations

import copy as _copy
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from ..errors import LayerError
from .compositing import check_blend_mode, composite_layers

LAYER_KINDS = ("background", "instance", "effect", "text", "other")


def as_rgba_array(image) -> np.ndarray:
    """PIL image or array -> contiguous uint8 `H x W x 4` (straight alpha).

    Grayscale, RGB and LA inputs are converted (opaque alpha where missing);
    16-bit and float inputs are rejected with a clear error rather than
    silently truncated.
    """
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a hard dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            raise LayerError(f"unsupported image mode {image.mode!r} (16-bit/float); convert to 8-bit RGBA first")
        image = np.asarray(image.convert("RGBA"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise LayerError(f"layer pixels must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.stack([arr, arr, arr, np.full_like(arr, 255)], axis=-1)
    elif arr.ndim == 3 and arr.shape[2] == 3:
        arr = np.concatenate([arr, np.full(arr.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    elif arr.ndim == 3 and arr.shape[2] == 2:
        arr = np.stack([arr[..., 0]] * 3 + [arr[..., 1]], axis=-1)
    if arr.ndim != 3 or arr.shape[2] != 4:
        raise LayerError(f"layer pixels must be H x W x 4 RGBA, got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise LayerError(f"layer must be at least 1x1 pixels, got {arr.shape[1]}x{arr.shape[0]}")
    return np.ascontiguousarray(arr)


MAX_OFFSET = 2**24  # pixels either way: far beyond any canvas, well inside PSD's 32-bit coordinates


def check_offset(x, y) -> tuple[int, int]:
    """A layer's canvas position as ints; a clear error for one no file format could store."""
    x, y = int(x), int(y)
    if abs(x) > MAX_OFFSET or abs(y) > MAX_OFFSET:
        raise LayerError(f"layer offset ({x}, {y}) is too far from the canvas (at most {MAX_OFFSET} px either way)")
    return x, y


@dataclass
class Layer:
    """One RGBA raster layer placed on a canvas.

    `metadata` is free-form provenance: prompt, seed, steps, model id, and
    `kind` (background / instance / effect / ...), so a layer can be repainted
    later and round-trips through every layered format we write.
    """

    pixels: np.ndarray
    name: str = "Layer"
    x: int = 0
    y: int = 0
    opacity: float = 1.0
    blend_mode: str = "normal"
    visible: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.pixels = as_rgba_array(self.pixels)
        self.x, self.y = check_offset(self.x, self.y)
        opacity = float(self.opacity)
        if not 0.0 <= opacity <= 1.0 or opacity != opacity:
            raise LayerError(f"opacity must be in [0, 1], got {self.opacity}")
        self.opacity = opacity
        check_blend_mode(self.blend_mode)
        self.visible = bool(self.visible)
        self.name = str(self.name)

    @classmethod
    def from_image(cls, image, **kwargs) -> "Layer":
        return cls(as_rgba_array(image), **kwargs)

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def kind(self) -> str | None:
        return self.metadata.get("kind")

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the layer's raster on the canvas."""
        return self.x, self.y, self.x + self.width, self.y + self.height

    def content_bbox(self) -> tuple[int, int, int, int] | None:
        """(x0, y0, x1, y1) in layer pixels of the non-transparent content, or None if empty."""
        ys, xs = np.nonzero(self.pixels[..., 3])
        if len(xs) == 0:
            return None
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1

    def to_image(self):
        from PIL import Image

        return Image.fromarray(self.pixels, "RGBA")

    def copy(self) -> "Layer":
        return Layer(self.pixels.copy(), self.name, self.x, self.y, self.opacity, self.blend_mode,
                     self.visible, _copy.deepcopy(self.metadata))

    def __eq__(self, other) -> bool:
        if not isinstance(other, Layer):
            return NotImplemented
        return (self.name, self.x, self.y, self.opacity, self.blend_mode, self.visible, self.metadata) == (
            other.name, other.x, other.y, other.opacity, other.blend_mode, other.visible, other.metadata
        ) and np.array_equal(self.pixels, other.pixels)

    def __repr__(self) -> str:
        return (f"Layer(name={self.name!r}, size={self.width}x{self.height}, offset=({self.x}, {self.y}), "
                f"opacity={self.opacity:g}, blend_mode={self.blend_mode!r}, visible={self.visible})")


class LayerStack:
    """An ordered stack of layers on a fixed-size canvas, bottom -> top.

    Mutating: `add`, `remove`, `move`, `reorder`, `duplicate`, `merge_down`,
    `flatten` and `crop_to_content` change the stack in place and return the
    layer they touched. `composite()` never mutates.
    """

    def __init__(self, width: int, height: int, layers=None, metadata: dict | None = None):
        width, height = int(width), int(height)
        if width < 1 or height < 1:
            raise LayerError(f"canvas must be at least 1x1, got {width}x{height}")
        self.width, self.height = width, height
        self.layers: list[Layer] = []
        self.metadata: dict[str, Any] = dict(metadata or {})
        for layer in layers or []:
            self.add(layer)

    # -- access ---------------------------------------------------------------
    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __getitem__(self, key) -> Layer:
        return self.layers[self.index(key)]

    def index(self, key) -> int:
        """Index of a layer given by position (negative allowed), name, or the Layer itself."""
        if isinstance(key, Layer):
            for i, layer in enumerate(self.layers):
                if layer is key:
                    return i
            raise LayerError(f"layer {key.name!r} is not in this stack")
        if isinstance(key, str):
            for i, layer in enumerate(self.layers):
                if layer.name == key:
                    return i
            raise LayerError(f"no layer named {key!r}; layers: {[l.name for l in self.layers]}")
        i = int(key)
        if not -len(self.layers) <= i < len(self.layers):
            raise LayerError(f"layer index {i} out of range for a stack of {len(self.layers)} layers")
        return i % len(self.layers)

    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    # -- editing --------------------------------------------------------------
    def add(self, layer: Layer, index: int | None = None) -> Layer:
        """Insert `layer` at `index` (default: on top)."""
        if not isinstance(layer, Layer):
            layer = Layer(layer)
        if index is None:
            self.layers.append(layer)
        else:
            self.layers.insert(max(0, min(int(index), len(self.layers))), layer)
        return layer

    def remove(self, key) -> Layer:
        return self.layers.pop(self.index(key))

    def move(self, key, x: int, y: int) -> Layer:
        """Place a layer's top-left corner at canvas position (x, y)."""
        layer = self[key]
        layer.x, layer.y = check_offset(x, y)
        return layer

    def reorder(self, key, new_index: int) -> Layer:
        """Move a layer to position `new_index` in the stack (0 = bottom)."""
        if not -len(self.layers) <= int(new_index) < len(self.layers):
            raise LayerError(f"target index {new_index} out of range for a stack of {len(self.layers)} layers")
        layer = self.layers.pop(self.index(key))
        self.layers.insert(int(new_index) % (len(self.layers) + 1), layer)
        return layer

    def duplicate(self, key, name: str | None = None) -> Layer:
        i = self.index(key)
        dup = self.layers[i].copy()
        dup.name = name or f"{dup.name} copy"
        self.layers.insert(i + 1, dup)
        return dup

    def merge_down(self, key) -> Layer:
        """Merge a layer into the one below it; the result keeps the lower layer's name and place."""
        i = self.index(key)
        if i == 0:
            raise LayerError(f"layer {self.layers[i].name!r} is the bottom layer; nothing to merge into")
        lower, upper = self.layers[i - 1], self.layers[i]
        x0 = min(lower.x, upper.x) if upper.visible else lower.x
        y0 = min(lower.y, upper.y) if upper.visible else lower.y
        x1 = max(lower.bbox[2], upper.bbox[2]) if upper.visible else lower.bbox[2]
        y1 = max(lower.bbox[3], upper.bbox[3]) if upper.visible else lower.bbox[3]
        shifted = []
        for layer in (lower, upper):
            moved = layer.copy()
            moved.x -= x0
            moved.y -= y0
            if layer is lower:
                moved.visible, moved.blend_mode = True, "normal"
            shifted.append(moved)
        merged = Layer(composite_layers(x1 - x0, y1 - y0, shifted), name=lower.name, x=x0, y=y0,
                       blend_mode=lower.blend_mode, visible=lower.visible, metadata=_copy.deepcopy(lower.metadata))
        self.layers[i - 1:i + 1] = [merged]
        return merged

    def flatten(self, name: str = "Flattened") -> Layer:
        """Replace all layers by one canvas-sized layer holding the composite."""
        flat = Layer(self.composite(), name=name, metadata={"kind": "background"})
        self.layers = [flat]
        return flat

    def crop_to_content(self, key) -> Layer:
        """Shrink a layer's raster to its non-transparent bbox, keeping its canvas position."""
        layer = self[key]
        box = layer.content_bbox()
        if box is None:
            raise LayerError(f"layer {layer.name!r} is fully transparent; nothing to crop to")
        x0, y0, x1, y1 = box
        layer.pixels = np.ascontiguousarray(layer.pixels[y0:y1, x0:x1])
        layer.x += x0
        layer.y += y0
        return layer

    # -- output ---------------------------------------------------------------
    def composite(self, background=None) -> np.ndarray:
        """Straight uint8 RGBA `H x W x 4` of all visible layers, composited exactly."""
        return composite_layers(self.width, self.height, self.layers, background)

    def to_image(self):
        from PIL import Image

        return Image.fromarray(self.composite(), "RGBA")

    def copy(self) -> "LayerStack":
        return LayerStack(self.width, self.height, [layer.copy() for layer in self.layers],
                          _copy.deepcopy(self.metadata))

    def __eq__(self, other) -> bool:
        if not isinstance(other, LayerStack):
            return NotImplemented
        return self.size == other.size and self.layers == other.layers

    def __repr__(self) -> str:
        return f"LayerStack({self.width}x{self.height}, layers={self.names()})"
