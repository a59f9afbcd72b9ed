"""The layergen studio: a Gradio Blocks app, thin over `Document` and an injected backend.

Each browser session gets its own `Document` (a `gr.State` created lazily per
session), so two users never see each other's work. Every handler is
`(doc, inputs...) -> (doc, panel...)`: it calls one `Document` method and
re-renders the panel (preview, layer thumbnails, the selected layer's
properties, undo/redo). User mistakes (`LayergenError`) become `gr.Error`
pop-ups; anything else is a bug and stays in the server log.

Extra tabs (3D humans, actions) plug in through `build_app(..., extra_tabs=)`:
each is `(title, builder)` where `builder(ctx: StudioContext)` creates the
tab's components and wires them with `ctx.action(...)`.
"""
import contextlib
import functools
import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import gradio as gr
import numpy as np

from ..errors import LayerError, LayergenError
from ..layers import BLEND_MODES, LayerStack
from .backends import Box, Condition, LayerBackend, MAX_PROMPT_CHARS
from .document import MAX_CANVAS, MAX_UPLOAD_BYTES, MIN_CANVAS, Document, check_canvas_size, check_image_header
from .scratch import ScratchDir

TITLE = "layergen studio"
IMPORT_TYPES = [".psd", ".ora", ".zip", ".png", ".webp"]
EXPORT_FORMATS = {  # label -> (extension, formats.save format)
    "PSD (Photoshop, Photopea, Krita)": (".psd", "psd"),
    "OpenRaster (GIMP, Krita)": (".ora", "ora"),
    "PNG stack (zip)": (".zip", "zip"),
    "Flattened PNG": (".png", "png"),
}
CONDITION_CHOICES = [
    ("Nothing: a free-standing layer on top", "none"),
    ("The current image: a new foreground that fits it", "background"),
    ("The current image: a new background behind it", "foreground"),
]
BOX_HEADERS = ["x0", "y0", "x1", "y1", "prompt"]
MAX_SEED = 2**31 - 1
STATE_TTL_S = 6 * 3600
BUSY_WAIT_S = 2.0  # an edit waits this long for the one before it (quick edits), then is refused as busy
MAX_SESSIONS = 200  # documents kept in memory at once (oldest dropped first)


def _user_errors(fn):
    """Turn a `LayergenError` into a Gradio error pop-up (one line, no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except LayergenError as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    return wrapper


# ---------------------------------------------------------------------------------------------
# input validation


def _check_prompt(prompt, required: bool = True) -> str:
    prompt = str(prompt or "").strip()
    if required and not prompt:
        raise LayerError("type a prompt first")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise LayerError(f"the prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    return prompt


def _check_seed(seed) -> int:
    try:
        value = float(seed)
    except (TypeError, ValueError):
        raise LayerError(f"the seed must be a whole number, got {seed!r}") from None
    if value != int(value) or not 0 <= value <= MAX_SEED:
        raise LayerError(f"the seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}")
    return int(value)


def _pass_unreadable_uploads(image: gr.Image) -> gr.Image:
    """Let an upload to `image` (type "filepath") reach layergen even when Pillow cannot open it.

    Gradio opens every uploaded image before the handler runs; a corrupt or huge file then fails inside Gradio
    with a bare "Error". Passing the path on lets `_check_image` say what is wrong, naming the file. (An instance
    override, not a subclass: Gradio writes a stub file next to any module that subclasses a component.)"""
    preprocess = image.preprocess

    def tolerant(payload):
        try:
            return preprocess(payload)
        except Exception:
            if payload is None or payload.path is None:
                raise
            return str(payload.path)

    image.preprocess = tolerant
    return image


def _check_image(image, what: str = "image") -> np.ndarray:
    """An array, or an uploaded file's path (decoded here, so a corrupt upload gets a clear message; Gradio's
    `max_file_size`, set at launch, has already bounded its size)."""
    if image is None:
        raise LayerError(f"upload an {what} first")
    if isinstance(image, (str, Path)):
        from ..layers.formats._common import decode_image

        path = Path(image)
        check_image_header(path)
        image = decode_image(path.read_bytes(), path.name)
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise LayerError(f"the {what} must be an 8-bit picture")
    check_canvas_size(arr.shape[1], arr.shape[0])
    return arr


def parse_box_table(table, width: int, height: int) -> list[Box]:
    """Rows of [x0, y0, x1, y1, prompt] (blank rows skipped) -> boxes; a bad row is named in the error."""
    rows = table
    if isinstance(table, dict):
        rows = table.get("data", [])
    elif hasattr(table, "values") and hasattr(table, "columns"):  # a pandas frame
        rows = table.values.tolist()
    boxes = []
    for r, row in enumerate(rows or [], start=1):
        row = list(row) + [""] * (5 - len(row))
        coords, prompt = row[:4], row[4]
        if all(v in (None, "") or (isinstance(v, float) and np.isnan(v)) for v in coords):
            continue
        try:
            x0, y0, x1, y1 = (int(round(float(v))) for v in coords)
        except (TypeError, ValueError):
            raise LayerError(f"box row {r}: x0, y0, x1, y1 must all be numbers, got {coords}") from None
        if not (0 <= min(x0, x1) and max(x0, x1) <= width and 0 <= min(y0, y1) and max(y0, y1) <= height):
            raise LayerError(f"box row {r} ({x0}, {y0}, {x1}, {y1}) is outside the {width}x{height} canvas")
        if abs(x1 - x0) < 4 or abs(y1 - y0) < 4:
            raise LayerError(f"box row {r} ({x0}, {y0}, {x1}, {y1}) is smaller than 4 pixels")
        text = "" if prompt is None or (isinstance(prompt, float) and np.isnan(prompt)) else str(prompt)
        boxes.append(Box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1), _check_prompt(text, required=False)))
    return boxes


def boxes_from_sketch(sketch, width: int, height: int, min_area: int = 16) -> list[list]:
    """Each connected stroke drawn on the sketch canvas -> one box row (bbox), scaled to the canvas."""
    import cv2

    if not sketch:
        return []
    layers = [np.asarray(l) for l in (sketch.get("layers") or []) if l is not None]
    layers = [l for l in layers if l.ndim == 3 and l.shape[2] == 4]
    if not layers:
        return []
    alpha = np.zeros(layers[0].shape[:2], np.uint8)
    for l in layers:
        if l.shape[:2] == alpha.shape:
            alpha = np.maximum(alpha, l[..., 3])
    n, _, stats, _ = cv2.connectedComponentsWithStats((alpha > 0).astype(np.uint8), connectivity=8)
    sx, sy = width / alpha.shape[1], height / alpha.shape[0]
    rows = []
    for s in stats[1:]:
        if s[cv2.CC_STAT_AREA] < min_area:
            continue
        x, y, w, h = (int(v) for v in s[:4])
        rows.append([int(round(x * sx)), int(round(y * sy)), int(round((x + w) * sx)), int(round((y + h) * sy)), ""])
    rows.sort(key=lambda r: (r[1], r[0]))
    return rows


def _table_rows(table) -> list[list]:
    if table is None:
        return []
    if isinstance(table, dict):
        return [list(r) for r in table.get("data", [])]
    if hasattr(table, "values") and hasattr(table, "columns"):
        return table.values.tolist()
    return [list(r) for r in table]


# ---------------------------------------------------------------------------------------------
# rendering


def _status(doc: Document) -> str:
    if not len(doc):
        return (f"Empty {doc.width}×{doc.height} document. Generate a layer, decompose an image or import a "
                f"file to start.")
    # escaped: the status is Markdown, where a name such as "a cat <jump>" would lose its <jump> as an HTML tag
    sel = f"selected: **{html.escape(doc.stack.layers[doc.selected].name)}**" if doc.selected is not None \
        else "no selection"
    status = f"{len(doc)} layer{'s' if len(doc) != 1 else ''} · {doc.width}×{doc.height} px · {sel} · " \
             f"last: {doc.last_action}"
    notes = doc.stack.metadata.get("notes")
    if doc.last_action.startswith(("Import ", "Decompose")) and isinstance(notes, list) and notes:
        # what flattening another tool's file could not keep (adjustment layers, group blending...), or guidance
        # that found nothing to decompose: say so
        status += "\n\nNotes: " + "; ".join(map(str, notes))
    return status


@contextlib.contextmanager
def holding(doc: Document, doing: str):
    """Hold the document for one event. If another event holds it for longer than a quick edit takes (a
    generation), refuse rather than wait: a queued edit would apply to whatever that generation selected."""
    if not doc.lock.acquire(timeout=BUSY_WAIT_S):
        raise LayerError(f"the document is busy ({doc.running or 'another edit'}): nothing was changed; "
                         "try again when it has finished")
    try:
        doc.running = doing
        yield
    finally:
        doc.running = None
        doc.lock.release()


@dataclass
class StudioContext:
    """What a tab builder needs: the per-session document and the panel that re-renders it."""

    doc: gr.State
    outputs: list
    backends: LayerBackend
    status: gr.components.Component | None = None

    @property
    def on_status(self) -> dict:
        """Event keywords for handlers that re-render the panel: progress and error badges on the status only."""
        return {"show_progress_on": [self.status]} if self.status is not None else {}

    def render(self, doc: Document) -> tuple:
        return (doc,) + render_panel(doc)

    def action(self, fn: Callable, doing: str = "another edit") -> Callable:
        """Wrap `fn(doc, *inputs)` (which edits `doc`) into a handler returning `(doc, *panel)` for `outputs`.

        One event edits a document at a time. An edit made while a generation (`doing`) runs is refused, not
        queued: queued, it would wait for the generation and then apply to the layer that generation selected."""

        @functools.wraps(fn)
        def handler(doc, *args, **kwargs):
            try:
                with holding(doc, doing):
                    fn(doc, *args, **kwargs)
                    return self.render(doc)
            except gr.Error:
                raise
            except LayergenError as exc:
                raise gr.Error(str(exc), print_exception=False) from None

        return handler

    def adds_layer(self, make_layer: Callable, label: str, what: Callable) -> Callable:
        """A handler `(doc, a, b, text) -> (doc, *panel, text)` for another tab's "add to the document" button.

        `make_layer(a, b)` goes into the document centred on the canvas (one undoable edit, `label`). The user is
        on that tab, not on the Layers tab whose status line says what changed, so the tab's own status `text`
        gets one "Added `what(a, b)` ..." line too, replacing the one an earlier click left."""

        def add(doc, a, b):
            layer = make_layer(a, b)
            layer.x, layer.y = (doc.width - layer.width) // 2, (doc.height - layer.height) // 2
            doc.add_layer(layer, label=label)

        add_to_doc = self.action(add)

        def handler(doc, a, b, text):
            panel = add_to_doc(doc, a, b)
            said = (text or "").split("\n\n" + ADDED_MARK)[0].rstrip()
            return (*panel, f"{said}\n\n{ADDED_MARK} {what(a, b)} as a new layer (Layers tab).")

        return handler


ADDED_MARK = "Added"  # starts the line `StudioContext.adds_layer` puts under another tab's status


def render_panel(doc: Document) -> tuple:
    """Values for: preview, gallery, layer select, name, visible, opacity, blend, x, y, scale, info, status,
    undo, redo (see `build_app`)."""
    order = list(range(len(doc) - 1, -1, -1))  # top layer first, as in Photoshop/GIMP
    gallery = [(doc.thumbnail(i), doc.layer_label(i)) for i in order]
    choices = [(doc.layer_label(i), i) for i in order]
    has = doc.selected is not None
    layer = doc.stack.layers[doc.selected] if has else None
    return (
        doc.preview(),
        gr.Gallery(value=gallery, selected_index=None if not has else len(doc) - 1 - doc.selected),
        gr.Dropdown(choices=choices, value=doc.selected if has else None),
        gr.Textbox(value=layer.name if has else "", interactive=has),
        gr.Checkbox(value=layer.visible if has else True, interactive=has),
        gr.Slider(value=round(layer.opacity * 100, 1) if has else 100, interactive=has),
        gr.Dropdown(value=layer.blend_mode if has else "normal", interactive=has),
        gr.Number(value=layer.x if has else 0, interactive=has),
        gr.Number(value=layer.y if has else 0, interactive=has),
        gr.Slider(value=100, interactive=has),
        doc.summary(),
        _status(doc),
        gr.Button(interactive=doc.can_undo),
        gr.Button(interactive=doc.can_redo),
    )


def _editor_background(doc: Document) -> np.ndarray:
    """What the box-sketch canvas shows: the composite over the preview checkerboard, opaque RGB."""
    return np.ascontiguousarray(doc.preview()[..., :3])


# ---------------------------------------------------------------------------------------------
# the app


def build_app(backends: LayerBackend, extra_tabs: Sequence[tuple[str, Callable[[StudioContext], None]]] = (),
              max_upload_bytes: int = MAX_UPLOAD_BYTES) -> gr.Blocks:
    """Build the studio UI on `backends` (see `layergen.studio.backends`); launch it with `launch()`."""
    exports = ScratchDir("layergen-studio-exports-")  # files wait there until Gradio has copied them
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        # Deep-copied per session: every browser tab gets its own Document, dropped when the tab closes
        # (or after `STATE_TTL_S` without an edit, for API clients that never close).
        doc = gr.State(Document(), time_to_live=STATE_TTL_S)
        description = getattr(backends, "description", "") or getattr(backends, "name", "")
        gr.Markdown(f"## {TITLE}\nLayered images you can edit: generate transparent layers, lay out many at once, "
                    f"repaint one, decompose a picture, export PSD / OpenRaster. Backend: *{description}*.")
        with contextlib.ExitStack() as workspace:
            if extra_tabs:  # the 2D studio becomes the first of several full-width workspaces
                workspaces = workspace.enter_context(gr.Tabs(elem_id="workspaces"))
                workspace.enter_context(gr.Tab("Layers", id="layers", elem_id="workspace-layers"))
            with gr.Row(equal_height=False):
                # -- tools ------------------------------------------------------------------------
                with gr.Column(scale=4, min_width=320):
                    with gr.Tabs(elem_id="tools"):
                        with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                            prompt = gr.Textbox(label="Prompt", placeholder="a red glass star with a drop shadow",
                                                lines=2, max_length=MAX_PROMPT_CHARS, elem_id="gen-prompt")
                            with gr.Row():
                                seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=MAX_SEED,
                                                 elem_id="gen-seed")
                                next_seed = gr.Checkbox(label="Next seed after each layer", value=True)
                            condition = gr.Radio(CONDITION_CHOICES, value="none", label="Condition on")
                            gen_btn = gr.Button("Generate layer", variant="primary", elem_id="gen-button")
                        with gr.Tab("Layout", id="layout", elem_id="tab-layout") as layout_tab:
                            gr.Markdown("Draw one stroke or rectangle per object (or type boxes), give each box a "
                                        "prompt if you like, then generate all layers at once.")
                            lay_prompt = gr.Textbox(label="Prompt (used for boxes without their own)", lines=1,
                                                    max_length=MAX_PROMPT_CHARS, elem_id="layout-prompt")
                            lay_sketch = gr.ImageEditor(label="Draw boxes", type="numpy", image_mode="RGBA",
                                                        format="png", layers=False, transforms=(), height=320,
                                                        sources=(), brush=gr.Brush(colors=["#ff2d7a"], default_size=6),
                                                        elem_id="layout-sketch")
                            lay_from_sketch = gr.Button("Add drawn boxes to the table", size="sm")
                            lay_boxes = gr.Dataframe(headers=BOX_HEADERS, datatype=["number"] * 4 + ["str"],
                                                     column_count=5, row_count=1, type="array", interactive=True,
                                                     label="Boxes (canvas pixels)", elem_id="layout-boxes")
                            with gr.Row():
                                lay_seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=MAX_SEED)
                                lay_background = gr.Checkbox(label="Also generate a background", value=True)
                            lay_btn = gr.Button("Generate layers", variant="primary", elem_id="layout-button")
                        with gr.Tab("Repaint", id="repaint", elem_id="tab-repaint"):
                            gr.Markdown("Regenerates the **selected layer** from a new prompt/seed, in the same "
                                        "place; every other layer stays exactly as it is.")
                            rep_prompt = gr.Textbox(label="New prompt", lines=2, max_length=MAX_PROMPT_CHARS,
                                                    elem_id="repaint-prompt")
                            rep_seed = gr.Number(label="Seed", value=1, precision=0, minimum=0, maximum=MAX_SEED)
                            rep_btn = gr.Button("Repaint selected layer", variant="primary", elem_id="repaint-button")
                        with gr.Tab("Decompose", id="decompose", elem_id="tab-decompose"):
                            gr.Markdown("Upload a flat picture; optionally draw or type a box around each object. "
                                        "Its layers replace the document (undo brings the old one back).")
                            dec_image = _pass_unreadable_uploads(gr.Image(
                                label="Flat image", type="filepath", image_mode=None, format="png",
                                sources=["upload", "clipboard"], elem_id="decompose-image"))
                            dec_sketch = gr.ImageEditor(label="Draw boxes (optional)", type="numpy", image_mode="RGBA",
                                                        format="png", layers=False, transforms=(), height=320,
                                                        sources=(), brush=gr.Brush(colors=["#2d9bff"], default_size=6))
                            dec_from_sketch = gr.Button("Add drawn boxes to the table", size="sm")
                            dec_boxes = gr.Dataframe(headers=BOX_HEADERS, datatype=["number"] * 4 + ["str"],
                                                     column_count=5, row_count=1, type="array", interactive=True,
                                                     label="Boxes (image pixels, optional)", elem_id="decompose-boxes")
                            dec_btn = gr.Button("Decompose into layers", variant="primary", elem_id="decompose-button")
                        with gr.Tab("File", id="file", elem_id="tab-file"):
                            with gr.Group():
                                with gr.Row():
                                    new_w = gr.Number(label="Width", value=256, precision=0, minimum=MIN_CANVAS,
                                                      maximum=MAX_CANVAS)
                                    new_h = gr.Number(label="Height", value=256, precision=0, minimum=MIN_CANVAS,
                                                      maximum=MAX_CANVAS)
                                new_btn = gr.Button("New empty document", elem_id="new-button")
                            imp_file = gr.File(label=f"Import ({', '.join(IMPORT_TYPES)}; up to "
                                                     f"{max_upload_bytes // 2**20} MB)", file_types=IMPORT_TYPES,
                                               type="filepath", elem_id="import-file")
                            imp_btn = gr.Button("Import as document", elem_id="import-button")
                            exp_format = gr.Radio(list(EXPORT_FORMATS), value=next(iter(EXPORT_FORMATS)),
                                                  label="Export format", elem_id="export-format")
                            exp_btn = gr.Button("Export", variant="primary", elem_id="export-button")
                            exp_file = gr.File(label="Download", interactive=False, elem_id="export-file")
                # -- canvas -----------------------------------------------------------------------
                with gr.Column(scale=4, min_width=320):
                    preview = gr.Image(label="Composite", type="numpy", image_mode="RGBA", format="png",
                                       interactive=False, height=460, buttons=["download", "fullscreen"],
                                       elem_id="preview")
                    with gr.Row():
                        undo_btn = gr.Button("↶ Undo", interactive=False, size="sm", min_width=60,
                                             elem_id="undo-button")
                        redo_btn = gr.Button("↷ Redo", interactive=False, size="sm", min_width=60,
                                             elem_id="redo-button")
                    status = gr.Markdown(label="Status", elem_id="status")
                # -- layers panel ---------------------------------------------------------------
                with gr.Column(scale=4, min_width=300, elem_id="layers-panel"):
                    gallery = gr.Gallery(label="Layers (top first) — click to select", format="png", columns=3,
                                         height=250, allow_preview=False, object_fit="contain", interactive=False,
                                         elem_id="layers-gallery")
                    layer_select = gr.Dropdown(label="Selected layer", choices=[], value=None, elem_id="layer-select")
                    with gr.Row():
                        name = gr.Textbox(label="Name", scale=3, elem_id="layer-name")
                        rename_btn = gr.Button("Rename", scale=1, size="sm", min_width=60, elem_id="rename-button")
                    with gr.Row():
                        visible = gr.Checkbox(label="Visible", value=True, elem_id="layer-visible")
                        blend = gr.Dropdown(list(BLEND_MODES), value="normal", label="Blend mode",
                                            elem_id="layer-blend")
                    opacity = gr.Slider(0, 100, value=100, step=1, label="Opacity %", elem_id="layer-opacity")
                    with gr.Row():
                        up_btn = gr.Button("▲ Up", size="sm", min_width=60, elem_id="up-button")
                        down_btn = gr.Button("▼ Down", size="sm", min_width=60, elem_id="down-button")
                        dup_btn = gr.Button("Duplicate", size="sm", min_width=60, elem_id="duplicate-button")
                    with gr.Row():
                        merge_btn = gr.Button("Merge down", size="sm", min_width=60, elem_id="merge-button")
                        del_btn = gr.Button("Delete", size="sm", min_width=60, variant="stop", elem_id="delete-button")
                    with gr.Group():
                        with gr.Row():
                            pos_x = gr.Number(label="x", value=0, precision=0, min_width=60, elem_id="layer-x")
                            pos_y = gr.Number(label="y", value=0, precision=0, min_width=60, elem_id="layer-y")
                        scale = gr.Slider(10, 400, value=100, step=5, elem_id="layer-scale",
                                          label="Scale % (about the centre, after the move)")
                    move_btn = gr.Button("Apply position / scale", size="sm", elem_id="transform-button")
                    with gr.Accordion("Document info", open=False):
                        info = gr.JSON(label="Document", elem_id="doc-info")
        extra_tab_slots = []
        if extra_tabs:
            with workspaces:  # extra tabs (3D human, ...) get the full width beside "Layers"
                for title, _builder in extra_tabs:
                    with gr.Tab(title) as tab:
                        extra_tab_slots.append(tab)

        panel = [preview, gallery, layer_select, name, visible, opacity, blend, pos_x, pos_y, scale, info, status,
                 undo_btn, redo_btn]
        ctx = StudioContext(doc, [doc] + panel, backends, status)
        outputs = ctx.outputs
        act = ctx.action
        model = dict(concurrency_id="model", concurrency_limit=1)  # one generation at a time per server
        # Progress and errors show on the status line only: by default Gradio badges every output "Error" after a
        # failed event and leaves the badges there, hiding the canvas and the layer panel behind them.
        on_status = ctx.on_status

        # -- document -----------------------------------------------------------------------
        demo.load(act(lambda d: None), [doc], outputs, **on_status, api_name="refresh")
        undo_btn.click(act(lambda d: d.undo()), [doc], outputs, **on_status, api_name="undo")
        redo_btn.click(act(lambda d: d.redo()), [doc], outputs, **on_status, api_name="redo")
        new_btn.click(act(lambda d, width, height: d.new(width, height)), [doc, new_w, new_h], outputs, **on_status,
                      api_name="new_document")

        # -- layers panel ---------------------------------------------------------------------
        layer_select.input(act(lambda d, index: d.select(index)), [doc, layer_select], outputs, **on_status,
                           api_name="select_layer")

        def on_gallery_select(d: Document, evt: gr.SelectData):
            d.select(len(d) - 1 - evt.index)  # the gallery shows the top layer first

        gallery.select(act(on_gallery_select), [doc], outputs, **on_status, api_name=False)
        rename_btn.click(act(lambda d, name: d.rename(None, name)), [doc, name], outputs, **on_status,
                         api_name="rename")
        name.submit(act(lambda d, name: d.rename(None, name)), [doc, name], outputs, **on_status, api_name=False)
        visible.input(act(lambda d, visible: d.set_visible(None, visible)), [doc, visible], outputs, **on_status,
                      api_name="set_visible")
        opacity.release(act(lambda d, percent: d.set_opacity(None, float(percent) / 100.0)), [doc, opacity], outputs,
                        **on_status, api_name="set_opacity")
        blend.input(act(lambda d, mode: d.set_blend_mode(None, mode)), [doc, blend], outputs, **on_status,
                    api_name="set_blend_mode")
        up_btn.click(act(lambda d: d.move_up()), [doc], outputs, **on_status, api_name="move_up")
        down_btn.click(act(lambda d: d.move_down()), [doc], outputs, **on_status, api_name="move_down")
        dup_btn.click(act(lambda d: d.duplicate()), [doc], outputs, **on_status, api_name="duplicate")
        merge_btn.click(act(lambda d: d.merge_down()), [doc], outputs, **on_status, api_name="merge_down")
        del_btn.click(act(lambda d: d.delete()), [doc], outputs, **on_status, api_name="delete")

        def transform(d: Document, x, y, scale_percent):
            i = d.resolve(None)
            layer = d.stack.layers[i]
            if x is None or y is None:
                raise LayerError("type a position (x and y) first")
            with d.edit("Move / scale layer"):  # one undo step for both
                if (int(x), int(y)) != (layer.x, layer.y):
                    d.set_position(i, x, y)
                if scale_percent is not None and float(scale_percent) != 100:
                    d.scale(i, float(scale_percent) / 100.0)

        move_btn.click(act(transform), [doc, pos_x, pos_y, scale], outputs, **on_status, api_name="transform")

        # -- generate -------------------------------------------------------------------------
        def generate(d: Document, prompt, seed, condition, progress=gr.Progress(track_tqdm=True)):
            text, s, cond = _check_prompt(prompt), _check_seed(seed), condition
            given = None
            if cond in ("background", "foreground"):
                if not len(d):
                    raise LayerError("the document is empty: there is nothing to condition on yet")
                given = Condition(cond, d.stack.composite())
            elif cond not in (None, "none"):
                raise LayerError(f"unknown condition {cond!r}")
            progress(0, desc="Generating layer")
            layer = backends.generate_layer(text, s, d.width, d.height, condition=given)
            d.add_layer(layer, index=0 if cond == "foreground" else None, label="Generate layer")

        def bump_seed(seed_value, bump):
            try:
                return gr.Number(value=(int(seed_value) + 1) % (MAX_SEED + 1)) if bump else gr.Number()
            except (TypeError, ValueError):
                return gr.Number()

        generate_handler = act(generate, "generating a layer")
        gen_evt = gen_btn.click(generate_handler, [doc, prompt, seed, condition], outputs, **on_status,
                                api_name="generate", **model)
        prompt.submit(generate_handler, [doc, prompt, seed, condition], outputs, **on_status, api_name=False, **model) \
            .success(bump_seed, [seed, next_seed], [seed], api_name=False, queue=False)
        gen_evt.success(bump_seed, [seed, next_seed], [seed], api_name=False, queue=False)

        # -- layout ---------------------------------------------------------------------------
        def generate_layout(d: Document, prompt, boxes, seed, background,
                            progress=gr.Progress(track_tqdm=True)):
            boxes = parse_box_table(boxes, d.width, d.height)
            text = _check_prompt(prompt, required=not all(b.prompt for b in boxes) or not boxes)
            s = _check_seed(seed)
            if not boxes and not background:
                raise LayerError("draw or type at least one box (or tick 'Also generate a background')")
            progress(0, desc="Generating layout")
            layers = backends.generate_layout(text, boxes, s, d.width, d.height, background=bool(background))
            n = len(layers)
            with d.edit(f"Generate {n} layer{'s' * (n != 1)}"):  # one undo step
                if background and n:  # an opaque background belongs under the document, not over it
                    d.add_layers(layers[:1], index=0)
                    layers = layers[1:]
                if layers:
                    d.add_layers(layers)

        lay_btn.click(act(generate_layout, "generating layers"), [doc, lay_prompt, lay_boxes, lay_seed, lay_background],
                      outputs, **on_status, api_name="generate_layout", **model)

        def sketch_to_table(d: Document, sketch, table):
            rows = [r for r in _table_rows(table) if any(v not in (None, "") for v in r[:4])]
            return rows + boxes_from_sketch(sketch, d.width, d.height) or [[None, None, None, None, ""]]

        lay_from_sketch.click(_user_errors(sketch_to_table), [doc, lay_sketch, lay_boxes], [lay_boxes],
                              api_name=False)

        def sketch_backdrop(d: Document, sketch):
            if sketch and any(np.asarray(l)[..., 3].any() for l in (sketch.get("layers") or []) if l is not None):
                return gr.ImageEditor()  # keep what the user drew
            return gr.ImageEditor(value={"background": _editor_background(d), "layers": [], "composite": None})

        layout_tab.select(sketch_backdrop, [doc, lay_sketch], [lay_sketch], api_name=False)

        # -- repaint --------------------------------------------------------------------------
        def repaint(d: Document, prompt, seed, progress=gr.Progress(track_tqdm=True)):
            text, s = _check_prompt(prompt), _check_seed(seed)
            i = d.resolve(None)
            progress(0, desc=f"Repainting {d.stack.layers[i].name}")
            new = backends.repaint(d.stack.copy(), i, text, s)
            d.replace_pixels(i, new, label="Repaint layer")

        rep_btn.click(act(repaint, "repainting a layer"), [doc, rep_prompt, rep_seed], outputs, **on_status,
                      api_name="repaint", **model)

        # -- decompose ------------------------------------------------------------------------
        def decompose(d: Document, image, boxes, progress=gr.Progress(track_tqdm=True)):
            arr = _check_image(image, "image to decompose")
            boxes = parse_box_table(boxes, arr.shape[1], arr.shape[0])
            progress(0, desc="Decomposing")
            stack = backends.decompose(arr, boxes or None)
            if not isinstance(stack, LayerStack) or not len(stack):
                raise LayerError("the decomposition produced no layers")
            d.replace_stack(stack, label="Decompose image")

        dec_btn.click(act(decompose, "decomposing an image"), [doc, dec_image, dec_boxes], outputs, **on_status,
                      api_name="decompose", **model)

        def dec_backdrop(image):
            if image is None:
                return gr.ImageEditor(value=None)
            arr = _check_image(image)
            return gr.ImageEditor(value={"background": np.asarray(arr)[..., :3] if arr.ndim == 3 else arr,
                                         "layers": [], "composite": None})

        dec_image.upload(_user_errors(dec_backdrop), [dec_image], [dec_sketch], api_name=False)

        def dec_sketch_to_table(image, sketch, table):
            arr = _check_image(image, "image to decompose")
            rows = [r for r in _table_rows(table) if any(v not in (None, "") for v in r[:4])]
            return rows + boxes_from_sketch(sketch, arr.shape[1], arr.shape[0]) or [[None, None, None, None, ""]]

        dec_from_sketch.click(_user_errors(dec_sketch_to_table), [dec_image, dec_sketch, dec_boxes], [dec_boxes],
                              api_name=False)

        # -- import / export -------------------------------------------------------------------
        def import_file(d: Document, file, progress=gr.Progress()):
            path = file
            if not path:
                raise LayerError("choose a file to import first")
            progress(0, desc="Reading file")
            d.import_file(path, max_bytes=max_upload_bytes)

        imp_btn.click(act(import_file, "importing a file"), [doc, imp_file], outputs, **on_status,
                      api_name="import_file")

        @_user_errors
        def export(d: Document, format, progress=gr.Progress()):
            fmt = format
            if fmt not in EXPORT_FORMATS:
                raise LayerError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
            ext, name_fmt = EXPORT_FORMATS[fmt]
            progress(0, desc=f"Writing {ext}")
            with holding(d, "exporting"):
                return str(d.export(exports.new_dir() / f"layergen-studio{ext}", format=name_fmt))

        exp_btn.click(export, [doc, exp_format], [exp_file], api_name="export")

        for (title, builder), tab in zip(extra_tabs, extra_tab_slots):
            with tab:
                builder(ctx)
    return demo


def default_extra_tabs(human_model=None, action_model=None) -> list:
    """The tabs every served studio has besides the 2D tools: "3D human" and "Actions" (bundled mini models by
    default; each loads on first use)."""
    from .actions import ActionBackend, action_tab
    from .human3d import HumanBackend, human_tab

    return [human_tab(HumanBackend(model_path=human_model)), action_tab(ActionBackend(model_path=action_model))]


def launch(backends: LayerBackend | None = None, host: str = "127.0.0.1", port: int | None = None,
           inbrowser: bool = False, prevent_thread_lock: bool = False, max_upload_bytes: int = MAX_UPLOAD_BYTES,
           quiet: bool = False, extra_tabs: Sequence | None = None, **kwargs):
    """Build and serve the studio on localhost (never a public share link).

    Returns `(demo, url)`. With `prevent_thread_lock=True` it returns at once
    (tests; call `demo.close()`), else it serves until Ctrl+C. `extra_tabs=None` means
    `default_extra_tabs()` (the 3D human and Actions tabs; their models load on first use).
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if backends is None:
        from .backends import default_backends

        backends = default_backends()
    if extra_tabs is None:
        extra_tabs = default_extra_tabs()
    demo = build_app(backends, extra_tabs=extra_tabs, max_upload_bytes=max_upload_bytes)
    demo.queue(default_concurrency_limit=4)
    _, url, _ = demo.launch(server_name=host, server_port=port, share=False, inbrowser=inbrowser,
                            prevent_thread_lock=True, max_file_size=max_upload_bytes, show_error=False,
                            quiet=True, footer_links=["api", "settings"], state_session_capacity=MAX_SESSIONS,
                            **kwargs)
    if not quiet:
        print(f"layergen studio running on {url}  (Ctrl+C to stop)", flush=True)
    if not prevent_thread_lock:
        demo.block_thread()
    return demo, url
