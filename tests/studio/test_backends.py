"""Studio backends: the procedural backend's determinism and prompt reading, layouts, repaint, decomposition,
the pipeline adapter and the default's fallback."""
import numpy as np
import pytest

from layergen.data.scenes import make_scene
from layergen.errors import LayergenError, LayerError
from layergen.layers import Layer, LayerStack
from layergen.studio.backends import (Box, Condition, PipelineBackend, ProceduralBackend, check_boxes,
                                      classical_decompose, default_backends, fit_into_box, parse_prompt)


@pytest.fixture(scope="module")
def backend():
    return ProceduralBackend()


def test_generate_layer_is_deterministic_and_follows_prompt(backend):
    a = backend.generate_layer("a red glass star with a drop shadow", 3, 128, 96)
    b = backend.generate_layer("a red glass star with a drop shadow", 3, 128, 96)
    c = backend.generate_layer("a red glass star with a drop shadow", 4, 128, 96)
    assert a == b and not a == c
    assert a.metadata["kind"] == "instance" and a.metadata["seed"] == 3
    assert "red glass star" in a.metadata["caption"] and "shadow" in a.metadata["caption"]
    # the layer lies inside the canvas and is partly transparent (a cut-out, not a rectangle)
    x0, y0, x1, y1 = a.bbox
    assert 0 <= x0 and 0 <= y0 and x1 <= 128 and y1 <= 96
    assert (a.pixels[..., 3] == 0).any() and (a.pixels[..., 3] > 0).mean() > 0.2
    body = a.pixels[a.pixels[..., 3] > 200, :3].astype(int)
    assert body[:, 0].mean() > body[:, 1].mean() + 60  # red dominates


def test_background_prompt_and_conditions(backend):
    bg = backend.generate_layer("a striped background", 1, 100, 60)
    assert bg.kind == "background" and bg.pixels.shape == (60, 100, 4) and (bg.pixels[..., 3] == 255).all()
    behind = backend.generate_layer("a red star", 1, 100, 60,
                                    condition=Condition("foreground", np.zeros((60, 100, 4), np.uint8)))
    assert behind.kind == "background"
    red_backdrop = np.zeros((60, 100, 4), np.uint8)
    red_backdrop[..., 0], red_backdrop[..., 3] = 220, 255
    fg = backend.generate_layer("a star", 5, 100, 60, condition=Condition("background", red_backdrop))
    assert fg.kind == "instance" and fg.metadata["condition"] == "background"
    assert "red" not in fg.metadata["caption"]  # a colour that stands out from the red backdrop
    with pytest.raises(LayerError):
        Condition("sideways", red_backdrop)


def test_parse_prompt():
    p = parse_prompt("Two GRAY glowing hearts over a noise texture")
    assert p["shape"] == "heart" and p["colour"] == "grey" and p["effect"] == "glow" and p["background"] == "noise"
    assert parse_prompt("the letter q")["shape"] == "Q"


def test_layout_puts_each_layer_in_its_box(backend):
    boxes = [Box(4, 4, 60, 60, "a blue circle"), Box(70, 10, 124, 90, "a yellow square")]
    layers = backend.generate_layout("shapes", boxes, 7, 128, 96, background=True)
    assert [l.kind for l in layers] == ["background", "instance", "instance"]
    for layer, box in zip(layers[1:], boxes):
        x0, y0, x1, y1 = layer.bbox
        assert box.x0 <= x0 and box.y0 <= y0 and x1 <= box.x1 and y1 <= box.y1
        assert max(x1 - x0, y1 - y0) >= min(box.width, box.height) - 2  # fills the box's short side
        assert layer.metadata["prompt"] == box.prompt
    assert layers == backend.generate_layout("shapes", boxes, 7, 128, 96, background=True)
    with pytest.raises(LayerError):
        backend.generate_layout("x", [], 0, 64, 64, background=False)


def test_repaint_changes_only_that_layer(backend):
    stack = LayerStack(128, 128)
    for k, prompt in enumerate(["a horizon background", "a red star", "a blue heart"]):
        stack.add(backend.generate_layer(prompt, k, 128, 128))
    before = stack.copy()
    new = backend.repaint(stack, 1, "a green square", 9)
    assert stack == before  # the backend does not touch the stack it is given
    old_box = before[1].content_bbox()
    x0, y0, x1, y1 = new.bbox
    ox, oy = before[1].x, before[1].y
    assert ox + old_box[0] <= x0 and oy + old_box[1] <= y0 and x1 <= ox + old_box[2] and y1 <= oy + old_box[3]
    assert "green square" in new.metadata["caption"]
    bg = backend.repaint(stack, 0, "a gradient background", 2)
    assert bg.kind == "background" and bg.pixels.shape == (128, 128, 4)


def test_check_boxes_and_fit():
    assert check_boxes([(10, 10, 2, 2)], 20, 20) == [Box(2, 2, 10, 10)]
    assert check_boxes([(-5, -5, 50, 50, "p")], 20, 20) == [Box(0, 0, 20, 20, "p")]
    with pytest.raises(LayerError, match="smaller"):
        check_boxes([(0, 0, 2, 2)], 20, 20)
    layer = Layer(np.zeros((10, 20, 4), np.uint8))
    layer.pixels[2:6, 4:12] = 255
    fitted = fit_into_box(layer, Box(0, 0, 16, 16))
    assert (fitted.width, fitted.height) == (16, 8) and (fitted.x, fitted.y) == (0, 4)


def test_classical_decompose_recomposites_exactly_and_finds_objects():
    scene = make_scene(5, 128)
    boxes = [Box(*o.box) for o in scene.objects]
    stack = classical_decompose(scene.composite, boxes)
    assert stack.layers[0].kind == "background" and len(stack) == 1 + len(boxes)
    assert np.array_equal(stack.composite()[..., :3], scene.composite)
    # the topmost object (never occluded) is recovered as a mask close to its true body
    top = stack.layers[-1]
    got = np.zeros((128, 128), bool)
    got[top.y:top.y + top.height, top.x:top.x + top.width] = top.pixels[..., 3] > 0
    true = scene.objects[-1].body_alpha > 0.5
    iou = (got & true).sum() / (got | true).sum()
    assert iou > 0.6, iou
    auto = classical_decompose(scene.composite)
    assert len(auto) >= 2 and np.array_equal(auto.composite()[..., :3], scene.composite)


class FakeGenerator:
    """A stand-in pipeline: records its inputs, returns an output object with `.layers`."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt, width, height, background_image=None):  # no `generator`: keeps torch unimported
        self.calls.append(dict(prompt=prompt, width=width, height=height, background_image=background_image))
        pix = np.zeros((height, width, 4), np.uint8)
        pix[2:6, 2:6] = (10, 20, 30, 255)

        class Out:
            layers = [Layer(pix)]
        return Out()


class FakeDecomposer:
    def __call__(self, image, boxes=None):
        self.boxes = boxes
        stack = LayerStack(image.shape[1], image.shape[0], [Layer(image, name="background")])

        class Out:
            pass
        out = Out()
        out.stack = stack
        return out


def test_pipeline_backend_adapts_calls():
    gen, dec = FakeGenerator(), FakeDecomposer()
    backend = PipelineBackend(gen, dec, description="fake")
    layer = backend.generate_layer("p", 1, 16, 12)
    assert layer.pixels.shape == (12, 16, 4) and layer.metadata["prompt"] == "p" and gen.calls[-1]["width"] == 16
    cond = np.full((12, 16, 4), 255, np.uint8)
    backend.generate_layer("p", 1, 16, 12, condition=Condition("background", cond))
    assert gen.calls[-1]["background_image"] is not None  # passed because the pipeline accepts it
    backend.generate_layer("p", 1, 16, 12, condition=Condition("foreground", cond))  # not accepted: dropped
    image = np.zeros((12, 16, 3), np.uint8)
    stack = backend.decompose(image, [Box(1, 2, 9, 10)])
    assert dec.boxes == [(1, 2, 8, 8)] and len(stack) == 1  # the pipeline takes (x, y, w, h)


def test_pipeline_backend_drives_the_real_layer_pipelines():
    """Tiny random LayerDiffusion components (built in code): the adapter's calls fit the real pipelines."""
    import torch

    from layergen.pipelines import (BackgroundBehindForegroundPipeline, ForegroundOnBackgroundPipeline,
                                    TransparentLayerPipeline)
    from layergen.testing import tiny_layer_components

    torch.manual_seed(0)
    pipe = TransparentLayerPipeline(**tiny_layer_components())
    backend = PipelineBackend(pipe, conditioned={
        "background": ForegroundOnBackgroundPipeline(**pipe.components),
        "foreground": BackgroundBehindForegroundPipeline(**pipe.components)},
        call_kwargs={"num_inference_steps": 2, "tta": False}, description="tiny")
    fg = backend.generate_layer("a red star", 3, 32, 32)
    assert fg.pixels.shape == (32, 32, 4) and fg.kind == "instance" and fg.metadata["seed"] == 3
    assert fg == backend.generate_layer("a red star", 3, 32, 32)  # the seed reaches the pipeline
    backdrop = np.zeros((32, 32, 4), np.uint8)
    backdrop[..., 0], backdrop[..., 3] = 200, 255
    on_bg = backend.generate_layer("a star", 3, 32, 32, condition=Condition("background", backdrop))
    assert on_bg.kind == "instance" and on_bg.metadata["condition"] == "background"
    behind = backend.generate_layer("a sky", 3, 32, 32, condition=Condition("foreground", fg.pixels))
    assert behind.kind == "background" and (behind.pixels[..., 3] == 255).all() and behind.name == "a sky"
    stack = LayerStack(32, 32, [behind, fg])
    new = backend.repaint(stack, 1, "a blue heart", 5)
    assert new.kind == "instance" and new.metadata["prompt"] == "a blue heart"


def test_default_backends_fall_back_or_fail_loudly(tmp_path, monkeypatch):
    from layergen.errors import ModelNotFoundError
    from layergen.studio import backends as mod

    def missing(model):
        raise ModelNotFoundError("bundled model is missing")

    monkeypatch.setattr(mod, "_load_generator", missing)
    monkeypatch.setattr(mod, "_load_decomposer", missing)
    backend = default_backends()  # no weights at all -> the procedural backend, still fully usable
    assert isinstance(backend, ProceduralBackend)
    assert backend.generate_layer("a red star", 0, 64, 64).kind == "instance"

    monkeypatch.setattr(mod, "_load_decomposer", lambda model: (FakeDecomposer(), "classical"))
    backend = default_backends()  # a decomposer but no generator: layers fall back, decomposition does not
    assert isinstance(backend, PipelineBackend) and "layers: procedural" in backend.description
    assert backend.generate_layer("a red star", 0, 64, 64).metadata["backend"] == "procedural"
    assert len(backend.decompose(np.zeros((8, 8, 3), np.uint8))) == 1

    monkeypatch.undo()
    with pytest.raises(LayergenError, match="cannot load the layer model"):  # an explicit path must load
        default_backends(model=str(tmp_path / "missing"))
    monkeypatch.setattr(mod, "_load_generator", missing)
    with pytest.raises(LayergenError, match="cannot load the decomposition model"):
        default_backends(decompose_model=str(tmp_path))  # a folder with no pipeline and no learned decomposer


def test_pipeline_backend_layouts_and_repaint_go_through_the_multilayer_pipeline():
    """With a MultiLayerPipeline, a studio layout is one region-cropped joint generation and a repaint
    leaves every other layer bit-identical (the pipeline's guarantee, reached through the adapter)."""
    import torch

    from layergen.pipelines import MultiLayerPipeline, TransparentLayerPipeline
    from layergen.testing import tiny_layer_components

    torch.manual_seed(0)
    pipe = TransparentLayerPipeline(**tiny_layer_components(conditional=True))
    backend = PipelineBackend(pipe, multilayer=MultiLayerPipeline(**pipe.components),
                              call_kwargs={"num_inference_steps": 2, "tta": False}, description="tiny")
    boxes = [Box(2, 2, 18, 18, "a red star"), Box(30, 30, 60, 60)]
    layers = backend.generate_layout("a blue ring on a grey background", boxes, 4, 64, 64)
    assert [l.kind for l in layers] == ["background", "instance", "instance"]
    assert layers[1].metadata["prompt"] == "a red star" and layers[2].metadata["prompt"] == "a blue ring"
    assert [l.name for l in layers[1:]] == ["a red star", "a blue ring"]  # no position prefix to go stale
    # each layer lies inside its box (the pipeline crops layers to their boxes)
    for layer, box in zip(layers[1:], boxes):
        assert (layer.x, layer.y) == (box.x0, box.y0)
        assert layer.pixels.shape[:2] == (box.height, box.width)
    assert layers[0].pixels.shape == (64, 64, 4) and (layers[0].pixels[..., 3] == 255).all()
    again = backend.generate_layout("a blue ring on a grey background", boxes, 4, 64, 64)
    assert all(np.array_equal(a.pixels, b.pixels) for a, b in zip(layers, again))  # seeded

    no_bg = backend.generate_layout("a blue ring", boxes, 4, 64, 64, background=False)
    assert [l.kind for l in no_bg] == ["instance", "instance"]

    stack = LayerStack(64, 64, layers)
    new = backend.repaint(stack, 1, "a green heart", 9)
    assert new.metadata["prompt"] == "a green heart" and (new.x, new.y) == (2, 2) and new.name == "a green heart"
    assert not np.array_equal(new.pixels, layers[1].pixels)
    assert all(np.array_equal(a.pixels, b.pixels) for a, b in zip(stack.layers, layers))  # input untouched
