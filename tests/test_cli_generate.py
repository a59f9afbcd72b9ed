"""`layergen generate`: in-process through `layergen.cli.main`, with a tiny random pipeline saved to disk.

Nothing here needs the bundled mini model: `--model` always points at a tiny folder.
"""
import numpy as np
import pytest
from PIL import Image

from layergen import cli
from layergen.layers import Layer, LayerStack, load, save
from layergen.pipelines import (BackgroundBehindForegroundPipeline, ForegroundOnBackgroundPipeline,
                                TransparentLayerPipeline)
from layergen.testing import tiny_layer_components

PROMPT = "a red glass star with a soft shadow"
FAST = ["--steps", "2", "--no-tta", "--quiet"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "pipe"
    TransparentLayerPipeline(**tiny_layer_components()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def plain_model_dir(tmp_path_factory):
    """A UNet without the condition channels (like SD1.5/SDXL + transparency LoRA): text -> layer only."""
    path = tmp_path_factory.mktemp("tiny_plain") / "pipe"
    TransparentLayerPipeline(**tiny_layer_components(conditional=False)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipe(model_dir):
    return TransparentLayerPipeline.from_pretrained(model_dir)


def generate(model_dir, *args):
    return cli.main(["generate", "--model", str(model_dir), *FAST, *map(str, args)])  # later flags win


def assert_error(capsys, rc, *fragments):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("layergen: error: "), err
    for f in fragments:
        assert f in err[0], err[0]


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_png_is_the_rgba_layer_the_pipeline_makes(model_dir, pipe, tmp_path, capsys):
    out = tmp_path / "star.png"
    assert generate(model_dir, PROMPT, "-o", out, "--size", "48x32", "--seed", "3") == 0
    assert f"wrote {out} (1 layer, 48x32, seed 3)" in capsys.readouterr().out
    img = Image.open(out)
    assert img.mode == "RGBA" and img.size == (48, 32)
    expected = pipe(PROMPT, height=32, width=48, num_inference_steps=2, seed=3, tta=False).images[0]
    assert np.array_equal(np.asarray(img), np.asarray(expected))
    assert listing(tmp_path) == ["star.png"]


def test_psd_is_a_two_layer_document_background_plus_layer(model_dir, tmp_path):
    flat, doc = tmp_path / "star.png", tmp_path / "star.psd"
    assert generate(model_dir, PROMPT, "-o", flat, "--seed", "1") == 0
    assert generate(model_dir, PROMPT, "-o", doc, "--seed", "1", "--bg-prompt", "a blue sky") == 0
    stack = load(doc)
    assert len(stack) == 2 and stack.size == (32, 32)  # tiny UNet sample_size 4 x VAE factor 8
    bg, layer = stack.layers
    assert (bg.name, bg.kind, layer.kind) == ("background", "background", "instance")
    assert (bg.pixels[..., 3] == 255).all(), "the background is opaque"
    assert np.array_equal(layer.pixels, np.asarray(Image.open(flat))), "same layer as the PNG output"
    assert layer.metadata["prompt"] == PROMPT and layer.metadata["seed"] == 1
    assert bg.metadata["prompt"] == "a blue sky"


def test_format_flag_overrides_extension_and_adds_suffix(model_dir, tmp_path):
    assert generate(model_dir, PROMPT, "-o", tmp_path / "doc", "--format", "ora") == 0
    assert listing(tmp_path) == ["doc.ora"]
    assert len(load(tmp_path / "doc.ora")) == 2
    assert generate(model_dir, PROMPT, "-o", tmp_path / "alone.zip", "--no-background") == 0
    assert len(load(tmp_path / "alone.zip")) == 1


def test_num_images_writes_numbered_files_with_consecutive_seeds(model_dir, pipe, tmp_path, capsys):
    assert generate(model_dir, PROMPT, "-o", tmp_path / "s.png", "--num-images", "2", "--seed", "5") == 0
    assert listing(tmp_path) == ["s_0.png", "s_1.png"]
    a, b = (np.asarray(Image.open(tmp_path / f"s_{k}.png")) for k in range(2))
    assert not np.array_equal(a, b)
    alone = pipe(PROMPT, num_inference_steps=2, seed=6, tta=False).images[0]
    # Batched and single denoising differ only in float summation order: at most one 8-bit level on a
    # handful of pixels, while another seed changes the image by tens of levels.
    diff = np.abs(b.astype(int) - np.asarray(alone).astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01, "image k uses seed + k"
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 5
    assert "seed 6" in capsys.readouterr().out


@pytest.mark.parametrize("name,cls", [("euler", "EulerDiscreteScheduler"), ("dpm", "DPMSolverMultistepScheduler"),
                                      ("unipc", "UniPCMultistepScheduler"), ("ddim", "DDIMScheduler")])
def test_scheduler_choice_is_used_and_recorded(model_dir, tmp_path, name, cls):
    out = tmp_path / "s.ora"
    assert generate(model_dir, PROMPT, "-o", out, "--scheduler", name, "--no-background") == 0
    stack = load(out)
    assert stack.metadata["generator"]["scheduler"] == cls
    assert stack[0].pixels.shape == (32, 32, 4)


def test_bg_mode_keeps_the_background_and_adds_a_layer(model_dir, pipe, tmp_path):
    rng = np.random.default_rng(0)
    bg = rng.integers(0, 256, (24, 48, 3), dtype=np.uint8)
    Image.fromarray(bg).save(tmp_path / "bg.jpg", quality=95)
    bg_read = np.asarray(Image.open(tmp_path / "bg.jpg").convert("RGB"))
    assert generate(model_dir, "a blue ring", "--bg", tmp_path / "bg.jpg", "-o", tmp_path / "o.ora",
                    "--size", "48x24") == 0
    stack = load(tmp_path / "o.ora")
    assert stack.size == (48, 24) and stack.names()[0] == "background" and len(stack) == 2
    assert np.array_equal(stack[0].pixels[..., :3], bg_read), "the given background is the bottom layer"
    ref = ForegroundOnBackgroundPipeline(**pipe.components)("a blue ring", bg_read, num_inference_steps=2, seed=0,
                                                            tta=False).stacks[0]
    assert np.array_equal(stack[1].pixels, ref[1].pixels)
    # a flat output holds the new layer alone; default size = the image's aspect at the native 32 px
    assert generate(model_dir, "a blue ring", "--bg", tmp_path / "bg.jpg", "-o", tmp_path / "o.png") == 0
    img = Image.open(tmp_path / "o.png")
    assert img.mode == "RGBA" and img.size == (32, 16)


def test_fg_mode_generates_a_background_behind_the_foreground(model_dir, pipe, tmp_path):
    fg = np.zeros((32, 32, 4), np.uint8)
    fg[8:24, 8:24] = (220, 40, 40, 255)
    save(LayerStack(32, 32, [Layer(fg)]), tmp_path / "fg.png")
    assert generate(model_dir, "a horizon with a blue sky", "--fg", tmp_path / "fg.png", "-o", tmp_path / "o.psd") == 0
    stack = load(tmp_path / "o.psd")
    assert len(stack) == 2 and stack[0].kind == "background"
    assert np.array_equal(stack[1].pixels, fg), "the given foreground is the top layer, unchanged"
    assert (stack[0].pixels[..., 3] == 255).all()
    ref = BackgroundBehindForegroundPipeline(**pipe.components)("a horizon with a blue sky", fg,
                                                                 num_inference_steps=2, seed=0).stacks[0]
    assert np.array_equal(stack[0].pixels, ref[0].pixels)
    assert generate(model_dir, "a horizon", "--fg", tmp_path / "fg.png", "-o", tmp_path / "bg.png") == 0
    assert (np.asarray(Image.open(tmp_path / "bg.png"))[..., 3] == 255).all(), "png = the new background"


def test_plain_model_writes_the_layer_alone_with_a_note(plain_model_dir, tmp_path, capsys):
    assert generate(plain_model_dir, PROMPT, "-o", tmp_path / "o.psd") == 0
    assert "note:" in capsys.readouterr().err
    assert len(load(tmp_path / "o.psd")) == 1


def test_errors_are_one_line_exit_2_and_leave_no_file(model_dir, plain_model_dir, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    out = work / "o.psd"
    rgb = work / "rgb.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(rgb)
    junk = work / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    deep = work / "deep.png"
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(deep)
    before = listing(work)

    assert_error(capsys, generate(model_dir, "   ", "-o", out), "PROMPT is empty")
    assert_error(capsys, generate(model_dir, PROMPT, "--bg", rgb, "--fg", rgb, "-o", out), "--bg and --fg")
    assert_error(capsys, generate(model_dir, PROMPT, "--bg", work / "nope.png", "-o", out), "--bg", "no such file")
    assert_error(capsys, generate(model_dir, PROMPT, "--bg", junk, "-o", out), "--bg", "junk.png")
    assert_error(capsys, generate(model_dir, PROMPT, "--bg", deep, "-o", out), "16-bit")
    assert_error(capsys, generate(model_dir, PROMPT, "--fg", rgb, "-o", out), "no transparency")
    assert_error(capsys, generate(model_dir, PROMPT, "--size", "big", "-o", out), "--size")
    assert_error(capsys, generate(model_dir, PROMPT, "--steps", "0", "-o", out), "--steps")
    assert_error(capsys, generate(model_dir, PROMPT, "-o", work / "o.gif"), "unsupported file type")
    assert_error(capsys, generate(work / "no_model", PROMPT, "-o", out), "never downloads")
    assert_error(capsys, generate(plain_model_dir, PROMPT, "--bg", rgb, "-o", out), "--bg needs a model")
    monkeypatch.setattr("layergen.mini.MINI_PATH", work / "missing-mini")
    rc = cli.main(["generate", *FAST, PROMPT, "-o", str(out)])
    assert_error(capsys, rc, "--model")
    assert listing(work) == before, "no output and no temporary file left behind"
    half = tmp_path / "half-mini"
    (half / "vae").mkdir(parents=True)  # a bundled folder still being filled in
    monkeypatch.setattr("layergen.mini.MINI_PATH", half)
    rc = cli.main(["generate", *FAST, PROMPT, "-o", str(out)])
    assert_error(capsys, rc, "incomplete", "--model")
    assert listing(work) == before


def test_bad_seeds_paths_boxes_and_ignored_flags_fail_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """Checked up front: minutes of generation must not end in an error the arguments already showed."""
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("layergen.commands.generate.load_pipeline", no_load)
    work = tmp_path / "work"
    work.mkdir()
    (work / "file.txt").write_text("x")
    fg = work / "fg.png"
    Image.fromarray(np.full((16, 16, 4), 200, np.uint8)).save(fg)
    layout = work / "layout.json"
    layout.write_text('{"width": 32, "height": 32, "boxes": [{"box": [0, 0, 8, 8], "seed": -5}]}')
    before = listing(work)
    out = work / "o.psd"
    top = str(2**63 - 1)
    for argv in (["--seed", "-1"], ["--seed", str(2**64)], ["--seed", "1.5"]):
        with pytest.raises(SystemExit) as exc:
            generate(work, PROMPT, "-o", out, *argv)
        assert exc.value.code == 2 and "--seed" in capsys.readouterr().err
    assert_error(capsys, generate(work, PROMPT, "-o", out, "--seed", top, "--num-images", "2"),
                 "--seed must be in [0, 9223372036854775807]", "later images")
    assert_error(capsys, generate(work, PROMPT, "-o", out, "--seed", str(2**63 - 60), "--box", "0,0,8,8"), "--seed")
    assert_error(capsys, generate(work, PROMPT, "--layout", layout, "-o", out), "box seed must be in [0, ")
    assert_error(capsys, generate(work, PROMPT, "--layout", work, "-o", out), "is a folder; pass a layout.json")
    assert_error(capsys, generate(work, PROMPT, "-o", work / "file.txt" / "o.png"),
                 str(work / "file.txt" / "o.png"), "is a file, not a folder")
    assert_error(capsys, generate(work, PROMPT, "--fg", fg, "--no-background", "-o", out),
                 "--no-background cannot be used with --fg")
    assert_error(capsys, generate(work, PROMPT, "--fg", fg, "--bg-prompt", "a sky", "-o", out), "--bg-prompt")
    assert_error(capsys, generate(work, PROMPT, "--size", "32", "--box", "30,30,10,10", "-o", out),
                 "not inside the 32x32 canvas")
    assert_error(capsys, generate(work, PROMPT, *["--box", "0,0,4,4"] * 65, "-o", out), "at most 64")
    assert listing(work) == before


def test_help_lists_modes_and_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--bg", "--fg", "--bg-prompt", "--model", "--steps", "--guidance", "--seed", "--size",
                 "--num-images", "--scheduler", "--no-tta", "--format"):
        assert flag in text
