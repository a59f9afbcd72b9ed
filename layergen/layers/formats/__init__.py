"""Load and save `LayerStack`s in layered and flat file formats, chosen by extension.

=========  =================================================  =======  ===========
format     path                                               layered  blend modes
=========  =================================================  =======  ===========
``ora``    ``*.ora`` OpenRaster (GIMP, Krita, MyPaint)         yes      yes
``psd``    ``*.psd`` Photoshop (8-bit opacity, see psd.py)     yes      yes
``zip``    ``*.zip`` PNG stack + ``stack.json``, zipped         yes      yes
``dir``    a folder / a path without suffix: PNG stack        yes      yes
``png``    ``*.png`` flattened composite                      no       -
``webp``   ``*.webp`` flattened composite, lossless            no       -
=========  =================================================  =======  ===========

Every write is atomic (a failure leaves no file); every unreadable file raises
`FormatError` with the file name and the problem.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...errors import FormatError, LayergenError
from ..layer import LayerStack


@dataclass(frozen=True)
class FormatInfo:
    name: str
    extensions: tuple[str, ...]
    layered: bool
    description: str


FORMATS: dict[str, FormatInfo] = {
    "ora": FormatInfo("ora", (".ora",), True, "OpenRaster (GIMP, Krita)"),
    "psd": FormatInfo("psd", (".psd",), True, "Photoshop PSD (opacity stored in 8 bits)"),
    "zip": FormatInfo("zip", (".zip",), True, "PNG stack + stack.json, zipped"),
    "dir": FormatInfo("dir", (), True, "PNG stack folder with stack.json"),
    "png": FormatInfo("png", (".png",), False, "flattened PNG"),
    "webp": FormatInfo("webp", (".webp",), False, "flattened lossless WebP"),
}
_BY_EXT = {ext: info.name for info in FORMATS.values() for ext in info.extensions}


def detect_format(path) -> str:
    """Format name for `path`: an existing folder or a path without suffix is `dir`, else by extension."""
    path = Path(path)
    if path.is_dir():
        return "dir"
    suffix = path.suffix.lower()
    if not suffix:
        return "dir"
    if suffix not in _BY_EXT:
        raise FormatError(f"{path}: unsupported file type {path.suffix!r}; expected one of "
                          f"{', '.join(sorted(_BY_EXT))} or a folder")
    return _BY_EXT[suffix]


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise FormatError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return fmt


def load(path, format: str | None = None) -> LayerStack:
    """Read a layered or flat image file (or PNG-stack folder) into a `LayerStack`."""
    path = Path(path)
    fmt = _check_format(format) if format else detect_format(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file or folder")
    if fmt != "dir" and path.is_dir():
        raise FormatError(f"{path}: is a folder, expected a .{fmt} file")
    try:
        if fmt == "ora":
            from . import ora
            return ora.load(path)
        if fmt == "psd":
            from . import psd
            return psd.load(path)
        if fmt in ("png", "webp"):
            from . import flat
            return flat.load(path, fmt)
        from . import pngstack
        return pngstack.load_zip(path) if fmt == "zip" else pngstack.load_dir(path)
    except LayergenError:
        raise
    except (IsADirectoryError, PermissionError) as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def save(stack: LayerStack, path, format: str | None = None) -> Path:
    """Write `stack` to `path` atomically; the format comes from `format` or the extension. Returns the path."""
    if not isinstance(stack, LayerStack):
        raise TypeError(f"save() needs a LayerStack, got {type(stack).__name__}")
    path = Path(path)
    fmt = _check_format(format) if format else detect_format(path)
    if fmt != "dir" and path.is_dir():
        raise FormatError(f"{path}: is a folder; cannot write a .{fmt} file there")
    for layer in stack.layers if FORMATS[fmt].layered else ():
        try:
            layer.name.encode("utf-8")
        except UnicodeEncodeError:
            raise FormatError(f"layer name {layer.name!r} is not valid Unicode text (a lone surrogate)") from None
    try:
        return _save(stack, path, fmt)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
        raise  # the CLI reports these with the offending file name
    except OSError as exc:  # disk full, read-only filesystem...: the atomic write left nothing behind
        raise FormatError(f"{path}: cannot write ({exc.strerror or exc})") from exc


def _save(stack: LayerStack, path: Path, fmt: str) -> Path:
    if fmt == "ora":
        from . import ora
        return ora.save(stack, path)
    if fmt == "psd":
        from . import psd
        return psd.save(stack, path)
    if fmt in ("png", "webp"):
        from . import flat
        return flat.save(stack, path, fmt)
    from . import pngstack
    return pngstack.save_zip(stack, path) if fmt == "zip" else pngstack.save_dir(stack, path)


__all__ = ["FORMATS", "FormatInfo", "detect_format", "load", "save"]
