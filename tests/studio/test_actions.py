"""The studio's Actions tab: its Gradio-free backend on the bundled mini action model, and the tab through the API
(a server with the tab, driven by gradio_client): example exemplars, learn, load, generate, add to the document."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from layergen.errors import FormatError, LayerError
from layergen.models.action_identifier import ActionIdentifier
from layergen.studio.actions import ActionBackend, action_tab, image_layer

STEPS = 4
APP_STEPS = 10  # the Steps slider's minimum


@pytest.fixture(scope="module")
def backend():
    return ActionBackend(num_inference_steps=3)  # the bundled assets/layergen-mini/action model


@pytest.fixture(scope="module")
def exemplars(backend):
    return backend.make_exemplars("jump")


@pytest.fixture(scope="module")
def jump(backend, exemplars):
    return backend.learn(exemplars, "<jump>", steps=STEPS)


def test_example_exemplars_are_figures_with_metadata(backend, exemplars):
    images, meta = exemplars[:-1], exemplars[-1]
    assert len(images) == 4 and meta.name == "metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    assert [r["file_name"] for r in rows] == [p.name for p in images]
    assert {r["action"] for r in rows} == {"jump"} and len({r["background"] for r in rows}) > 1
    assert all(np.asarray(Image.open(p)).shape == (128, 128, 3) for p in images)
    one_place = backend.make_exemplars("wave", "beach")
    assert {json.loads(line)["background"] for line in one_place[-1].read_text().splitlines()} == {"beach"}


def test_learn_writes_an_identifier_for_the_model(backend, jump):
    ident = ActionIdentifier.load(jump)
    assert jump.name == "jump.safetensors" and ident.token == "<jump>"
    assert ident.extra_metadata["steps"] == str(STEPS) and ident.extra_metadata["mask_basis"] == "channel"
    assert backend.read_identifier(jump) == "<jump>"
    assert not backend.pipeline().action_identifiers  # nothing stays loaded between calls


def test_generate_puts_the_identifier_in_the_prompt(backend, jump):
    idents = {"<jump>": str(jump)}
    images = backend.generate("a blue cat in the snow <jump>", idents, 2, seed=5)
    assert len(images) == 2 and images[0].shape == (128, 128, 3) and images[0].dtype == np.uint8
    assert 20 < images[0].mean() < 250 and not np.array_equal(images[0], images[1])
    again = backend.generate("a blue cat in the snow <jump>", idents, 2, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(again, images))        # same seed, same images
    plain = backend.generate("a blue cat in the snow", idents, 2, seed=5)   # no token: the base model's images
    assert not np.array_equal(plain[0], images[0])
    assert not backend.pipeline().action_identifiers


def test_one_place_exemplars_use_the_eigen_mask(backend, tmp_path):
    procedural = backend.learn(backend.make_exemplars("wave", "beach"), "wave", steps=STEPS, one_place=True)
    assert ActionIdentifier.load(procedural).extra_metadata["mask_basis"] == "eigen"
    photos = [p for p in backend.make_exemplars("kick", "snow") if p.suffix == ".png"]  # no metadata: photos
    with pytest.raises(LayerError, match="add photos of other places"):
        backend.learn(photos, "kick", steps=STEPS, one_place=True)
    place = tmp_path / "meadow.jpg"
    Image.fromarray(np.full((64, 80, 3), (90, 160, 70), np.uint8)).save(place)
    learned = backend.learn(photos, "kick", steps=STEPS, one_place=True, places=[place])
    meta = ActionIdentifier.load(learned).extra_metadata
    assert meta["mask_basis"] == "eigen" and meta["restage"] == "mask"


def test_bad_input_is_a_clear_error(backend, exemplars, jump, tmp_path):
    with pytest.raises(LayerError, match="at least 2 exemplar images"):
        backend.learn(exemplars[:1], "jump", steps=STEPS)
    with pytest.raises(LayerError, match="at least 2 exemplar images"):
        backend.learn(None, "jump", steps=STEPS)
    for name in ("", "two words", "a/b", "<>"):
        with pytest.raises(LayerError, match="an action name is a word"):
            backend.learn(exemplars, name, steps=STEPS)
    with pytest.raises(LayerError, match="steps must be in"):
        backend.learn(exemplars, "jump", steps=0)
    twin = tmp_path / "twin"
    twin.mkdir()
    shutil.copy(exemplars[0], twin / exemplars[1].name)
    with pytest.raises(LayerError, match="two exemplar files are named"):
        backend.learn([exemplars[1], twin / exemplars[1].name], "jump", steps=STEPS)
    with pytest.raises(LayerError, match=r"names <kick>, which is not learned.*have: <jump>"):
        backend.generate("a cat <kick>", {"<jump>": str(jump)}, 1)
    with pytest.raises(LayerError, match="identifier file of <gone> is no longer here"):
        backend.generate("a cat <gone>", {"<gone>": str(tmp_path / "pruned.safetensors")}, 1)
    with pytest.raises(LayerError, match="write a prompt"):
        backend.generate("   ", {}, 1)
    with pytest.raises(LayerError, match="number of images"):
        backend.generate("a cat", {}, 9)
    with pytest.raises(FormatError, match="not a safetensors identifier file"):
        backend.read_identifier(exemplars[0])


def test_image_layer_is_opaque_and_named_after_the_prompt():
    rgb = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    layer = image_layer(rgb, "  a blue cat <jump> ")
    assert layer.name == "a blue cat <jump>"
    assert np.array_equal(layer.pixels[..., :3], rgb) and (layer.pixels[..., 3] == 255).all()


def test_missing_model_is_a_clear_error(tmp_path):
    from layergen.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError):
        ActionBackend(model_path=tmp_path / "nope").generate("a cat", {}, 1)


@pytest.fixture(scope="module")
def served(tmp_path_factory, serve_tab):
    """A studio with the Actions tab on fast settings, and an API client."""
    with serve_tab(tmp_path_factory, action_tab(ActionBackend(num_inference_steps=3)), "actions") as client:
        yield client


def test_tab_through_the_api(served, jump):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    files, name = served.predict("kick", "(different places)", api_name="/make_action_exemplars")
    assert name == "kick" and len(files) == 5 and files[-1].endswith("metadata.jsonl")
    with pytest.raises(AppError, match=r"names <kick>, which is not learned or loaded \(have: none yet\)"):
        served.predict("a red cat <kick>", 2, 0, api_name="/generate_action")
    ident_file, text = served.predict([handle_file(f) for f in files], "kick", APP_STEPS, False,
                                              [], api_name="/learn_action")
    assert ident_file.endswith("kick.safetensors") and ActionIdentifier.load(ident_file).token == "<kick>"
    assert f"Learned `<kick>` in {APP_STEPS} steps" in text and "`<kick>`" in text
    text = served.predict([handle_file(str(jump))], api_name="/load_action_identifiers")
    assert text == "Identifiers: `<jump>`, `<kick>`"
    gallery, pick, status = served.predict("a red cat on a beach <kick> <jump>", 2, 7, api_name="/generate_action")
    assert len(gallery) == 2 and pick == 1 and status.startswith("2 images of `a red cat on a beach <kick> <jump>`")
    shown = np.asarray(Image.open(gallery[1]["image"]).convert("RGB"))
    r = served.predict(2, status, api_name="/add_action_image")  # image 2 into the 2D document
    info = r[10]
    assert [layer["name"] for layer in info["layers"]] == ["a red cat on a beach <kick> <jump>"]
    assert r[-1].startswith(status) and r[-1].endswith("Added image 2 as a new layer (Layers tab).")
    again = served.predict(1, r[-1], api_name="/add_action_image")
    assert again[-1].count("Added") == 1 and len(again[10]["layers"]) == 2
    with pytest.raises(AppError, match="pick an image from 1 to 2"):
        served.predict(3, status, api_name="/add_action_image")
    with pytest.raises(AppError, match="at least 2 exemplar images"):
        served.predict([handle_file(files[0])], "kick", APP_STEPS, False, [], api_name="/learn_action")
    assert shown.shape == (128, 128, 3)


def test_default_studio_has_the_actions_tab():
    import gradio as gr

    from layergen.studio.app import build_app, default_extra_tabs
    from layergen.studio.backends import ProceduralBackend

    demo = build_app(ProceduralBackend(), extra_tabs=default_extra_tabs())
    tabs = [b.label for b in demo.blocks.values() if isinstance(b, gr.Tab)]
    assert "Actions" in tabs and "3D human" in tabs
    assert {"make_action_exemplars", "learn_action", "load_action_identifiers", "generate_action",
            "add_action_image"} <= {d.api_name for d in demo.fns.values() if d.api_name}
    demo.close()


def test_studio_cli_rejects_a_missing_action_model(tmp_path, capsys):
    from layergen.cli import main

    assert main(["studio", "--procedural", "--action-model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "not a local diffusers model folder" in err and err.count("\n") == 1


def test_layer_names_with_tokens_survive_the_markdown_status():
    """The Layers tab's status is Markdown: an added image named "a cat <jump>" must not lose its token as a tag."""
    from layergen.studio.app import _status
    from layergen.studio.document import Document

    doc = Document(64, 64)
    doc.add_layer(image_layer(np.zeros((8, 8, 3), np.uint8), "a cat <jump>"), label="Add action image")
    assert "selected: **a cat &lt;jump&gt;**" in _status(doc)
