import json

import numpy as np
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
    anonymous = Layout(64, 64, [Box(0, 0, 5, 5)])  # a layout.json may leave the prompt to the command line
    with pytest.raises(LayoutError, match="global prompt"):
        anonymous.check_prompts()
    assert Layout(64, 64, [Box(0, 0, 5, 5)], prompt="a star").check_prompts()
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


# -- the CLI: `layergen generate --box ... / --layout layout.json` ----------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from layergen.pipelines import TransparentLayerPipeline
    from layergen.testing import tiny_layer_components

    path = tmp_path_factory.mktemp("tiny") / "pipe"
    TransparentLayerPipeline(**tiny_layer_components()).save_pretrained(path)
    return path


def generate(model_dir, *args):
    from layergen import cli

    return cli.main(["generate", "--model", str(model_dir), "--steps", "1", "--no-tta", "--quiet", *map(str, args)])


def test_cli_boxes_make_a_layered_document(model_dir, tmp_path, capsys):
    from layergen.layers import load

    out = tmp_path / "scene.psd"
    rc = generate(model_dir, "a red star and a blue ring on a sky", "-o", out, "--box", "2,2,12,12",
                  "--box", "14,14,16,16:a green heart", "--seed", "4")
    assert rc == 0 and f"wrote {out} (3 layers, 32x32, seed 4)" in capsys.readouterr().out  # the layout's seed
    stack = load(out)
    assert [l.metadata.get("prompt") for l in stack] == ["a sky", "a red star", "a green heart"]
    assert [l.bbox for l in stack.layers[1:]] == [(2, 2, 14, 14), (14, 14, 30, 30)]
    assert [l.metadata["seed"] for l in stack] == [4, 5, 6]


def test_cli_layout_file_sets_the_canvas_and_flat_outputs_get_the_composite(model_dir, tmp_path, capsys):
    from PIL import Image

    layout = save_layout(Layout(48, 40, [Box(0, 0, 20, 20, prompt="a red star"), Box(20, 10, 20, 20)]),
                         tmp_path / "layout.json")
    rc = generate(model_dir, "a blue ring on a sky", "-o", tmp_path / "img.png", "--layout", layout,
                  "--num-images", "2", "--seed", "3")
    assert rc == 0
    assert capsys.readouterr().out.splitlines() == [
        f"wrote {tmp_path / 'img_0.png'} (composite of 3 layers, 48x40, seed 3)",
        f"wrote {tmp_path / 'img_1.png'} (composite of 3 layers, 48x40, seed 68)"]
    imgs = [np.asarray(Image.open(tmp_path / f"img_{k}.png")) for k in (0, 1)]
    assert imgs[0].shape == (40, 48, 4) and (imgs[0][..., 3] == 255).all() and not np.array_equal(*imgs)


@pytest.mark.parametrize("extra, fragment", [
    (["--layout", "LAYOUT", "--box", "1,1,2,2"], "cannot be combined"),
    (["--layout", "missing.json"], "no such file"),
    (["--box", "1,1,2"], "bad box"),
    (["--box", "30,30,10,10"], "not inside the 32x32 canvas"),
    (["--layout", "LAYOUT", "--size", "64"], "disagree"),
    (["--box", "0,0,4,4"] * 65, "at most 64"),
])
def test_cli_layout_errors_are_one_line_and_write_nothing(model_dir, tmp_path, capsys, extra, fragment):
    layout = save_layout(Layout(48, 40, [Box(0, 0, 20, 20, prompt="a red star")]), tmp_path / "layout.json")
    extra = [str(layout) if e == "LAYOUT" else str(tmp_path / e) if e.endswith(".json") else e for e in extra]
    rc = generate(model_dir, "a star", "-o", tmp_path / "out.png", *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "out.png").exists()
