"""Prompt + background image -> a transparent foreground layer that fits it (background-conditioned foreground)."""
from __future__ import annotations

import torch

from ..layers import Layer, LayerStack
from .layer_diffusion import (TASK_FOREGROUND_ON_BACKGROUND, LayerDiffusionPipelineBase,
                              make_generator_list, to_rgba_tensor)


class ForegroundOnBackgroundPipeline(LayerDiffusionPipelineBase):
    """The background's latent conditions the UNet (concatenated channels), so the layer's placement,
    scale and colours are chosen with the scene in view. Returns a stack: background + new layer.

    Needs a UNet with 2 x latent_channels inputs (the mini UNet, or a LayerDiffuse-style `bg2fg` model).
    """

    task_id = TASK_FOREGROUND_ON_BACKGROUND

    @torch.no_grad()
    def __call__(self, prompt, background, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 20, guidance_scale: float = 5.0, negative_prompt=None,
                 num_images_per_prompt: int = 1, generator=None, seed: int | None = None, latents=None,
                 tta: bool = True, output_type: str = "pil", return_dict: bool = True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), cross_attention_kwargs: dict | None = None):
        """`background`: PIL image / uint8 array / Layer, resized to the canvas (default: its own size)."""
        height, width = self.check_inputs(
            prompt, *self.canvas_size(background, height, width), num_inference_steps, guidance_scale,
            callback_on_step_end_tensor_inputs, num_images_per_prompt, generator, output_type)
        self._cross_attention_kwargs = cross_attention_kwargs
        bg = to_rgba_tensor(background, height, width)
        f = self.vae_scale_factor
        gh, gw = -(-height // f) * f, -(-width // f) * f
        bg_pad = torch.nn.functional.pad(bg[:, :3], (0, gw - width, 0, gh - height), mode="replicate")
        cond = self.encode_condition_rgb(bg_pad)
        n = (1 if isinstance(prompt, str) else len(prompt)) * num_images_per_prompt
        generator = make_generator_list(generator, seed, n)
        latents, prompts = self.denoise(prompt, height, width, num_inference_steps, guidance_scale, negative_prompt,
                                        num_images_per_prompt, generator, latents, cond, callback_on_step_end,
                                        callback_on_step_end_tensor_inputs)
        if output_type == "latent":
            return self._latent_output(latents, return_dict)
        rgba = self.decode_transparent(latents, height, width, tta=tta)
        bg_u8 = (bg[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype("uint8")
        bg_u8[..., 3] = 255
        stacks = []
        for k in range(n):
            p = prompts[k // num_images_per_prompt]
            meta = self._provenance(p, self._seed_of(generator, k), num_inference_steps, guidance_scale, "instance")
            stacks.append(LayerStack(width, height, [
                Layer(bg_u8, name="background", metadata={"kind": "background", "source": "input"}),
                Layer(rgba[k], name=p[:60], metadata=meta)]))
        return self._output(stacks, output_type, return_dict)
