"""Files written by other tools, and broken files: clear FormatErrors, never a traceback from a parser."""
import io
import json
import struct
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from layergen.errors import FormatError
from layergen.layers import Layer, LayerStack, load, save
from layergen.layers.formats import ora as ora_module


def png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr, np.uint8), "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def rnd(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)


def small_stack():
    return LayerStack(8, 6, [Layer(rnd(6, 8, 0), "bg"), Layer(rnd(3, 4, 1), "fg", x=2, y=1, blend_mode="screen")])


# -- fixtures made by other writers ------------------------------------------------------------
def test_psd_built_directly_with_psd_tools(tmp_path):
    from psd_tools import PSDImage
    from psd_tools.api.layers import PixelLayer
    from psd_tools.constants import BlendMode

    a, b, c, d = rnd(10, 12, 2), rnd(4, 5, 3), rnd(3, 3, 4), rnd(2, 6, 5)
    psd = PSDImage.new("RGBA", (12, 10))
    PixelLayer.frompil(Image.fromarray(a), psd, "Background")
    lb = PixelLayer.frompil(Image.fromarray(b), psd, "Shadow", top=-1, left=9)
    lb.blend_mode, lb.opacity = BlendMode.MULTIPLY, 153
    lc = PixelLayer.frompil(Image.fromarray(c), psd, "Eye", top=2, left=3)
    ld = PixelLayer.frompil(Image.fromarray(d), psd, "Note", top=7, left=0)
    ld.visible = False
    group = psd.create_group([lc], name="Face", opacity=128)
    group.visible = True
    path = tmp_path / "photoshop_like.psd"
    psd.save(path)

    stack = load(path)
    assert stack.size == (12, 10)
    assert stack.names() == [l.name for l in psd.descendants() if not l.is_group()]  # psd-tools' own order
    assert set(stack.names()) == {"Background", "Shadow", "Eye", "Note"}
    assert np.array_equal(stack["Background"].pixels, a)
    sh = stack["Shadow"]
    assert (sh.x, sh.y, sh.blend_mode, sh.opacity) == (9, -1, "multiply", 153 / 255)
    assert np.array_equal(sh.pixels, b)
    eye = stack["Eye"]  # flattened out of its group, group opacity folded in
    assert (eye.x, eye.y, eye.opacity, eye.metadata["psd_group"]) == (3, 2, 128 / 255, "Face")
    assert np.array_equal(eye.pixels, c)
    assert stack["Note"].visible is False  # hidden layers stay hidden


def test_psd_hidden_group_hides_children_and_unsupported_blend_is_error(tmp_path):
    from psd_tools import PSDImage
    from psd_tools.api.layers import PixelLayer
    from psd_tools.constants import BlendMode

    psd = PSDImage.new("RGBA", (4, 4))
    l1 = PixelLayer.frompil(Image.fromarray(rnd(4, 4, 6)), psd, "inside")
    g = psd.create_group([l1], name="G")
    g.visible = False
    psd.save(tmp_path / "g.psd")
    assert load(tmp_path / "g.psd")["inside"].visible is False

    l2 = PixelLayer.frompil(Image.fromarray(rnd(4, 4, 7)), psd, "burn")
    l2.blend_mode = BlendMode.COLOR_BURN
    psd.save(tmp_path / "burn.psd")
    with pytest.raises(FormatError, match=r"burn\.psd: layer 'burn' uses blend mode 'color_burn'"):
        load(tmp_path / "burn.psd")


def test_psd_layer_mask_is_applied_to_alpha(tmp_path):
    from psd_tools import PSDImage
    from psd_tools.api.layers import PixelLayer

    psd = PSDImage.new("RGBA", (4, 2))
    px = np.full((2, 4, 4), 255, np.uint8)
    layer = PixelLayer.frompil(Image.fromarray(px), psd, "masked")
    layer.create_mask(Image.fromarray(np.array([[0, 255, 128, 255]] * 2, np.uint8), "L"))
    psd.save(tmp_path / "m.psd")
    stack = load(tmp_path / "m.psd")
    assert stack["masked"].pixels[..., 3].tolist() == [[0, 255, 128, 255]] * 2


def _ora(path, stack_xml: str, files: dict, mimetype=b"image/openraster"):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        if mimetype is not None:
            zf.writestr(zipfile.ZipInfo("mimetype"), mimetype, compress_type=zipfile.ZIP_STORED)
        zf.writestr("stack.xml", stack_xml)
        for name, data in files.items():
            zf.writestr(name, data)


def test_ora_built_by_hand_top_first_with_nested_stack(tmp_path):
    top, mid, bottom = rnd(2, 3, 8), rnd(5, 5, 9), rnd(6, 7, 10)
    xml = """<?xml version="1.0" encoding="UTF-8"?>
<image version="0.0.3" w="7" h="6">
  <stack>
    <layer name="Top" src="data/top.png" x="2" y="-1" opacity="0.25" composite-op="svg:plus"/>
    <stack name="Group" opacity="0.5" visibility="hidden">
      <layer name="Mid" src="data/mid.png" x="1" y="1" composite-op="svg:overlay"/>
    </stack>
    <layer name="Bottom" src="data/bottom.png"/>
  </stack>
</image>"""
    path = tmp_path / "krita_like.ora"
    _ora(path, xml, {"data/top.png": png(top), "data/mid.png": png(mid), "data/bottom.png": png(bottom)})
    stack = load(path)
    assert stack.size == (7, 6) and stack.names() == ["Bottom", "Mid", "Top"]  # bottom -> top
    b, m, t = stack.layers
    assert (b.x, b.y, b.opacity, b.blend_mode, b.visible) == (0, 0, 1.0, "normal", True)
    assert (m.x, m.y, m.opacity, m.blend_mode, m.visible, m.metadata) == (1, 1, 0.5, "overlay", False,
                                                                          {"ora_group": "Group"})
    assert (t.x, t.y, t.opacity, t.blend_mode) == (2, -1, 0.25, "add")
    assert np.array_equal(t.pixels, top) and np.array_equal(b.pixels, bottom)


# -- broken and unsupported files --------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".ora", ".psd", ".zip", ".png", ".webp"])
@pytest.mark.parametrize("keep", [0.0, 0.3, 0.6, 0.9])
def test_truncated_files_raise_format_error_naming_the_file(tmp_path, suffix, keep):
    good = save(small_stack(), tmp_path / f"good{suffix}")
    data = good.read_bytes()
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(FormatError) as info:
        load(bad)
    msg = str(info.value)
    assert msg.startswith(str(bad)) and "\n" not in msg


@pytest.mark.parametrize("suffix", [".ora", ".psd", ".zip", ".png", ".webp"])
def test_garbage_files_raise_format_error(tmp_path, suffix):
    bad = tmp_path / f"junk{suffix}"
    bad.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(FormatError, match=str(bad)):
        load(bad)


def test_corrupt_bytes_inside_psd_layer_data(tmp_path):
    good = save(small_stack(), tmp_path / "c.psd")
    data = bytearray(good.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 400):
        data[i] ^= 0xA5
    (tmp_path / "x.psd").write_bytes(bytes(data))
    try:
        stack = load(tmp_path / "x.psd")
    except FormatError as exc:
        assert str(exc).startswith(str(tmp_path / "x.psd"))
    else:  # flipped bits inside RLE pixel data can still decode; it must then be a valid stack
        assert stack.size == (8, 6)


def test_sixteen_bit_png_is_rejected_clearly(tmp_path):
    arr16 = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    Image.fromarray(arr16).save(tmp_path / "deep.png")  # 16-bit grayscale
    with pytest.raises(FormatError, match="deep.png: 16-bit PNG is not supported"):
        load(tmp_path / "deep.png")
    # 16-bit RGBA PNG written by hand (Pillow cannot write it): must not be silently truncated to 8 bits.
    raw = b"".join(b"\x00" + bytes(8 * 2) for _ in range(2))
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    png16 = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 16, 6, 0, 0, 0))
             + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    (tmp_path / "rgba16.png").write_bytes(png16)
    with pytest.raises(FormatError, match="16-bit"):
        load(tmp_path / "rgba16.png")
    # ... and the same inside a PNG stack
    save(small_stack(), tmp_path / "st")
    (tmp_path / "st" / "000-bg.png").write_bytes(png16)
    with pytest.raises(FormatError, match="000-bg.png: 16-bit PNG"):
        load(tmp_path / "st")


def test_png_stack_manifest_errors(tmp_path):
    root = tmp_path / "st"
    save(small_stack(), root)
    manifest = json.loads((root / "stack.json").read_text())

    def write(m):
        (root / "stack.json").write_text(json.dumps(m))

    m = json.loads(json.dumps(manifest)); m["layers"][1]["width"] = 99
    write(m)
    with pytest.raises(FormatError, match=r"layer 'fg': 001-fg.png is 4x3 but the manifest says 99x3"):
        load(root)
    m = json.loads(json.dumps(manifest)); m["layers"][1]["blend_mode"] = "vivid-light"
    write(m)
    with pytest.raises(FormatError, match="unknown blend mode 'vivid-light'"):
        load(root)
    m = json.loads(json.dumps(manifest)); del m["width"]
    write(m)
    with pytest.raises(FormatError, match="missing required field 'width'"):
        load(root)
    m = json.loads(json.dumps(manifest)); m["layers"][0]["file"] = "../../etc/passwd"
    write(m)
    with pytest.raises(FormatError, match="outside the folder"):
        load(root)
    (root / "stack.json").write_text("{not json")
    with pytest.raises(FormatError, match="stack.json: invalid JSON"):
        load(root)
    write(manifest)
    (root / "001-fg.png").unlink()
    with pytest.raises(FormatError, match="layer file '001-fg.png' is missing"):
        load(root)
    with pytest.raises(FormatError, match="not a PNG stack folder"):
        load(tmp_path)


def test_ora_errors(tmp_path):
    layer = {"data/a.png": png(rnd(2, 2, 1))}
    cases = [
        ('<image w="2" h="2"><stack><layer src="data/a.png" composite-op="svg:color-burn"/></stack></image>',
         layer, "unsupported composite-op 'svg:color-burn'"),
        ('<image w="2" h="2"><stack><layer src="data/missing.png"/></stack></image>', layer,
         "missing 'data/missing.png'"),
        ('<image w="two" h="2"><stack/></image>', layer, "needs integer w and h"),
        ('<image w="2" h="2"><stack>', layer, "stack.xml is not valid XML"),
        ('<image w="100000" h="100000"><stack/></image>', layer, "canvas 100000x100000 is larger than"),
        ('<image w="20000" h="20000"><stack/></image>', layer, "256 megapixels"),
        ('<image w="2" h="2"><stack><layer src="data/a.png" opacity="nan"/></stack></image>', layer,
         "opacity='nan' is not a finite number"),
        ('<image w="2" h="2"><stack><layer src="data/a.png" x="inf"/></stack></image>', layer,
         "x='inf' is not a finite number"),
        ('<image w="2" h="2"><stack><layer src="data/a.png" x="99999999999999999999"/></stack></image>', layer,
         "too far from the canvas"),  # read, it would crash the PSD writer's 32-bit fields later
    ]
    for i, (xml, files, match) in enumerate(cases):
        path = tmp_path / f"e{i}.ora"
        _ora(path, xml, files)
        with pytest.raises(FormatError, match=match):
            load(path)
    _ora(tmp_path / "mime.ora", "<image/>", {}, mimetype=b"application/zip")
    with pytest.raises(FormatError, match="mimetype is"):
        load(tmp_path / "mime.ora")
    (tmp_path / "actually_png.ora").write_bytes(png(rnd(2, 2, 1)))
    with pytest.raises(FormatError, match="not a zip archive"):
        load(tmp_path / "actually_png.ora")


def test_unsupported_and_missing_paths(tmp_path):
    with pytest.raises(FormatError, match="unsupported file type '.gif'"):
        load(tmp_path / "a.gif")
    with pytest.raises(FormatError, match="no such file"):
        load(tmp_path / "nope.ora")


# -- atomic writes ----------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".ora", ".zip", ".psd", ".png"])
def test_failing_write_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch, suffix):
    target = tmp_path / f"out{suffix}"
    calls = {"n": 0}

    def boom(*args, **kwargs):
        calls["n"] += 1
        raise OSError(28, "No space left on device")

    # fail inside the writer, after the temporary file has been opened
    monkeypatch.setattr(zipfile.ZipFile, "writestr", boom)
    monkeypatch.setattr("psd_tools.PSDImage.save", lambda self, fp, *a, **k: (open(fp, "wb").write(b"8BPS"), boom()))
    pil_save = Image.Image.save

    def partial_pil_save(self, fp, *args, **kwargs):
        if isinstance(fp, io.BytesIO):  # in-memory encodes (layer PNGs) still work
            return pil_save(self, fp, *args, **kwargs)
        open(fp, "wb").write(b"\x89PNG")
        boom()

    monkeypatch.setattr(Image.Image, "save", partial_pil_save)
    with pytest.raises(FormatError, match=rf"out\{suffix}: cannot write \(No space left on device\)"):
        save(small_stack(), target)
    assert calls["n"] == 1
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary sibling

    monkeypatch.undo()
    save(small_stack(), target)
    before = target.read_bytes()
    monkeypatch.setattr(ora_module, "png_bytes", lambda px: (_ for _ in ()).throw(OSError(5, "I/O error")))
    monkeypatch.setattr(zipfile.ZipFile, "writestr", boom)
    monkeypatch.setattr("psd_tools.PSDImage.save", lambda self, fp, *a, **k: boom())
    monkeypatch.setattr(Image.Image, "save", lambda self, fp, *a, **k: boom())
    with pytest.raises(FormatError):
        save(small_stack(), target)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_dir_save_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    with pytest.raises(FormatError, match="not a PNG stack .*refusing to replace"):
        save(small_stack(), tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "precious"
    save(small_stack(), tmp_path / "stack_dir")
    save(LayerStack(2, 2, [Layer(rnd(2, 2, 3), "only")]), tmp_path / "stack_dir")  # our own: replaced whole
    assert sorted(p.name for p in (tmp_path / "stack_dir").iterdir()) == ["000-only.png", "stack.json"]


# -- what flattening cannot keep is applied or noted, never silently wrong (QA pass, session 17) --------------
def test_psd_adjustment_layer_is_skipped_with_a_note_and_fill_opacity_fades_the_layer(tmp_path):
    from psd_tools import PSDImage
    from psd_tools.constants import Tag
    from psd_tools.psd.tagged_blocks import TaggedBlock

    psd = PSDImage.new("RGBA", (4, 4), color=(0, 0, 0, 0))
    psd.create_pixel_layer(Image.new("RGBA", (4, 4), (255, 255, 255, 255)), name="paper")
    red = psd.create_pixel_layer(Image.new("RGBA", (4, 4), (255, 0, 0, 255)), name="red")
    red.fill_opacity = 128
    invert = psd.create_pixel_layer(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), name="Invert 1")
    invert._record.tagged_blocks[Tag.INVERT] = TaggedBlock(key=Tag.INVERT, data=b"")  # what Photoshop writes
    psd.save(tmp_path / "adj.psd")
    assert PSDImage.open(tmp_path / "adj.psd")[2].kind == "invert"  # psd-tools names the kind by the adjustment

    stack = load(tmp_path / "adj.psd")
    assert stack.names() == ["paper", "red"]
    assert stack.metadata["notes"] == ["adjustment layer 'Invert 1' (invert) skipped"]
    assert stack["red"].opacity == 128 / 255
    assert stack.composite()[0, 0].tolist() == [255, 127, 127, 255]  # psd-tools' own composite, with fill opacity


def test_faded_groups_and_group_blending_are_noted_in_psd_and_ora(tmp_path):
    from psd_tools import PSDImage

    psd = PSDImage.new("RGBA", (4, 4), color=(0, 0, 0, 0))
    a = psd.create_pixel_layer(Image.new("RGBA", (4, 4), (255, 0, 0, 255)), name="a")
    b = psd.create_pixel_layer(Image.new("RGBA", (4, 4), (0, 0, 255, 255)), name="b")
    psd.create_group([a, b], name="two", opacity=128)
    psd.save(tmp_path / "g.psd")
    assert load(tmp_path / "g.psd").metadata["notes"] == [
        "group 'two': its opacity is applied to each of its layers, so where they overlap the lower ones show through"]

    xml = """<image w="4" h="4"><stack>
  <stack name="mul" composite-op="svg:multiply"><layer name="" src="data/a.png"/></stack>
  <stack name="faded" opacity="0.5"><layer name="x" src="data/a.png"/><layer name="y" src="data/a.png"/></stack>
  <stack name="one" opacity="0.5"><layer name="z" src="data/a.png"/></stack>
</stack></image>"""
    _ora(tmp_path / "g.ora", xml, {"data/a.png": png(rnd(4, 4, 1))})
    stack = load(tmp_path / "g.ora")
    assert stack.metadata["notes"] == [
        "group 'mul': composite-op svg:multiply ignored (group flattened)",
        "group 'faded': its opacity is applied to each of its layers, so where they overlap the lower ones show "
        "through"]
    assert stack.names() == ["z", "y", "x", ""]  # an empty name stays empty (not the PNG's path)


def test_psd_merged_image_keeps_the_canvas_transparency_and_an_empty_stack_stays_empty(tmp_path):
    from psd_tools import PSDImage

    stack = LayerStack(6, 6, [Layer(rnd(2, 2, 4), "dot", x=2, y=2)])
    save(stack, tmp_path / "t.psd")
    merged = PSDImage.open(tmp_path / "t.psd").composite()  # what previews and thumbnails show
    assert merged.mode == "RGBA" and merged.getpixel((0, 0))[3] == 0
    assert np.abs(np.asarray(merged, int)[2:4, 2:4] - stack.composite()[2:4, 2:4]).max() <= 1  # psd-tools rounds
    save(LayerStack(3, 3, []), tmp_path / "empty.psd")
    assert len(load(tmp_path / "empty.psd")) == 0


@pytest.mark.parametrize("suffix", [".ora", ".psd", ".zip"])
def test_names_a_format_cannot_store_are_refused_before_writing(tmp_path, suffix):
    with pytest.raises(FormatError, match="lone surrogate"):
        save(LayerStack(2, 2, [Layer(rnd(2, 2, 0), "bad\ud800")]), tmp_path / f"s{suffix}")
    control = LayerStack(2, 2, [Layer(rnd(2, 2, 0), "tab\tok"), Layer(rnd(2, 2, 1), "bell\x07")])
    if suffix == ".ora":
        with pytest.raises(FormatError, match="cannot store the control character U\\+0007"):
            save(control, tmp_path / f"c{suffix}")
        assert list(tmp_path.iterdir()) == []
    else:
        assert load(save(control, tmp_path / f"c{suffix}")).names() == ["tab\tok", "bell\x07"]


def test_dir_save_never_deletes_files_it_did_not_write(tmp_path):
    save(small_stack(), tmp_path / "stack_dir")
    (tmp_path / "stack_dir" / "notes.txt").write_text("mine")
    (tmp_path / "stack_dir" / "refs").mkdir()
    with pytest.raises(FormatError, match="also holds notes.txt, refs/, which replacing it would delete"):
        save(LayerStack(2, 2, [Layer(rnd(2, 2, 3), "only")]), tmp_path / "stack_dir")
    assert (tmp_path / "stack_dir" / "notes.txt").read_text() == "mine"
    assert load(tmp_path / "stack_dir") == small_stack()


def test_an_image_declaring_a_huge_canvas_is_refused_from_its_header(tmp_path):
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr
                                        + struct.pack(">I", zlib.crc32(ihdr)) + struct.pack(">I", 99) + b"IDAT")
    with pytest.raises(FormatError, match="bomb.png: image is larger than layergen reads"):
        load(tmp_path / "bomb.png")


def test_notes_are_not_written_back_and_a_stack_folder_tolerates_hidden_and_listed_files(tmp_path):
    stack = small_stack()
    stack.metadata.update(notes=["group 'g': composite-op svg:multiply ignored (group flattened)"], title="t")
    for suffix in (".psd", ".ora", ".zip"):
        assert load(save(stack, tmp_path / f"s{suffix}")).metadata == {"title": "t"}
    save(small_stack(), tmp_path / "dir")
    (tmp_path / "dir" / ".DS_Store").write_bytes(b"finder")
    save(LayerStack(2, 2, [Layer(rnd(2, 2, 3), "only")]), tmp_path / "dir")
    assert load(tmp_path / "dir").names() == ["only"]


@pytest.mark.parametrize("suffix", [".ora", ".psd", ".zip"])
def test_metadata_no_utf8_or_xml_can_hold_still_round_trips(tmp_path, suffix):
    """A prompt with a lone surrogate or U+FFFE (pasted from odd sources): ORA wrote a stack.xml nobody could
    read, PSD and PNG stacks failed with a raw UnicodeEncodeError. JSON escapes store them exactly."""
    odd = "p\ud800 \ufffe\uffff \\\ufffe \x01 é"
    stack = LayerStack(2, 2, [Layer(rnd(2, 2, 0), "x", metadata={"prompt": odd, odd: 1})], metadata={"prompt": odd})
    back = load(save(stack, tmp_path / f"s{suffix}"))
    assert back.metadata["prompt"] == odd and back.layers[0].metadata == {"prompt": odd, odd: 1}
