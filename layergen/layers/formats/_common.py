"""Helpers shared by the format readers and writers: PNG bytes, safe layer building, JSON metadata."""
from __future__ import annotations

import io
import json
import re
import struct
from pathlib import Path

import numpy as np

from ...errors import FormatError, LayerError
from ..layer import Layer, LayerStack

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_bytes(pixels: np.ndarray) -> bytes:
    """Encode straight uint8 RGBA as an 8-bit RGBA PNG (lossless, deterministic: no timestamps)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes, where: str) -> np.ndarray:
    """PNG bytes -> uint8 RGBA; rejects 16-bit PNGs instead of letting Pillow silently drop the low byte."""
    if not data.startswith(PNG_SIGNATURE) or len(data) < 33 or data[12:16] != b"IHDR":
        raise FormatError(f"{where}: not a PNG image (corrupt or wrong file type)")
    bit_depth = data[24]
    if bit_depth == 16:
        raise FormatError(f"{where}: 16-bit PNG is not supported; convert it to 8-bit RGBA")
    return decode_image(data, where)


def decode_image(data: bytes, where: str) -> np.ndarray:
    """Any Pillow-readable 8-bit image bytes -> uint8 RGBA, fully decoded (truncation is detected here)."""
    from PIL import Image

    from ..layer import as_rgba_array

    try:
        with Image.open(io.BytesIO(data)) as im:
            check_canvas(where, *im.size)  # from the header, before decoding gigabytes
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F", "RGB;16", "RGBA;16"):
                raise FormatError(f"{where}: {im.mode} (16-bit/float) images are not supported; convert to 8-bit RGBA")
            if im.mode == "CMYK":
                raise FormatError(f"{where}: CMYK images are not supported; convert to RGB(A)")
            return as_rgba_array(im)
    except FormatError:
        raise
    except LayerError as exc:
        raise FormatError(f"{where}: {exc}") from exc
    except Image.DecompressionBombError:  # Pillow's own guard, below ours, trips first for very large images
        raise FormatError(f"{where}: image is larger than layergen reads (over "
                          f"{2 * Image.MAX_IMAGE_PIXELS // 10**6} megapixels)") from None
    except Image.UnidentifiedImageError:  # its message names an internal BytesIO object, not the file
        raise FormatError(f"{where}: cannot decode image (not an image file, or damaged)") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
        # Pillow reports corrupt/truncated data as OSError ("image file is truncated"), SyntaxError or ValueError.
        raise FormatError(f"{where}: cannot decode image ({exc})") from exc


def make_layer(where: str, pixels, **kwargs) -> Layer:
    """Build a Layer from file data, turning invalid values (blend mode, opacity) into a FormatError."""
    try:
        return Layer(pixels, **kwargs)
    except LayerError as exc:
        raise FormatError(f"{where}: layer {kwargs.get('name', '?')!r}: {exc}") from exc


MAX_CANVAS_SIDE = 30000  # what PSD allows
MAX_CANVAS_PIXELS = 16384 * 16384  # 1 GiB as RGBA8: a file claiming more is corrupt or hostile, not a picture


def check_canvas(where: str, width: int, height: int) -> None:
    if max(width, height) > MAX_CANVAS_SIDE or width * height > MAX_CANVAS_PIXELS:
        raise FormatError(f"{where}: canvas {width}x{height} is larger than layergen reads "
                          f"({MAX_CANVAS_SIDE} px a side, {MAX_CANVAS_PIXELS // 2**20} megapixels)")


def make_stack(where: str, width, height, metadata=None) -> LayerStack:
    try:
        width, height = int(width), int(height)
        check_canvas(where, width, height)
        return LayerStack(width, height, metadata=metadata)
    except (LayerError, TypeError, ValueError, OverflowError) as exc:
        raise FormatError(f"{where}: invalid canvas size {width!r} x {height!r}") from exc


def faded_group_note(name: str) -> str:
    """What flattening a faded group of several layers changes (PSD and ORA alike)."""
    return (f"group {name!r}: its opacity is applied to each of its layers, so where they overlap the lower ones "
            "show through")


def saved_metadata(stack: LayerStack) -> dict:
    """The stack metadata a file keeps: all but `notes`, which describe this reading (what flattening another
    tool's file lost, guidance that found nothing) and would be wrong about the file layergen writes."""
    return {k: v for k, v in stack.metadata.items() if k != "notes"}


def dumps_metadata(metadata: dict) -> str:
    """JSON for metadata; non-JSON values (numpy scalars, paths) become strings so saving never fails on them."""
    return json_text(metadata, sort_keys=True, default=_json_default)


# UTF-8 cannot encode a lone surrogate, and XML cannot hold U+FFFE / U+FFFF at all (a prompt pasted from odd
# sources can carry them); JSON's \u escapes can, and read back as the very same string.
_UNWRITABLE = re.compile("[\ud800-\udfff\ufffe\uffff]")


def json_text(value, **kwargs) -> str:
    """`json.dumps(value, ensure_ascii=False, **kwargs)` that every file format layergen writes can store."""
    text = json.dumps(value, ensure_ascii=False, **kwargs)
    return _UNWRITABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def loads_metadata(text: str | None, where: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{where}: invalid layer metadata JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise FormatError(f"{where}: layer metadata must be a JSON object, got {type(value).__name__}")
    return value


def slug(name: str, limit: int = 40) -> str:
    """A filesystem-safe, human-readable fragment of a layer name."""
    s = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:limit]
    return s or "layer"


def describe(path) -> str:
    return str(Path(path))
