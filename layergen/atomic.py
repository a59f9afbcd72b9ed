"""Atomic writes: a failure never leaves a half-written file behind.

Write to a temporary sibling, then `os.replace` it onto the target (atomic on
POSIX and Windows when both are on the same filesystem).
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp, mode: int) -> None:
    """mkstemp/mkdtemp create 0600/0700 entries; give the result the permissions a plain open() would."""
    os.chmod(tmp, mode & ~_umask())


def _beside(path: Path, make):
    """Create `path`'s missing parent folders, then the temporary entry (`make()`). A failure names `path`,
    the file the user asked for, never the temporary name nobody has heard of."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return make()
    except FileExistsError:  # mkdir met a file where a folder must be
        raise NotADirectoryError(errno.ENOTDIR, "cannot write there: a part of the path is a file, not a folder",
                                 str(path)) from None
    except OSError as exc:
        raise type(exc)(exc.errno, f"cannot write there ({exc.strerror or exc})", str(path)) from None


def check_writable(path) -> None:
    """Fail now, not after minutes of work, if `path` could not be written. Missing parent folders are created
    for the test and removed again: a run that fails later leaves no empty folders behind (the write creates
    them for good)."""
    path = Path(path)
    missing = [d for d in [path.parent, *path.parent.parents] if not d.exists()]
    try:
        fd, tmp = _beside(path, lambda: tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent))
        os.close(fd)
        os.unlink(tmp)
    finally:
        for d in missing:  # deepest first; stops at a folder someone else has put something in meanwhile
            try:
                os.rmdir(d)
            except OSError:
                break


@contextlib.contextmanager
def atomic_path(path, suffix: str | None = None):
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds.

    `suffix` defaults to the target's suffix so that writers choosing a format
    by extension (Pillow, trimesh) still see the right one.
    """
    path = Path(path)
    fd, tmp = _beside(path, lambda: tempfile.mkstemp(prefix=f".{path.name}.",
                                                     suffix=path.suffix if suffix is None else suffix,
                                                     dir=path.parent))
    os.close(fd)
    try:
        yield Path(tmp)
        _publish(tmp, 0o666)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary directory beside `path`; it replaces the directory `path` on success."""
    path = Path(path)
    tmp = Path(_beside(path, lambda: tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)))
    try:
        yield tmp
        _publish(tmp, 0o777)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes_atomic(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_text_atomic(path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
