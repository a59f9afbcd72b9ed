"""Training records from the folders users already have: transparent PNGs with captions, PSD / ORA / PNG stacks.

Two layouts, freely mixed in one folder tree:

* **imagefolder** (the diffusers / `datasets` convention): RGBA images with captions in a
  `metadata.jsonl` (`{"file_name": "a.png", "text": "a red star"}`, paths relative to the
  metadata file's folder; an optional `background_file_name` names the opaque image the layer
  sits on) or in a `.txt` file beside each image. Without either, the file name is the caption.
* **layered files** (`.psd`, `.ora`, PNG-stack `.zip` or folder with `stack.json`): every visible
  pixel layer becomes a record; the visible layers below it, flattened (over white where they
  leave gaps), become its background. Its caption is the layer's `prompt` metadata, else its name
  unless that is a generic "Layer 3", else the file's caption.

A record is one straight-alpha RGBA layer on its canvas. Bad input never stops a scan: files
that cannot be decoded, images without alpha, fully transparent or tiny layers, hidden layers and
unsupported files are skipped and counted by reason in a `SkipReport`, which the training script
and `layergen dataset build` print at the end.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import LayergenError
from ..layers import Layer, LayerStack, composite_layers

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".webp", ".tif", ".tiff", ".gif", ".bmp", ".jpg", ".jpeg")
LAYERED_SUFFIXES = (".psd", ".ora", ".zip")
METADATA_FILE = "metadata.jsonl"
CAPTION_COLUMN = "text"
BACKGROUND_COLUMN = "background_file_name"
SKIP_REASONS = {
    "corrupt": "cannot be read (corrupt, truncated or not an image)",
    "no_alpha": "no transparency (RGB image or fully opaque layer)",
    "empty": "fully transparent",
    "tiny": "visible content smaller than the minimum size",
    "hidden": "hidden layer",
    "background": "opaque bottom layer (it is the background of the layers above, not a sample)",
    "unsupported": "not an image or layered file",
}
_GENERIC_NAME = re.compile(r"^(layer|ebene|calque|capa|instance|group|background|flattened|untitled)?[\s_#-]*\d*"
                           r"( copy( \d+)?)?$", re.IGNORECASE)


@dataclass
class LayerRecord:
    """One training sample: a canvas-sized straight RGBA layer, its caption, and what lies below it."""

    rgba: np.ndarray  # H x W x 4 uint8, straight alpha
    caption: str
    background: np.ndarray | None = None  # H x W x 3 uint8 (opaque), or None
    source: str = ""  # "folder/a.png" or "doc.psd#2" (layer index, bottom = 0)


@dataclass(frozen=True)
class RecordRef:
    """Where a record lives, without its pixels: `layer` is the stack index for layered files."""

    path: Path
    caption: str
    layer: int | None = None
    background: Path | None = None
    source: str = ""


@dataclass
class SkipReport:
    """Counts of records kept and skipped (by reason), with a few example sources per reason."""

    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    captions_from_names: int = 0

    def skip(self, reason: str, source: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(f"{source}: {detail}" if detail else source)
        logger.info("skipped %s (%s%s)", source, reason, f": {detail}" if detail else "")

    def merge(self, other: "SkipReport") -> "SkipReport":
        self.kept += other.kept
        self.skipped.update(other.skipped)
        self.captions_from_names += other.captions_from_names
        for k, v in other.examples.items():
            self.examples.setdefault(k, [])
            self.examples[k] = (self.examples[k] + v)[:5]
        return self

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line: '12 records; skipped 3: 1 corrupt, 2 no_alpha'."""
        text = f"{self.kept} record{'s' * (self.kept != 1)}"
        if self.skipped:
            parts = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items()))
            text += f"; skipped {self.total_skipped}: {parts}"
        else:
            text += "; skipped 0"
        if self.captions_from_names:
            text += f" ({self.captions_from_names} captioned from file names)"
        return text

    def to_dict(self) -> dict:
        return {"kept": self.kept, "skipped": dict(sorted(self.skipped.items())),
                "examples": {k: list(v) for k, v in sorted(self.examples.items())},
                "captions_from_names": self.captions_from_names}


# ---------------------------------------------------------------------------------------------
# checks


def check_layer(rgba: np.ndarray, min_size: int = 8) -> str | None:
    """Why a canvas-sized RGBA layer is not a useful sample (a `SKIP_REASONS` key), or None if it is."""
    h, w = rgba.shape[:2]
    if min(h, w) < min_size:
        return "tiny"
    alpha = rgba[..., 3]
    if not alpha.any():
        return "empty"
    if alpha.min() == 255:
        return "no_alpha"
    ys, xs = np.nonzero(alpha > 0)
    if max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) < min_size:
        return "tiny"
    return None


def flatten_on_white(rgba: np.ndarray) -> np.ndarray:
    """Straight RGBA uint8 -> opaque RGB uint8 over white (paper), for backgrounds with gaps."""
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.floor(rgb + 0.5).astype(np.uint8)


def caption_from_name(name: str) -> str:
    """'red_star-02.png' -> 'red star 02': the fallback caption when none is given."""
    return re.sub(r"[\s_\-]+", " ", Path(name).stem).strip()


def is_generic_name(name: str) -> bool:
    """'Layer 3', 'instance 2', 'Background', 'Layer 1 copy': names that say nothing about content."""
    return bool(_GENERIC_NAME.fullmatch(name.strip()))


# ---------------------------------------------------------------------------------------------
# reading


def _read_image(path: Path) -> np.ndarray:
    """Fully decoded uint8 RGBA; raises LayergenError('no_alpha') for images without an alpha channel."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            has_alpha = "A" in im.getbands() or "transparency" in im.info
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                raise LayergenError(f"{im.mode} (16-bit/float) images are not supported")
            arr = np.asarray(im.convert("RGBA"))
    except LayergenError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise LayergenError(f"cannot decode image ({type(exc).__name__}: {exc})") from exc
    if not has_alpha:
        raise _NoAlpha()
    return np.ascontiguousarray(arr)


class _NoAlpha(LayergenError):
    pass


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return flatten_on_white(np.asarray(im.convert("RGBA")))
    except Exception as exc:
        raise LayergenError(f"cannot decode background ({type(exc).__name__}: {exc})") from exc


def load_stack(path: Path) -> LayerStack:
    """A layered file or PNG-stack folder as a LayerStack (FormatError when unreadable)."""
    from ..layers.formats import load

    try:
        return load(path)
    except LayergenError:
        raise
    except Exception as exc:  # readers are hardened, but a record scan must never crash on one file
        raise LayergenError(f"cannot read ({type(exc).__name__}: {exc})") from exc


def layer_on_canvas(stack: LayerStack, index: int) -> np.ndarray:
    """Layer `index` alone on the stack's canvas (offset, clipping and opacity applied), uint8 RGBA."""
    layer = stack.layers[index]
    alone = Layer(layer.pixels, x=layer.x, y=layer.y, opacity=layer.opacity)  # blend modes need a backdrop
    return composite_layers(stack.width, stack.height, [alone])


def background_below(stack: LayerStack, index: int) -> np.ndarray | None:
    """The visible layers below `index`, flattened over white; None when nothing visible is below."""
    below = [l for l in stack.layers[:index] if l.visible and l.opacity > 0]
    if not below:
        return None
    flat = composite_layers(stack.width, stack.height, below)
    if not flat[..., 3].any():
        return None
    return flatten_on_white(flat)


def layer_caption(layer: Layer, fallback: str) -> str:
    for key in ("prompt", "caption", "text"):
        value = layer.metadata.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    if layer.name and not is_generic_name(layer.name):
        return layer.name.strip()
    return fallback


def records_from_stack(stack: LayerStack, source: str, caption: str = "", min_size: int = 8,
                       report: SkipReport | None = None) -> list[LayerRecord]:
    """Every visible pixel layer of `stack` as a record, its background = the flattened layers below."""
    report = report if report is not None else SkipReport()
    out = []
    for i, layer in enumerate(stack.layers):
        where = f"{source}#{i}"
        if not layer.visible or layer.opacity <= 0:
            report.skip("hidden", where, layer.name)
            continue
        rgba = layer_on_canvas(stack, i)
        reason = check_layer(rgba, min_size)
        if reason == "no_alpha" and i == 0:
            reason = "background"
        if reason:
            report.skip(reason, where, layer.name)
            continue
        text = layer_caption(layer, caption)
        out.append(LayerRecord(rgba, text, background_below(stack, i), where))
        report.kept += 1
    return out


# ---------------------------------------------------------------------------------------------
# folder scan


def _read_metadata(root: Path, caption_column: str, report: SkipReport) -> dict[Path, dict]:
    """Every `metadata.jsonl` under `root`: {resolved image path: row}. Bad lines are skipped."""
    rows = {}
    for meta in sorted(root.rglob(METADATA_FILE)):
        if any(part.startswith(".") for part in meta.relative_to(root).parts):
            continue
        for n, line in enumerate(meta.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name = row["file_name"]
                if not isinstance(name, str):
                    raise TypeError("file_name is not a string")
            except (ValueError, KeyError, TypeError) as exc:
                report.skip("corrupt", f"{meta.relative_to(root)}:{n}", f"bad metadata line ({exc})")
                continue
            row["__dir__"] = meta.parent  # other *_file_name columns are relative to the metadata file too
            rows[(meta.parent / name).resolve()] = row
    return rows


def _is_stack_dir(path: Path) -> bool:
    return path.is_dir() and (path / "stack.json").is_file()


def _side_caption(path: Path) -> str | None:
    txt = path.with_suffix(".txt")
    if txt.is_file():
        return txt.read_text(encoding="utf-8", errors="replace").strip()
    return None


def _walk(root: Path):
    """Files and PNG-stack folders under `root`, sorted, hidden entries skipped."""
    if _is_stack_dir(root):
        yield root
        return
    for child in sorted(root.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            yield from _walk(child)
        else:
            yield child


def scan_folder(root, min_size: int = 8, caption_column: str = CAPTION_COLUMN, report: SkipReport | None = None,
                load_pixels: bool = False):
    """Validate every candidate record under `root`.

    Returns `(items, report)`: `items` are `RecordRef`s (or `LayerRecord`s with `load_pixels=True`,
    which keeps every decoded layer in memory: for small data sets). Nothing raises for a bad file.
    """
    root = Path(root)
    if not root.is_dir():
        raise LayergenError(f"{root}: no such data folder")
    report = report if report is not None else SkipReport()
    rows = _read_metadata(root, caption_column, report)
    referenced = set()  # background images are not samples of their own
    for path, row in rows.items():
        for key, value in row.items():
            if key != "file_name" and key.endswith("file_name") and isinstance(value, str):
                referenced.add((row["__dir__"] / value).resolve())
    items = []
    for path in _walk(root):
        rel = str(path.relative_to(root)) if path != root else path.name
        resolved = path.resolve()
        if resolved in referenced or path.name == METADATA_FILE:
            continue
        suffix = path.suffix.lower()
        row = rows.get(resolved, {})
        given = row.get(caption_column)
        given = given.strip() if isinstance(given, str) else None
        if given is None:
            given = _side_caption(path) if path.is_file() else None
        if _is_stack_dir(path) or suffix in LAYERED_SUFFIXES:
            try:
                stack = load_stack(path)
            except LayergenError as exc:
                report.skip("corrupt", rel, str(exc).replace(str(path) + ": ", ""))
                continue
            fallback = given if given is not None else caption_from_name(path.name)
            recs = records_from_stack(stack, rel, fallback, min_size, report)
            for rec in recs:
                k = int(rec.source.rsplit("#", 1)[1])
                if given is None and rec.caption == fallback:
                    report.captions_from_names += 1
                items.append(rec if load_pixels else RecordRef(path, rec.caption, k, None, rec.source))
            continue
        if suffix in (".txt", ".json", ".jsonl", ".md") and not row:
            continue  # captions and notes beside the images
        if suffix not in IMAGE_SUFFIXES:
            report.skip("unsupported", rel)
            continue
        try:
            rgba = _read_image(path)
        except _NoAlpha:
            report.skip("no_alpha", rel)
            continue
        except LayergenError as exc:
            report.skip("corrupt", rel, str(exc))
            continue
        reason = check_layer(rgba, min_size)
        if reason:
            report.skip(reason, rel)
            continue
        bg_path = None
        if isinstance(row.get(BACKGROUND_COLUMN), str):
            bg_path = (row["__dir__"] / row[BACKGROUND_COLUMN]).resolve()
            if not bg_path.is_file():
                report.skip("corrupt", rel, f"background {row[BACKGROUND_COLUMN]} is missing")
                continue
        if given is None:
            given = caption_from_name(path.name)
            report.captions_from_names += 1
        if load_pixels:
            background = None
            if bg_path is not None:
                try:
                    background = _fit_background(_read_rgb(bg_path), rgba.shape[:2])
                except LayergenError as exc:
                    report.skip("corrupt", rel, str(exc))
                    continue
            items.append(LayerRecord(rgba, given, background, rel))
        else:
            items.append(RecordRef(path, given, None, bg_path, rel))
        report.kept += 1
    return items, report


def _fit_background(rgb: np.ndarray, shape) -> np.ndarray:
    if rgb.shape[:2] == tuple(shape):
        return rgb
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).resize((shape[1], shape[0]), Image.LANCZOS))


class _StackCache:
    """The last few decoded layered files, so loading every layer of a PSD does not re-read it each time."""

    def __init__(self, size: int = 4):
        self.size, self.items = size, OrderedDict()

    def get(self, path: Path) -> LayerStack:
        if path in self.items:
            self.items.move_to_end(path)
            return self.items[path]
        stack = load_stack(path)
        self.items[path] = stack
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return stack


def load_record(ref: RecordRef, cache: _StackCache | None = None) -> LayerRecord:
    """Decode the record a `RecordRef` points to (it was validated by `scan_folder`)."""
    if ref.layer is not None:
        stack = (cache or _StackCache()).get(ref.path)
        return LayerRecord(layer_on_canvas(stack, ref.layer), ref.caption, background_below(stack, ref.layer),
                           ref.source)
    rgba = _read_image(ref.path)
    bg = _fit_background(_read_rgb(ref.background), rgba.shape[:2]) if ref.background else None
    return LayerRecord(rgba, ref.caption, bg, ref.source)


# ---------------------------------------------------------------------------------------------
# to training resolution


def fit_record(record: LayerRecord, resolution: int, mode: str = "pad"):
    """Resize a record to `resolution` x `resolution`: float32 RGBA (H x W x 4, [0, 1], straight) and
    RGB background (H x W x 3, [0, 1]) or None.

    `pad` fits the whole canvas (transparent margins for the layer, edge-replicated background),
    `crop` fills the square and cuts the overflow (centre), `stretch` ignores the aspect ratio.
    Colour is resized premultiplied, so edges do not pick up the colour hidden under alpha = 0.
    """
    import cv2

    if mode not in ("pad", "crop", "stretch"):
        raise LayergenError(f"resize mode must be pad, crop or stretch, got {mode!r}")
    rgba = record.rgba.astype(np.float32) / 255.0
    premul = np.concatenate([rgba[..., :3] * rgba[..., 3:], rgba[..., 3:]], -1)
    bg = None if record.background is None else record.background.astype(np.float32) / 255.0
    h, w = rgba.shape[:2]
    if mode == "stretch":
        size = (resolution, resolution)
    else:
        s = resolution / (max(h, w) if mode == "pad" else min(h, w))
        size = (max(1, round(w * s)), max(1, round(h * s)))
    interp = cv2.INTER_AREA if size[0] < w else cv2.INTER_CUBIC

    def resize(x):
        return np.clip(cv2.resize(x, size, interpolation=interp), 0, 1)

    premul = resize(premul)
    bg = None if bg is None else resize(bg)
    nh, nw = premul.shape[:2]
    if mode == "crop":
        y0, x0 = (nh - resolution) // 2, (nw - resolution) // 2
        premul = premul[y0:y0 + resolution, x0:x0 + resolution]
        bg = None if bg is None else bg[y0:y0 + resolution, x0:x0 + resolution]
    elif mode == "pad":
        top, left = (resolution - nh) // 2, (resolution - nw) // 2
        pads = ((top, resolution - nh - top), (left, resolution - nw - left), (0, 0))
        premul = np.pad(premul, pads)
        bg = None if bg is None else np.pad(bg, pads, mode="edge")
    a = premul[..., 3:]
    rgb = np.where(a > 1e-6, premul[..., :3] / np.maximum(a, 1e-6), 0.0)
    out = np.concatenate([np.clip(rgb, 0, 1), a], -1).astype(np.float32)
    return out, (None if bg is None else bg.astype(np.float32))


class LayerFolderDataset:
    """torch-style Dataset over a record folder: dicts of `rgba` (4 x R x R), `background` (3 x R x R, zeros
    when absent), `has_background`, `caption`. Decodes lazily; use `records=` to pass pre-scanned refs."""

    def __init__(self, root=None, resolution: int = 128, resize_mode: str = "pad", min_size: int = 8,
                 caption_column: str = CAPTION_COLUMN, records=None, random_flip: bool = False):
        if records is None:
            records, self.report = scan_folder(root, min_size, caption_column)
        else:
            self.report = None
        self.records = list(records)
        self.resolution, self.resize_mode, self.random_flip = resolution, resize_mode, random_flip
        self._cache = _StackCache()

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        import torch

        item = self.records[i]
        rec = item if isinstance(item, LayerRecord) else load_record(item, self._cache)
        rgba, bg = fit_record(rec, self.resolution, self.resize_mode)
        if self.random_flip and torch.rand(()) < 0.5:
            rgba = rgba[:, ::-1]
            bg = None if bg is None else bg[:, ::-1]
        out = {"rgba": torch.from_numpy(np.ascontiguousarray(rgba.transpose(2, 0, 1))),
               "has_background": bg is not None, "caption": rec.caption}
        out["background"] = (torch.from_numpy(np.ascontiguousarray(bg.transpose(2, 0, 1))) if bg is not None
                             else torch.zeros(3, self.resolution, self.resolution))
        return out


__all__ = ["BACKGROUND_COLUMN", "CAPTION_COLUMN", "IMAGE_SUFFIXES", "LAYERED_SUFFIXES", "LayerFolderDataset",
           "LayerRecord", "METADATA_FILE", "RecordRef", "SKIP_REASONS", "SkipReport", "background_below",
           "caption_from_name", "check_layer", "fit_record", "flatten_on_white", "is_generic_name",
           "layer_caption", "layer_on_canvas", "load_record", "load_stack", "records_from_stack", "scan_folder"]
