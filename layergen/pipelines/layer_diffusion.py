"""What every latent-transparency pipeline shares: prompt encoding, the denoising loop, RGBA decoding.

The three LayerDiffusion pipelines differ only in what they condition on and what
they decode, so each is a thin subclass of `LayerDiffusionPipelineBase`.

UNet conventions (mini family and LayerDiffuse's SDXL layer models alike):
* `unet.config.in_channels == latent_channels`: plain text-to-latent (SD 1.5 / SDXL with the
  transparent attention LoRA, or the mini UNet trained without conditioning);
* `== 2 * latent_channels`: the condition image's latent is concatenated to the noisy latent
  (zeros when there is no condition), as LayerDiffuse's `fg2ble`/`bg2ble` models do;
* `unet.config.num_class_embeds` set: the task id below is passed as `class_labels`, so one
  mini UNet serves all three tasks.
SDXL-class UNets (`addition_embed_type == "text_time"`) get pooled text embeddings from
`text_encoder_2` and the usual size/crop time ids.
"""
from __future__ import annotations

import inspect
import numbers
from typing import Callable

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import LayergenError
from ..layers import Layer
from ..models.transparent_codec import (TransparentDecoder, TransparentEncoder, decode_rgba, encode_rgba,
                                        vae_scale_factor)
from ..seeds import check_seed
from .pipeline_output import LayerPipelineOutput

TASK_FOREGROUND = 0
TASK_FOREGROUND_ON_BACKGROUND = 1
TASK_BACKGROUND_BEHIND_FOREGROUND = 2


def to_rgba_tensor(image, height: int, width: int) -> torch.Tensor:
    """PIL / uint8 array (RGB or RGBA) -> 1 x 4 x H x W float in [0, 1], resized to the canvas."""
    if isinstance(image, Layer):
        image = image.pixels
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise LayergenError(f"condition image must be uint8, got {image.dtype}")
        if not (image.ndim == 2 or image.ndim == 3 and image.shape[2] in (1, 2, 3, 4)):
            raise LayergenError(f"condition image must be H x W (x 1, 2, 3 or 4) gray, gray + alpha, RGB or RGBA, "
                                f"got {image.shape}")
        image = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise LayergenError(f"condition image must be a PIL image or uint8 array, got {type(image).__name__}")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        raise LayergenError(f"condition image mode {image.mode!r} (16-bit/float) is not supported; use 8-bit")
    image = image.convert("RGBA")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    arr = np.asarray(image, np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def image_size(image) -> tuple[int, int] | None:
    """(width, height) of a PIL image, uint8 array or Layer; None if unknown."""
    if isinstance(image, Layer):
        return image.width, image.height
    if isinstance(image, np.ndarray) and image.ndim >= 2:
        return image.shape[1], image.shape[0]
    if isinstance(image, Image.Image):
        return image.size
    return None


class LayerDiffusionPipelineBase(DiffusionPipeline, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin):
    """Shared machinery; use one of the task pipelines."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae->transparent_decoder"
    _optional_components = ["transparent_encoder", "text_encoder_2", "tokenizer_2"]
    _callback_tensor_inputs = ["latents", "prompt_embeds"]
    output_types = ("pil", "np", "latent", "stack")
    task_id = TASK_FOREGROUND

    # The annotations let diffusers' `from_pipe` hand the components from one task pipeline to another.
    def __init__(self, vae: AutoencoderKL, text_encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 unet: UNet2DConditionModel, scheduler: SchedulerMixin, transparent_decoder: TransparentDecoder,
                 transparent_encoder: TransparentEncoder | None = None, text_encoder_2: PreTrainedModel | None = None,
                 tokenizer_2: PreTrainedTokenizerBase | None = None):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              scheduler=scheduler, transparent_decoder=transparent_decoder,
                              transparent_encoder=transparent_encoder, text_encoder_2=text_encoder_2,
                              tokenizer_2=tokenizer_2)

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers `from_pretrained`, plus: a text encoder folder holding only a `packaged.json`
        pointer (the bundled mini family) loads the weights shipped in a Python package.
        Local folders only: nothing is downloaded."""
        from pathlib import Path

        from ..mini import PACKAGED_POINTER, check_model_dir, resolve_packaged

        path = check_model_dir(pretrained_model_name_or_path)
        kwargs.setdefault("local_files_only", True)
        for name in ("text_encoder", "tokenizer"):
            sub = Path(path) / name
            if name not in kwargs and (sub / PACKAGED_POINTER).is_file():
                from transformers import AutoModel, AutoTokenizer

                real = resolve_packaged(sub)
                kwargs[name] = (  # the packaged encoder follows torch_dtype like every other component
                    AutoModel.from_pretrained(real, local_files_only=True, **_dtype_kwargs(kwargs.get("torch_dtype")))
                    if name == "text_encoder" else AutoTokenizer.from_pretrained(real, local_files_only=True))
        return super().from_pretrained(path, **kwargs)

    def load_layerdiffuse_unet_weights(self, path_or_state_dict, scale: float = 1.0) -> int:
        """Fuse the UNet side of a published LayerDiffuse file (attention LoRA, conv offsets, or a
        two-step model's offsets with a widened `conv_in`) into `self.unet`. Returns tensors changed.

            pipe.load_layerdiffuse_unet_weights("layer_xl_transparent_attn.safetensors")
        """
        from ..models.layerdiffuse_unet import load_layerdiffuse_unet, widen_conv_in

        state = path_or_state_dict
        if not isinstance(state, dict):
            from safetensors.torch import load_file

            from ..errors import FormatError

            try:
                state = load_file(str(path_or_state_dict))
            except Exception as exc:  # safetensors raises several types for bad files
                raise FormatError(f"{path_or_state_dict}: not a readable safetensors file ({exc})") from exc
        for key, value in state.items():
            if "input_blocks.0.0.weight" in key and value.ndim == 4 and value.shape[1] > self.unet.conv_in.in_channels:
                widen_conv_in(self.unet, value.shape[1])
        return load_layerdiffuse_unet(self.unet, state, scale)

    # -- properties ----------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self):
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def interrupt(self):
        return self._interrupt

    @property
    def cross_attention_kwargs(self):
        """The call's `cross_attention_kwargs`, passed to every UNet call (e.g. `{"scale": 0.5}` for a LoRA)."""
        return getattr(self, "_cross_attention_kwargs", None)

    def _takes_condition(self) -> bool:
        return self.unet.config.in_channels == 2 * self.latent_channels

    # -- text ------------------------------------------------------------------------------------
    def _tokenize(self, tokenizer, prompts):
        max_len = min(int(getattr(tokenizer, "model_max_length", 77) or 77), 77)
        return tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")

    def _run_text_encoder(self, encoder, tokens, want_pooled: bool):
        device = self._execution_device
        is_clip = getattr(encoder.config, "model_type", "").startswith("clip")
        kwargs = {} if is_clip else {"attention_mask": tokens.attention_mask.to(device)}
        out = encoder(tokens.input_ids.to(device), output_hidden_states=want_pooled, **kwargs)
        if want_pooled:  # SDXL: penultimate hidden states + pooled projection
            pooled = getattr(out, "text_embeds", None)
            if pooled is None:
                pooled = out[0][:, 0]
            return out.hidden_states[-2], pooled
        return out[0], None

    @torch.no_grad()
    def encode_prompt(self, prompt, num_images_per_prompt: int = 1, negative_prompt=None):
        """Returns (prompt_embeds, negative_embeds, pooled, negative_pooled); negatives only with CFG."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        sdxl = self.text_encoder_2 is not None
        prompt_list = [prompts]
        if self.do_classifier_free_guidance:
            neg = negative_prompt or ""
            if not isinstance(neg, (str, list, tuple)) or not all(isinstance(n, str) for n in neg):
                raise LayergenError(f"negative_prompt must be a string or a list of strings, got {negative_prompt!r}")
            neg = [neg] * len(prompts) if isinstance(neg, str) else list(neg)
            if len(neg) != len(prompts):
                raise LayergenError(f"got {len(neg)} negative prompts for {len(prompts)} prompts")
            prompt_list.append(neg)
        results = []
        for texts in prompt_list:
            tokens = self._tokenize(self.tokenizer, texts)
            if sdxl:
                h1, _ = self._run_text_encoder(self.text_encoder, tokens, True)
                tokens2 = self._tokenize(self.tokenizer_2, texts)
                h2, pooled = self._run_text_encoder(self.text_encoder_2, tokens2, True)
                embeds = torch.cat([h1, h2], dim=-1)
            else:
                embeds, pooled = self._run_text_encoder(self.text_encoder, tokens, False)
            embeds = embeds.to(self.unet.dtype).repeat_interleave(num_images_per_prompt, dim=0)
            if pooled is not None:
                pooled = pooled.to(self.unet.dtype).repeat_interleave(num_images_per_prompt, dim=0)
            results.append((embeds, pooled))
        pos, neg = results[0], (results[1] if len(results) > 1 else (None, None))
        return pos[0], neg[0], pos[1], neg[1]

    def _added_cond_kwargs(self, pooled, height, width, batch):
        if getattr(self.unet.config, "addition_embed_type", None) != "text_time":
            return None
        if pooled is None:
            raise LayergenError("this UNet expects SDXL text_time conditioning: load text_encoder_2/tokenizer_2")
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=pooled.dtype,
                                device=pooled.device).repeat(batch, 1)
        return {"text_embeds": pooled, "time_ids": time_ids}

    # -- checks ----------------------------------------------------------------------------------
    def check_inputs(self, prompt, height, width, num_inference_steps, guidance_scale,
                     callback_on_step_end_tensor_inputs=None, num_images_per_prompt=1, generator=None,
                     output_type="pil") -> tuple[int, int]:
        """Every argument checked before anything runs; returns (height, width) as ints."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise LayergenError("prompt must be a non-empty string or a list of strings")
        if any(not p.strip() for p in prompts):
            raise LayergenError("prompt is empty; describe the layer, e.g. 'a red glass star with a soft shadow'")
        f = self.vae_scale_factor
        for name, v in (("height", height), ("width", width)):
            if not _is_int(v) or v < f or v > 4096:
                raise LayergenError(f"{name} must be an integer in [{f}, 4096], got {v!r}")
        check_steps(self.scheduler, num_inference_steps)
        check_guidance(guidance_scale)
        if not _is_int(num_images_per_prompt) or num_images_per_prompt < 1:
            raise LayergenError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        generators = generator if isinstance(generator, list) else [] if generator is None else [generator]
        if not all(isinstance(g, torch.Generator) for g in generators):
            raise LayergenError("generator must be a torch.Generator or a list of them; for an integer use seed=")
        n = len(prompts) * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != n:
            raise LayergenError(f"got {len(generator)} generators for {n} images (prompts x num_images_per_prompt); "
                                "pass one per image, or one")
        self.check_output_type(output_type)
        bad = [k for k in (callback_on_step_end_tensor_inputs or []) if k not in self._callback_tensor_inputs]
        if bad:
            raise LayergenError(f"callback tensor inputs {bad} not in {self._callback_tensor_inputs}")
        return int(height), int(width)

    def check_output_type(self, output_type) -> None:
        if output_type not in self.output_types:
            raise LayergenError(f"output_type must be one of {', '.join(map(repr, self.output_types))}, "
                                f"got {output_type!r}")

    def canvas_size(self, image, height, width) -> tuple:
        """(height, width): the given ones, else those of the condition `image`, else the model's default."""
        w, h = image_size(image) or (self.default_size(), self.default_size())
        return (h if height is None else height), (w if width is None else width)

    def default_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    # -- latents ---------------------------------------------------------------------------------
    def prepare_latents(self, batch, height, width, dtype, device, generator, latents=None):
        shape = (batch, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if tuple(latents.shape) != shape:
                raise LayergenError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
            if not torch.isfinite(latents).all():
                raise LayergenError("latents contain NaN or Inf")
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def encode_condition_rgba(self, rgba: torch.Tensor) -> torch.Tensor:
        """RGBA condition (1 x 4 x H x W, [0, 1]) -> scaled latent, through the codec when the layer is transparent."""
        if self.transparent_encoder is not None:
            return encode_rgba(self.vae, self.transparent_encoder, rgba.to(self._execution_device))
        from ..models.transparent_codec import premultiply_on_grey

        dist = self.vae.encode(premultiply_on_grey(rgba).to(self._execution_device, self.vae.dtype)).latent_dist
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (dist.mean - shift) * self.vae.config.scaling_factor

    def encode_condition_rgb(self, rgb: torch.Tensor) -> torch.Tensor:
        """Opaque RGB condition (1 x 3 x H x W, [0, 1]) -> scaled latent."""
        dist = self.vae.encode((rgb * 2 - 1).to(self._execution_device, self.vae.dtype)).latent_dist
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (dist.mean - shift) * self.vae.config.scaling_factor

    # -- the loop --------------------------------------------------------------------------------
    def denoise(self, prompt, height, width, num_inference_steps, guidance_scale, negative_prompt,
                num_images_per_prompt, generator, latents, condition_latent, callback_on_step_end,
                callback_on_step_end_tensor_inputs, eta: float = 0.0):
        self._guidance_scale = float(guidance_scale)
        self._interrupt = False
        device = self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts) * num_images_per_prompt
        embeds, neg_embeds, pooled, neg_pooled = self.encode_prompt(prompts, num_images_per_prompt, negative_prompt)

        gen_h = -(-height // self.vae_scale_factor) * self.vae_scale_factor
        gen_w = -(-width // self.vae_scale_factor) * self.vae_scale_factor
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        latents = self.prepare_latents(batch, gen_h, gen_w, embeds.dtype, device, generator, latents)

        cond = None
        if self._takes_condition():
            if condition_latent is None:
                condition_latent = torch.zeros_like(latents[:1])
            cond = condition_latent.to(device=device, dtype=latents.dtype).expand(batch, -1, -1, -1)
        elif condition_latent is not None:
            raise LayergenError(
                f"{type(self).__name__} needs a UNet with {2 * self.latent_channels} input channels "
                f"(latent + condition latent); this UNet has {self.unet.config.in_channels}")
        class_labels = None
        if getattr(self.unet.config, "num_class_embeds", None):
            class_labels = torch.full((batch,), self.task_id, device=device, dtype=torch.long)
        added = self._added_cond_kwargs(pooled, gen_h, gen_w, batch)
        neg_added = self._added_cond_kwargs(neg_pooled, gen_h, gen_w, batch) if neg_pooled is not None else None

        step_kwargs = scheduler_step_kwargs(self.scheduler, eta=eta, generator=generator)
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                x = self.scheduler.scale_model_input(latents, t)
                if cond is not None:
                    x = torch.cat([x, cond], dim=1)
                if self.do_classifier_free_guidance:
                    x_in = torch.cat([x, x])
                    e_in = torch.cat([neg_embeds, embeds])
                    c_in = None if class_labels is None else torch.cat([class_labels, class_labels])
                    a_in = None if added is None else {k: torch.cat([neg_added[k], added[k]]) for k in added}
                    noise_uncond, noise_text = self.unet(x_in, t, encoder_hidden_states=e_in, class_labels=c_in,
                                                         added_cond_kwargs=a_in,
                                                         cross_attention_kwargs=self.cross_attention_kwargs
                                                         ).sample.chunk(2)
                    noise = noise_uncond + self._guidance_scale * (noise_text - noise_uncond)
                else:
                    noise = self.unet(x, t, encoder_hidden_states=embeds, class_labels=class_labels,
                                      added_cond_kwargs=added,
                                      cross_attention_kwargs=self.cross_attention_kwargs).sample
                latents = self.scheduler.step(noise, t, latents, **step_kwargs).prev_sample
                if callback_on_step_end is not None:
                    local = {"latents": latents, "prompt_embeds": embeds}
                    kwargs = {k: local[k] for k in (callback_on_step_end_tensor_inputs or [])}
                    out = callback_on_step_end(self, i, t, kwargs) or {}
                    latents = out.pop("latents", latents)
                    embeds = out.pop("prompt_embeds", embeds)
                progress_bar.update()
        return self.check_finite(latents), prompts

    def check_finite(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoised latents, refused if they hold NaN or Inf (e.g. from a huge guidance_scale): decoded, they
        would silently become an empty layer."""
        if not torch.isfinite(latents).all():
            raise LayergenError(f"denoising diverged (NaN or Inf latents) at guidance_scale {self._guidance_scale:g}; "
                                "use a smaller guidance_scale")
        return latents

    # -- decoding -----------------------------------------------------------------------------
    def decode_transparent(self, latents, height, width, tta: bool = True) -> np.ndarray:
        """Latents -> uint8 B x H x W x 4 straight RGBA, cropped to the requested size."""
        rgba = decode_rgba(self.vae, self.transparent_decoder, latents, tta=tta)
        rgba = rgba[:, :, :height, :width].clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        out = np.floor(rgba * 255 + 0.5).astype(np.uint8)
        out[out[..., 3] == 0, :3] = 0  # no hidden colour under fully transparent pixels
        return out

    def decode_opaque(self, latents, height, width) -> np.ndarray:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = latents / self.vae.config.scaling_factor + shift
        rgb = (self.vae.decode(z.to(self.vae.dtype)).sample.float() * 0.5 + 0.5).clamp(0, 1)
        rgb = rgb[:, :, :height, :width].permute(0, 2, 3, 1).cpu().numpy()
        rgb = np.floor(rgb * 255 + 0.5).astype(np.uint8)
        return np.concatenate([rgb, np.full(rgb.shape[:3] + (1,), 255, np.uint8)], axis=-1)

    def _provenance(self, prompt, seed, steps, guidance_scale, kind):
        return {"kind": kind, "prompt": prompt, "seed": seed, "steps": steps, "guidance_scale": guidance_scale,
                "model": str(getattr(self.config, "_name_or_path", "") or type(self).__name__),
                "pipeline": type(self).__name__}

    @staticmethod
    def _seed_of(generator, index):
        if isinstance(generator, list):
            generator = generator[index] if index < len(generator) else None
        return int(generator.initial_seed()) if isinstance(generator, torch.Generator) else None

    def _latent_output(self, latents, return_dict):
        """`output_type="latent"`: the denoised latents, before any decoding."""
        self.maybe_free_model_hooks()
        return LayerPipelineOutput(images=latents, stacks=[]) if return_dict else (latents, [])

    def _output(self, stacks, output_type, return_dict):
        """`images`: PIL RGBA composites ("pil"), a uint8 N x H x W x 4 array ("np": layers are 8-bit, so the
        exact values, not floats), or the stacks themselves ("stack")."""
        if output_type == "stack":
            images = stacks
        else:
            images = [s.to_image() for s in stacks]
            if output_type == "np":
                images = np.stack([np.asarray(i) for i in images])
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, stacks)
        return LayerPipelineOutput(images=images, stacks=stacks)


def scheduler_step_kwargs(scheduler, **optional) -> dict:
    """Those of `optional` (DDIM's eta; the generator of random samplers such as Euler ancestral, so they stay
    reproducible) that this scheduler's `step` takes: UniPC, PNDM and LMS take neither."""
    params = inspect.signature(scheduler.step).parameters
    return {k: v for k, v in optional.items() if k in params}


def _dtype_kwargs(dtype) -> dict:
    """transformers' dtype keyword: `dtype` since 4.56, `torch_dtype` before; nothing when not asked for."""
    if dtype is None:
        return {}
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


def check_steps(scheduler, steps) -> None:
    """A step count the scheduler can run: diffusers' schedulers index past their training timesteps."""
    most = int(scheduler.config.num_train_timesteps)
    if not _is_int(steps) or not 1 <= steps <= most:
        raise LayergenError(f"num_inference_steps must be an integer in [1, {most}] (the scheduler's training "
                            f"timesteps), got {steps!r}")


def check_guidance(guidance_scale) -> None:
    if not isinstance(guidance_scale, numbers.Real) or not np.isfinite(guidance_scale):
        raise LayergenError(f"guidance_scale must be a finite number, got {guidance_scale!r}")


def _is_int(value) -> bool:
    """An integer, numpy's included, but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def make_generator_list(generator, seed, batch):
    """A per-image generator list from a seed, so image k of a batch is reproducible on its own."""
    if generator is not None and seed is not None:
        raise LayergenError("pass seed= or generator=, not both")
    if generator is not None or seed is None:
        return generator
    seed = check_seed(seed, "seed", batch)
    return [torch.Generator().manual_seed(seed + k) for k in range(batch)]


CallbackType = Callable[..., dict]
