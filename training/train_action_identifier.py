#!/usr/bin/env python
"""Learn an action identifier from a few exemplar images (ADI; Textual Inversion as a baseline).

    accelerate launch training/train_action_identifier.py --exemplars exemplars/ --name jump \\
        --output_dir runs/action-jump --steps 600

`exemplars/` holds images of *different* subjects doing the same action, and optionally a
`metadata.jsonl` (one JSON object per image: `file_name`, `caption` describing subject and
background without the action, and for procedural figures `species`/`colour`/`background`;
`layergen action exemplars` writes one). The result is `<output_dir>/<name>.safetensors`
(or `--output`), usable as ``pipe.load_action_identifier(path)`` and in prompts as ``<name>``.

Methods (`--method`):
* ``adi`` — layer-wise output-space tokens (`--shared_token` for one token for all layers)
  trained with the gradient-invariance mask (`--mask_quantile 0` disables it).
* ``textual_inversion`` — one input-space token, no mask (the classic baseline).

Every step draws `--train_batch_size` anchor exemplars; each anchor i is paired with a
*context-different* partner (another exemplar, same action) and, when masking, an
*action-different* partner (same subject and background, another action), all three with
the same noise and timestep. The update is the mean gradient of anchors and context
partners (all exemplars of the action); the action partners only inform the mask. Where the
action-different images come from is `--contrast`:
  render   procedural figures: the same species/colour/background in other (seen) poses;
  generate the base model draws the exemplar's caption (no identifier) — its pose prior;
  dir      `--contrast_dir` images named `<exemplar stem>*.png`;
  none     context pairs only: the mask keeps the channels least sensitive to context;
  auto     render if the metadata allows, else generate if there are captions, else none.

Context the exemplars *share* (all shot in one place) never changes inside such a triple, so neither the mask
nor the averaged update can tell it from the action. `--restage` puts each exemplar's subject (same pose) on
other backgrounds: `mask` makes that copy of the anchor the mask's context-different sample (only the place
changes; the update is unchanged), `train` also adds the copies to the update, so the action is learned over
several places. Cut-outs: exact mattes for procedural figures passed in memory (`matte`), otherwise
`layergen.decompose`'s automatic proposal + closed-form matting. Backgrounds: `--restage_backgrounds DIR`,
or, for procedural figures, the other figure backgrounds.

`--mask_basis eigen` masks *directions* instead of channels: the `--mask_quantile` fraction of each row's
directions whose gradient differences are most context-like (eigenvectors of the difference of the action- and
context-difference covariances) is frozen. On the mini model pose and context share channels, so a channel mask
that keeps a place out keeps the action out too; a few directions (2 %) with `--restage mask` do not
(docs/actions.md, session 20).

Resume with `--resume_from_checkpoint latest`; validation grids go to `<output_dir>`.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from PIL import Image
from tqdm.auto import tqdm

from layergen.errors import LayergenError
from layergen.layers.compositing import to_uint8
from layergen.layers.formats._common import decode_image
from layergen.models.action_identifier import (ActionIdentifier, GradientInvarianceMasker, identifier_masks,
                                               input_embedding_override, install_identifier_processors,
                                               limit_row_norms, masked_step, substitute_identifiers)
from layergen.training_utils import (due, finish_step, non_negative_float, positive_int, resume_step, run_script,
                                     save_image_grid, start_accelerator, step_schedule)

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def default_model() -> str:
    from layergen.mini import MINI_PATH

    return str(MINI_PATH / "action")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Learn an action identifier from exemplar images (ADI).")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="ActionPipeline folder (default: the bundled assets/layergen-mini/action).")
    p.add_argument("--exemplars", default=None, help="Folder of exemplar images (+ optional metadata.jsonl).")
    p.add_argument("--name", required=True, help="Identifier name: used in prompts as <name>.")
    p.add_argument("--output_dir", required=True, help="Checkpoints and validation images.")
    p.add_argument("--output", default=None, help="Identifier file (default <output_dir>/<name>.safetensors).")
    p.add_argument("--method", default="adi", choices=["adi", "textual_inversion"])
    p.add_argument("--shared_token", action="store_true",
                   help="ADI ablation: one token for every cross-attention layer instead of one per layer.")
    p.add_argument("--initializer_token", default="pose", help="Word the identifier starts from (and stands in "
                                                                "for when the prompt is encoded).")
    p.add_argument("--template", default=None,
                   help="Training prompt; {caption} is the exemplar's caption, {token} the identifier. "
                        "Default: '{caption} {token}' for adi, 'a {token}' for textual_inversion.")
    p.add_argument("--num_exemplars", type=int, default=4, help="Use the first N exemplars (sorted by name).")
    p.add_argument("--steps", "--max_train_steps", dest="max_train_steps", type=int, default=600)
    p.add_argument("--train_batch_size", type=positive_int, default=4, help="Anchors per step (each brings partners).")
    p.add_argument("--learning_rate", type=non_negative_float, default=None,
                   help="Default 5e-2 (output-space tokens) or 2e-2 (textual inversion); see docs/actions.md.")
    p.add_argument("--weight_decay", type=float, default=1e-2)
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--mask_quantile", type=float, default=None,
                   help="Fraction of each layer's channels (or directions) masked as action-agnostic per step "
                        "(0 = no mask; default 0.5 for channels, 0.02 for directions).")
    p.add_argument("--mask_basis", default="channel", choices=["channel", "eigen"],
                   help="channel: mask identifier channels (ADI); eigen: freeze the --mask_quantile fraction of "
                        "directions whose gradient differences are most context-like (eigenvectors of the "
                        "difference of the two gradient-difference covariances). With --restage mask it keeps a "
                        "place all exemplars share out of new images (docs/actions.md)")
    p.add_argument("--mask_momentum", type=float, default=0.98,
                   help="EMA of the mask statistics across steps. One step's channel score is mostly noise "
                        "(docs/actions.md), so the default averages ~50 steps; 0 = a fresh mask every step.")
    p.add_argument("--max_norm_ratio", type=float, default=0.0,
                   help="Cap each identifier row's norm at this multiple of its initial norm, rescaling only "
                        "the channels updated this step (0 = no cap).")
    p.add_argument("--contrast", default="auto", choices=["auto", "render", "generate", "dir", "none"])
    p.add_argument("--contrast_dir", default=None)
    p.add_argument("--num_contrast", type=int, default=3, help="Action-different images per exemplar.")
    p.add_argument("--restage", default="off", choices=["off", "mask", "train"],
                   help="Put each exemplar's subject on other backgrounds, for exemplars all shot in one place: "
                        "'mask' = as the mask's context-different sample (instead of another exemplar), 'train' = "
                        "that and in the update too.")
    p.add_argument("--restage_backgrounds", default=None,
                   help="Folder of background images for --restage (procedural figures: not needed, their other "
                        "backgrounds are drawn).")
    p.add_argument("--num_restaged", type=positive_int, default=3, help="Restaged images per exemplar.")
    p.add_argument("--timestep_sampling", default="focal", choices=["uniform", "focal"],
                   help="'focal' (default): p(t) ~ 1 - 0.5 cos(pi t / T), favouring the noisy steps where pose is "
                        "decided (ReVersion's relation-focal sampling); the pipeline applies identifiers in those "
                        "steps only (identifier_steps). 'uniform': every timestep alike.")
    p.add_argument("--validation_prompt", action="append", default=None,
                   help="Prompt containing {token}; repeat for several. Default: three unseen subjects.")
    p.add_argument("--validation_steps", type=int, default=100)
    p.add_argument("--num_validation_images", type=int, default=2)
    p.add_argument("--checkpointing_steps", type=int, default=100)
    p.add_argument("--checkpoints_total_limit", type=int, default=2)
    p.add_argument("--resume_from_checkpoint", default=None)
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--report_to", default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.method == "textual_inversion" and args.shared_token:
        p.error("--shared_token is an ADI ablation; textual inversion always has one token")
    if args.learning_rate is None:
        args.learning_rate = 2e-2 if args.method == "textual_inversion" else 5e-2
    if args.template is None:
        args.template = "a {token}" if args.method == "textual_inversion" else "{caption} {token}"
    if args.mask_basis == "eigen" and args.max_norm_ratio > 0:
        p.error("--max_norm_ratio rescales whole channels, which would move the eigen mask's frozen directions; "
                "use it with --mask_basis channel")
    if args.mask_quantile is None:  # a few directions carry what half of the channels do
        args.mask_quantile = 0.02 if args.mask_basis == "eigen" else 0.5
    if args.method == "textual_inversion":
        args.mask_quantile = 0.0
    if args.num_exemplars < 2:
        p.error("--num_exemplars must be at least 2 (context pairs need two subjects)")
    if args.max_train_steps < 0:  # 0 is allowed: the initial identifier (the mask benchmark measures it)
        p.error(f"--steps must be >= 0, got {args.max_train_steps}")
    return args


def token_of(name: str) -> str:
    name = name.strip().strip("<>")
    if not name or any(c.isspace() for c in name):
        raise LayergenError(f"identifier name must be one word, got {name!r}")
    return f"<{name}>"


# ---------------------------------------------------------------------------------------------
# data


def image_files(folder: Path) -> list[Path]:
    """The image files of `folder`, sorted by name ([] when it is not a folder)."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def read_rgb(path: Path, size: int) -> np.ndarray:
    """An image file as uint8 RGB, resized to size x size; a corrupt file is a clear FormatError."""
    rgb = decode_image(path.read_bytes(), str(path))[..., :3]
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.LANCZOS))


def read_exemplars(folder, limit: int | None = None, size: int = 128) -> list[dict]:
    """Images (RGB uint8, resized) + their metadata.jsonl rows, sorted by file name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LayergenError(f"{folder}: not a folder of exemplar images")
    meta = {}
    if (folder / "metadata.jsonl").is_file():
        for n, line in enumerate((folder / "metadata.jsonl").read_text().splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                    meta[row["file_name"]] = row
                except (ValueError, KeyError, TypeError):
                    raise LayergenError(f"{folder / 'metadata.jsonl'}, line {n}: not a JSON object with a "
                                        "\"file_name\" (one per line, as `layergen action exemplars` writes)") from None
    files = image_files(folder)
    if limit:
        files = files[:limit]
    if len(files) < 2:
        raise LayergenError(f"{folder}: need at least 2 exemplar images, found {len(files)}")
    return [{"image": read_rgb(f, size), "stem": f.stem, **meta.get(f.name, {})} for f in files]


def build_contrast(args, exemplars, pipe, size: int) -> list[list[dict]]:
    """Action-different images per exemplar (see the module docstring for the sources)."""
    source = args.contrast
    procedural = all(all(k in e for k in ("species", "colour", "background")) for e in exemplars)
    if source == "auto":
        source = "render" if procedural else ("generate" if all(e.get("caption") for e in exemplars) else "none")
    if source == "none" or args.mask_quantile <= 0:
        return [[] for _ in exemplars]
    if source == "render":
        if not procedural:
            raise LayergenError("--contrast render needs species/colour/background in metadata.jsonl")
        from layergen.data.figures import contrast_set

        return [[{"image": s.image, "caption": s.caption()} for s in
                 contrast_set(e["species"], e["colour"], e["background"], e.get("action", ""), args.num_contrast,
                              seed=args.seed + i, size=size)] for i, e in enumerate(exemplars)]
    if source == "dir":
        if not args.contrast_dir:
            raise LayergenError("--contrast dir needs --contrast_dir")
        folder = Path(args.contrast_dir)
        files = image_files(folder)
        out = [[{"image": read_rgb(f, size), "caption": e.get("caption")}
                for f in files if f.stem.startswith(e["stem"])] for e in exemplars]
        if not any(out):
            raise LayergenError(f"{folder}: no image named after an exemplar (<stem>*.png)")
        return out
    # generate: the base model's own rendering of each exemplar's caption
    if not all(e.get("caption") for e in exemplars):
        raise LayergenError("--contrast generate needs a caption per exemplar in metadata.jsonl")
    out = []
    for i, e in enumerate(exemplars):
        imgs = pipe([e["caption"]] * args.num_contrast, seed=args.seed * 100 + i, output_type="np").images
        out.append([{"image": im, "caption": e["caption"]} for im in imgs])
    return out


def cut_out(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(premultiplied subject H x W x 3 float, alpha H x W) of an exemplar photo: the largest automatic instance
    proposal (`layergen.decompose`), refined by closed-form matting."""
    from layergen.decompose import AutomaticProposer, ClosedFormMatting

    rgb = image.astype(np.float32) / 255.0
    proposals = AutomaticProposer()(rgb)
    if not proposals:
        raise LayergenError("--restage: found no subject to cut out of an exemplar; leave --restage off")
    body = max(proposals, key=lambda q: q.area).mask
    alpha = ClosedFormMatting()(rgb, body.astype(np.float32))
    return rgb * alpha[..., None], alpha


def build_restaged(args, exemplars, size: int) -> list[list[dict]]:
    """Per exemplar, `--num_restaged` copies of its subject on other backgrounds (see the module docstring)."""
    from layergen.data.figures import FIGURE_BACKGROUNDS, render_background, subject_caption

    if args.restage == "off" or (args.restage == "mask" and args.mask_quantile <= 0):
        return [[] for _ in exemplars]
    files = []
    if args.restage_backgrounds:
        folder = Path(args.restage_backgrounds)
        files = image_files(folder)
        if not files:
            raise LayergenError(f"--restage_backgrounds {folder}: no background images there")
    rng = np.random.default_rng([int(args.seed), 43])
    out = []
    for i, e in enumerate(exemplars):
        procedural = e.get("background") in FIGURE_BACKGROUNDS and "species" in e and "colour" in e
        if not files and not procedural:
            raise LayergenError("--restage needs --restage_backgrounds DIR (other places to put "
                                "the exemplars' subjects on)")
        figure, alpha = e["matte"] if e.get("matte") is not None else cut_out(e["image"])
        if files:
            picks = [files[int(k)] for k in rng.permutation(len(files))[: args.num_restaged]]
            backdrops = [(read_rgb(f, size).astype(np.float32) / 255.0, e.get("caption")) for f in picks]
        else:
            others = [b for b in FIGURE_BACKGROUNDS if b != e["background"]]
            picks = [others[int(k)] for k in rng.permutation(len(others))[: args.num_restaged]]
            backdrops = [(render_background(b, size, np.random.default_rng([int(args.seed), 47, i, k]))[0],
                          subject_caption(e["species"], e["colour"], b)) for k, b in enumerate(picks)]
        out.append([{"image": to_uint8(figure + (1 - alpha)[..., None] * bg), "caption": caption}
                    for bg, caption in backdrops])
    return out


@torch.no_grad()
def encode_images(pipe, images) -> torch.Tensor:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return pipe.encode_condition_rgb(x).float()


def prompt_for(template: str, caption: str | None, token: str) -> str:
    text = template.replace("{caption}", caption or "a").replace("{token}", token)
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------
# text states


class TextStates:
    """Encodes training prompts. Output-space identifiers see fixed states (cached, no grad);
    textual inversion re-encodes with the learned input vector each step (grad through the encoder)."""

    def __init__(self, pipe, ident: ActionIdentifier):
        self.pipe, self.ident = pipe, ident
        self.max_length = min(int(getattr(pipe.tokenizer, "model_max_length", 77) or 77), 77)
        self.cache = {}

    def _tokens(self, prompts):
        texts, spans = substitute_identifiers(prompts, {self.ident.token: self.ident})
        masks = identifier_masks(self.pipe.tokenizer, texts, spans, self.max_length)
        return texts, masks[self.ident.token]

    def _encode(self, texts):
        pipe = self.pipe
        tok = pipe._tokenize(pipe.tokenizer, texts)
        if pipe.text_encoder_2 is not None:
            h1, _ = pipe._run_text_encoder(pipe.text_encoder, tok, True)
            h2, pooled = pipe._run_text_encoder(pipe.text_encoder_2, pipe._tokenize(pipe.tokenizer_2, texts), True)
            return torch.cat([h1, h2], -1).float(), pooled.float()
        return pipe._run_text_encoder(pipe.text_encoder, tok, False)[0].float(), None

    def fixed(self, prompts):
        """(states B x S x D, pooled or None, mask B x S) with no identifier inside (output-space kinds)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            texts, masks = self._tokens(missing)
            with torch.no_grad():
                states, pooled = self._encode(texts)
            for k, p in enumerate(missing):
                self.cache[p] = (states[k], None if pooled is None else pooled[k], masks[k])
        items = [self.cache[p] for p in prompts]
        pooled = None if items[0][1] is None else torch.stack([i[1] for i in items])
        return torch.stack([i[0] for i in items]), pooled, torch.stack([i[2] for i in items])

    def with_input(self, prompts, override):
        """Textual inversion: encode with the per-sample input vectors `override` (B x 1 x D), with grad."""
        texts, mask = self._tokens(prompts)
        with input_embedding_override(self.pipe.text_encoder, self.ident, mask.to(override.device), override):
            states, pooled = self._encode(texts)
        return states, pooled, mask

    @torch.no_grad()
    def initial_vector(self, prompts) -> torch.Tensor:
        """Output-space init: the encoder's output at the initializer word, averaged over prompts."""
        if self.ident.kind == "input":
            ids = self.pipe.tokenizer(self.ident.config.initializer, add_special_tokens=False).input_ids
            return self.pipe.text_encoder.get_input_embeddings().weight[ids].mean(0).float()
        states, _, mask = self.fixed(prompts)
        return states[mask].mean(0)


# ---------------------------------------------------------------------------------------------
# one step


def sample_timesteps(n, num_train, mode, gen):
    if mode == "uniform":
        return torch.randint(0, num_train, (n,), generator=gen)
    t = torch.arange(num_train, dtype=torch.float)
    w = 1 - 0.5 * torch.cos(math.pi * t / num_train)
    return torch.multinomial(w, n, replacement=True, generator=gen)


class TripleDraw(NamedTuple):
    anchor: torch.Tensor    # (b,) exemplar index
    partner: torch.Tensor   # (b,) another exemplar: the context-different sample
    noise: torch.Tensor     # (b, *latent_shape), shared by the three samples of a triple
    t: torch.Tensor         # (b,) timestep, shared likewise
    pick: list[int] | None  # per anchor, which of its action-different samples (None: no contrast)
    restaged: list[int] | None = None  # per anchor, which of its restaged copies (None: exemplar partners)


def draw_triples(gen, batch: int, n_exemplars: int, latent_shape, num_train: int, sampling: str,
                 contrast_sizes=None, restaged_sizes=None) -> TripleDraw:
    """One step's random draws, always in this order, so that the mask benchmark measures the very triples
    the trainer learns from (same generator, same draws); restaged picks come last, so runs without them draw
    exactly as before."""
    anchor = torch.randint(0, n_exemplars, (batch,), generator=gen)
    partner = (anchor + torch.randint(1, n_exemplars, (batch,), generator=gen)) % n_exemplars
    noise = torch.randn((batch,) + tuple(latent_shape), generator=gen)
    t = sample_timesteps(batch, num_train, sampling, gen)
    pick = restaged = None
    if contrast_sizes is not None:
        pick = [int(torch.randint(0, contrast_sizes[i], (1,), generator=gen)) for i in anchor.tolist()]
    if restaged_sizes is not None:
        restaged = [int(torch.randint(0, restaged_sizes[i], (1,), generator=gen)) for i in anchor.tolist()]
    return TripleDraw(anchor, partner, noise, t, pick, restaged)


def unet_kwargs(pipe, pooled, n, size):
    if getattr(pipe.unet.config, "addition_embed_type", None) != "text_time":
        return {}
    return {"added_cond_kwargs": pipe._added_cond_kwargs(pooled, size, size, n)}


def per_sample_grads(pipe, ident, states_fn, latents, prompts, noise, t, noise_scheduler, size,
                     per_sample: bool = True):
    """Denoising loss of each sample and d(loss_b)/d(embeddings), one forward/backward for the batch.

    `per_sample=False` (no mask needs them): input-space identifiers encode each distinct prompt
    once (textual inversion's "a <token>" is one prompt for the whole batch; the text encoder
    dominates the step), and row b of the result holds the summed gradient of every sample
    sharing its prompt (zero for the others) — the same mean gradient, several times cheaper.
    """
    n = latents.shape[0]
    override = ident.embeddings.detach()[None].expand(n, -1, -1).clone().requires_grad_(True)
    router = install_identifier_processors(pipe.unet)
    if ident.kind == "input" and not per_sample:
        unique = list(dict.fromkeys(prompts))
        first = [prompts.index(u) for u in unique]
        where = torch.tensor([unique.index(p) for p in prompts], device=latents.device)
        states, pooled, _ = states_fn.with_input(unique, override[first])
        states, pooled = states[where], (None if pooled is None else pooled[where])
        noisy = noise_scheduler.add_noise(latents, noise, t)
        pred = pipe.unet(noisy, t, encoder_hidden_states=states.to(latents),
                         **unet_kwargs(pipe, pooled, n, size)).sample
    elif ident.kind == "input":
        states, pooled, _ = states_fn.with_input(prompts, override)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        pred = pipe.unet(noisy, t, encoder_hidden_states=states.to(latents),
                         **unet_kwargs(pipe, pooled, n, size)).sample
    else:
        states, pooled, mask = states_fn.fixed(prompts)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        with router.bind(ident, mask.to(latents.device), override):
            pred = pipe.unet(noisy, t, encoder_hidden_states=states.to(latents),
                             **unet_kwargs(pipe, pooled, n, size)).sample
    pt = noise_scheduler.config.prediction_type
    goal = noise if pt == "epsilon" else (noise_scheduler.get_velocity(latents, noise, t) if pt == "v_prediction"
                                          else latents)
    loss = F.mse_loss(pred.float(), goal.float(), reduction="none").mean(dim=(1, 2, 3))
    (grad,) = torch.autograd.grad(loss.sum(), override)
    return loss.detach(), grad


# ---------------------------------------------------------------------------------------------
# validation & saving


def default_validation_prompts(token: str) -> list[str]:
    return [f"a green cat in the snow {token}", f"a purple robot on a beach {token}",
            f"an orange frog in a room {token}"]


@torch.no_grad()
def log_validation(args, pipe, ident, path):
    from copy import deepcopy

    prompts = [p.replace("{token}", ident.token) for p in (args.validation_prompt or
                                                           default_validation_prompts("{token}"))]
    saved = dict(pipe._action_identifiers)
    try:
        pipe.load_action_identifier(deepcopy(ident).eval().requires_grad_(False))
        images = pipe(prompts, num_images_per_prompt=args.num_validation_images, seed=args.seed,
                      output_type="np").images
    finally:
        pipe._action_identifiers = saved
    save_image_grid(list(images), path, cols=args.num_validation_images * len(prompts))


def load_pipeline(path):
    from layergen.pipelines.pipeline_action import ActionPipeline

    pipe = ActionPipeline.from_pretrained(path or default_model())
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------


def train(args, pipe=None, exemplars=None, contrast=None, accelerator=None, show_progress=True) -> ActionIdentifier:
    """The training loop; the benchmark calls it with a loaded pipeline and in-memory exemplars.

    `exemplars`: list of dicts with `image` (uint8 H x W x 3), optional `caption`, and optionally the
    procedural metadata and `matte` (see `build_restaged`);
    `contrast`: per exemplar, a list of such dicts (action-different samples), or None to build them.
    """
    accelerator = accelerator or start_accelerator(args, "train_action_identifier")
    set_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = pipe or load_pipeline(args.pretrained_model_name_or_path)
    pipe.to(accelerator.device)
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    if pipe.unet.config.in_channels != pipe.latent_channels:
        raise LayergenError("action identifiers need a plain text-to-image UNet "
                            f"(in_channels {pipe.unet.config.in_channels} != latent channels {pipe.latent_channels})")
    size = pipe.default_size()
    if exemplars is None:
        if not args.exemplars:
            raise LayergenError("pass --exemplars FOLDER")
        exemplars = read_exemplars(args.exemplars, args.num_exemplars, size)
    exemplars = exemplars[: args.num_exemplars]
    if len(exemplars) < 2:
        raise LayergenError("need at least 2 exemplars")
    pipe._guidance_scale = 5.0
    if contrast is None:
        contrast = build_contrast(args, exemplars, pipe, size)
    restaged_sets = build_restaged(args, exemplars, size)
    token = token_of(args.name)

    kind = "input" if args.method == "textual_inversion" else ("shared" if args.shared_token else "layerwise")
    ident = ActionIdentifier.for_unet(pipe.unet, token, kind=kind, initializer=args.initializer_token,
                                      embedding_dim=(pipe.text_encoder.get_input_embeddings().embedding_dim
                                                     if kind == "input" else None),
                                      base_model=str(pipe.config.get("_name_or_path") or "") or None)
    ident.to(accelerator.device)
    states = TextStates(pipe, ident)
    prompts = [prompt_for(args.template, e.get("caption"), token) for e in exemplars]
    with torch.no_grad():
        ident.embeddings.copy_(states.initial_vector(prompts)[None].expand_as(ident.embeddings))
    max_norms = ident.embeddings.detach().norm(dim=-1) * args.max_norm_ratio
    masker = GradientInvarianceMasker(ident.num_rows, ident.embeddings.shape[1], args.mask_quantile,
                                      args.mask_momentum, args.mask_basis).to(accelerator.device)

    x_ex = encode_images(pipe, [e["image"] for e in exemplars])
    has_contrast = args.mask_quantile > 0 and all(len(c) > 0 for c in contrast)
    if has_contrast:
        x_ct = [encode_images(pipe, [c["image"] for c in cs]) for cs in contrast]
        p_ct = [[prompt_for(args.template, c.get("caption") or exemplars[i].get("caption"), token) for c in cs]
                for i, cs in enumerate(contrast)]
    has_restaged = all(len(c) > 0 for c in restaged_sets)
    if has_restaged:
        x_rs = [encode_images(pipe, [c["image"] for c in cs]) for cs in restaged_sets]
        p_rs = [[prompt_for(args.template, c.get("caption"), token) for c in cs] for cs in restaged_sets]

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    noise_scheduler.alphas_cumprod = noise_scheduler.alphas_cumprod.to(accelerator.device)
    optimizer = torch.optim.AdamW([ident.embeddings], lr=args.learning_rate, weight_decay=args.weight_decay)
    lr_sched = step_schedule(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.lr_warmup_steps)),
                             accelerator.num_processes)
    optimizer, lr_sched = accelerator.prepare(optimizer, lr_sched)
    accelerator.register_for_checkpointing(ident)
    accelerator.register_for_checkpointing(masker)
    global_step = resume_step(accelerator, out, args.resume_from_checkpoint)

    gen = torch.Generator().manual_seed(args.seed * 1000 + global_step * accelerator.num_processes
                                        + accelerator.process_index)
    n_ex = len(exemplars)
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc=f"identifier {token}",
                    disable=not (show_progress and accelerator.is_local_main_process))
    num_train = noise_scheduler.config.num_train_timesteps
    while global_step < args.max_train_steps:
        b = args.train_batch_size
        anchor, partner, noise, t, pick, restaged = draw_triples(
            gen, b, n_ex, x_ex.shape[1:], num_train, args.timestep_sampling,
            [len(x) for x in x_ct] if has_contrast else None, [len(x) for x in x_rs] if has_restaged else None)
        lat = [x_ex[anchor], x_ex[partner]]
        prm = [prompts[i] for i in anchor.tolist()] + [prompts[i] for i in partner.tolist()]
        if has_contrast:
            lat.append(torch.stack([x_ct[i][k] for i, k in zip(anchor.tolist(), pick)]))
            prm += [p_ct[i][k] for i, k in zip(anchor.tolist(), pick)]
        if has_restaged:  # last, after the action partner
            lat.append(torch.stack([x_rs[i][k] for i, k in zip(anchor.tolist(), restaged)]))
            prm += [p_rs[i][k] for i, k in zip(anchor.tolist(), restaged)]
        k = len(lat)
        latents = torch.cat(lat).to(accelerator.device)
        loss, grad = per_sample_grads(pipe, ident, states, latents, prm, noise.repeat(k, 1, 1, 1).to(latents),
                                      t.repeat(k).to(latents.device), noise_scheduler, size,
                                      per_sample=args.mask_quantile > 0)
        grad = accelerator.gather(grad.contiguous()) if accelerator.num_processes > 1 else grad
        g = grad.view(accelerator.num_processes, k, b, *grad.shape[1:]).transpose(0, 1).reshape(k, -1,
                                                                                                  *grad.shape[1:])
        keep = None
        if args.mask_quantile > 0:
            keep = masker.update(g[0], g[-1] if has_restaged else g[1], g[2] if has_contrast else None)
        learn_from = [g[0], g[1]] + ([g[-1]] if has_restaged and args.restage == "train" else [])
        ident.embeddings.grad = torch.stack(learn_from).mean(dim=(0, 1)).to(ident.embeddings.dtype)
        masked_step(optimizer, ident.embeddings, keep)
        if args.max_norm_ratio > 0:
            limit_row_norms(ident.embeddings, max_norms, keep)
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        global_step = finish_step(accelerator, args, out, global_step, progress, {"loss": loss[:2 * b]})
        if accelerator.is_main_process and due(global_step, args.validation_steps):
            log_validation(args, pipe, ident, out / f"validation-{global_step}.png")

    accelerator.wait_for_everyone()
    ident.extra_metadata = {"method": args.method, "steps": str(args.max_train_steps),
                            "mask_quantile": str(args.mask_quantile), "num_exemplars": str(n_ex),
                            "template": args.template, "restage": args.restage, "mask_basis": args.mask_basis}
    if accelerator.is_main_process:
        dest = Path(args.output) if args.output else out / f"{args.name.strip('<>')}.safetensors"
        ident.save(dest)
        accelerator.print(f"saved {dest}")
    return ident.eval().requires_grad_(False)


def main(argv=None):
    args = parse_args(argv)
    accelerator = start_accelerator(args, "train_action_identifier")  # also sets up logging
    train(args, accelerator=accelerator)
    accelerator.end_training()


if __name__ == "__main__":
    run_script(main)
