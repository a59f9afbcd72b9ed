"""PNG stack: one 8-bit RGBA PNG per layer plus a `stack.json` manifest, as a folder or a `.zip`.

The simplest layered format that any tool (and a human) can read; it keeps
everything a `LayerStack` holds, including free-form metadata, losslessly.

Manifest (`stack.json`), layers listed bottom -> top::

    {"format": "layergen.png-stack", "version": 1, "width": W, "height": H, "metadata": {...},
     "layers": [{"file": "000-sky.png", "name": "sky", "width": w, "height": h, "x": 0, "y": 0,
                 "opacity": 1.0, "blend_mode": "normal", "visible": true, "metadata": {...}}, ...]}
"""
from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

from ...atomic import atomic_dir, atomic_path
from ...errors import FormatError
from ..layer import LayerStack
from ._common import decode_png, dumps_metadata, json_text, make_layer, make_stack, png_bytes, saved_metadata, slug

MANIFEST = "stack.json"
FORMAT_ID = "layergen.png-stack"
VERSION = 1
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed so that identical stacks give identical archives
_LAYER_FILE = re.compile(r"[0-9]{3,}-[A-Za-z0-9_-]*\.png")  # what _entries names layer files


def _entries(stack: LayerStack) -> list[tuple[str, bytes]]:
    """(file name, bytes) for every file of the stack, manifest last."""
    files, layers = [], []
    for i, layer in enumerate(stack.layers):
        fname = f"{i:03d}-{slug(layer.name)}.png"
        files.append((fname, png_bytes(layer.pixels)))
        layers.append({
            "file": fname, "name": layer.name, "width": layer.width, "height": layer.height,
            "x": layer.x, "y": layer.y, "opacity": layer.opacity, "blend_mode": layer.blend_mode,
            "visible": layer.visible, "metadata": json.loads(dumps_metadata(layer.metadata)),
        })
    manifest = {"format": FORMAT_ID, "version": VERSION, "width": stack.width, "height": stack.height,
                "metadata": json.loads(dumps_metadata(saved_metadata(stack))), "layers": layers}
    files.append((MANIFEST, (json_text(manifest, indent=2) + "\n").encode("utf-8")))
    return files


def save_dir(stack: LayerStack, path: Path) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FormatError(f"{path}: exists and is not a folder; cannot write a PNG stack folder there")
    if path.is_dir() and any(path.iterdir()):
        # atomic_dir replaces the whole folder: only ever do that to a stack folder holding nothing but its stack.
        if not (path / MANIFEST).is_file():
            raise FormatError(f"{path}: folder is not empty and is not a PNG stack (no {MANIFEST}); refusing to "
                              "replace it")
        ours = _listed_files(path / MANIFEST)
        foreign = sorted(p.name + "/" * p.is_dir() for p in path.iterdir()
                         if p.name != MANIFEST and not p.name.startswith(".")  # .DS_Store and the like
                         and not (p.is_file() and (_LAYER_FILE.fullmatch(p.name) or p.name in ours)))
        if foreign:
            raise FormatError(f"{path}: the stack folder also holds {', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}, which replacing it would delete; "
                              "write to another folder or move them")
    with atomic_dir(path) as tmp:
        for name, data in _entries(stack):
            (tmp / name).write_bytes(data)
    return path


def _listed_files(manifest: Path) -> set[str]:
    """The layer files a stack folder's manifest lists (a hand-written one may name them anything)."""
    try:
        layers = json.loads(manifest.read_text("utf-8")).get("layers", [])
        return {e["file"] for e in layers if isinstance(e, dict) and isinstance(e.get("file"), str)}
    except (OSError, ValueError, AttributeError):
        return set()


def save_zip(stack: LayerStack, path: Path) -> Path:
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in _entries(stack):
                info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
                info.compress_type = zipfile.ZIP_STORED if name.endswith(".png") else zipfile.ZIP_DEFLATED
                zf.writestr(info, data)
    return Path(path)


def load_dir(path: Path) -> LayerStack:
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise FormatError(f"{path}: not a PNG stack folder (no {MANIFEST})")

    def read(name: str) -> bytes:
        target = (path / name).resolve()
        if path.resolve() not in target.parents:
            raise FormatError(f"{manifest_path}: layer file {name!r} points outside the folder")
        if not target.is_file():
            raise FormatError(f"{manifest_path}: layer file {name!r} is missing")
        return target.read_bytes()

    return _parse(manifest_path.read_bytes(), read, str(manifest_path), str(path))


def load_zip(path: Path) -> LayerStack:
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise FormatError(f"{path}: not a valid zip archive ({exc})") from exc
    with zf:
        names = zf.namelist()
        manifests = [n for n in names if n == MANIFEST or n.endswith("/" + MANIFEST)]
        if not manifests:
            raise FormatError(f"{path}: zip holds no {MANIFEST}; not a PNG stack archive")
        manifest = min(manifests, key=len)  # prefer the root, else one folder deep
        prefix = manifest[: -len(MANIFEST)]

        def read(name: str) -> bytes:
            try:
                return zf.read(prefix + name)
            except KeyError:
                raise FormatError(f"{path}: layer file {name!r} is missing from the archive") from None
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise FormatError(f"{path}: layer file {name!r} is corrupt ({exc})") from exc

        try:
            manifest_bytes = zf.read(manifest)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise FormatError(f"{path}: {MANIFEST} is corrupt ({exc})") from exc
        return _parse(manifest_bytes, read, f"{path}:{manifest}", str(path))


def _field(entry: dict, key: str, types, where: str, default=None):
    if key not in entry:
        if default is not None:
            return default
        raise FormatError(f"{where}: missing required field {key!r}")
    value = entry[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,))):
        raise FormatError(f"{where}: field {key!r} has the wrong type ({type(value).__name__})")
    return value


def _parse(manifest_bytes: bytes, read, where: str, root: str) -> LayerStack:
    try:
        manifest = json.loads(manifest_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{where}: invalid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise FormatError(f"{where}: manifest must be a JSON object")
    if manifest.get("format", FORMAT_ID) != FORMAT_ID:
        raise FormatError(f"{where}: unknown manifest format {manifest.get('format')!r}")
    version = manifest.get("version", VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        raise FormatError(f"{where}: manifest version must be a whole number, got {version!r}")
    if version > VERSION:
        raise FormatError(f"{where}: manifest version {version} is newer than this layergen supports ({VERSION})")
    width = _field(manifest, "width", int, where)
    height = _field(manifest, "height", int, where)
    stack = make_stack(where, width, height, _field(manifest, "metadata", dict, where, {}))
    entries = _field(manifest, "layers", list, where)
    for i, entry in enumerate(entries):
        ewhere = f"{where}: layers[{i}]"
        if not isinstance(entry, dict):
            raise FormatError(f"{ewhere}: must be a JSON object")
        fname = _field(entry, "file", str, ewhere)
        name = _field(entry, "name", str, ewhere, fname)
        pixels = decode_png(read(fname), f"{root}: {fname}")
        h, w = pixels.shape[:2]
        ew, eh = entry.get("width", w), entry.get("height", h)
        if (ew, eh) != (w, h):
            raise FormatError(f"{where}: layer {name!r}: {fname} is {w}x{h} but the manifest says {ew}x{eh}")
        stack.add(make_layer(
            where, pixels, name=name,
            x=_field(entry, "x", int, ewhere, 0), y=_field(entry, "y", int, ewhere, 0),
            opacity=_field(entry, "opacity", (int, float), ewhere, 1.0),
            blend_mode=_field(entry, "blend_mode", str, ewhere, "normal"),
            visible=_field(entry, "visible", bool, ewhere, True),
            metadata=_field(entry, "metadata", dict, ewhere, {}),
        ))
    return stack
