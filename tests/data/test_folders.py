"""layergen.data.folders: records from imagefolders and layered files; bad records counted, never raised."""
import json

import numpy as np
import pytest
from PIL import Image

from layergen.data.folders import (LayerFolderDataset, LayerRecord, background_below, caption_from_name,
                                   check_layer, fit_record, is_generic_name, layer_on_canvas, load_record,
                                   records_from_stack, scan_folder)
from layergen.layers import Layer, LayerStack, save


def blob(size=32, colour=(200, 30, 30), r=8, alpha=255):
    yy, xx = np.mgrid[:size, :size]
    m = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= r * r
    img = np.zeros((size, size, 4), np.uint8)
    img[m] = (*colour, alpha)
    return img


def document():
    """Opaque background, a red square at an offset, a hidden layer, a half-opacity blue layer on top."""
    bg = np.zeros((32, 32, 4), np.uint8)
    bg[..., :3] = (0, 100, 0)
    bg[..., 3] = 255
    red = np.zeros((10, 10, 4), np.uint8)
    red[...] = (255, 0, 0, 255)
    blue = np.zeros((32, 32, 4), np.uint8)
    blue[4:12, 4:12] = (0, 0, 255, 255)
    return LayerStack(32, 32, [Layer(bg, name="Background"), Layer(red, name="red square", x=20, y=2),
                               Layer(blob(), name="ghost", visible=False),
                               Layer(blue, name="Layer 4", opacity=0.5, metadata={"prompt": "a blue tile"})])


def test_stack_records_place_layers_on_the_canvas_with_the_layers_below_as_background():
    from layergen.data.folders import SkipReport

    report = SkipReport()
    recs = records_from_stack(document(), "doc.psd", caption="fallback", report=report)
    assert [r.source for r in recs] == ["doc.psd#1", "doc.psd#3"]
    assert [r.caption for r in recs] == ["red square", "a blue tile"]  # layer name; prompt metadata wins
    assert report.kept == 2 and dict(report.skipped) == {"background": 1, "hidden": 1}
    red = recs[0]
    assert red.rgba.shape == (32, 32, 4)
    assert (red.rgba[2:12, 20:30] == (255, 0, 0, 255)).all() and red.rgba[:, :20, 3].max() == 0
    assert (red.background == (0, 100, 0)).all()  # only the opaque background is below
    blue = recs[1]
    assert tuple(blue.rgba[5, 5]) == (0, 0, 255, 128)  # layer opacity folded into alpha (255 * 0.5 rounded)
    assert tuple(blue.background[5, 25]) == (255, 0, 0) and tuple(blue.background[20, 5]) == (0, 100, 0)


def test_background_below_flattens_gaps_over_white_and_none_when_nothing_is_below():
    stack = LayerStack(16, 16, [Layer(blob(16, r=3, alpha=128), name="a"), Layer(blob(16, r=5), name="b")])
    assert background_below(stack, 0) is None
    bg = background_below(stack, 1)
    assert tuple(bg[0, 0]) == (255, 255, 255)          # gap -> white
    assert tuple(bg[8, 8]) == (227, 142, 142)            # half-alpha over white: 200 * 128/255 + 255 * 127/255
    assert layer_on_canvas(stack, 1)[8, 8, 3] == 255


def test_check_layer_reasons():
    assert check_layer(blob()) is None
    assert check_layer(np.zeros((32, 32, 4), np.uint8)) == "empty"
    assert check_layer(np.full((32, 32, 4), 255, np.uint8)) == "no_alpha"
    assert check_layer(blob(r=2)) == "tiny"          # 5 px of content
    assert check_layer(blob(r=2), min_size=4) is None
    assert check_layer(blob(6, r=2)) == "tiny"       # canvas smaller than min_size


def test_generic_names_and_file_name_captions():
    for name in ("Layer 3", "layer", "Background", "instance 2", "Layer 1 copy", "Ebene 7", "  "):
        assert is_generic_name(name), name
    for name in ("red square", "Logo", "sky 2"):
        assert not is_generic_name(name), name
    assert caption_from_name("red_star--02.png") == "red star 02"


@pytest.fixture
def mixed_folder(tmp_path):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(blob(colour=(10, 200, 10))).save(d / "a.png")
    Image.fromarray(blob(colour=(10, 10, 200))).save(d / "sub" / "b.png")
    Image.fromarray(blob(colour=(200, 200, 10))).save(d / "sub" / "yellow_dot.png")  # caption from its name
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(d / "sub" / "b_bg.png")
    (d / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "a green dot"}) + "\n"
        + json.dumps({"file_name": "sub/b.png", "text": "a blue dot", "background_file_name": "sub/b_bg.png"}) + "\n"
        + "{not json\n")
    Image.fromarray(blob(colour=(200, 10, 200))).save(d / "c.webp", lossless=True)
    (d / "c.txt").write_text("a purple dot\n")
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(d / "rgb.png")              # no alpha
    Image.fromarray(np.zeros((32, 32, 4), np.uint8)).save(d / "empty.png")                # fully transparent
    Image.fromarray(blob(r=1)).save(d / "speck.png")                                       # tiny
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)                 # corrupt
    Image.fromarray(blob()).save(d / "cut.png")
    (d / "cut.png").write_bytes((d / "cut.png").read_bytes()[:60])                         # truncated
    (d / "readme.md").write_text("notes")                                                  # ignored
    (d / "model.ckpt").write_bytes(b"xx")                                                  # unsupported
    save(document(), d / "doc.psd")
    save(document(), d / "doc.ora")
    (d / "broken.ora").write_bytes(b"PK\x03\x04 not really")                               # corrupt layered
    return d


def test_scan_folder_keeps_good_records_and_counts_bad_ones(mixed_folder):
    refs, report = scan_folder(mixed_folder)
    got = {r.source: r.caption for r in refs}
    assert got == {"a.png": "a green dot", "sub/b.png": "a blue dot", "sub/yellow_dot.png": "yellow dot",
                   "c.webp": "a purple dot", "doc.psd#1": "red square", "doc.psd#3": "a blue tile",
                   "doc.ora#1": "red square", "doc.ora#3": "a blue tile"}
    assert report.kept == 8
    assert dict(report.skipped) == {"corrupt": 4, "no_alpha": 1, "empty": 1, "tiny": 1, "unsupported": 1,
                                    "background": 2, "hidden": 2}
    assert any("metadata.jsonl:3" in e for e in report.examples["corrupt"])  # the bad metadata line
    assert report.captions_from_names == 1
    assert "8 records; skipped 12:" in report.summary() and "4 corrupt" in report.summary()
    # b_bg.png is b.png's background, not a sample; and it is loaded as one
    b = load_record(next(r for r in refs if r.source == "sub/b.png"))
    assert b.background.shape == (32, 32, 3) and (b.background == 90).all()
    doc = load_record(next(r for r in refs if r.source == "doc.ora#3"))
    assert tuple(doc.background[5, 25]) == (255, 0, 0)


def test_scan_folder_with_pixels_matches_lazy_loading(mixed_folder):
    refs, _ = scan_folder(mixed_folder)
    recs, report = scan_folder(mixed_folder, load_pixels=True)
    assert report.kept == len(recs) == len(refs)
    for ref, rec in zip(refs, recs):
        lazy = load_record(ref)
        assert lazy.source == rec.source and np.array_equal(lazy.rgba, rec.rgba)
        assert (lazy.background is None) == (rec.background is None)


def test_fit_record_pads_without_dark_fringes():
    rgba = np.zeros((20, 40, 4), np.uint8)
    rgba[:, :20] = (255, 255, 255, 255)          # white opaque half, transparent (black RGB) half
    bg = np.full((20, 40, 3), 7, np.uint8)
    out, back = fit_record(LayerRecord(rgba, "x", bg), 16, "pad")
    assert out.shape == (16, 16, 4) and back.shape == (16, 16, 3)
    assert out[:4, :, 3].max() == 0 and out[12:, :, 3].max() == 0   # 16x8 content centred, transparent margins
    assert np.allclose(back, 7 / 255)                                 # edge-replicated background
    edge = out[..., 3] > 0.01
    assert np.allclose(out[..., :3][edge], 1.0, atol=1e-4)            # premultiplied resize: no grey at the edge
    crop, _ = fit_record(LayerRecord(rgba, "x"), 16, "crop")
    assert crop.shape == (16, 16, 4) and crop[..., 3].min() == 0 and crop[..., 3].max() == 1
    with pytest.raises(Exception, match="resize mode"):
        fit_record(LayerRecord(rgba, "x"), 16, "zoom")


def test_dataset_items(mixed_folder):
    ds = LayerFolderDataset(mixed_folder, resolution=24)
    assert len(ds) == 8 and ds.report.kept == 8
    item = ds[[r.source for r in ds.records].index("sub/b.png")]
    assert item["rgba"].shape == (4, 24, 24) and item["background"].shape == (3, 24, 24)
    assert item["has_background"] and item["caption"] == "a blue dot"
    assert float(item["rgba"][3].max()) == 1.0 and abs(float(item["background"].mean()) - 90 / 255) < 1e-3
    plain = ds[[r.source for r in ds.records].index("a.png")]
    assert not plain["has_background"] and float(plain["background"].abs().max()) == 0.0


def test_missing_folder_is_a_clear_error(tmp_path):
    from layergen.errors import LayergenError

    with pytest.raises(LayergenError, match="no such data folder"):
        scan_folder(tmp_path / "nope")
