"""The studio's 3D human tab: its Gradio-free backend on the bundled mini model, and the tab through the API
(a server with the tab, driven by gradio_client): generate, switch layers, add a view to the document, errors."""
import json

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from safetensors.torch import load_file

from layergen.errors import LayerError
from layergen.studio.human3d import HumanBackend, canonical_layers, front_view_layer, human_tab, layer_files

FAST = dict(num_inference_steps=3, num_views=2, size=24, mesh_resolution=24)


@pytest.fixture(scope="module")
def backend():
    return HumanBackend(**FAST)  # the bundled assets/layergen-mini/human model


@pytest.fixture(scope="module")
def human(backend):
    return backend.generate(["shirt", "body", "pants"], 3)


def test_canonical_layers_orders_and_requires_body():
    assert canonical_layers(["shoes", "body", "pants"]) == ("body", "pants", "shoes")
    assert canonical_layers(("hat", "Body")) == ("body", "hat")
    with pytest.raises(LayerError, match="tick 'body'"):
        canonical_layers(["pants", "shirt"])
    with pytest.raises(LayerError, match="unknown layer"):
        canonical_layers(["body", "cape"])


def test_backend_generates_meshes_turntables_and_is_deterministic(backend, human):
    assert [e["name"] for e in human["layers"]] == ["body", "pants", "shirt"]
    for entry in human["layers"]:
        mesh = trimesh.load(entry["mesh"], force="mesh")
        assert entry["mesh"].endswith(".glb") and len(mesh.faces) > 0
        assert np.asarray(mesh.visual.vertex_colors).shape == (len(mesh.vertices), 4)
        gif = Image.open(entry["gif"])
        assert gif.n_frames == 2 and gif.size == (24, 24)
        views = [np.asarray(Image.open(p)) for p in entry["views"]]
        assert len(views) == 2 and views[0].shape == (24, 24, 4) and views[0][..., 3].max() > 0
    summary = json.loads(open(human["summary"]).read())
    assert summary["seed"] == 3 and summary["layers"] == ["body", "pants", "shirt"]
    again = backend.generate(["body", "pants", "shirt"], 3)
    assert again["triplanes"] != human["triplanes"]                      # a new folder per call
    a, b = load_file(human["triplanes"]), load_file(again["triplanes"])
    assert torch.equal(a["triplanes"], b["triplanes"])                   # same seed, same human
    other = load_file(backend.generate(["body"], 4)["triplanes"])["triplanes"][0]
    assert not torch.equal(other, a["triplanes"][0])


def test_layer_lookup_and_front_view_layer(human):
    assert layer_files(human, "pants")["name"] == "pants"
    with pytest.raises(LayerError, match="no layer 'shoes'"):
        layer_files(human, "shoes")
    with pytest.raises(LayerError, match="generate a human first"):
        layer_files(None, "body")
    layer = front_view_layer(human, "shirt")
    assert layer.name == "human shirt (front)"
    assert np.array_equal(layer.pixels, np.asarray(Image.open(layer_files(human, "shirt")["views"][0])))


def test_missing_model_is_a_clear_error(tmp_path):
    from layergen.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="pass --model PATH"):
        HumanBackend(model_path=tmp_path / "nope", **FAST).generate(["body"], 0)


@pytest.fixture(scope="module")
def served(tmp_path_factory, serve_tab):
    """A studio with the 3D tab on fast settings, and an API client."""
    with serve_tab(tmp_path_factory, human_tab(HumanBackend(**FAST)), "human") as client:
        yield client


def _value(x):
    return x["value"] if isinstance(x, dict) and x.get("__type__") == "update" else x


def test_tab_through_the_api(served):
    from gradio_client.exceptions import AppError

    shown, mesh, gif, text = served.predict(["body", "pants", "shoes"], 5, api_name="/generate_human")
    assert _value(shown) == "shoes"                                     # the top layer is shown first
    assert mesh.endswith(".glb") and len(trimesh.load(mesh, force="mesh").faces) > 0
    assert Image.open(gif).n_frames == 2
    assert "3 layers, seed 5" in text and "shoes (" in text
    body_mesh, body_gif = served.predict("body", api_name="/show_human_layer")
    assert body_mesh.endswith(".glb") and body_mesh != mesh
    r = served.predict("body", text, api_name="/add_human_view")  # the body's front view into the 2D document
    info = r[10]
    assert [l["name"] for l in info["layers"]] == ["human body (front)"]
    # the 3D tab says so too (the Layers tab's status line is not on screen), once per click
    assert r[-1].startswith(text) and r[-1].endswith("Added the body front view as a new layer (Layers tab).")
    again = served.predict("pants", r[-1], api_name="/add_human_view")
    assert again[-1].count("Added") == 1 and "pants front view" in again[-1] and again[-1].startswith(text)
    with pytest.raises(AppError, match="tick 'body'"):
        served.predict(["pants"], 1, api_name="/generate_human")
    with pytest.raises(AppError, match="minimum value 0"):  # Gradio checks the Number bounds
        served.predict(["body"], -3, api_name="/generate_human")


def test_default_studio_has_the_3d_tab():
    import gradio as gr

    from layergen.studio.app import build_app, default_extra_tabs
    from layergen.studio.backends import ProceduralBackend

    demo = build_app(ProceduralBackend(), extra_tabs=default_extra_tabs())
    models = [b for b in demo.blocks.values() if isinstance(b, gr.Model3D)]
    assert len(models) == 1 and models[0].elem_id == "human-model"
    tabs = [b.label for b in demo.blocks.values() if isinstance(b, gr.Tab)]
    assert "3D human" in tabs
    assert {"generate_human", "show_human_layer", "add_human_view"} <= {
        d.api_name for d in demo.fns.values() if d.api_name}
    demo.close()


def test_studio_cli_rejects_a_missing_human_model(tmp_path, capsys):
    from layergen.cli import main

    assert main(["studio", "--procedural", "--human-model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "not a local diffusers model folder" in err and err.count("\n") == 1
