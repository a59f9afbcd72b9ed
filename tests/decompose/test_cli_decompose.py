import numpy as np
from PIL import Image

from layergen.cli import main
from layergen.data.scenes import make_scene
from layergen.layers.formats import load


def scene_png(tmp_path):
    for s in range(500):
        sc = make_scene(s, 96, num_objects=1)
        o = sc.objects[0]
        if o.material == "solid" and o.effect == "shadow" and "noise" not in sc.background_caption:
            break
    path = tmp_path / "scene.png"
    Image.fromarray(sc.composite).save(path)
    x0, y0, x1, y1 = o.box
    return sc, path, f"{x0},{y0},{x1 - x0},{y1 - y0}"


def test_cli_writes_a_psd_that_recomposites(tmp_path, capsys):
    sc, path, box = scene_png(tmp_path)
    out = tmp_path / "layers.psd"
    assert main(["decompose", str(path), "-o", str(out), "--box", box, "--quiet"]) == 0
    stack = load(out)
    assert len(stack) == 2
    diff = np.abs(stack.composite()[..., :3].astype(int) - sc.composite.astype(int))
    assert diff.max() <= 2
    assert "re-composite PSNR" in capsys.readouterr().out


def test_cli_folder_output_and_layers_limit(tmp_path):
    sc, path, _ = scene_png(tmp_path)
    out = tmp_path / "stack_dir"
    assert main(["decompose", str(path), "-o", str(out), "--layers", "1", "--quiet"]) == 0
    assert len(load(out)) == 2


def test_cli_errors_exit_2_and_write_nothing(tmp_path, capsys):
    sc, path, _ = scene_png(tmp_path)
    out = tmp_path / "x.psd"
    assert main(["decompose", str(path), "-o", str(out), "--box", "500,500,10,10", "--quiet"]) == 2
    assert "outside" in capsys.readouterr().err and not out.exists()
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1)).save(tiny)
    assert main(["decompose", str(tiny), "-o", str(out), "--quiet"]) == 2
    assert "at least 8x8" in capsys.readouterr().err and not out.exists()
    assert main(["decompose", str(path), "-o", str(tmp_path / "flat.png"), "--quiet"]) == 2
    assert "cannot hold layers" in capsys.readouterr().err
    assert main(["decompose", str(path), "-o", str(tmp_path / "flat.jpg"), "--quiet"]) == 2
    assert "use .psd, .ora, .zip or a folder" in capsys.readouterr().err
    assert main(["decompose", str(path), "-o", str(out), "--steps", "0", "--quiet"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert main(["decompose", str(tmp_path / "missing.png"), "-o", str(out)]) == 2
    assert list(tmp_path.glob("*.psd")) == []


def test_cli_missing_learned_model_exits_2(tmp_path, capsys):
    sc, path, _ = scene_png(tmp_path)
    out = tmp_path / "x.psd"
    assert main(["decompose", str(path), "-o", str(out), "--model", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "no learned decomposer" in capsys.readouterr().err and not out.exists()


def test_cli_bad_input_files_exit_2_and_write_nothing(tmp_path, capsys):
    sc, path, box = scene_png(tmp_path)
    out = tmp_path / "x.psd"
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert main(["decompose", str(empty), "-o", str(out), "--quiet"]) == 2
    assert "cannot read image" in capsys.readouterr().err
    small_mask = tmp_path / "small_mask.png"
    Image.new("L", (10, 10), 255).save(small_mask)
    assert main(["decompose", str(path), "-o", str(out), "--mask", str(small_mask), "--quiet"]) == 2
    assert "mask 0 is 10x10 but the image is 96x96" in capsys.readouterr().err
    blank_mask = tmp_path / "blank_mask.png"
    Image.new("L", (96, 96), 0).save(blank_mask)
    assert main(["decompose", str(path), "-o", str(out), "--mask", str(blank_mask), "--quiet"]) == 2
    assert "mask 0 is empty" in capsys.readouterr().err
    assert main(["decompose", str(path), "-o", str(out), "--box", "10,10,0,5", "--quiet"]) == 2
    assert "no area" in capsys.readouterr().err
    huge = tmp_path / "huge.png"
    Image.new("L", (4100, 4100), 0).save(huge)  # compresses to a few kB, decodes to 17 megapixels
    assert main(["decompose", str(huge), "-o", str(out), "--quiet"]) == 2
    assert "megapixels" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.glob("*.psd")) == []


def test_cli_takes_grayscale_and_16_bit_pngs(tmp_path):
    sc, path, box = scene_png(tmp_path)
    grey = np.asarray(Image.fromarray(sc.composite).convert("L"))
    for name, im in [("grey.png", Image.fromarray(grey)),
                     ("grey16.png", Image.fromarray(grey.astype(np.uint16) * 257))]:
        src = tmp_path / name
        im.save(src)
        out = tmp_path / (name[:-4] + ".psd")
        assert main(["decompose", str(src), "-o", str(out), "--box", box, "--quiet"]) == 0
        stack = load(out)
        assert len(stack) == 2 and stack.width == 96
        comp = stack.composite()[..., :3].astype(int)
        assert np.abs(comp - grey[..., None].astype(int)).max() <= 2  # gray in, the same gray out (as RGB)


def test_a_box_around_nothing_is_reported_not_silently_dropped(tmp_path, capsys):
    image = np.full((96, 96, 3), 200, np.uint8)
    image[30:60, 30:60] = (220, 30, 30)
    Image.fromarray(image).save(tmp_path / "poster.png")
    out = tmp_path / "layers.psd"
    args = ["decompose", str(tmp_path / "poster.png"), "-o", str(out), "--box", "28,28,34,34", "--box", "0,0,10,10"]
    assert main(args + ["--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "note: box at 0,0,10,10: nothing there differs from the background, so it has no layer" in printed
    stack = load(out)
    assert len(stack) == 2 and "notes" not in stack.metadata  # a note is about this run, not kept in the file
