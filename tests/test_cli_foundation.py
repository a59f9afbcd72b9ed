"""`layergen info` and `layergen compose`: end to end through the real entry point, plus in-process edge cases."""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from layergen import cli
from layergen.layers import Layer, LayerStack, load, save

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "assets" / "samples" / "sample.ora"


def run_cli(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "layergen.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=120)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layergen: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_readme_flow_compose_sample_to_psd_then_info(tmp_path):
    out = tmp_path / "out.psd"
    proc = run_cli("compose", SAMPLE, out)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    proc = run_cli("info", out, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert (info["format"], info["width"], info["height"]) == ("psd", 192, 128)
    layers = info["layers"]
    assert [l["name"] for l in layers] == ["Sky", "Sun", "Hill", "Guides"]
    assert [l["blend_mode"] for l in layers] == ["normal", "normal", "multiply", "normal"]
    assert [l["visible"] for l in layers] == [True, True, True, False]
    assert [l["kind"] for l in layers] == ["background", "instance", "instance", "other"]
    assert (layers[1]["x"], layers[1]["y"], layers[1]["width"]) == (150, 14, 56)
    assert layers[2]["opacity"] == 217 / 255  # 0.85 stored as one PSD byte
    sample = load(SAMPLE)
    psd = load(out)
    for a, b in zip(sample, psd):
        assert np.array_equal(a.pixels, b.pixels)


def test_info_table_and_help():
    proc = run_cli("info", SAMPLE)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == f"{SAMPLE}: ora, 192x128, 4 layers (bottom -> top)"
    assert out[1].split() == ["#", "name", "size", "offset", "opacity", "blend", "visible", "kind"]
    assert out[3].split() == ["1", "Sun", "56x56", "150,14", "1.000", "normal", "yes", "instance"]
    assert out[5].split() == ["3", "Guides", "176x112", "8,8", "1.000", "normal", "no", "other"]
    proc = run_cli("compose", "--help")
    assert proc.returncode == 0 and "--flatten" in proc.stdout and "layergen compose assets/samples/sample.ora" \
        in proc.stdout and max(len(line) for line in proc.stdout.splitlines()) <= 100


def test_reader_closing_the_pipe_ends_quietly():
    """`layergen info --json FILE | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "layergen.cli", "info", "--json", str(SAMPLE)], stdout=write,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr == ""


def test_corrupt_input_is_one_line_exit_2_and_writes_nothing(tmp_path):
    bad = tmp_path / "broken.ora"
    bad.write_bytes(SAMPLE.read_bytes()[:500])
    out_dir = tmp_path / "existing_dir"
    out_dir.mkdir()
    proc = run_cli("compose", bad, out_dir / "out.psd")
    assert_one_line_error(proc, str(bad))
    assert list(out_dir.iterdir()) == []
    proc = run_cli("info", tmp_path / "missing.psd")
    assert_one_line_error(proc, "missing.psd", "no such file")


def test_unknown_layer_to_hide_is_an_error_and_nothing_is_written(tmp_path):
    proc = run_cli("compose", SAMPLE, tmp_path / "x.ora", "--hide", "Nope")
    assert_one_line_error(proc, "no layer named 'Nope'", "Sky")
    assert list(tmp_path.iterdir()) == []


# -- in process (cheaper), same entry point ------------------------------------------------------
def main(*args):
    return cli.main([str(a) for a in args])


def test_hide_flatten_and_format_override(tmp_path, capsys):
    assert main("compose", SAMPLE, tmp_path / "flat.png", "--hide", "Sun") == 0
    expected = load(SAMPLE)
    expected["Sun"].visible = False
    assert np.array_equal(load(tmp_path / "flat.png").layers[0].pixels, expected.composite())

    assert main("compose", SAMPLE, tmp_path / "one.ora", "--flatten") == 0
    one = load(tmp_path / "one.ora")
    assert len(one) == 1 and np.array_equal(one.layers[0].pixels, load(SAMPLE).composite())

    assert main("compose", SAMPLE, tmp_path / "stack.v1", "--format", "dir") == 0
    assert (tmp_path / "stack.v1" / "stack.json").is_file() and load(tmp_path / "stack.v1", format="dir") == \
        load(SAMPLE)


@pytest.mark.parametrize("src,dst", [("ora", "zip"), ("zip", "dir"), ("dir", "psd"), ("psd", "ora"),
                                     ("ora", "webp"), ("webp", "png")])
def test_any_format_to_any_format(tmp_path, src, dst):
    stack = LayerStack(9, 7, [Layer(np.random.default_rng(0).integers(0, 256, (7, 9, 4), dtype=np.uint8), "a"),
                              Layer(np.full((2, 3, 4), 200, np.uint8), "b", x=-1, y=5, opacity=51 / 255,
                                    blend_mode="overlay")])
    suffix = {"dir": ""}.get(src, f".{src}")
    first = save(stack, tmp_path / f"in{suffix}")
    out = tmp_path / ("out" if dst == "dir" else f"out.{dst}")
    assert main("compose", first, out) == 0
    back = load(out)
    if dst in ("png", "webp") or src in ("png", "webp"):
        assert np.array_equal(back.composite(), stack.composite())
    else:
        assert back == stack


def test_failing_writer_leaves_no_file(tmp_path, capsys, monkeypatch):
    def boom(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", boom)
    out = tmp_path / "out.ora"
    assert main("compose", SAMPLE, out) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"layergen: error: {out}: cannot write (No space left on device)"
    assert list(tmp_path.iterdir()) == []


def test_bad_output_extension(tmp_path, capsys):
    assert main("compose", SAMPLE, tmp_path / "out.jpg") == 2
    assert "unsupported file type '.jpg'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
