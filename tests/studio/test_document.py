"""The studio document: every edit, its undo/redo, selection rules and validation (no Gradio)."""
import numpy as np
import pytest

from layergen.errors import FormatError, LayerError
from layergen.layers import Layer, LayerStack
from layergen.studio.document import MAX_LAYERS, Document, checkerboard


def solid(w, h, rgba, **kw):
    return Layer(np.tile(np.array(rgba, np.uint8), (h, w, 1)), **kw)


@pytest.fixture
def doc():
    d = Document(64, 48)
    d.add_layer(solid(64, 48, (0, 0, 255, 255), name="bg", metadata={"kind": "background"}))
    d.add_layer(solid(10, 10, (255, 0, 0, 255), name="red", x=5, y=6))
    d.add_layer(solid(8, 8, (0, 255, 0, 128), name="green", x=20, y=20))
    return d


def test_add_selects_new_layer_and_makes_names_unique(doc):
    assert doc.stack.names() == ["bg", "red", "green"]
    assert doc.selected == 2
    doc.add_layer(solid(4, 4, (1, 2, 3, 255), name="red"))
    assert doc.stack.names()[-1] == "red 2" and doc.selected == 3


def test_every_edit_undoes_and_redoes_exactly(doc):
    states = [doc.stack.copy()]
    edits = [
        lambda: doc.rename(1, "renamed"),
        lambda: doc.set_visible(2, False),
        lambda: doc.set_opacity(1, 0.25),
        lambda: doc.set_blend_mode(2, "multiply"),
        lambda: doc.move_up(1),
        lambda: doc.move_down(2),
        lambda: doc.duplicate(0),
        lambda: doc.set_position(2, -3, 17),
        lambda: doc.scale(2, 2.0),
        lambda: doc.merge_down(3),
        lambda: doc.delete(1),
        lambda: doc.replace_pixels(1, solid(3, 3, (9, 9, 9, 255), x=1, y=2, metadata={"prompt": "p"})),
        lambda: doc.new(32, 40),
    ]
    for edit in edits:
        edit()
        assert not doc.stack == states[-1], edit
        states.append(doc.stack.copy())
    for expected in reversed(states[:-1]):
        doc.undo()
        assert doc.stack == expected
        assert np.array_equal(doc.stack.composite(), expected.composite())
    assert doc.undo_label == "Add layer"  # only the fixture's own additions are left
    for expected in states[1:]:
        doc.redo()
        assert doc.stack == expected
    assert not doc.can_redo
    assert (doc.width, doc.height) == (32, 40)


def test_new_edit_clears_redo_and_noop_records_nothing(doc):
    doc.rename(1, "a")
    doc.undo()
    assert doc.redo_label == "Rename layer"
    doc.set_visible(1, True)  # already visible: nothing changes, nothing recorded
    assert doc.redo_label == "Rename layer"
    doc.set_visible(1, False)
    assert not doc.can_redo and doc.undo_label == "Hide layer"


def test_history_is_bounded_and_shares_pixels():
    d = Document(32, 32, max_history=5)
    d.add_layer(solid(32, 32, (1, 1, 1, 255), name="a"))
    for k in range(12):
        d.set_position(0, k, 0)
    assert len(d._undo) == 5
    # snapshots share the (frozen) pixel array rather than copying it
    assert all(s.layers[0].pixels is d.stack.layers[0].pixels for s in d._undo)
    with pytest.raises(ValueError):
        d.stack.layers[0].pixels[0, 0, 0] = 7  # in-place writes would corrupt undo; they fail loudly


def test_failed_edit_leaves_document_untouched(doc):
    before = doc.stack.copy()
    with pytest.raises(LayerError):
        with doc.edit("broken"):
            doc.stack.layers[0].name = "changed"
            raise LayerError("boom")
    assert doc.stack == before and doc.undo_label == "Add layer"


def test_repaint_takes_new_name_unless_user_renamed(doc):
    doc.replace_pixels(1, solid(3, 3, (9, 9, 9, 255), name="grey square"))
    assert doc.stack.names() == ["bg", "grey square", "green"]
    doc.rename(1, "Hero")
    doc.replace_pixels(1, solid(3, 3, (7, 7, 7, 255), name="green"))
    assert doc.stack.names() == ["bg", "Hero", "green"] and doc.stack[1].pixels[0, 0, 0] == 7
    for _ in range(2):  # back to before the rename
        doc.undo()
    assert doc.stack.names() == ["bg", "grey square", "green"]
    doc.replace_pixels(1, solid(3, 3, (7, 7, 7, 255), name="green"))
    assert doc.stack.names() == ["bg", "green 2", "green"]  # names stay unique


def test_merge_down_matches_composite_and_selects_result(doc):
    before = doc.stack.composite()
    doc.merge_down(2)
    assert doc.stack.names() == ["bg", "red"] and doc.selected == 1
    assert np.array_equal(doc.stack.composite(), before)


def test_reorder_changes_composite(doc):
    doc.set_position(2, 5, 6)  # put green over red
    top_green = doc.stack.composite()[8, 8].copy()
    doc.move_down(2)  # green now under red
    assert doc.stack.names() == ["bg", "green", "red"] and doc.selected == 1
    assert tuple(doc.stack.composite()[8, 8]) == (255, 0, 0, 255)
    assert tuple(top_green) != (255, 0, 0, 255)


def test_scale_keeps_centre_and_colour(doc):
    doc.scale(1, 2.0)
    red = doc.stack.layers[1]
    assert (red.width, red.height) == (20, 20) and (red.x, red.y) == (0, 1)
    # premultiplied resampling: the interior stays pure red, no dark fringe from transparent pixels
    assert tuple(red.pixels[10, 10]) == (255, 0, 0, 255)


def test_selection_after_delete_and_errors(doc):
    doc.delete(0)
    assert doc.selected == 0 and doc.stack.names() == ["red", "green"]
    doc.select(None)
    with pytest.raises(LayerError, match="select a layer"):
        doc.rename(None, "x")
    with pytest.raises(LayerError, match="top layer"):
        doc.move_up(1)
    with pytest.raises(LayerError, match="bottom layer"):
        doc.move_down(0)
    with pytest.raises(LayerError, match="bottom layer"):
        doc.merge_down(0)
    with pytest.raises(LayerError, match="empty"):
        doc.rename(0, "  ")
    with pytest.raises(LayerError, match="opacity"):
        doc.set_opacity(0, 1.5)
    with pytest.raises(LayerError, match="blend mode"):
        doc.set_blend_mode(0, "dissolve")
    with pytest.raises(LayerError, match="out of range"):
        doc.select(7)
    with pytest.raises(LayerError, match="scale"):
        doc.scale(0, 0)
    with pytest.raises(LayerError):
        Document(10, 5000)
    with pytest.raises(LayerError, match="nothing to undo"):
        Document().undo()


def test_layer_limit(doc):
    with pytest.raises(LayerError, match="at most"):
        doc.add_layers([solid(2, 2, (0, 0, 0, 255))] * MAX_LAYERS)
    assert len(doc) == 3


def test_preview_thumbnail_and_summary(doc):
    doc.set_visible(0, False)
    prev = doc.preview()
    assert prev.shape == (48, 64, 4) and (prev[..., 3] == 255).all()
    assert tuple(prev[0, 63]) == tuple(checkerboard(64, 48)[0, 63])  # empty area shows the checkerboard
    thumb = doc.thumbnail(1, size=32)
    assert thumb.shape == (24, 32, 4)
    s = doc.summary()
    assert [l["name"] for l in s["layers"]] == ["bg", "red", "green"]
    assert s["layers"][0]["visible"] is False and s["undo"] == "Hide layer"
    assert doc.layer_label(0) == "0: bg (hidden)"


@pytest.mark.parametrize("ext", [".psd", ".ora", ".zip"])
def test_export_import_roundtrip(doc, tmp_path, ext):
    doc.set_visible(2, False)
    path = doc.export(tmp_path / f"doc{ext}")
    other = Document()
    other.import_file(path)
    assert other.stack.names() == doc.stack.names()
    assert [l.visible for l in other.stack] == [True, True, False]
    assert np.array_equal(other.stack.composite(), doc.stack.composite())
    other.undo()
    assert len(other) == 0 and (other.width, other.height) == (256, 256)


def test_import_rejects_big_or_unknown_files(tmp_path):
    d = Document()
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(FormatError, match="unsupported file type"):
        d.import_file(bad)
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 2048)
    with pytest.raises(FormatError, match="up to"):
        d.import_file(big, max_bytes=1024)
    corrupt = tmp_path / "c.psd"
    corrupt.write_bytes(b"8BPS garbage")
    with pytest.raises(FormatError):
        d.import_file(corrupt)
    huge = LayerStack(4000, 10)
    with pytest.raises(LayerError, match="canvas"):
        d.replace_stack(huge)
    assert len(d) == 0 and not d.can_undo
