import json

import numpy as np
import pytest
import torch
from PIL import Image

from layergen.cli import main
from layergen.models.action_identifier import ActionIdentifier
from layergen.pipelines.pipeline_action import ActionPipeline
from layergen.testing import tiny_scheduler, tiny_text_encoder, tiny_tokenizer, tiny_unet, tiny_vae


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    ActionPipeline(vae=tiny_vae(), text_encoder=tiny_text_encoder(32), tokenizer=tiny_tokenizer(),
                   unet=tiny_unet(4, 32, None), scheduler=tiny_scheduler()).save_pretrained(d)
    return d


def test_exemplars_learn_generate(model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["action", "exemplars", "jump", "ex", "-n", "3", "--size", "32"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "ex" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["action"] == "jump" and "jump" not in r["caption"] for r in rows)
    assert all(Image.open(tmp_path / "ex" / r["file_name"]).size == (32, 32) for r in rows)

    assert main(["action", "learn", "ex", "--name", "jump", "--model", str(model), "--steps", "2",
                 "--num_exemplars", "3"]) == 0
    ident = ActionIdentifier.load(tmp_path / "jump.safetensors")
    assert ident.token == "<jump>" and ident.kind == "layerwise"
    assert "<jump>" in capsys.readouterr().out

    # the identifier is found as ./jump.safetensors from the prompt alone
    assert main(["action", "generate", "a red star <jump>", "--model", str(model), "--steps", "2",
                 "-o", "out.png", "-n", "2"]) == 0
    imgs = [np.asarray(Image.open(tmp_path / f"out-{k}.png")) for k in range(2)]
    assert imgs[0].shape == (32, 32, 3) and not np.array_equal(imgs[0], imgs[1])
    assert not (tmp_path / "out.png").exists()
    # --identifier_steps 0: the identifier never acts, so the image is the plain prompt's
    common = ["--model", str(model), "--steps", "2"]
    assert main(["action", "generate", "a red star <jump>", *common, "--identifier_steps", "0", "-o", "no.png"]) == 0
    assert main(["action", "generate", "a red star", *common, "-o", "plain.png"]) == 0
    assert np.array_equal(np.asarray(Image.open("no.png")), np.asarray(Image.open("plain.png")))
    assert not np.array_equal(np.asarray(Image.open("no.png")), imgs[0])

    # a diverged (NaN) identifier is refused instead of turning every image black; -i names what it defines
    nan = ActionIdentifier.load(tmp_path / "jump.safetensors")
    with torch.no_grad():
        nan.embeddings.fill_(float("nan"))
    nan.save(tmp_path / "nan.safetensors")
    assert main(["action", "generate", "a red star <jump>", *common, "-i", "nan.safetensors", "-o", "nan.png"]) == 2
    assert "NaN or infinite" in capsys.readouterr().err and not (tmp_path / "nan.png").exists()
    assert main(["action", "generate", "a red star <leap>", *common, "-i", "jump.safetensors", "-o", "l.png"]) == 2
    assert "the -i files define <jump>" in capsys.readouterr().err


def test_learn_with_restaged_context_partners(model, tmp_path, capsys, monkeypatch):
    """Procedural exemplars are cut out and put on the figures' other backgrounds (with the eigen mask, which then
    masks 2 % of the directions); photos without metadata need --restage_backgrounds, and say so."""
    monkeypatch.chdir(tmp_path)
    assert main(["action", "exemplars", "jump", "ex", "-n", "3", "--size", "32", "--background", "snow"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "ex" / "metadata.jsonl").read_text().splitlines()]
    assert {r["background"] for r in rows} == {"snow"} and all("snow" in r["caption"] for r in rows)
    assert main(["action", "exemplars", "jump", "moon", "--background", "moon"]) == 2
    assert "unknown --background 'moon'" in capsys.readouterr().err and not (tmp_path / "moon").exists()
    common = ["--model", str(model), "--steps", "1", "--num_exemplars", "3", "--restage", "mask"]
    assert main(["action", "learn", "ex", "--name", "jump", *common, "--mask_basis", "eigen"]) == 0
    meta = ActionIdentifier.load(tmp_path / "jump.safetensors").extra_metadata
    assert (meta["restage"], meta["mask_basis"], meta["mask_quantile"]) == ("mask", "eigen", "0.02")
    (tmp_path / "photos").mkdir()
    for f in (tmp_path / "ex").glob("*.png"):
        (tmp_path / "photos" / f.name).write_bytes(f.read_bytes())
    assert main(["action", "learn", "photos", "--name", "hop", *common]) == 2
    assert "--restage_backgrounds" in capsys.readouterr().err and not (tmp_path / "hop.safetensors").exists()
    (tmp_path / "places").mkdir()
    for k, rgb in enumerate(((200, 40, 40), (40, 40, 200))):
        Image.new("RGB", (48, 40), rgb).save(tmp_path / "places" / f"{k}.jpg")
    assert main(["action", "learn", "photos", "--name", "hop", *common, "--restage_backgrounds", "places"]) == 0
    assert (tmp_path / "hop.safetensors").is_file()


def test_clear_errors(model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["action", "exemplars", "fly", "ex"]) == 2
    assert "unknown action 'fly'" in capsys.readouterr().err
    assert main(["action", "learn", "missing", "--name", "jump", "--model", str(model)]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "ex").mkdir()
    for argv, fragment in ((["--steps", "0"], "--steps must be at least 1"),
                           (["--num_exemplars", "1"], "--num_exemplars must be at least 2")):
        assert main(["action", "learn", "ex", "--name", "jump", "--model", str(model), *argv]) == 2
        captured = capsys.readouterr()
        assert fragment in captured.err and "usage" not in captured.err + captured.out
    assert main(["action", "learn", "ex", "--name", "jump", "-o", "jump.txt", "--model", str(model)]) == 2
    assert "ends in .safetensors" in capsys.readouterr().err and not (tmp_path / "jump.txt").exists()
    assert main(["action", "generate", "a cat", "--steps", "0", "--model", str(model)]) == 2
    assert "--steps must be at least 1, got 0" in capsys.readouterr().err
    assert main(["action", "generate", " ", "--model", str(model)]) == 2
    assert "<jump>" in capsys.readouterr().err
    assert main(["action", "generate", "a cat <wave>", "--model", str(model), "-o", "x.png"]) == 2
    err = capsys.readouterr().err
    assert "<wave>" in err and "layergen action learn" in err and not (tmp_path / "x.png").exists()
    assert main(["action", "generate", "a cat", "--model", str(tmp_path / "nope")]) == 2
    assert main(["action"]) == 2
    (tmp_path / "corrupt").mkdir()
    for name in ("a.png", "b.jpg"):
        (tmp_path / "corrupt" / name).write_bytes(b"not an image")
    assert main(["action", "learn", "corrupt", "--name", "jump", "--steps", "1", "--model", str(model)]) == 2
    err = capsys.readouterr().err
    assert "corrupt/a.png: cannot decode image (not an image file, or damaged)" in err and "BytesIO" not in err
    assert not (tmp_path / "jump.safetensors").exists()


def test_exemplars_never_replace_other_files(tmp_path, capsys, monkeypatch):
    """`exemplars` replaces its folder as a whole: an earlier exemplar folder yes, anything else never."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep")
    (tmp_path / "photo.png").write_text("precious")
    for target in ("notes", "photo.png"):
        assert main(["action", "exemplars", "jump", target, "-n", "1", "--size", "32"]) == 2
        assert "layergen: error:" in capsys.readouterr().err
    assert (tmp_path / "notes" / "a.txt").read_text() == "keep" and (tmp_path / "photo.png").read_text() == "precious"
    assert main(["action", "exemplars", "jump", "ex", "-n", "2", "--size", "32"]) == 0
    assert main(["action", "exemplars", "wave", "ex", "-n", "1", "--size", "32"]) == 0  # an earlier set: replaced
    rows = (tmp_path / "ex" / "metadata.jsonl").read_text().splitlines()
    assert len(rows) == 1 and len(list((tmp_path / "ex").glob("*.png"))) == 1
    for size in ("0", "-5", "100000"):
        assert main(["action", "exemplars", "jump", "big", "--size", size]) == 2
        assert "--size must be in [32, 1024]" in capsys.readouterr().err and not (tmp_path / "big").exists()


def test_a_malformed_metadata_file_is_a_clear_error(model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["action", "exemplars", "jump", "ex", "-n", "2", "--size", "32"]) == 0
    (tmp_path / "ex" / "metadata.jsonl").write_text('{"file_name": "00.png"}\n{not json\n')
    assert main(["action", "learn", "ex", "--name", "jump", "--steps", "1", "--model", str(model)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the model-loading progress bars
    assert last.startswith("layergen: error:") and "metadata.jsonl, line 2: not a JSON object" in last
    assert not (tmp_path / "jump.safetensors").exists()


def test_learn_help_states_the_trainers_defaults(capsys):
    """`action learn` leaves unset settings to the training script; its help must not drift from them."""
    from layergen.commands.action import training_script

    defaults = training_script().parse_args(["--exemplars", "e", "--name", "n", "--output_dir", "o"])
    with pytest.raises(SystemExit):
        main(["action", "learn", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"default {defaults.method}" in text and f"(default {defaults.max_train_steps})" in text
    eigen = training_script().parse_args(["--exemplars", "e", "--name", "n", "--output_dir", "o", "--mask_basis",
                                          "eigen"])
    assert f"(default {defaults.num_exemplars})" in text
    assert f"(default {defaults.mask_quantile} for channels, {eigen.mask_quantile} for directions;" in text
    assert f"(default {defaults.contrast})" in text


def test_generate_help_states_the_pipelines_identifier_steps(capsys):
    from layergen.pipelines.pipeline_action import DEFAULT_IDENTIFIER_STEPS

    with pytest.raises(SystemExit):
        main(["action", "generate", "--help"])
    assert f"(default {DEFAULT_IDENTIFIER_STEPS}, the pipeline's;" in " ".join(capsys.readouterr().out.split())
