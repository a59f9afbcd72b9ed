"""Scratch folders for files the studio hands to Gradio (exports, meshes, identifiers).

Gradio copies what it shows or offers for download into its own cache, so ours only need to live a while:
each call gets a fresh folder under one root, folders older than `keep_seconds` are pruned on the next
call, and the whole root goes at exit.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
import time
from pathlib import Path


class ScratchDir:
    def __init__(self, prefix: str, keep_seconds: float = 600.0):
        self.prefix = prefix
        self.keep_seconds = keep_seconds
        self.root: Path | None = None

    def new_dir(self) -> Path:
        if self.root is None or not self.root.exists():
            self.root = Path(tempfile.mkdtemp(prefix=self.prefix))
            atexit.register(shutil.rmtree, self.root, True)
        now = time.time()
        for old in self.root.iterdir():
            if now - old.stat().st_mtime > self.keep_seconds:
                shutil.rmtree(old, ignore_errors=True)
        return Path(tempfile.mkdtemp(dir=self.root))
