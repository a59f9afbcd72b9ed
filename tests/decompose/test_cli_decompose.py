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
    assert main(["decompose", str(tmp_path / "missing.png"), "-o", str(out)]) == 2
    assert list(tmp_path.glob("*.psd")) == []


def test_cli_missing_learned_model_exits_2(tmp_path, capsys):
    sc, path, _ = scene_png(tmp_path)
    out = tmp_path / "x.psd"
    assert main(["decompose", str(path), "-o", str(out), "--model", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "no learned decomposer" in capsys.readouterr().err and not out.exists()
