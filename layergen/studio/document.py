"""The studio's document: one `LayerStack`, a selection and an undo/redo history.

Why a class of its own: the Gradio app keeps one `Document` per browser
session (in `gr.State`) and only translates clicks into calls to it, so every
editing rule — what an edit changes, what is selected afterwards, what undo
restores, which inputs are rejected — lives here and is tested without Gradio.

History is a list of snapshots. A snapshot copies the layer *records* but
shares their pixel arrays, which is safe because the document never writes
into pixels in place (every edit builds a new array) and freezes the arrays
it holds (`writeable=False`) so a stray in-place write fails loudly instead
of silently corrupting undo. Fifty steps of a 20-layer document therefore
cost little more than the pixels that actually changed.

Indices are stack positions, 0 = bottom, like `LayerStack`; `None` means
"the selected layer".
"""
from __future__ import annotations

import contextlib
import copy as _copy
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FormatError, LayerError
from ..layers import BLEND_MODES, Layer, LayerStack
from ..layers.compositing import composite_layers

DEFAULT_SIZE = 256
MIN_CANVAS = 32
MAX_CANVAS = 2048
MAX_LAYERS = 64
MAX_HISTORY = 50
MAX_SCALE = 8.0
MAX_UPLOAD_BYTES = 64 * 2**20


def check_image_header(path) -> None:
    """Refuse an image file whose header declares a canvas the studio does not take, before decoding it (a
    12000 px PNG takes seconds and gigabytes to decode only to be refused)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            size = im.size
    except Image.DecompressionBombError:
        raise LayerError(f"{Path(path).name}: canvas must be at most {MAX_CANVAS} pixels per side; this image is "
                         "hundreds of megapixels") from None
    except (OSError, SyntaxError, ValueError):
        return  # not an image Pillow can open: the decoder says what is wrong, naming the file
    check_canvas_size(*size)


def check_canvas_size(width, height) -> tuple[int, int]:
    """Validate a canvas size the studio accepts (generation, import, decomposition)."""
    try:
        w, h = int(width), int(height)
    except (TypeError, ValueError):
        raise LayerError(f"canvas size must be whole numbers, got {width!r} x {height!r}") from None
    if not (MIN_CANVAS <= w <= MAX_CANVAS and MIN_CANVAS <= h <= MAX_CANVAS):
        raise LayerError(f"canvas must be between {MIN_CANVAS} and {MAX_CANVAS} pixels per side, got {w}x{h}")
    return w, h


def checkerboard(width: int, height: int, cell: int = 8, light=236, dark=200) -> np.ndarray:
    """Opaque grey checkerboard (RGBA) drawn under previews so transparency is visible."""
    yy, xx = np.mgrid[0:height, 0:width]
    grey = np.where(((yy // cell) + (xx // cell)) % 2 == 0, light, dark).astype(np.uint8)
    return np.stack([grey, grey, grey, np.full_like(grey, 255)], axis=-1)


def _shallow_copy(layer: Layer) -> Layer:
    """A new layer record sharing the (frozen) pixel array."""
    return Layer(layer.pixels, layer.name, layer.x, layer.y, layer.opacity, layer.blend_mode, layer.visible,
                 _copy.deepcopy(layer.metadata))


def _same_layer(a: Layer, b: Layer) -> bool:
    return ((a.name, a.x, a.y, a.opacity, a.blend_mode, a.visible, a.metadata)
            == (b.name, b.x, b.y, b.opacity, b.blend_mode, b.visible, b.metadata)
            and (a.pixels is b.pixels or np.array_equal(a.pixels, b.pixels)))


@dataclass
class _Snapshot:
    label: str
    width: int
    height: int
    layers: list[Layer]
    metadata: dict
    selected: int | None


class Document:
    """An editable layered image with a selection and undo/redo of every edit."""

    def __init__(self, width: int = DEFAULT_SIZE, height: int = DEFAULT_SIZE, max_history: int = MAX_HISTORY):
        width, height = check_canvas_size(width, height)
        self.stack = LayerStack(width, height)
        self.selected: int | None = None
        self.max_history = int(max_history)
        self._undo: list[_Snapshot] = []
        self._redo: list[_Snapshot] = []
        self._depth = 0
        self.last_action = "New document"
        self.lock = threading.RLock()  # the app holds it for a whole event: one edit at a time per document
        self.running: str | None = None  # what the event holding the lock is doing ("generating a layer")

    def __deepcopy__(self, memo):
        """Deep copy without the lock (gr.State deep-copies the initial document for every session)."""
        new = Document.__new__(Document)
        for key, value in self.__dict__.items():
            if key != "lock":
                new.__dict__[key] = _copy.deepcopy(value, memo)
        new.lock = threading.RLock()
        return new

    # -- history ----------------------------------------------------------------
    def _snapshot(self, label: str) -> _Snapshot:
        return _Snapshot(label, self.stack.width, self.stack.height, [_shallow_copy(l) for l in self.stack],
                         _copy.deepcopy(self.stack.metadata), self.selected)

    def _restore(self, snap: _Snapshot) -> None:
        self.stack = LayerStack(snap.width, snap.height, [_shallow_copy(l) for l in snap.layers],
                                _copy.deepcopy(snap.metadata))
        self.selected = snap.selected

    def _changed_since(self, snap: _Snapshot) -> bool:
        return ((snap.width, snap.height) != (self.stack.width, self.stack.height)
                or snap.metadata != self.stack.metadata or len(snap.layers) != len(self.stack)
                or not all(_same_layer(a, b) for a, b in zip(snap.layers, self.stack)))

    def _freeze(self) -> None:
        for layer in self.stack:
            if layer.pixels.flags.writeable:
                layer.pixels.flags.writeable = False

    @contextlib.contextmanager
    def edit(self, label: str):
        """Group the changes made inside the block into one undo step named `label`.

        If the block raises, the document is restored exactly as it was; if it
        changes nothing, no step is recorded (so no-op clicks don't fill undo).
        """
        if self._depth:  # nested: the outermost edit records (and rolls back) the whole group
            self._depth += 1
            try:
                yield self.stack
            finally:
                self._depth -= 1
            return
        before = self._snapshot(label)
        self._depth = 1
        try:
            yield self.stack
            if len(self.stack) > MAX_LAYERS:
                raise LayerError(f"a document holds at most {MAX_LAYERS} layers; delete or merge some first")
        except BaseException:
            self._restore(before)
            raise
        finally:
            self._depth = 0
        self._freeze()
        if self.selected is not None and not 0 <= self.selected < len(self.stack):
            self.selected = len(self.stack) - 1 if len(self.stack) else None
        if self._changed_since(before):
            self._undo.append(before)
            del self._undo[:-self.max_history]
            self._redo.clear()
            self.last_action = label

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    @property
    def undo_label(self) -> str | None:
        return self._undo[-1].label if self._undo else None

    @property
    def redo_label(self) -> str | None:
        return self._redo[-1].label if self._redo else None

    def undo(self) -> str:
        """Revert the last edit; returns its label."""
        if not self._undo:
            raise LayerError("nothing to undo")
        snap = self._undo.pop()
        self._redo.append(self._snapshot(snap.label))
        self._restore(snap)
        self.last_action = f"Undo {snap.label}"
        return snap.label

    def redo(self) -> str:
        """Re-apply the last undone edit; returns its label."""
        if not self._redo:
            raise LayerError("nothing to redo")
        snap = self._redo.pop()
        self._undo.append(self._snapshot(snap.label))
        self._restore(snap)
        self.last_action = f"Redo {snap.label}"
        return snap.label

    # -- access -----------------------------------------------------------------
    @property
    def width(self) -> int:
        return self.stack.width

    @property
    def height(self) -> int:
        return self.stack.height

    def __len__(self) -> int:
        return len(self.stack)

    def resolve(self, index: int | None = None) -> int:
        """Stack position of `index`, or of the selected layer when `index` is None."""
        if not len(self.stack):
            raise LayerError("the document has no layers yet; generate, decompose or import some first")
        if index is None:
            if self.selected is None:
                raise LayerError("select a layer first")
            return self.selected
        try:
            i = int(index)
        except (TypeError, ValueError):
            raise LayerError(f"invalid layer index {index!r}") from None
        if not 0 <= i < len(self.stack):
            raise LayerError(f"layer index {i} out of range; the document has {len(self.stack)} layers")
        return i

    def layer(self, index: int | None = None) -> Layer:
        return self.stack.layers[self.resolve(index)]

    def select(self, index: int | None) -> None:
        """Selecting is not an edit: it is not recorded in the history."""
        self.selected = None if index is None else self.resolve(index)

    # -- whole-document edits ---------------------------------------------------
    def new(self, width: int = DEFAULT_SIZE, height: int = DEFAULT_SIZE) -> None:
        width, height = check_canvas_size(width, height)
        with self.edit("New document"):
            self.stack = LayerStack(width, height)
            self.selected = None

    def replace_stack(self, stack: LayerStack, label: str = "Import") -> None:
        """Make `stack` (a copy of it) the document, e.g. after import or decomposition."""
        if not isinstance(stack, LayerStack):
            raise TypeError(f"expected a LayerStack, got {type(stack).__name__}")
        check_canvas_size(stack.width, stack.height)
        if len(stack) > MAX_LAYERS:
            raise LayerError(f"{len(stack)} layers is more than the studio's limit of {MAX_LAYERS}")
        with self.edit(label):
            self.stack = stack.copy()
            self.selected = len(self.stack) - 1 if len(self.stack) else None

    def import_file(self, path, max_bytes: int = MAX_UPLOAD_BYTES) -> None:
        """Load a PSD / OpenRaster / PNG-stack zip / flat PNG or WebP as the document."""
        stack = load_upload(path, max_bytes)
        self.replace_stack(stack, label=f"Import {Path(path).name}")

    def export(self, path, format: str | None = None) -> Path:
        """Save the document; the format comes from the extension (see `layergen.layers.formats`)."""
        from ..layers import formats

        if not len(self.stack):
            raise LayerError("the document is empty; add a layer before exporting")
        return formats.save(self.stack, path, format=format)

    # -- layer edits ------------------------------------------------------------
    def add_layer(self, layer: Layer, index: int | None = None, label: str = "Add layer") -> Layer:
        return self.add_layers([layer], index=index, label=label)[0]

    def add_layers(self, layers, index: int | None = None, label: str = "Add layers") -> list[Layer]:
        """Insert layers (bottom -> top) at `index` (default: on top) and select the topmost new one."""
        layers = list(layers)
        if not layers:
            raise LayerError("nothing to add: no layers were produced")
        for layer in layers:
            if not isinstance(layer, Layer):
                raise TypeError(f"expected Layer objects, got {type(layer).__name__}")
        with self.edit(label):
            at = len(self.stack) if index is None else max(0, min(int(index), len(self.stack)))
            added = []
            for k, layer in enumerate(layers):
                layer = layer.copy()
                layer.name = self._unique_name(layer.name)
                added.append(self.stack.add(layer, at + k))
            self.selected = at + len(layers) - 1
        return added

    def _unique_name(self, name: str) -> str:
        name = name.strip() or "Layer"
        names = set(self.stack.names())
        if name not in names:
            return name
        k = 2
        while f"{name} {k}" in names:
            k += 1
        return f"{name} {k}"

    def rename(self, index: int | None, name: str) -> None:
        i = self.resolve(index)
        name = str(name or "").strip()
        if not name:
            raise LayerError("a layer name cannot be empty")
        if len(name) > 200:
            raise LayerError("a layer name can be at most 200 characters")
        with self.edit("Rename layer"):
            layer = self.stack.layers[i]
            if layer.name != name:
                layer.name = name
                layer.metadata["renamed"] = True  # a repaint keeps a name the user chose
            self.selected = i

    def set_visible(self, index: int | None, visible: bool) -> None:
        i = self.resolve(index)
        with self.edit("Show layer" if visible else "Hide layer"):
            self.stack.layers[i].visible = bool(visible)
            self.selected = i

    def set_opacity(self, index: int | None, opacity: float) -> None:
        i = self.resolve(index)
        try:
            opacity = float(opacity)
        except (TypeError, ValueError):
            raise LayerError(f"opacity must be a number, got {opacity!r}") from None
        if not 0.0 <= opacity <= 1.0:
            raise LayerError(f"opacity must be in [0, 1], got {opacity:g}")
        with self.edit("Change opacity"):
            self.stack.layers[i].opacity = opacity
            self.selected = i

    def set_blend_mode(self, index: int | None, mode: str) -> None:
        i = self.resolve(index)
        if mode not in BLEND_MODES:
            raise LayerError(f"unknown blend mode {mode!r}; expected one of {', '.join(BLEND_MODES)}")
        with self.edit("Change blend mode"):
            self.stack.layers[i].blend_mode = mode
            self.selected = i

    def move_up(self, index: int | None = None) -> None:
        """One step towards the top of the stack."""
        i = self.resolve(index)
        if i == len(self.stack) - 1:
            raise LayerError(f"layer {self.stack.layers[i].name!r} is already the top layer")
        with self.edit("Move layer up"):
            self.stack.reorder(i, i + 1)
            self.selected = i + 1

    def move_down(self, index: int | None = None) -> None:
        i = self.resolve(index)
        if i == 0:
            raise LayerError(f"layer {self.stack.layers[i].name!r} is already the bottom layer")
        with self.edit("Move layer down"):
            self.stack.reorder(i, i - 1)
            self.selected = i - 1

    def duplicate(self, index: int | None = None) -> None:
        i = self.resolve(index)
        with self.edit("Duplicate layer"):
            self.stack.duplicate(i, name=self._unique_name(f"{self.stack.layers[i].name} copy"))
            self.selected = i + 1

    def delete(self, index: int | None = None) -> None:
        i = self.resolve(index)
        with self.edit("Delete layer"):
            self.stack.remove(i)
            self.selected = (i - 1 if i > 0 else 0) if len(self.stack) else None

    def merge_down(self, index: int | None = None) -> None:
        i = self.resolve(index)
        with self.edit("Merge down"):
            self.stack.merge_down(i)
            self.selected = i - 1

    def set_position(self, index: int | None, x: int, y: int) -> None:
        """Place the layer's top-left corner at canvas pixel (x, y)."""
        i = self.resolve(index)
        try:
            x, y = int(round(float(x))), int(round(float(y)))
        except (TypeError, ValueError):
            raise LayerError(f"position must be numbers, got ({x!r}, {y!r})") from None
        limit = 4 * MAX_CANVAS
        if abs(x) > limit or abs(y) > limit:
            raise LayerError(f"position ({x}, {y}) is too far outside the canvas")
        with self.edit("Move layer"):
            self.stack.move(i, x, y)
            self.selected = i

    def scale(self, index: int | None, factor: float) -> None:
        """Resize the layer by `factor` about its centre (premultiplied Lanczos, so edges keep their colour)."""
        i = self.resolve(index)
        try:
            factor = float(factor)
        except (TypeError, ValueError):
            raise LayerError(f"scale must be a number, got {factor!r}") from None
        if not 0.0 < factor <= MAX_SCALE:
            raise LayerError(f"scale must be in (0, {MAX_SCALE:g}], got {factor:g}")
        layer = self.stack.layers[i]
        w = max(1, int(round(layer.width * factor)))
        h = max(1, int(round(layer.height * factor)))
        if max(w, h) > 2 * MAX_CANVAS:
            raise LayerError(f"scaled layer would be {w}x{h}; the limit is {2 * MAX_CANVAS} pixels per side")
        if (w, h) == (layer.width, layer.height):
            return
        from PIL import Image

        # Pillow premultiplies RGBA internally when resampling, so no dark fringes appear at soft edges.
        pixels = np.asarray(layer.to_image().resize((w, h), Image.Resampling.LANCZOS))
        cx, cy = layer.x + layer.width / 2.0, layer.y + layer.height / 2.0
        with self.edit("Scale layer"):
            layer = self.stack.layers[i]
            layer.pixels = np.ascontiguousarray(pixels)
            layer.x, layer.y = int(round(cx - w / 2.0)), int(round(cy - h / 2.0))
            self.selected = i

    def replace_pixels(self, index: int | None, new: Layer, label: str = "Repaint layer") -> None:
        """Swap in new content for one layer (repaint): pixels, position and provenance change;
        visibility, opacity, blend mode and a name the user typed stay; all other layers stay untouched."""
        i = self.resolve(index)
        if not isinstance(new, Layer):
            raise TypeError(f"expected a Layer, got {type(new).__name__}")
        with self.edit(label):
            layer = self.stack.layers[i]
            renamed = layer.metadata.get("renamed", False)
            layer.pixels = np.ascontiguousarray(new.pixels.copy())
            layer.x, layer.y = new.x, new.y
            layer.metadata = _copy.deepcopy(new.metadata)
            if renamed:
                layer.metadata["renamed"] = True
            elif new.name and new.name != "Layer":
                others = set(self.stack.names()[:i] + self.stack.names()[i + 1:])
                layer.name = new.name if new.name not in others else self._unique_name(new.name)
            self.selected = i

    # -- views ------------------------------------------------------------------
    def preview(self, checker: bool = True) -> np.ndarray:
        """The composite as RGBA; over a checkerboard (opaque) by default so transparency shows."""
        bg = checkerboard(self.width, self.height) if checker else None
        return self.stack.composite(background=bg)

    def thumbnail(self, index: int, size: int = 96) -> np.ndarray:
        """One layer alone, in place on the canvas, over a checkerboard, fitted into `size` pixels."""
        from PIL import Image

        layer = self.stack.layers[self.resolve(index)]
        shown = _shallow_copy(layer)
        shown.visible, shown.opacity, shown.blend_mode = True, 1.0, "normal"
        scale = size / max(self.width, self.height)
        w, h = max(1, round(self.width * scale)), max(1, round(self.height * scale))
        rgba = composite_layers(self.width, self.height, [shown], checkerboard(self.width, self.height, cell=16))
        return np.asarray(Image.fromarray(rgba, "RGBA").resize((w, h), Image.Resampling.BILINEAR))

    def layer_label(self, index: int) -> str:
        layer = self.stack.layers[index]
        return f"{index}: {layer.name}" + ("" if layer.visible else " (hidden)")

    def summary(self) -> dict:
        """A JSON-able description (what the studio's info panel shows and API tests assert)."""
        layers = []
        for i, l in enumerate(self.stack):
            layers.append({"index": i, "name": l.name, "visible": l.visible, "opacity": round(l.opacity, 4),
                           "blend_mode": l.blend_mode, "x": l.x, "y": l.y, "width": l.width, "height": l.height,
                           "kind": l.kind, "prompt": l.metadata.get("prompt"), "seed": l.metadata.get("seed")})
        return {"width": self.width, "height": self.height, "selected": self.selected, "layers": layers,
                "undo": self.undo_label, "redo": self.redo_label, "last_action": self.last_action}


def load_upload(path, max_bytes: int = MAX_UPLOAD_BYTES) -> LayerStack:
    """Validate an uploaded file (size, type) before parsing it."""
    from ..layers import formats

    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise FormatError(f"{path.name} is {size / 2**20:.1f} MB; the studio accepts files up to "
                          f"{max_bytes / 2**20:.0f} MB")
    fmt = formats.detect_format(path)
    if fmt == "dir":
        raise FormatError(f"{path.name}: upload a .psd, .ora, .zip, .png or .webp file")
    if fmt in ("png", "webp"):
        check_image_header(path)
    try:
        return formats.load(path, format=fmt)
    except FormatError as exc:  # the user knows the file's name, not the server's upload folder
        raise FormatError(str(exc).replace(str(path), path.name)) from None
