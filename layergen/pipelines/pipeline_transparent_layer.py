"""Text -> transparent RGBA layer (LayerDiffuse "foreground only")."""
from __future__ import annotations

import torch

from ..layers import Layer, LayerStack
from .layer_diffusion import TASK_FOREGROUND, LayerDiffusionPipelineBase, make_generator_list


class TransparentLayerPipeline(LayerDiffusionPipelineBase):
    """Prompt -> one transparent foreground layer per image.

    Components: `vae` (frozen RGB AutoencoderKL), `text_encoder`/`tokenizer` (+ `_2` for SDXL),
    `unet`, `scheduler`, `transparent_decoder` (and optionally `transparent_encoder`).

    Example:
        >>> pipe = TransparentLayerPipeline.from_pretrained("assets/layergen-mini")
        >>> out = pipe("a red glass star with a soft shadow", seed=0)
        >>> out.images[0].save("star.png")          # RGBA PNG
        >>> out.stacks[0]                           # LayerStack with provenance metadata
    """

    task_id = TASK_FOREGROUND

    @torch.no_grad()
    def __call__(self, prompt, height: int | None = None, width: int | None = None, num_inference_steps: int = 20,
                 guidance_scale: float = 5.0, negative_prompt=None, num_images_per_prompt: int = 1,
                 generator=None, seed: int | None = None, latents=None, tta: bool = True,
                 output_type: str = "pil", return_dict: bool = True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), cross_attention_kwargs: dict | None = None):
        """`seed` is a convenience for `generator` (image k of a batch uses seed + k).
        `output_type`: "pil" (RGBA images), "np", "latent" or "stack"."""
        height, width = self.check_inputs(
            prompt, *self.canvas_size(None, height, width), num_inference_steps, guidance_scale,
            callback_on_step_end_tensor_inputs, num_images_per_prompt, generator, output_type)
        self._cross_attention_kwargs = cross_attention_kwargs
        n = (1 if isinstance(prompt, str) else len(prompt)) * num_images_per_prompt
        generator = make_generator_list(generator, seed, n)
        latents, prompts = self.denoise(prompt, height, width, num_inference_steps, guidance_scale, negative_prompt,
                                        num_images_per_prompt, generator, latents, None, callback_on_step_end,
                                        callback_on_step_end_tensor_inputs)
        if output_type == "latent":
            return self._latent_output(latents, return_dict)
        rgba = self.decode_transparent(latents, height, width, tta=tta)
        stacks = []
        for k in range(n):
            p = prompts[k // num_images_per_prompt]
            meta = self._provenance(p, self._seed_of(generator, k), num_inference_steps, guidance_scale, "instance")
            stacks.append(LayerStack(width, height, [Layer(rgba[k], name=p[:60], metadata=meta)]))
        return self._output(stacks, output_type, return_dict)
