import json

import pytest

from layergen import LayergenError
from layergen.layout import MAX_LAYERS, Box, Layout, LayoutError, load_layout, parse_box, save_layout


def test_parse_box_with_and_without_prompt():
    b = parse_box("10, 12,40,30:a red star, with a shadow: big")
    assert b.xywh == (10, 12, 40, 30) and b.xyxy == (10, 12, 50, 42) and b.area == 1200
    assert b.prompt == "a red star, with a shadow: big" and b.bound
    anon = parse_box("1,2,3,4")
    assert anon.prompt is None and not anon.bound
    assert parse_box("1,2,3,4:   ").prompt is None


@pytest.mark.parametrize("text", ["1,2,3", "1,2,3,4,5:x", "a,b,c,d", "1.5,2,3,4", ",2,3,4:x", ""])
def test_parse_box_rejects_malformed(text):
    with pytest.raises(LayoutError, match="box"):
        parse_box(text)


@pytest.mark.parametrize("xywh", [(0, 0, 0, 5), (0, 0, 5, -1)])
def test_box_needs_positive_size(xywh):
    with pytest.raises(LayergenError, match="positive"):
        Box(*xywh)


def test_box_intersects():
    a = Box(0, 0, 10, 10)
    assert a.intersects(Box(9, 9, 5, 5)) and not a.intersects(Box(10, 0, 5, 5))  # touching is not overlapping


def test_layout_validation():
    ok = Layout(64, 64, [Box(0, 0, 64, 64, prompt="a red star")])
    assert len(ok) == 1
    with pytest.raises(LayoutError, match="not inside"):
        Layout(64, 64, [Box(60, 0, 5, 5, prompt="x")])
    with pytest.raises(LayoutError, match="not inside"):
        Layout(64, 64, [Box(-1, 0, 5, 5, prompt="x")])
    with pytest.raises(LayoutError, match="at least one box"):
        Layout(64, 64, [])
    with pytest.raises(LayoutError, match=f"at most {MAX_LAYERS}"):
        Layout(64, 64, [Box(0, 0, 1, 1, prompt="x")] * (MAX_LAYERS + 1))
    assert len(Layout(64, 64, [Box(i % 8 * 8, i // 8 * 8, 8, 8, prompt="x") for i in range(64)])) == 64
    with pytest.raises(LayoutError, match="global prompt"):
        Layout(64, 64, [Box(0, 0, 5, 5)])
    with pytest.raises(LayoutError, match="canvas"):
        Layout(0, 64, [Box(0, 0, 5, 5, prompt="x")])


def test_from_boxes_accepts_every_spelling():
    lay = Layout.from_boxes([Box(0, 0, 4, 4, prompt="a"), (1, 1, 5, 5), (2, 2, 6, 6, "b"), {"box": [3, 3, 7, 7]},
                             "4,4,8,8:c"], 32, 32, prompt="x and y")
    assert [b.xywh for b in lay.boxes] == [(0, 0, 4, 4), (1, 1, 5, 5), (2, 2, 6, 6), (3, 3, 7, 7), (4, 4, 8, 8)]
    assert [b.prompt for b in lay.boxes] == ["a", None, "b", None, "c"]


def test_save_load_round_trip(tmp_path):
    lay = Layout(128, 96, [Box(1, 2, 30, 40, prompt="a red star", seed=7, name="star"), Box(50, 20, 10, 10)],
                 prompt="a red star and a ring on a sky", background="a sky")
    path = save_layout(lay, tmp_path / "sub" / "layout.json")
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["boxes"][1] == {"box": [50, 20, 10, 10]}
    assert load_layout(path) == lay
    assert [p.name for p in path.parent.iterdir()] == ["layout.json"], "atomic write leaves no temp file"


@pytest.mark.parametrize("payload, match", [
    ("{", "not valid JSON"),
    ("[]", "JSON object"),
    ('{"width": 64, "height": 64}', "missing boxes"),
    ('{"width": 64, "height": 64, "boxes": [{"box": [0, 0, 8]}]}', r"box 0: 'box' must be"),
    ('{"width": 64, "height": 64, "boxes": [{"box": [0, 0, 8, 8], "colour": "red"}], "prompt": "x"}', "unknown key"),
    ('{"width": 64, "height": 64, "boxes": [{"box": [60, 0, 8, 8]}], "prompt": "x"}', "not inside"),
    ('{"version": 2, "width": 64, "height": 64, "boxes": []}', "version"),
    ('{"width": 64, "height": 64, "boxes": [{"box": [0, 0, 8, 8], "prompt": 3}]}', "must be a string"),
])
def test_load_errors_are_clear_and_name_the_file(tmp_path, payload, match):
    path = tmp_path / "layout.json"
    path.write_text(payload)
    with pytest.raises(LayoutError, match=match) as info:
        load_layout(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
