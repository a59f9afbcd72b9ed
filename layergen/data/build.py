"""Turn a folder of PSD / ORA / PNG-stack files, transparent PNGs and flat images into training records.

The output is an imagefolder the training script reads directly (`layergen.data.folders`):

    DST/images/<key>-<k>.png          one RGBA layer per record (canvas size, straight alpha)
    DST/backgrounds/<key>-<k>.png     the flattened layers below it (when there are any)
    DST/metadata.jsonl                {"file_name", "text", "background_file_name", "source", ...}
    DST/build_summary.json            records written, sources, skipped and why

Layered files give one record per visible layer. Flat images go through the decomposition
pipeline first (MuLAn-style: background + one RGBA layer per instance, each instance's record
has the layers below it as background); a PNG/WebP that already has transparency is one record.

Why per-source manifests (`DST/.build/<key>.json`, written last and atomically): they make a
build resumable (a source with a manifest is done; a crash leaves at most orphan images that
the next run overwrites) and let several processes share the work without talking to each other.
The main process merges them into `metadata.jsonl` at the end.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_path, write_text_atomic
from ..errors import LayergenError
from .folders import (CAPTION_COLUMN, IMAGE_SUFFIXES, LAYERED_SUFFIXES, METADATA_FILE, LayerRecord, SkipReport,
                      _is_stack_dir, _read_metadata, _side_caption, _walk, caption_from_name, check_layer,
                      load_stack, records_from_stack)

MANIFEST_DIR = ".build"
SUMMARY_FILE = "build_summary.json"


@dataclass
class BuildSummary:
    """What a build did: records in the dataset, how many this run wrote, sources by kind, skips by reason."""

    records: int = 0
    written: int = 0
    reused: int = 0
    sources: dict = field(default_factory=dict)
    report: SkipReport = field(default_factory=SkipReport)
    output: str = ""

    def to_dict(self) -> dict:
        return {"records": self.records, "written_this_run": self.written, "reused_from_earlier_run": self.reused,
                "sources": dict(sorted(self.sources.items())), "skipped": self.report.to_dict()["skipped"],
                "skipped_examples": self.report.to_dict()["examples"], "output": self.output}

    def line(self) -> str:
        srcs = ", ".join(f"{n} {k}" for k, n in sorted(self.sources.items())) or "no sources"
        text = (f"{self.records} records in {self.output} ({self.written} written now, {self.reused} from an earlier "
                f"run); sources: {srcs}")
        skipped = self.report.skipped
        if skipped:
            parts = []
            for reason, n in sorted(skipped.items()):
                ex = self.report.examples.get(reason, [])
                parts.append(f"{n} {reason}" + (f" ({ex[0].split(':')[0]}{', ...' if n > 1 else ''})" if ex else ""))
            text += f"; skipped {sum(skipped.values())}: " + ", ".join(parts)
        else:
            text += "; skipped 0"
        return text


def source_key(rel: str) -> str:
    """A file-name-safe, collision-free key for a source path."""
    stem = re.sub(r"[^A-Za-z0-9]+", "_", rel).strip("_")[:48] or "source"
    return f"{stem}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}"


def list_sources(src: Path) -> list[Path]:
    """Every candidate source under `src`, sorted: files and PNG-stack folders (hidden entries skipped)."""
    out = []
    for path in _walk(src):
        if path.name == METADATA_FILE or path.suffix.lower() in (".txt", ".json", ".jsonl", ".md"):
            continue
        out.append(path)
    return out


def _fingerprint(path: Path) -> list:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _read_rgba(path: Path):
    """(uint8 RGBA, has_alpha) of an image file; LayergenError when it cannot be decoded."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                raise LayergenError(f"{im.mode} (16-bit/float) images are not supported")
            has_alpha = "A" in im.getbands() or "transparency" in im.info
            return np.ascontiguousarray(np.asarray(im.convert("RGBA"))), has_alpha
    except LayergenError:
        raise
    except Exception as exc:  # Pillow raises many types for corrupt data
        raise LayergenError(f"cannot decode image ({type(exc).__name__}: {exc})") from exc


class DatasetBuilder:
    """Builds records source by source; `decompose` is a callable image -> LayerStack for flat images."""

    def __init__(self, src, dst, decompose=None, min_size: int = 8, caption_column: str = CAPTION_COLUMN):
        self.src, self.dst = Path(src), Path(dst)
        if not self.src.is_dir():
            raise LayergenError(f"{self.src}: no such folder")
        if self.dst.resolve() == self.src.resolve() or self.src.resolve() in self.dst.resolve().parents:
            raise LayergenError(f"{self.dst}: the output must not be inside the source folder")
        self.decompose, self.min_size, self.caption_column = decompose, min_size, caption_column
        self._captions = None

    # -- captions ------------------------------------------------------------------------------
    def caption_for(self, path: Path) -> tuple[str, bool]:
        """(caption, given): metadata.jsonl row, else a .txt beside the file, else the file name."""
        if self._captions is None:
            self._captions = _read_metadata(self.src, self.caption_column, SkipReport())
        row = self._captions.get(path.resolve(), {})
        text = row.get(self.caption_column)
        if isinstance(text, str) and text.strip():
            return text.strip(), True
        side = _side_caption(path) if path.is_file() else None
        if side:
            return side, True
        return caption_from_name(path.name), False

    # -- one source ----------------------------------------------------------------------------
    def manifest_path(self, rel: str) -> Path:
        return self.dst / MANIFEST_DIR / f"{source_key(rel)}.json"

    def done(self, path: Path) -> dict | None:
        """The manifest of a source already built from the same file contents, else None."""
        rel = str(path.relative_to(self.src))
        m = self.manifest_path(rel)
        if not m.is_file():
            return None
        try:
            manifest = json.loads(m.read_text())
        except ValueError:
            return None
        return manifest if manifest.get("fingerprint") == _fingerprint(path) else None

    def records_of(self, path: Path, report: SkipReport) -> tuple[str, list[LayerRecord]]:
        """(kind, records) of one source; bad input is counted in `report`, never raised."""
        rel = str(path.relative_to(self.src))
        caption, given = self.caption_for(path)
        suffix = path.suffix.lower()
        if _is_stack_dir(path) or suffix in LAYERED_SUFFIXES:
            try:
                stack = load_stack(path)
            except LayergenError as exc:
                report.skip("corrupt", rel, str(exc).replace(str(path) + ": ", ""))
                return "corrupt", []
            recs = records_from_stack(stack, rel, caption, self.min_size, report)
            report.captions_from_names += 0 if given else sum(r.caption == caption for r in recs)
            return "layered", recs
        if suffix not in IMAGE_SUFFIXES:
            report.skip("unsupported", rel)
            return "unsupported", []
        try:
            rgba, has_alpha = _read_rgba(path)
        except LayergenError as exc:
            report.skip("corrupt", rel, str(exc))
            return "corrupt", []
        if has_alpha and rgba[..., 3].min() < 255:  # already a transparent layer
            reason = check_layer(rgba, self.min_size)
            if reason:
                report.skip(reason, rel)
                return "transparent", []
            report.kept += 1
            report.captions_from_names += 0 if given else 1
            return "transparent", [LayerRecord(rgba, caption, None, rel)]
        if self.decompose is None:
            report.skip("no_alpha", rel, "flat image (decomposition is off)")
            return "flat", []
        if min(rgba.shape[:2]) < self.min_size:
            report.skip("tiny", rel)
            return "flat", []
        try:
            stack = self.decompose(rgba[..., :3])
        except LayergenError as exc:
            report.skip("corrupt", rel, f"decomposition failed ({exc})")
            return "flat", []
        recs = records_from_stack(stack, rel, caption, self.min_size, report)
        report.captions_from_names += 0 if given else sum(r.caption == caption for r in recs)
        return "flat (decomposed)", recs

    def build_one(self, path: Path) -> dict:
        """Write the records of one source and its manifest; returns the manifest."""
        rel = str(path.relative_to(self.src))
        key = source_key(rel)
        report = SkipReport()
        kind, recs = self.records_of(path, report)
        rows = []
        from PIL import Image

        for rec in recs:
            k = rec.source.rsplit("#", 1)[1] if "#" in rec.source else "0"
            image = f"images/{key}-{k}.png"
            with atomic_path(self.dst / image) as tmp:
                Image.fromarray(rec.rgba, "RGBA").save(tmp, format="PNG")
            row = {"file_name": image, "text": rec.caption, "source": rel, "width": rec.rgba.shape[1],
                   "height": rec.rgba.shape[0]}
            if "#" in rec.source:
                row["layer"] = int(k)
            if kind.startswith("flat"):
                row["decomposed"] = True
            if rec.background is not None:
                bg = f"backgrounds/{key}-{k}.png"
                with atomic_path(self.dst / bg) as tmp:
                    Image.fromarray(rec.background, "RGB").save(tmp, format="PNG")
                row["background_file_name"] = bg
            rows.append(row)
        manifest = {"source": rel, "kind": kind, "fingerprint": _fingerprint(path), "records": rows,
                    "report": report.to_dict()}
        write_text_atomic(self.manifest_path(rel), json.dumps(manifest, indent=1) + "\n")
        return manifest

    # -- everything -----------------------------------------------------------------------------
    def run(self, progress: bool = True, state=None) -> BuildSummary | None:
        """Build every source, shared over the processes of `state` (accelerate `PartialState`).

        Returns the summary on the main process (None on the others), after every process is done.
        """
        from tqdm.auto import tqdm

        if state is None:
            from accelerate import PartialState
            from accelerate.utils import parse_flag_from_env

            state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator reads it
        sources = list_sources(self.src)
        if not sources:  # before anything is written: an empty dataset folder helps nobody
            raise LayergenError(f"{self.src}: no PSD, ORA, PNG-stack or image files in it")
        if self.dst.exists() and not self.dst.is_dir():
            raise LayergenError(f"{self.dst}: exists and is not a folder; the dataset is written into a folder")
        written = 0
        with state.split_between_processes(sources) as mine:
            bar = tqdm(mine, desc="dataset build", unit="file", disable=not progress or not state.is_main_process)
            for path in bar:
                bar.set_postfix_str(path.name[:30])
                if self.done(path) is not None:
                    continue
                written += len(self.build_one(path)["records"])
        # each process reports its count in a file: no collective op, so any launcher (or none) works
        write_text_atomic(self.dst / MANIFEST_DIR / f"written-{state.process_index}.json",
                          json.dumps({"written": written}) + "\n")
        state.wait_for_everyone()
        if not state.is_main_process:
            return None
        total = sum(json.loads((self.dst / MANIFEST_DIR / f"written-{rank}.json").read_text())["written"]
                    for rank in range(state.num_processes))
        return self.merge(sources, total)

    def merge(self, sources, written: int) -> BuildSummary:
        """metadata.jsonl + build_summary.json from every source's manifest (main process)."""
        summary = BuildSummary(output=str(self.dst))
        lines = []
        for path in sources:
            rel = str(path.relative_to(self.src))
            m = self.manifest_path(rel)
            if not m.is_file():  # another process failed on it; it is rebuilt on the next run
                summary.report.skip("corrupt", rel, "not built")
                continue
            manifest = json.loads(m.read_text())
            if manifest["kind"] not in ("corrupt", "unsupported"):  # those are counted as skipped
                summary.sources[manifest["kind"]] = summary.sources.get(manifest["kind"], 0) + 1
            rep = manifest["report"]
            part = SkipReport(kept=rep["kept"], captions_from_names=rep.get("captions_from_names", 0))
            part.skipped.update(rep["skipped"])
            part.examples = {k: list(v) for k, v in rep["examples"].items()}
            summary.report.merge(part)
            lines += [json.dumps(r, ensure_ascii=False) for r in manifest["records"]]
        summary.records, summary.written = len(lines), written
        summary.reused = summary.records - written
        self.dst.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.dst / METADATA_FILE, "".join(line + "\n" for line in lines))
        write_text_atomic(self.dst / SUMMARY_FILE, json.dumps(summary.to_dict(), indent=2) + "\n")
        return summary


def build_dataset(src, dst, decompose=None, min_size: int = 8, caption_column: str = CAPTION_COLUMN,
                  progress: bool = True) -> BuildSummary | None:
    """`layergen dataset build` as a function; see `DatasetBuilder`."""
    return DatasetBuilder(src, dst, decompose, min_size, caption_column).run(progress)


__all__ = ["BuildSummary", "DatasetBuilder", "MANIFEST_DIR", "SUMMARY_FILE", "build_dataset", "list_sources",
           "source_key"]
