"""Text -> opaque image with learned action identifiers: ``pipe("a blue cat <jump>")``.

An ordinary text-to-image pipeline (the LayerDiffusion machinery minus transparency) that
understands identifier tokens: `load_action_identifier` installs per-layer routing on the
UNet's cross-attention processors (see `layergen.models.action_identifier`), and every call
binds the identifiers its prompts name to their token positions — in the conditional and the
unconditional half of the classifier-free-guidance batch alike.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from PIL import Image
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import LayergenError
from ..models.action_identifier import (TOKEN_PATTERN, ActionIdentifier, identifier_masks,
                                        input_embedding_override, install_identifier_processors,
                                        substitute_identifiers, uninstall_identifier_processors)
from .layer_diffusion import LayerDiffusionPipelineBase, make_generator_list

LINK_FILE = "linked.json"
# share of denoising steps (noisiest first) in which identifiers act by default; see __call__ and docs/actions.md
DEFAULT_IDENTIFIER_STEPS = 0.7


@dataclass
class ActionPipelineOutput(BaseOutput):
    """`images`: PIL RGB images (or a uint8 N x H x W x 3 array, or latents)."""

    images: Any


class ActionPipeline(LayerDiffusionPipelineBase):
    """Prompt (optionally naming action identifiers) -> RGB images.

    Components: `vae`, `text_encoder`, `tokenizer` (+ `_2` for SDXL), `unet`, `scheduler`.

    Example:
        >>> pipe = ActionPipeline.from_pretrained("assets/layergen-mini/action")
        >>> pipe.load_action_identifier("jump.safetensors")          # token "<jump>"
        >>> pipe("a blue cat in the snow <jump>", seed=0).images[0].save("cat.png")
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["text_encoder_2", "tokenizer_2"]
    output_types = ("pil", "np", "latent")

    def __init__(self, vae: AutoencoderKL, text_encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 unet: UNet2DConditionModel, scheduler: SchedulerMixin, text_encoder_2: PreTrainedModel | None = None,
                 tokenizer_2: PreTrainedTokenizerBase | None = None):
        super(LayerDiffusionPipelineBase, self).__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              scheduler=scheduler, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        self.transparent_encoder = None
        self._action_identifiers: dict[str, ActionIdentifier] = {}

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """As the base class, plus: a component folder holding only `linked.json` ({"path": "../../vae",
        "class": "AutoencoderKL"}, relative to that folder or absolute) loads the component from the
        linked folder, so a model can share another model's VAE instead of shipping a copy."""
        from ..mini import check_model_dir

        path = check_model_dir(pretrained_model_name_or_path)
        for sub in Path(path).iterdir():
            link = sub / LINK_FILE
            if sub.name in kwargs or not link.is_file():
                continue
            spec = json.loads(link.read_text())
            target = (sub / spec["path"]).resolve()
            import diffusers

            klass = getattr(diffusers, spec.get("class", "AutoencoderKL"), None)
            if klass is None or not target.is_dir():
                raise LayergenError(f"{link}: cannot load {spec.get('class')} from {target}")
            kwargs[sub.name] = klass.from_pretrained(target, local_files_only=True)
        return super().from_pretrained(path, **kwargs)

    @property
    def action_identifiers(self) -> dict:
        """token -> `ActionIdentifier` currently loaded."""
        return dict(self._action_identifiers)

    def load_action_identifier(self, identifier, token: str | None = None, strict: bool = True) -> ActionIdentifier:
        """Load an identifier file (or object) for use in prompts; `token` renames it (e.g. "<leap>").

        Raises a clear `LayergenError` if it was learned for another UNet (other layers, width or
        weights); `strict=False` skips only the weights check.
        """
        ident = identifier if isinstance(identifier, ActionIdentifier) else ActionIdentifier.load(identifier)
        if token is not None and token != ident.token:
            ident = ident.renamed(token)
        ident.check_compatible(self.unet, strict=strict)
        if ident.kind == "input":
            dim = self.text_encoder.get_input_embeddings().embedding_dim
            if dim != ident.config.embedding_dim:
                raise LayergenError(f"identifier {ident.token} has {ident.config.embedding_dim}-d input embeddings, "
                                    f"this text encoder takes {dim}-d: it was made for another base model")
        ident = ident.to(device=self.unet.device).requires_grad_(False)
        install_identifier_processors(self.unet)
        self._action_identifiers[ident.token] = ident
        return ident

    def unload_action_identifier(self, token: str | None = None) -> None:
        """Forget one identifier (or all, restoring the UNet's original processors)."""
        if token is None:
            self._action_identifiers.clear()
        elif self._action_identifiers.pop(token, None) is None:
            raise LayergenError(f"identifier {token} is not loaded")
        if not self._action_identifiers:
            uninstall_identifier_processors(self.unet)

    # -- prompts ---------------------------------------------------------------------------------
    def _max_length(self) -> int:
        return min(int(getattr(self.tokenizer, "model_max_length", 77) or 77), 77)

    def _substitute(self, prompts):
        known = self.tokenizer.get_added_vocab() if hasattr(self.tokenizer, "get_added_vocab") else {}
        texts, spans = substitute_identifiers(prompts, self._action_identifiers, passthrough=known)
        return texts, identifier_masks(self.tokenizer, texts, spans, self._max_length())

    @torch.no_grad()
    def encode_prompt(self, prompt, num_images_per_prompt: int = 1, negative_prompt=None):
        """As the base class; identifier tokens become their initializer word, and input-space
        (textual-inversion) identifiers are written into the text encoder's input embeddings."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        texts, masks = self._substitute(prompts)
        neg_texts, neg_masks = None, {}
        if self.do_classifier_free_guidance:
            neg = negative_prompt or ""
            neg = [neg] * len(prompts) if isinstance(neg, str) else list(neg)
            neg_texts, neg_masks = self._substitute(neg)
        # the base class encodes positives, then negatives: one mask set per text-encoder call
        self._input_mask_queue = [masks, neg_masks]
        try:
            return super().encode_prompt(texts, num_images_per_prompt, neg_texts)
        finally:
            self._input_mask_queue = []

    def _run_text_encoder(self, encoder, tokens, want_pooled: bool):
        queue = getattr(self, "_input_mask_queue", None)
        inputs = [i for i in self._action_identifiers.values() if i.kind == "input"]
        if encoder is not self.text_encoder or not queue or not inputs:
            return super()._run_text_encoder(encoder, tokens, want_pooled)
        masks = queue.pop(0)
        with contextlib.ExitStack() as stack:
            for ident in inputs:
                m = masks.get(ident.token)
                if m is None:
                    continue
                stack.enter_context(input_embedding_override(encoder, ident, m.to(self._execution_device)))
            return super()._run_text_encoder(encoder, tokens, want_pooled)

    def identifier_batch_masks(self, prompt, negative_prompt, num_images_per_prompt: int) -> dict:
        """token -> mask over the UNet batch ([negatives, positives] under CFG), for output-space identifiers."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        _, masks = self._substitute(prompts)
        neg_masks = {}
        if self.do_classifier_free_guidance:
            neg = negative_prompt or ""
            neg = [neg] * len(prompts) if isinstance(neg, str) else list(neg)
            _, neg_masks = self._substitute(neg)
        out = {}
        length = self._max_length()
        for token in set(masks) | set(neg_masks):
            if self._action_identifiers[token].kind == "input":
                continue
            zero = torch.zeros(len(prompts), length, dtype=torch.bool)
            pos = masks.get(token, zero).repeat_interleave(num_images_per_prompt, 0)
            if self.do_classifier_free_guidance:
                out[token] = torch.cat([neg_masks.get(token, zero).repeat_interleave(num_images_per_prompt, 0), pos])
            else:
                out[token] = pos
        return out

    def _without_identifiers(self, prompt) -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        drop = lambda m: "" if m.group(0) in self._action_identifiers else m.group(0)  # noqa: E731
        return [" ".join(TOKEN_PATTERN.sub(drop, p).split()) for p in prompts]

    def _identifier_switch(self, plain, negative_prompt, num_images_per_prompt, end, bindings, user_callback):
        """A step callback that, after step `end` - 1, unbinds the output-space identifiers and swaps the
        prompt embeddings for those of `plain` (the prompt without identifier tokens; this also ends
        input-space identifiers, which live in the embeddings)."""
        plain_embeds = self.encode_prompt(plain, num_images_per_prompt, negative_prompt)[0]

        def callback(pipe, i, t, kwargs):
            out = dict(user_callback(pipe, i, t, kwargs) or {}) if user_callback is not None else {}
            if i + 1 == end:
                bindings.close()
                out["prompt_embeds"] = plain_embeds
            return out

        return callback

    # -- call ------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt, height: int | None = None, width: int | None = None, num_inference_steps: int = 20,
                 guidance_scale: float = 5.0, negative_prompt=None, num_images_per_prompt: int = 1,
                 generator=None, seed: int | None = None, latents=None, output_type: str = "pil",
                 return_dict: bool = True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",),
                 identifier_steps: float = DEFAULT_IDENTIFIER_STEPS, cross_attention_kwargs: dict | None = None):
        """`seed` is a convenience for `generator` (image k of a batch uses seed + k).
        `output_type`: "pil" (RGB images), "np" (uint8 N x H x W x 3) or "latent".

        `identifier_steps`: the fraction of denoising steps, from the noisiest, during which the
        identifiers act; the remaining steps read the prompt with the identifier tokens removed.
        The pose is settled in the noisy steps, the subject's small cues (ears, beak) in the
        late ones, so ending the identifier early keeps the action and gives the subject back
        to the base model (prompt switching, as in Prompt-to-Prompt's step schedules). The default
        (0.7) matches how identifiers are trained (focal timestep sampling favours the noisy steps);
        1.0 lets them act throughout.
        """
        if not 0.0 <= float(identifier_steps) <= 1.0:
            raise LayergenError(f"identifier_steps must be in [0, 1], got {identifier_steps}")
        height, width = self.check_inputs(
            prompt, *self.canvas_size(None, height, width), num_inference_steps, guidance_scale,
            callback_on_step_end_tensor_inputs, num_images_per_prompt, generator, output_type)
        self._cross_attention_kwargs = cross_attention_kwargs
        n = (1 if isinstance(prompt, str) else len(prompt)) * num_images_per_prompt
        generator = make_generator_list(generator, seed, n)
        self._guidance_scale = float(guidance_scale)  # masks depend on whether CFG runs
        masks = self.identifier_batch_masks(prompt, negative_prompt, num_images_per_prompt)
        callback = callback_on_step_end
        with contextlib.ExitStack() as bindings:
            if masks:
                router = install_identifier_processors(self.unet)
                for token, mask in masks.items():
                    bindings.enter_context(router.bind(self._action_identifiers[token],
                                                       mask.to(self._execution_device)))
            end = round(float(identifier_steps) * num_inference_steps)
            if end == 0:
                bindings.close()
                prompt = self._without_identifiers(prompt)
            elif end < num_inference_steps:
                callback = self._identifier_switch(self._without_identifiers(prompt), negative_prompt,
                                                   num_images_per_prompt, end, bindings, callback_on_step_end)
            latents, _ = self.denoise(prompt, height, width, num_inference_steps, guidance_scale, negative_prompt,
                                      num_images_per_prompt, generator, latents, None, callback,
                                      callback_on_step_end_tensor_inputs)
        if output_type == "latent":
            self.maybe_free_model_hooks()
            return ActionPipelineOutput(images=latents) if return_dict else (latents,)
        rgb = self.decode_opaque(latents, height, width)[..., :3]
        images = rgb if output_type == "np" else [Image.fromarray(np.ascontiguousarray(x)) for x in rgb]
        self.maybe_free_model_hooks()
        return ActionPipelineOutput(images=images) if return_dict else (images,)
