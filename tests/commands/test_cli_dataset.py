"""`layergen dataset build`: a mixed folder (PSD, ORA, transparent PNG, flat image, corrupt file) -> records."""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from layergen import cli
from layergen.data.folders import scan_folder
from layergen.data.scenes import make_object_layer, make_scene
from layergen.layers import save

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--matting", "hard", "--quiet"]


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    (d / "nested").mkdir(parents=True)
    save(make_scene(3, 48, num_objects=2).to_stack(), d / "poster.psd")
    save(make_scene(4, 48, num_objects=1).to_stack(), d / "nested" / "card.ora")
    Image.fromarray(make_object_layer(5, 48).rgba).save(d / "sticker.png")
    (d / "sticker.txt").write_text("a shiny sticker\n")
    Image.fromarray(make_scene(6, 48, num_objects=1, background="gradient").composite).save(d / "photo.png")
    (d / "metadata.jsonl").write_text(json.dumps({"file_name": "photo.png", "text": "a holiday photo"}) + "\n")
    (d / "broken.psd").write_bytes(b"8BPS\x00\x01 this is not a psd")
    (d / "notes.doc").write_bytes(b"hello")
    return d


def build(src, dst, *extra):
    return cli.main(["dataset", "build", str(src), "-o", str(dst), *FAST, *extra])


def rows_of(dst):
    return [json.loads(line) for line in (dst / "metadata.jsonl").read_text().splitlines()]


def test_build_mixed_folder_reports_the_corrupt_file_and_resumes(src, tmp_path, capsys):
    dst = tmp_path / "out"
    assert build(src, dst) == 0
    line = capsys.readouterr().out
    assert "skipped" in line and "1 corrupt (broken.psd)" in line and "1 unsupported (notes.doc)" in line
    rows = rows_of(dst)
    by_source = {}
    for r in rows:
        by_source.setdefault(r["source"], []).append(r)
    assert set(by_source) == {"poster.psd", "nested/card.ora", "sticker.png", "photo.png"}

    scene = make_scene(3, 48, num_objects=2)
    poster = sorted(by_source["poster.psd"], key=lambda r: r["layer"])
    assert [r["layer"] for r in poster] == [1, 2]
    assert [r["text"] for r in poster] == [o.caption for o in scene.objects]   # layer prompts kept by the PSD
    for r, obj in zip(poster, scene.objects):
        assert np.array_equal(np.asarray(Image.open(dst / r["file_name"])), obj.rgba)
    bg1 = np.asarray(Image.open(dst / poster[0]["background_file_name"]))
    assert np.array_equal(bg1, scene.background)                                 # only the background is below
    bg2 = np.asarray(Image.open(dst / poster[1]["background_file_name"]))
    assert np.array_equal(bg2, _flat(scene, 2))                                 # background + first object

    sticker, = by_source["sticker.png"]
    assert sticker["text"] == "a shiny sticker" and "background_file_name" not in sticker
    assert np.array_equal(np.asarray(Image.open(dst / sticker["file_name"])), make_object_layer(5, 48).rgba)

    photo = by_source["photo.png"]
    assert photo and all(r["decomposed"] and r["text"] == "a holiday photo" for r in photo)
    layer = np.asarray(Image.open(dst / photo[0]["file_name"]))
    assert layer.shape == (48, 48, 4) and 0 < (layer[..., 3] > 0).mean() < 0.8   # an instance, not the whole image
    assert (dst / photo[0]["background_file_name"]).is_file()

    summary = json.loads((dst / "build_summary.json").read_text())
    assert summary["records"] == len(rows) == summary["written_this_run"]
    assert summary["skipped"]["corrupt"] == 1 and summary["skipped"]["unsupported"] == 1
    assert summary["skipped"]["background"] == 3                             # psd + ora + decomposed photo
    assert summary["sources"] == {"flat (decomposed)": 1, "layered": 2, "transparent": 1}

    # the training loader reads the output as is: same records, backgrounds attached, nothing skipped
    refs, report = scan_folder(dst)
    assert report.kept == len(rows) and report.total_skipped == 0
    assert sum(r.background is not None for r in refs) == sum("background_file_name" in r for r in rows)

    # resume: nothing rebuilt; a changed source and a missing manifest are rebuilt, nothing else
    assert build(src, dst) == 0
    assert f"({0} written now, {len(rows)} from an earlier run)" in capsys.readouterr().out
    Image.fromarray(make_object_layer(9, 48).rgba).save(src / "sticker.png")
    for m in (dst / ".build").glob("nested_card_ora-*.json"):
        m.unlink()
    assert build(src, dst) == 0
    n_card = len(by_source["nested/card.ora"])
    assert f"({1 + n_card} written now, {len(rows) - 1 - n_card} from an earlier run)" in capsys.readouterr().out
    sticker2 = next(r for r in rows_of(dst) if r["source"] == "sticker.png")
    assert np.array_equal(np.asarray(Image.open(dst / sticker2["file_name"])), make_object_layer(9, 48).rgba)
    assert not list(dst.rglob(".*.png")) and not list(dst.rglob("*.tmp"))   # no temporary files left behind


def _flat(scene, n):
    from layergen.data.folders import flatten_on_white
    from layergen.layers import composite_layers

    stack = scene.to_stack()
    return flatten_on_white(composite_layers(48, 48, stack.layers[:n]))


def test_no_decompose_skips_flat_images(src, tmp_path, capsys):
    dst = tmp_path / "out"
    assert build(src, dst, "--no-decompose") == 0
    assert "no_alpha (photo.png" in capsys.readouterr().out
    assert "photo.png" not in {r["source"] for r in rows_of(dst)}


def test_bad_arguments_exit_2(src, tmp_path, capsys):
    assert build(tmp_path / "missing", tmp_path / "out") == 2
    assert "no such folder" in capsys.readouterr().err
    assert build(src, src / "out") == 2
    assert "must not be inside the source" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert build(tmp_path / "empty", tmp_path / "out") == 2
    assert "no PSD, ORA, PNG-stack or image files" in capsys.readouterr().err and not (tmp_path / "out").exists()
    (tmp_path / "afile").write_text("x")
    assert build(src, tmp_path / "afile") == 2
    assert "exists and is not a folder" in capsys.readouterr().err and (tmp_path / "afile").read_text() == "x"
    assert cli.main(["dataset"]) == 2


class FakeState:
    """Process `index` of `n`, run one after the other in this process (main last): the sharding logic alone."""

    def __init__(self, index, n):
        self.process_index, self.num_processes, self.is_main_process = index, n, index == 0

    @contextlib.contextmanager
    def split_between_processes(self, items):
        per, extra = divmod(len(items), self.num_processes)
        start = self.process_index * per + min(self.process_index, extra)
        yield items[start:start + per + (self.process_index < extra)]

    def wait_for_everyone(self):
        pass


def test_sharding_splits_sources_and_the_main_process_merges(src, tmp_path):
    from layergen.commands.dataset import make_decomposer, register  # noqa: F401
    from layergen.data.build import DatasetBuilder

    args = cli.build_parser().parse_args(["dataset", "build", str(src), "-o", str(tmp_path / "x"), *FAST])
    dst = tmp_path / "sharded"
    builder = DatasetBuilder(src, dst, make_decomposer(args), min_size=8)
    assert builder.run(progress=False, state=FakeState(1, 2)) is None          # the other process: no summary
    done_by_1 = {json.loads(m.read_text())["source"] for m in (dst / ".build").glob("*-*.json")
                 if not m.name.startswith("written")}
    assert done_by_1 and not (dst / "metadata.jsonl").exists()
    summary = builder.run(progress=False, state=FakeState(0, 2))
    assert summary.records == len(rows_of(dst)) == summary.written and summary.reused == 0
    assert {r["source"] for r in rows_of(dst)} == {"poster.psd", "nested/card.ora", "sticker.png", "photo.png"}
    assert summary.report.skipped["corrupt"] == 1


@pytest.mark.slow
def test_sharded_over_two_processes(src, tmp_path):
    """torchrun with 2 CPU processes (gloo): each takes half of the files, the main one merges."""
    dst = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29531", "-m", "layergen.cli", "dataset", "build", str(src), "-o",
                           str(dst), *FAST], capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("records in") == 1                              # one summary, from the main process
    single = tmp_path / "single"
    assert build(src, single) == 0
    assert sorted(json.dumps(r, sort_keys=True) for r in rows_of(dst)) == \
        sorted(json.dumps(r, sort_keys=True) for r in rows_of(single))
    for r in rows_of(dst):
        if r.get("decomposed"):
            continue  # the decomposition's pixels may differ in the last bits between processes
        assert np.array_equal(np.asarray(Image.open(dst / r["file_name"])),
                              np.asarray(Image.open(single / r["file_name"])))
