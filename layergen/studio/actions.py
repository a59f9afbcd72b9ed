"""The studio's "Actions" tab: learn an action from a few exemplar images (ADI), then put it in prompts.

`ActionBackend` does the work without Gradio (testable, reusable): it renders procedural example
exemplars, learns identifiers with `training/train_action_identifier.py` (the same code as `layergen
action learn`) and generates with `ActionPipeline` (bundled layergen-mini action model unless given
another). `action_tab(backend)` is an `extra_tabs` entry for `build_app`: exemplar upload, a Learn
button with progress, a download of the identifier file, identifier files to load, a prompt such as
"a blue cat in the snow <jump>", a gallery, and "Add image to the layered document", which drops the
chosen image into the document as an ordinary (opaque) layer.
"""

import re
import shutil
import threading
from pathlib import Path

import numpy as np

from ..errors import LayerError
from .scratch import ScratchDir

TAB_TITLE = "Actions"
MAX_EXEMPLARS = 24
MAX_IMAGES = 8
MAX_STEPS = 2000
PLACE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,40}")  # also the identifier's file name


def _name(name: str) -> str:
    """'jump' or '<jump>' -> 'jump'; a clear error for what cannot be a token."""
    bare = str(name or "").strip().strip("<>").strip()
    if not NAME_PATTERN.fullmatch(bare):
        raise LayerError(f"an action name is a word such as 'jump' (up to 40 letters, digits, - or _), got {name!r}")
    return bare


class ActionBackend:
    """Learns identifiers and generates with one `ActionPipeline`, loaded on first use.

    One lock serialises learning and generation (they share the pipeline, whose loaded identifiers
    change per call). Files go to scratch folders that are pruned after `keep_seconds`.
    """

    def __init__(self, model_path=None, num_inference_steps: int = 20, keep_seconds: float = 4 * 3600.0):
        self.model_path = model_path
        self.num_inference_steps = num_inference_steps
        self.scratch = ScratchDir("layergen-studio-actions-", keep_seconds)
        self._pipe = None
        self._lock = threading.Lock()

    @property
    def description(self) -> str:
        return f"ActionPipeline ({self.model_path or 'bundled layergen-mini action model'})"

    def pipeline(self):
        if self._pipe is None:
            from ..mini import mini_path
            from ..pipelines.pipeline_action import ActionPipeline

            self._pipe = ActionPipeline.from_pretrained(self.model_path or mini_path("action"))
        return self._pipe

    def make_exemplars(self, action: str, one_place: str | None = None, seed: int = 1_000_000,
                       num: int = 4) -> list[Path]:
        """Procedural figures doing `action` (+ metadata.jsonl, last): something to learn from without photos.
        `one_place`: shoot them all in that place."""
        from ..commands.action import write_exemplars

        folder = self.scratch.new_dir() / "exemplars"
        images = write_exemplars(folder, action, num, seed, background=one_place or None)
        return [*images, folder / "metadata.jsonl"]

    def learn(self, files, name: str, steps: int = 600, one_place: bool = False, places=(), seed: int = 0,
              progress: bool = False) -> Path:
        """Learn `<name>` from exemplar image files (a metadata.jsonl among them is used, as by `layergen action
        learn`); returns the identifier file. `one_place`: the exemplars share a place, so the mask compares each
        with its subject put on other backgrounds (`--restage mask --mask_basis eigen`): `places` are photos of
        other places (procedural exemplars draw their own)."""
        from ..commands.action import training_script
        from ..errors import LayergenError

        name = _name(name)
        files = [Path(f) for f in (files or [])]
        images = [f for f in files if f.name != "metadata.jsonl"]
        if len(images) < 2:
            raise LayerError(f"add at least 2 exemplar images (got {len(images)})")
        if len(images) > MAX_EXEMPLARS:
            raise LayerError(f"at most {MAX_EXEMPLARS} exemplar images, got {len(images)}")
        steps = int(steps)
        if not 1 <= steps <= MAX_STEPS:
            raise LayerError(f"steps must be in [1, {MAX_STEPS}], got {steps}")
        work = self.scratch.new_dir()
        folder = work / "exemplars"
        folder.mkdir()
        for f in files:  # distinct names, in the order given (the trainer reads them sorted by name)
            dest = folder / ("metadata.jsonl" if f.name == "metadata.jsonl" else f.name)
            if dest.exists():
                raise LayerError(f"two exemplar files are named {f.name}")
            shutil.copyfile(f, dest)
        argv = ["--exemplars", str(folder), "--name", name, "--output", str(work / f"{name}.safetensors"),
                "--output_dir", str(work / "run"), "--steps", str(steps), "--num_exemplars", str(len(images)),
                "--seed", str(int(seed)), "--validation_steps", "0", "--checkpointing_steps", str(10 ** 9)]
        if one_place:
            argv += ["--restage", "mask", "--mask_basis", "eigen"]
            photos = [Path(p) for p in (places or [])]
            if photos:
                bg = work / "places"
                bg.mkdir()
                for k, p in enumerate(photos):
                    if p.suffix.lower() not in PLACE_SUFFIXES:
                        raise LayerError(f"{p.name}: a place must be an image ({', '.join(PLACE_SUFFIXES)})")
                    shutil.copyfile(p, bg / f"{k:03d}{p.suffix.lower()}")
                argv += ["--restage_backgrounds", str(bg)]
        module = training_script()
        args = module.parse_args(argv)
        with self._lock:
            pipe = self.pipeline()
            pipe.unload_action_identifier()  # all of them; nothing happens when none is loaded
            try:
                module.train(args, pipe=pipe, show_progress=progress)
            except LayergenError as exc:
                if "--restage needs --restage_backgrounds" in str(exc):
                    raise LayerError("these exemplars are photos: add photos of other places to put their "
                                     "subjects on, or untick 'shot in one place'") from None
                raise
        return Path(args.output)

    def generate(self, prompt: str, identifiers: dict, num_images: int = 4, seed: int = 0,
                 progress: bool = False) -> list[np.ndarray]:
        """Images (H x W x 3 uint8) for `prompt`; every <name> in it must be among `identifiers` ({token: file})."""
        from ..models.action_identifier import TOKEN_PATTERN

        prompt = str(prompt or "").strip()
        if not prompt:
            raise LayerError("write a prompt, e.g. 'a blue cat in the snow <jump>'")
        if not 1 <= int(num_images) <= MAX_IMAGES:
            raise LayerError(f"number of images must be in [1, {MAX_IMAGES}], got {num_images}")
        tokens = list(dict.fromkeys(TOKEN_PATTERN.findall(prompt)))
        missing = [t for t in tokens if t not in (identifiers or {})]
        if missing:
            have = ", ".join(sorted(identifiers)) if identifiers else "none yet"
            raise LayerError(f"the prompt names {', '.join(missing)}, which is not learned or loaded (have: {have}); "
                             "learn it or load its identifier file first")
        gone = [t for t in tokens if not Path(identifiers[t]).is_file()]
        if gone:  # scratch files are pruned after `keep_seconds`
            raise LayerError(f"the identifier file of {', '.join(gone)} is no longer here (kept for "
                             f"{self.scratch.keep_seconds / 3600:g} h); load it again from the file you downloaded")
        with self._lock:
            pipe = self.pipeline()
            pipe.unload_action_identifier()
            for t in tokens:
                pipe.load_action_identifier(identifiers[t])
            pipe.set_progress_bar_config(disable=not progress)
            try:
                out = pipe(prompt, num_images_per_prompt=int(num_images), seed=int(seed),
                           num_inference_steps=self.num_inference_steps, output_type="np").images
            finally:
                pipe.unload_action_identifier()
        return [np.ascontiguousarray(im) for im in out]  # uint8 RGB

    def read_identifier(self, path) -> str:
        """The token an identifier file defines (a clear error if it is not one, or not for this model)."""
        pipe = self.pipeline()
        with self._lock:
            try:
                return pipe.load_action_identifier(path).token
            finally:
                pipe.unload_action_identifier()


def image_layer(image: np.ndarray, prompt: str):
    """A generated image as a document `Layer` (opaque RGBA), named after its prompt."""
    from ..layers import Layer

    rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    return Layer(rgba, name=(prompt.strip() or "action image")[:60])


def action_tab(backend: ActionBackend | None = None):
    """`(title, builder)` for `build_app(extra_tabs=...)`."""
    backend = backend or ActionBackend()

    def build(ctx) -> None:
        import gradio as gr

        from ..data.figures import ACTIONS, FIGURE_BACKGROUNDS, HELDOUT_ACTIONS
        from .app import _check_seed, _user_errors

        gr.Markdown("Learn an action (a pose such as jumping) from a few exemplar images as a token `<name>`, then "
                    "put it on new subjects: `a blue cat in the snow <jump>` (ADI: layer-wise identifier tokens "
                    "with a gradient-invariance mask; bundled mini model unless the studio was given another).")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                files = gr.File(label="Exemplar images (2 or more; a metadata.jsonl may come with them)",
                                file_count="multiple", file_types=["image", ".jsonl"], elem_id="action-exemplars")
                with gr.Row():
                    example = gr.Dropdown(list(HELDOUT_ACTIONS) + [a for a in ACTIONS if a not in HELDOUT_ACTIONS],
                                          value=HELDOUT_ACTIONS[0], label="Example action", elem_id="action-example",
                                          scale=2)
                    example_btn = gr.Button("Make example exemplars", size="sm", elem_id="action-example-button",
                                            scale=1)
                name = gr.Textbox(label="Name (use it as <name> in prompts)", value=HELDOUT_ACTIONS[0],
                                  max_length=40, elem_id="action-name")
                steps = gr.Slider(10, MAX_STEPS, value=600, step=10, label="Steps", elem_id="action-steps")
                with gr.Accordion("Exemplars shot in one place", open=False):
                    one_place = gr.Checkbox(label="They all share one place: keep it out of new images",
                                            elem_id="action-one-place")
                    example_place = gr.Dropdown(["(different places)"] + list(FIGURE_BACKGROUNDS),
                                                value="(different places)", label="Example exemplars' place",
                                                elem_id="action-example-place")
                    places = gr.File(label="Photos of other places (for photo exemplars)", file_count="multiple",
                                     file_types=["image"], elem_id="action-places")
                learn_btn = gr.Button("Learn action", variant="primary", elem_id="action-learn")
                learned = gr.Markdown(elem_id="action-learned")
                ident_file = gr.File(label="Identifier file (download; `layergen action generate -i`)",
                                     interactive=False, elem_id="action-identifier-file")
                uploads = gr.File(label="Or load identifier files (.safetensors)", file_count="multiple",
                                  file_types=[".safetensors"], elem_id="action-load")
            with gr.Column(scale=2, min_width=320):
                prompt = gr.Textbox(label="Prompt", value=f"a blue cat in the snow <{HELDOUT_ACTIONS[0]}>",
                                    max_length=300, elem_id="action-prompt")
                with gr.Row():
                    num = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Images", elem_id="action-num")
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=2**31 - 1,
                                     elem_id="action-seed")
                gen_btn = gr.Button("Generate", variant="primary", elem_id="action-generate")
                gallery = gr.Gallery(label="Images", columns=4, height=300, interactive=False, format="png",
                                     elem_id="action-gallery")
                with gr.Row():
                    pick = gr.Number(label="Image # to add", value=1, precision=0, minimum=1, maximum=MAX_IMAGES,
                                     elem_id="action-pick")
                    add_btn = gr.Button("Add image to the layered document", size="sm", elem_id="action-add")
                status = gr.Markdown(elem_id="action-status")
        identifiers = gr.State({})       # token -> identifier file
        images_state = gr.State(None)    # (prompt, [H x W x 3 uint8])

        def code(text: str) -> str:
            """Markdown code span: a prompt's <name> tokens would otherwise be read as HTML tags and vanish."""
            return "`" + str(text).replace("`", "'") + "`"

        def listing(idents: dict) -> str:
            return "Identifiers: " + (", ".join(f"`{t}`" for t in sorted(idents)) if idents else "none yet")

        @_user_errors
        def make_examples(action, place):
            paths = backend.make_exemplars(action, None if place == "(different places)" else place)
            return [str(p) for p in paths], action

        @_user_errors
        def learn(file_list, name_value, steps_value, shared_place, place_files, idents,
                  progress=gr.Progress(track_tqdm=True)):
            token = f"<{_name(name_value)}>"
            progress(0, desc=f"Learning {token}")
            path = backend.learn(file_list, name_value, int(steps_value), bool(shared_place), place_files,
                                 progress=True)
            idents = {**(idents or {}), token: str(path)}
            return idents, str(path), f"Learned `{token}` in {int(steps_value)} steps. " + listing(idents)

        @_user_errors
        def load(file_list, idents):
            idents = dict(idents or {})
            for f in file_list or []:
                idents[backend.read_identifier(f)] = str(f)
            return idents, listing(idents)

        @_user_errors
        def generate(text, n, seed_value, idents, progress=gr.Progress(track_tqdm=True)):
            s = _check_seed(seed_value)
            progress(0, desc="Generating")
            images = backend.generate(text, idents, int(n), s, progress=True)
            return (text, images), images, 1, f"{len(images)} images of {code(text)}, seed {s}."

        def pick_image(evt: gr.SelectData):
            return int(evt.index) + 1

        def picked_image(shown, k):
            if not shown:
                raise LayerError("generate images first")
            text, images = shown
            k = int(k or 1)
            if not 1 <= k <= len(images):
                raise LayerError(f"pick an image from 1 to {len(images)}, got {k}")
            return image_layer(images[k - 1], text)

        add_and_say = ctx.adds_layer(picked_image, "Add action image", lambda shown, k: f"image {int(k or 1)}")

        example_btn.click(make_examples, [example, example_place], [files, name], api_name="make_action_exemplars")
        learn_btn.click(learn, [files, name, steps, one_place, places, identifiers],
                        [identifiers, ident_file, learned], api_name="learn_action",
                        concurrency_id="action-model", concurrency_limit=1, show_progress_on=[learned])
        uploads.upload(load, [uploads, identifiers], [identifiers, learned], api_name="load_action_identifiers")
        gen_btn.click(generate, [prompt, num, seed, identifiers], [images_state, gallery, pick, status],
                      api_name="generate_action", concurrency_id="action-model", concurrency_limit=1,
                      show_progress_on=[status])
        gallery.select(pick_image, None, [pick], api_name=False)
        add_btn.click(add_and_say, [ctx.doc, images_state, pick, status], [*ctx.outputs, status],
                      show_progress_on=[status], api_name="add_action_image")

    return TAB_TITLE, build
