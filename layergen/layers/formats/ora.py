"""OpenRaster (`.ora`): the open layered format GIMP, Krita and MyPaint read and write.

Layout per the OpenRaster spec: a zip whose first entry is `mimetype`, stored
uncompressed, holding `image/openraster`; `stack.xml` lists layers TOP FIRST;
layer PNGs under `data/`; `mergedimage.png` (full composite) and
`Thumbnails/thumbnail.png` (at most 256 px) for viewers. layergen metadata
rides in a namespaced `layergen:metadata` attribute (JSON), which other
readers ignore. Nested stacks (groups) from other tools are flattened into
their layers: visibility and opacity are folded into each child, and the group
path is kept in the layer's metadata as `ora_group`. What that cannot keep (a
group's composite-op; a faded group's overlapping layers, where the lower ones
now show through) is listed in `stack.metadata["notes"]`, as for PSD.
"""
from __future__ import annotations

import io
import math
import re
import zipfile
import xml.etree.ElementTree as ET
from pathlib import Path

from ...atomic import atomic_path
from ...errors import FormatError
from ..layer import LayerStack
from ._common import (decode_png, dumps_metadata, faded_group_note, loads_metadata, make_layer, make_stack,
                      png_bytes, saved_metadata)

MIMETYPE = b"image/openraster"
LAYERGEN_NS = "https://github.com/layergen/layergen/ns/openraster"
META = f"{{{LAYERGEN_NS}}}metadata"
ET.register_namespace("layergen", LAYERGEN_NS)

# layergen blend mode <-> OpenRaster composite-op (SVG compositing names; `svg:plus` is Krita's Linear Dodge).
COMPOSITE_OPS = {
    "normal": "svg:src-over",
    "multiply": "svg:multiply",
    "screen": "svg:screen",
    "overlay": "svg:overlay",
    "darken": "svg:darken",
    "lighten": "svg:lighten",
    "add": "svg:plus",
}
BLEND_MODES_BY_OP = {op: mode for mode, op in COMPOSITE_OPS.items()}
THUMBNAIL_MAX = 256
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")  # characters XML 1.0 cannot hold at all


def save(stack: LayerStack, path: Path) -> Path:
    from PIL import Image

    root = ET.Element("image", {"version": "0.0.5", "w": str(stack.width), "h": str(stack.height)})
    metadata = saved_metadata(stack)
    if metadata:
        root.set(META, dumps_metadata(metadata))
    top = ET.SubElement(root, "stack")
    files = []
    for i, layer in reversed(list(enumerate(stack.layers))):  # ORA lists the top layer first
        bad = _NOT_XML.search(layer.name)
        if bad:
            raise FormatError(f"layer {layer.name!r}: OpenRaster (XML) cannot store the control character "
                              f"U+{ord(bad.group()):04X} in a name; rename the layer")
        src = f"data/layer{i:03d}.png"
        attrs = {
            "name": layer.name, "src": src, "x": str(layer.x), "y": str(layer.y),
            "opacity": repr(layer.opacity), "visibility": "visible" if layer.visible else "hidden",
            "composite-op": COMPOSITE_OPS[layer.blend_mode],
        }
        el = ET.SubElement(top, "layer", attrs)
        if layer.metadata:
            el.set(META, dumps_metadata(layer.metadata))
        files.append((src, png_bytes(layer.pixels)))
    ET.indent(root)
    xml = ET.tostring(root, encoding="utf-8", xml_declaration=True)

    merged = stack.to_image()
    thumb = merged.copy()
    thumb.thumbnail((THUMBNAIL_MAX, THUMBNAIL_MAX), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    thumb.save(buf, format="PNG")

    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w") as zf:
            info = zipfile.ZipInfo("mimetype", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED  # spec: first entry, uncompressed, no extra field
            zf.writestr(info, MIMETYPE)
            entries = [("stack.xml", xml)] + files[::-1] + [
                ("mergedimage.png", png_bytes(stack.composite())), ("Thumbnails/thumbnail.png", buf.getvalue())]
            for name, data in entries:
                info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
                info.compress_type = zipfile.ZIP_STORED if name.endswith(".png") else zipfile.ZIP_DEFLATED
                zf.writestr(info, data)
    return Path(path)


def _int(value: str | None, where: str, attr: str) -> int:
    if value is None or value == "":
        return 0
    try:
        return int(round(float(value)))
    except (ValueError, OverflowError):  # also nan and inf
        raise FormatError(f"{where}: attribute {attr}={value!r} is not a finite number") from None


def _float(value: str | None, where: str, attr: str, default: float = 1.0) -> float:
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise FormatError(f"{where}: attribute {attr}={value!r} is not a number") from None
    if not math.isfinite(number):
        raise FormatError(f"{where}: attribute {attr}={value!r} is not a finite number")
    return number


def load(path: Path) -> LayerStack:
    path = Path(path)
    where = str(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise FormatError(f"{where}: not a valid OpenRaster file: not a zip archive ({exc})") from exc
    with zf:
        def read(name: str) -> bytes:
            try:
                return zf.read(name)
            except KeyError:
                raise FormatError(f"{where}: missing {name!r} in the archive") from None
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise FormatError(f"{where}: {name!r} is corrupt ({exc})") from exc

        names = zf.namelist()
        if "mimetype" in names and read("mimetype").strip() != MIMETYPE:
            raise FormatError(f"{where}: mimetype is {read('mimetype')[:60]!r}, expected {MIMETYPE.decode()!r}")
        if "stack.xml" not in names:
            raise FormatError(f"{where}: not an OpenRaster file (no stack.xml)")
        try:
            root = ET.fromstring(read("stack.xml"))
        except ET.ParseError as exc:
            raise FormatError(f"{where}: stack.xml is not valid XML ({exc})") from exc
        if root.tag != "image":
            raise FormatError(f"{where}: stack.xml root element is <{root.tag}>, expected <image>")
        try:
            width, height = int(root.get("w", "")), int(root.get("h", ""))
        except ValueError:
            raise FormatError(f"{where}: stack.xml <image> needs integer w and h, "
                              f"got w={root.get('w')!r} h={root.get('h')!r}") from None
        stack = make_stack(where, width, height, loads_metadata(root.get(META), where))
        top = root.find("stack")
        if top is None:
            raise FormatError(f"{where}: stack.xml has no <stack>")
        layers, notes = [], []  # layers collected top first
        _walk(top, read, where, layers, notes, x0=0, y0=0, opacity=1.0, visible=True, group=[])
        for layer in reversed(layers):
            stack.add(layer)
        if notes:
            stack.metadata["notes"] = list(stack.metadata.get("notes", [])) + notes
        return stack


def _walk(stack_el, read, where, out, notes, x0, y0, opacity, visible, group):
    for el in stack_el:
        name = el.get("name", "")
        ewhere = f"{where}: stack.xml <{el.tag} name={name!r}>"
        el_visible = visible and el.get("visibility", "visible") != "hidden"
        own_opacity = min(1.0, max(0.0, _float(el.get("opacity"), ewhere, "opacity")))
        x = x0 + _int(el.get("x"), ewhere, "x")
        y = y0 + _int(el.get("y"), ewhere, "y")
        op = el.get("composite-op", "svg:src-over")
        if el.tag == "stack":
            if op != "svg:src-over":
                notes.append(f"group {name!r}: composite-op {op} ignored (group flattened)")
            if own_opacity < 1 and len(el) > 1:
                notes.append(faded_group_note(name))
            _walk(el, read, where, out, notes, x, y, opacity * own_opacity, el_visible, group + [name])
            continue
        if el.tag != "layer":
            continue  # <text>, <filter>: not raster layers; other readers skip them too
        if op not in BLEND_MODES_BY_OP:
            raise FormatError(f"{ewhere}: unsupported composite-op {op!r}; "
                              f"supported: {', '.join(BLEND_MODES_BY_OP)}")
        src = el.get("src")
        if not src:
            raise FormatError(f"{ewhere}: layer has no src")
        pixels = decode_png(read(src), f"{where}: {src}")
        metadata = loads_metadata(el.get(META), ewhere)
        if group:
            metadata.setdefault("ora_group", "/".join(group))
        out.append(make_layer(where, pixels, name=el.get("name", src), x=x, y=y, opacity=opacity * own_opacity,
                              blend_mode=BLEND_MODES_BY_OP[op], visible=el_visible, metadata=metadata))
