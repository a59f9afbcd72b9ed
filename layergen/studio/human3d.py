"""The studio's "3D human" tab: a layered 3D human (body, then clothing) as GLB meshes and turntables.

`HumanBackend` does the work without Gradio (so it is testable and reusable): it runs
`generate_human` into a scratch folder and returns the files. `human_tab(backend)` is an
`extra_tabs` entry for `build_app`: layer checkboxes, a seed, a Generate button, a
`gr.Model3D` with the GLB of the chosen layer and its turntable GIF. The 3D work is separate
from the 2D document (a human is not a layer stack); "Add front view as layer" drops the
selected layer's front render into the document as an ordinary RGBA layer.
"""
from __future__ import annotations

import numpy as np

from ..errors import LayerError
from .scratch import ScratchDir

HUMAN_LAYERS = ("body", "pants", "shirt", "shoes", "hat")
DEFAULT_HUMAN_LAYERS = ("body", "pants", "shirt", "shoes")
TAB_TITLE = "3D human"


def canonical_layers(selected) -> tuple[str, ...]:
    """Checkbox values (any order) -> layer names in stacking order; body is required."""
    chosen = {str(s).strip().lower() for s in (selected or [])}
    unknown = chosen - set(HUMAN_LAYERS)
    if unknown:
        raise LayerError(f"unknown layer(s) {', '.join(sorted(unknown))}; choose from {', '.join(HUMAN_LAYERS)}")
    if "body" not in chosen:
        raise LayerError("tick 'body': every layered human starts from its body")
    return tuple(n for n in HUMAN_LAYERS if n in chosen)


class HumanBackend:
    """Generates layered humans with `LayeredHumanPipeline` (default: the bundled layergen-mini model).

    Each call writes into its own folder under one scratch directory; folders older than
    `keep_seconds` are pruned (Gradio copies what it shows into its own cache).
    """

    def __init__(self, model_path=None, num_inference_steps: int = 25, num_views: int = 8, size: int = 96,
                 mesh_resolution: int = 64, keep_seconds: float = 1800.0):
        self.model_path = model_path
        self.num_inference_steps = num_inference_steps
        self.num_views = num_views
        self.size = size
        self.mesh_resolution = mesh_resolution
        self.scratch = ScratchDir("layergen-studio-humans-", keep_seconds)

    @property
    def description(self) -> str:
        return f"LayeredHumanPipeline ({self.model_path or 'bundled layergen-mini human'})"

    def generate(self, layers, seed: int, progress: bool = False) -> dict:
        """Generate and export one human; returns `generate_human`'s file dict (meshes, views, gifs, summary)."""
        from ..pipelines.pipeline_layered_human import generate_human

        names = canonical_layers(layers)
        out = self.scratch.new_dir()
        return generate_human(",".join(names), seed=int(seed), output_dir=out, model_path=self.model_path,
                              num_inference_steps=self.num_inference_steps, num_views=self.num_views,
                              size=self.size, mesh_resolution=self.mesh_resolution, mesh_format="glb",
                              progress=progress)


def layer_files(files: dict | None, layer: str | None) -> dict:
    """The file entry of `layer` in a `generate` result (a clear error if there is none)."""
    if not files:
        raise LayerError("generate a human first")
    for entry in files["layers"]:
        if entry["name"] == layer:
            return entry
    names = ", ".join(e["name"] for e in files["layers"])
    raise LayerError(f"this human has no layer {layer!r} (layers: {names})")


def front_view_layer(files: dict, layer: str):
    """The front turntable view of `layer` as a document `Layer` (RGBA, straight alpha)."""
    from PIL import Image

    from ..layers import Layer

    entry = layer_files(files, layer)
    pixels = np.asarray(Image.open(entry["views"][0]).convert("RGBA"))
    return Layer(pixels, name=f"human {layer} (front)")


def human_tab(backend: HumanBackend | None = None):
    """`(title, builder)` for `build_app(extra_tabs=...)`."""
    backend = backend or HumanBackend()

    def build(ctx) -> None:
        import gradio as gr

        from .app import _check_seed

        gr.Markdown("A layered 3D human: the body first, then each ticked garment on the layer below "
                    "(tri-plane diffusion, bundled mini model unless the studio was given another). Pick a layer "
                    "to see its coloured mesh and turntable; drag to orbit.")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=280):
                layers = gr.CheckboxGroup(list(HUMAN_LAYERS), value=list(DEFAULT_HUMAN_LAYERS),
                                          label="Layers (stacked in this order; body is required)",
                                          elem_id="human-layers")
                seed = gr.Number(label="Seed", value=3, precision=0, minimum=0, maximum=2**31 - 1,
                                 elem_id="human-seed")
                button = gr.Button("Generate human", variant="primary", elem_id="human-button")
                shown = gr.Radio([], label="Show layer", elem_id="human-show")
                summary = gr.Markdown(elem_id="human-summary")
                add_btn = gr.Button("Add front view to the layered document", size="sm",
                                    elem_id="human-add-layer")
            with gr.Column(scale=2, min_width=320):
                model3d = gr.Model3D(label="Mesh of the selected layer (GLB)", clear_color=(0.93, 0.93, 0.93, 1.0),
                                     height=420, interactive=False, elem_id="human-model")
            with gr.Column(scale=1, min_width=200):
                turntable = gr.Image(label="Turntable", type="filepath", interactive=False, height=260,
                                     elem_id="human-turntable")
        files_state = gr.State(None)

        def show(files, layer):
            entry = layer_files(files, layer)
            return entry["mesh"], entry["gif"]

        def generate(selected, seed_value, progress=gr.Progress(track_tqdm=True)):
            try:
                names = canonical_layers(selected)
                s = _check_seed(seed_value)
                progress(0, desc=f"Generating {', '.join(names)}")
                files = backend.generate(names, s, progress=True)
            except gr.Error:
                raise
            except Exception as exc:  # noqa: BLE001 - LayergenError (incl. a missing model) -> pop-up
                from ..errors import LayergenError

                if isinstance(exc, LayergenError):
                    raise gr.Error(str(exc), print_exception=False) from None
                raise
            top = files["layers"][-1]["name"]
            mesh, gif = show(files, top)
            text = (f"{len(files['layers'])} layers, seed {s}, {files['seconds']:.1f} s · meshes: "
                    + ", ".join(f"{e['name']} ({e['mesh_vertices']} vertices)" for e in files["layers"]))
            return files, gr.Radio(choices=[e["name"] for e in files["layers"]], value=top), mesh, gif, text

        def on_show(files, layer):
            if not files or not layer:
                return None, None
            try:
                return show(files, layer)
            except LayerError as exc:
                raise gr.Error(str(exc), print_exception=False) from None

        def front_view(files, layer):
            if not layer:
                raise LayerError("generate a human and pick a layer first")
            return front_view_layer(files, layer)

        button.click(generate, [layers, seed], [files_state, shown, model3d, turntable, summary],
                     api_name="generate_human", concurrency_id="model", concurrency_limit=1,
                     show_progress_on=[summary])  # progress and error badges there, not over the 3D view
        shown.input(on_show, [files_state, shown], [model3d, turntable], api_name="show_human_layer")
        add_and_say = ctx.adds_layer(front_view, "Add 3D human view", lambda files, layer: f"the {layer} front view")
        add_btn.click(add_and_say, [ctx.doc, files_state, shown, summary], [*ctx.outputs, summary],
                      show_progress_on=[summary], api_name="add_human_view")

    return TAB_TITLE, build
