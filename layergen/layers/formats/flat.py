"""Flattened images (`.png`, `.webp`): save writes the composite, load gives a one-layer stack.

WebP is written lossless with `exact=True`, so colour under transparent
pixels is kept and a reload is pixel-identical.
"""
from __future__ import annotations

from pathlib import Path

from ...atomic import atomic_path
from ...errors import FormatError
from ..layer import LayerStack
from ._common import PNG_SIGNATURE, decode_image, decode_png, make_layer, make_stack


def save(stack: LayerStack, path: Path, fmt: str) -> Path:
    image = stack.to_image()
    with atomic_path(path) as tmp:
        if fmt == "webp":
            image.save(tmp, format="WEBP", lossless=True, exact=True, quality=100, method=4)
        else:
            image.save(tmp, format="PNG", compress_level=6)
    return Path(path)


def load(path: Path, fmt: str) -> LayerStack:
    path = Path(path)
    data = path.read_bytes()
    if fmt == "png":
        pixels = decode_png(data, str(path))
    else:
        if not (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            kind = "a PNG" if data.startswith(PNG_SIGNATURE) else "not a WebP image"
            raise FormatError(f"{path}: {kind} (corrupt or wrong extension)")
        pixels = decode_image(data, str(path))
    stack = make_stack(str(path), pixels.shape[1], pixels.shape[0])
    stack.add(make_layer(str(path), pixels, name=path.stem or "Background", metadata={"kind": "background"}))
    return stack
