"""Prompt + transparent foreground -> an opaque background that fits behind it (foreground-conditioned background)."""
from __future__ import annotations

import torch

from ..layers import Layer, LayerStack
from .layer_diffusion import (TASK_BACKGROUND_BEHIND_FOREGROUND, LayerDiffusionPipelineBase,
                              make_generator_list, to_rgba_tensor)


class BackgroundBehindForegroundPipeline(LayerDiffusionPipelineBase):
    """The foreground's latent (through the transparent codec) conditions the UNet; the result is decoded
    by the plain VAE as an opaque background. Returns a stack: new background + the given foreground.

    Needs a UNet with 2 x latent_channels inputs (the mini UNet, or a LayerDiffuse-style `fg2bg` model).
    """

    task_id = TASK_BACKGROUND_BEHIND_FOREGROUND

    @torch.no_grad()
    def __call__(self, prompt, foreground, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 20, guidance_scale: float = 5.0, negative_prompt=None,
                 num_images_per_prompt: int = 1, generator=None, seed: int | None = None, latents=None,
                 output_type: str = "pil", return_dict: bool = True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), cross_attention_kwargs: dict | None = None):
        """`foreground`: RGBA PIL image / uint8 array / Layer (alpha is what matters), resized to the canvas."""
        fg_layer = foreground if isinstance(foreground, Layer) else None
        height, width = self.check_inputs(
            prompt, *self.canvas_size(foreground, height, width), num_inference_steps, guidance_scale,
            callback_on_step_end_tensor_inputs, num_images_per_prompt, generator, output_type)
        self._cross_attention_kwargs = cross_attention_kwargs
        fg = to_rgba_tensor(foreground, height, width)
        f = self.vae_scale_factor
        gh, gw = -(-height // f) * f, -(-width // f) * f
        cond = self.encode_condition_rgba(torch.nn.functional.pad(fg, (0, gw - width, 0, gh - height)))
        n = (1 if isinstance(prompt, str) else len(prompt)) * num_images_per_prompt
        generator = make_generator_list(generator, seed, n)
        latents, prompts = self.denoise(prompt, height, width, num_inference_steps, guidance_scale, negative_prompt,
                                        num_images_per_prompt, generator, latents, cond, callback_on_step_end,
                                        callback_on_step_end_tensor_inputs)
        if output_type == "latent":
            return self._latent_output(latents, return_dict)
        bgs = self.decode_opaque(latents, height, width)
        fg_u8 = (fg[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype("uint8")
        stacks = []
        for k in range(n):
            p = prompts[k // num_images_per_prompt]
            meta = self._provenance(p, self._seed_of(generator, k), num_inference_steps, guidance_scale, "background")
            fg_meta = dict(fg_layer.metadata) if fg_layer else {"kind": "instance", "source": "input"}
            stacks.append(LayerStack(width, height, [
                Layer(bgs[k], name="background", metadata=meta),
                Layer(fg_u8, name=fg_layer.name if fg_layer else "foreground", metadata=fg_meta)]))
        return self._output(stacks, output_type, return_dict)
