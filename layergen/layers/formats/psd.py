"""Layered PSD through psd-tools: what Photoshop, Photopea, GIMP and Krita all open.

Limits worth knowing:

* PSD stores opacity as one byte, so opacity is rounded to the nearest k/255
  on save (0.5 -> 128/255). Everything else (pixels, names, order, offsets,
  visibility, the supported blend modes) round-trips exactly.
* layergen metadata (stack and layers) is kept as JSON inside the document's
  XMP packet, which Photoshop preserves and other readers ignore.
* Loading: 8-bit RGB and grayscale documents. Groups are flattened into their
  layers (the group's visibility and opacity are folded into each child and
  the group path is kept as `psd_group` metadata; where the layers of a faded
  group overlap, the lower ones therefore show through); user masks
  are applied to alpha; fill opacity is multiplied into opacity; adjustment
  layers are skipped, and clipping and layer effects are not reproduced. Each
  such simplification is listed in `stack.metadata["notes"]`. A blend mode
  layergen cannot composite (e.g. color burn) is an error, not a silent change.
* The merged image carries the canvas's transparency (a negative layer count,
  as Photoshop writes it), so previews of a transparent document stay transparent.
"""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np

from ...atomic import atomic_path
from ...errors import FormatError, LayerError
from ..layer import LayerStack
from ._common import dumps_metadata, faded_group_note, make_layer, make_stack, saved_metadata

PSD_MAX_SIDE = 30000
XMP_NS = "https://github.com/layergen/layergen/ns/psd"
_XMP_RE = re.compile(r'layergen:stack="([^"]*)"')


def _blend_maps():
    from psd_tools.constants import BlendMode

    to_psd = {
        "normal": BlendMode.NORMAL, "multiply": BlendMode.MULTIPLY, "screen": BlendMode.SCREEN,
        "overlay": BlendMode.OVERLAY, "darken": BlendMode.DARKEN, "lighten": BlendMode.LIGHTEN,
        "add": BlendMode.LINEAR_DODGE,
    }
    return to_psd, {v: k for k, v in to_psd.items()}


def _xmp(stack: LayerStack) -> bytes:
    layers = [{"name": l.name, "metadata": l.metadata} for l in stack.layers]
    data = {"metadata": saved_metadata(stack), "layers": layers}
    value = html.escape(dumps_metadata(data), quote=True)
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        f'  <rdf:Description rdf:about="" xmlns:layergen="{XMP_NS}" layergen:stack="{value}"/>\n'
        ' </rdf:RDF>\n'
        '</x:xmpmeta>\n'
        '<?xpacket end="w"?>'
    ).encode("utf-8")


def save(stack: LayerStack, path: Path) -> Path:
    from PIL import Image
    from psd_tools import PSDImage
    from psd_tools.api.layers import PixelLayer
    from psd_tools.constants import Resource
    from psd_tools.psd.image_resources import ImageResource

    if max(stack.size) > PSD_MAX_SIDE:
        raise LayerError(f"PSD canvas is limited to {PSD_MAX_SIDE} px a side, got {stack.width}x{stack.height}")
    to_psd, _ = _blend_maps()
    psd = PSDImage.new("RGBA", stack.size, color=(0, 0, 0, 0))
    psd.background_color = None  # transparent merged preview, like the canvas itself
    for layer in stack.layers:
        # frompil appends the new layer to `psd` itself (bottom -> top, the same order as ours).
        if len(layer.name) > 255:
            raise LayerError(f"layer name {layer.name[:40]!r}... is {len(layer.name)} characters; PSD allows 255")
        pl = PixelLayer.frompil(Image.fromarray(layer.pixels, "RGBA"), psd, "Layer", top=layer.y, left=layer.x)
        pl.name = layer.name  # the setter also writes the Unicode name block, so any character survives
        pl.opacity = int(np.floor(layer.opacity * 255 + 0.5))  # 8-bit, half up like compositing
        pl.blend_mode = to_psd[layer.blend_mode]
        pl.visible = layer.visible
    layer_info = psd._record.layer_and_mask_information.layer_info
    if layer_info is not None:  # (none without layers) the merged image's 4th channel is its transparency
        layer_info.layer_count = -abs(layer_info.layer_count)
    psd.image_resources[Resource.XMP_METADATA] = ImageResource(key=Resource.XMP_METADATA, data=_xmp(stack))
    with atomic_path(path) as tmp:
        psd.save(tmp)
    return Path(path)


def _read_xmp(psd) -> dict | None:
    from psd_tools.constants import Resource

    raw = psd.image_resources.get_data(Resource.XMP_METADATA)
    if not isinstance(raw, (bytes, bytearray)):
        return None
    m = _XMP_RE.search(bytes(raw).decode("utf-8", "replace"))
    if not m:
        return None
    try:
        data = json.loads(html.unescape(m.group(1)))
    except json.JSONDecodeError:
        return None  # our block damaged by another tool: the pixels are still fine
    return data if isinstance(data, dict) else None


def _reason(exc: Exception) -> str:
    """psd-tools' exceptions may carry whole attrs reprs; the first part says what was wrong."""
    first = exc.args[0] if exc.args else exc
    while isinstance(first, tuple) and first:
        first = first[0]
    return f"{type(exc).__name__}: {str(first)[:120]}"


def load(path: Path) -> LayerStack:
    from psd_tools import PSDImage
    from psd_tools.constants import ColorMode

    path = Path(path)
    where = str(path)
    with open(path, "rb") as f:
        if f.read(4) != b"8BPS":
            raise FormatError(f"{where}: not a PSD file (missing 8BPS signature)")
    try:
        psd = PSDImage.open(path)
    except Exception as exc:  # psd-tools raises many types on corrupt input (struct.error, ValueError, ...)
        raise FormatError(f"{where}: corrupt or truncated PSD ({_reason(exc)})") from exc
    if psd.depth != 8:
        raise FormatError(f"{where}: {psd.depth}-bit PSD is not supported; save it as 8 bits/channel")
    if psd.color_mode not in (ColorMode.RGB, ColorMode.GRAYSCALE):
        raise FormatError(f"{where}: {psd.color_mode.name} PSD is not supported; convert it to RGB")
    xmp = _read_xmp(psd)
    stack = make_stack(where, psd.width, psd.height, (xmp or {}).get("metadata") or {})
    notes: list[str] = []
    try:
        _walk(psd, stack, where, notes, visible=True, opacity=1.0, group=[])
        merged = psd.topil()  # decoding the merged image is what detects a file cut short after the layers
    except FormatError:
        raise
    except Exception as exc:  # truncated channel data surfaces only when pixels are decoded
        raise FormatError(f"{where}: corrupt or truncated PSD layer data ({_reason(exc)})") from exc
    if xmp and isinstance(xmp.get("layers"), list) and [e.get("name") for e in xmp["layers"]
                                                        if isinstance(e, dict)] == stack.names():
        for layer, entry in zip(stack.layers, xmp["layers"]):
            if isinstance(entry.get("metadata"), dict):
                layer.metadata = {**entry["metadata"], **layer.metadata}
    if notes:
        stack.metadata["notes"] = list(stack.metadata.get("notes", [])) + notes
    if len(psd) == 0 and not (xmp and xmp.get("layers") == []):  # a flat PSD: its merged image is the only layer
        pil = merged
        if pil is None:
            raise FormatError(f"{where}: PSD has neither layers nor a merged image")
        stack.add(make_layer(where, np.asarray(pil.convert("RGBA")), name="Background",
                             metadata={"kind": "background"}))
    return stack


def _walk(group_el, stack, where, notes, visible, opacity, group):
    from psd_tools.api.layers import AdjustmentLayer
    from psd_tools.constants import BlendMode

    _, from_psd = _blend_maps()
    for pl in group_el:  # psd-tools iterates bottom -> top, like LayerStack
        name = pl.name
        pl_visible = visible and pl.visible
        pl_opacity = opacity * pl.opacity / 255.0
        if pl.is_group():
            if pl.blend_mode not in (BlendMode.PASS_THROUGH, BlendMode.NORMAL):
                notes.append(f"group {name!r}: blend mode {pl.blend_mode.name.lower()} ignored (group flattened)")
            if pl.opacity < 255 and len(pl) > 1:
                notes.append(faded_group_note(name))
            _walk(pl, stack, where, notes, pl_visible, pl_opacity, group + [name])
            continue
        if isinstance(pl, AdjustmentLayer):
            notes.append(f"adjustment layer {name!r} ({pl.kind}) skipped")
            continue
        pl_opacity *= pl.fill_opacity / 255.0  # without effects, fill opacity fades the pixels like opacity
        if pl.has_effects():
            notes.append(f"layer {name!r}: layer effects not reproduced")
        if pl.blend_mode not in from_psd:
            raise FormatError(f"{where}: layer {name!r} uses blend mode {pl.blend_mode.name.lower()!r}, which "
                              f"layergen cannot composite; supported: {', '.join(sorted(from_psd.values()))}")
        if getattr(pl, "clipping", False):
            notes.append(f"layer {name!r}: clipping mask not reproduced")
        pil = pl.topil() if pl.has_pixels() else None
        if pil is None and pl.kind != "pixel" and pl.width > 0 and pl.height > 0:
            pil = pl.composite()  # fill/shape layers without stored pixels: render them
            if pil is not None:
                notes.append(f"layer {name!r} ({pl.kind}) rasterized")
        metadata = {}
        if group:
            metadata["psd_group"] = "/".join(group)
        if pl.kind != "pixel":
            metadata["psd_kind"] = pl.kind
        if pil is None:
            pixels = np.zeros((1, 1, 4), np.uint8)  # empty layer: keep its name and place in the order
        else:
            pixels = np.array(pil.convert("RGBA"))
            pixels = _apply_mask(pl, pixels, notes)
        stack.add(make_layer(where, pixels, name=name, x=pl.left, y=pl.top, opacity=min(1.0, pl_opacity),
                             blend_mode=from_psd[pl.blend_mode], visible=pl_visible, metadata=metadata))


def _apply_mask(pl, pixels: np.ndarray, notes) -> np.ndarray:
    """Multiply a raster user mask into alpha so the layer looks the way it does in Photoshop."""
    mask = getattr(pl, "mask", None)
    if mask is None or mask.disabled:
        return pixels
    h, w = pixels.shape[:2]
    full = np.full((h, w), int(mask.background_color), np.float32)
    mimg = mask.topil()
    if mimg is not None:
        m = np.asarray(mimg.convert("L"), np.float32)
        ox, oy = mask.left - pl.left, mask.top - pl.top
        x0, y0 = max(ox, 0), max(oy, 0)
        x1, y1 = min(ox + m.shape[1], w), min(oy + m.shape[0], h)
        if x0 < x1 and y0 < y1:
            full[y0:y1, x0:x1] = m[y0 - oy:y1 - oy, x0 - ox:x1 - ox]
    out = pixels.copy()
    out[..., 3] = np.floor(pixels[..., 3].astype(np.float32) * full / 255.0 + 0.5).astype(np.uint8)
    notes.append(f"layer {pl.name!r}: layer mask applied to alpha")
    return out
