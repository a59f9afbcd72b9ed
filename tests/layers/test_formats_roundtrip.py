"""Every layered format round-trips a stack exactly; flat formats hold its composite."""
import json
import zipfile
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from layergen.errors import FormatError
from layergen.layers import BLEND_MODES, FORMATS, Layer, LayerStack, detect_format, load, save


def make_stack(psd_safe=False):
    """Partial alpha, colour under alpha 0, negative/off-canvas offsets, hidden, every blend mode, metadata."""
    rng = np.random.default_rng(1)
    s = LayerStack(40, 30, metadata={"prompt": "a stack", "seed": 3, "nested": {"list": [1, 2.5, "x"]}})
    bg = rng.integers(0, 256, (30, 40, 4), dtype=np.uint8)
    bg[0, :5, 3] = 0  # colour hidden under alpha 0 must survive too
    s.add(Layer(bg, "Background", metadata={"kind": "background", "model": "mini"}))
    opacities = [k / 255 for k in (255, 128, 77, 1, 200, 254, 0)] if psd_safe else [1.0, 0.5, 0.3, 0.123456789,
                                                                                        0.75, 0.999, 0.0]
    for i, mode in enumerate(BLEND_MODES):
        px = rng.integers(0, 256, (7 + i, 11 - i, 4), dtype=np.uint8)
        s.add(Layer(px, f"{mode} layer ✓ {i}", x=-3 + 7 * i, y=-2 + 4 * i, opacity=opacities[i], blend_mode=mode,
                    visible=i % 3 != 2, metadata={"kind": "instance", "index": i}))
    s.add(Layer(rng.integers(0, 256, (8, 8, 4), dtype=np.uint8), "off canvas", x=60, y=-20))
    return s


@pytest.mark.parametrize("suffix", [".ora", ".psd", ".zip", ""])
def test_layered_round_trip_is_exact(tmp_path, suffix):
    stack = make_stack(psd_safe=suffix == ".psd")
    path = save(stack, tmp_path / f"doc{suffix}")
    back = load(path)
    assert back.size == stack.size
    assert back.names() == stack.names()
    for a, b in zip(stack.layers, back.layers):
        assert np.array_equal(a.pixels, b.pixels), a.name
        assert (a.x, a.y, a.opacity, a.blend_mode, a.visible, a.metadata) == \
               (b.x, b.y, b.opacity, b.blend_mode, b.visible, b.metadata), a.name
    assert back.metadata == stack.metadata
    assert back == stack
    assert np.array_equal(back.composite(), stack.composite())


def test_psd_opacity_is_rounded_to_8_bits(tmp_path):
    s = LayerStack(2, 2, [Layer(np.full((2, 2, 4), 200, np.uint8), opacity=0.5),
                          Layer(np.full((1, 1, 4), 9, np.uint8), opacity=0.31)])
    back = load(save(s, tmp_path / "o.psd"))
    assert [l.opacity for l in back] == [128 / 255, 79 / 255]  # 127.5 -> 128 (half up), 79.05 -> 79


@pytest.mark.parametrize("suffix", [".png", ".webp"])
def test_flat_formats_store_the_composite(tmp_path, suffix):
    stack = make_stack()
    back = load(save(stack, tmp_path / f"flat{suffix}"))
    assert len(back) == 1 and back.size == stack.size
    assert np.array_equal(back.layers[0].pixels, stack.composite())
    assert back.layers[0].kind == "background"
    assert np.array_equal(np.asarray(Image.open(tmp_path / f"flat{suffix}").convert("RGBA")), stack.composite())


def test_ora_follows_the_spec(tmp_path):
    stack = make_stack()
    stack.add(Layer(np.zeros((1, 1, 4), np.uint8), "top"))
    big = LayerStack(600, 300, [Layer(np.full((300, 600, 4), 255, np.uint8))])
    for s, name in ((stack, "a.ora"), (big, "big.ora")):
        save(s, tmp_path / name)
    raw = (tmp_path / "a.ora").read_bytes()
    assert raw[30:38] == b"mimetype" and raw[38:54] == b"image/openraster"  # the magic `file` and GIMP sniff
    with zipfile.ZipFile(tmp_path / "a.ora") as zf:
        first = zf.infolist()[0]
        assert first.filename == "mimetype" and first.compress_type == zipfile.ZIP_STORED and first.extra == b""
        assert zf.read("mimetype") == b"image/openraster"
        names = zf.namelist()
        assert {"stack.xml", "mergedimage.png", "Thumbnails/thumbnail.png"} <= set(names)
        root = ET.fromstring(zf.read("stack.xml"))
        assert (root.tag, root.get("w"), root.get("h")) == ("image", "40", "30")
        layers = root.find("stack").findall("layer")
        assert [l.get("name") for l in layers] == stack.names()[::-1]  # top layer first
        ops = {l.get("name"): l.get("composite-op") for l in layers}
        assert ops["add layer ✓ 6"] == "svg:plus" and ops["multiply layer ✓ 1"] == "svg:multiply"
        assert ops["Background"] == "svg:src-over"
        hidden = [l.get("visibility") for l in layers if l.get("name") == "overlay layer ✓ 3"]
        assert hidden == ["visible"]
        assert [l.get("visibility") for l in layers if l.get("name") == "screen layer ✓ 2"] == ["hidden"]
        for l in layers:
            assert l.get("src") in names
        merged = np.asarray(Image.open(zf.open("mergedimage.png")))
        assert np.array_equal(merged, stack.composite())
    with zipfile.ZipFile(tmp_path / "big.ora") as zf:
        assert Image.open(zf.open("Thumbnails/thumbnail.png")).size == (256, 128)


def test_png_stack_manifest_is_readable(tmp_path):
    stack = make_stack()
    save(stack, tmp_path / "st")
    manifest = json.loads((tmp_path / "st" / "stack.json").read_text())
    assert (manifest["width"], manifest["height"]) == (40, 30)
    assert [e["name"] for e in manifest["layers"]] == stack.names()
    first = manifest["layers"][0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "st" / first["file"])), stack.layers[0].pixels)


def test_detect_format():
    assert detect_format("a.ORA") == "ora" and detect_format("x/y.psd") == "psd"
    assert detect_format("out") == "dir" and detect_format("a.webp") == "webp" and detect_format("s.zip") == "zip"
    assert set(FORMATS) == {"ora", "psd", "zip", "dir", "png", "webp"}
    with pytest.raises(FormatError, match=r"a\.jpg: unsupported file type '\.jpg'"):
        detect_format("a.jpg")


def test_format_override_and_saving_is_deterministic(tmp_path):
    stack = make_stack()
    save(stack, tmp_path / "one.bin", format="ora")
    save(stack, tmp_path / "two.bin", format="ora")
    assert (tmp_path / "one.bin").read_bytes() == (tmp_path / "two.bin").read_bytes()
    assert load(tmp_path / "one.bin", format="ora") == stack


def test_sample_file_matches_its_script(tmp_path):
    from pathlib import Path
    import runpy

    root = Path(__file__).resolve().parents[2]
    sample = load(root / "assets/samples/sample.ora")
    built = runpy.run_path(str(root / "assets/samples/make_sample.py"))["build"]()
    assert sample == built and sample.metadata == built.metadata
    assert sample.names() == ["Sky", "Sun", "Hill", "Guides"]
    assert [l.blend_mode for l in sample] == ["normal", "normal", "multiply", "normal"]
    assert [l.visible for l in sample] == [True, True, True, False]
    assert any(0 < a < 255 for a in np.unique(sample["Sun"].pixels[..., 3]))
