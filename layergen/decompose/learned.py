"""The learned mini decomposer (LayerDecomp-style) and its glue to `DecompositionPipeline`.

`LayerDecomposer` is a small latent diffusion model. Given the composite's
latent and an instance mask, it denoises the *background* latent and the
*RGBA-layer* latent (the transparent codec's latent of the instance with its
shadow/glow) jointly: one UNet, both noisy latents concatenated with the
condition, both predictions out. The mask enters twice — area-pooled to the
latent grid, and space-to-depth (`pixel_unshuffle`) so its full-resolution edge
survives the 8x downsampling.

In the pipeline, the decoded layer alpha becomes the matting prior and the
decoded background the completion inside the hole (`background_mode`), then
the usual unblending makes the stack re-composite to the input exactly.

Reference: Yang et al., "Generative Image Layer Decomposition with Visual
Effects" (LayerDecomp, CVPR 2025) — no public code; this is our reading of it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..errors import LayergenError, ModelNotFoundError

DEFAULT_DECOMPOSER = Path(__file__).resolve().parents[2] / "assets" / "layergen-mini"
BACKGROUND_MODES = ("learned", "residual", "classical")


class LayerDecomposer(ModelMixin, ConfigMixin):
    """(noisy background latent, noisy layer latent, composite latent, mask, t) -> predictions for both."""

    @register_to_config
    def __init__(self, latent_channels: int = 4, sample_size: int = 16, vae_scale_factor: int = 8,
                 block_out_channels=(64, 128, 128), layers_per_block: int = 2,
                 attention_levels=(False, True, True), attention_head_dim: int = 8, norm_num_groups: int = 16,
                 pixel_mask: bool = True):
        super().__init__()
        if len(attention_levels) != len(block_out_channels):
            raise LayergenError("attention_levels needs one entry per block")
        in_channels = 3 * latent_channels + 1 + (vae_scale_factor ** 2 if pixel_mask else 0)
        down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels)
        up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels))
        self.unet = UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=2 * latent_channels,
                                block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                                down_block_types=down, up_block_types=up, attention_head_dim=attention_head_dim,
                                norm_num_groups=norm_num_groups)

    def condition(self, composite_latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Composite latent (B x C x h x w) + pixel mask (B x 1 x H x W in [0, 1]) -> condition channels."""
        f = self.config.vae_scale_factor
        h, w = composite_latent.shape[-2:]
        if mask.shape[-2:] != (h * f, w * f):
            mask = F.interpolate(mask.float(), size=(h * f, w * f), mode="bilinear", align_corners=False)
        mask = mask.to(composite_latent)
        parts = [composite_latent, F.adaptive_avg_pool2d(mask, (h, w))]
        if self.config.pixel_mask:
            parts.append(F.pixel_unshuffle(mask, f))
        return torch.cat(parts, 1)

    def forward(self, noisy_background, noisy_layer, condition, timestep):
        out = self.unet(torch.cat([noisy_background, noisy_layer, condition], 1), timestep).sample
        c = self.config.latent_channels
        return out[:, :c], out[:, c:]


# ----------------------------------------------------------------------------------------------- helpers
def latent_norm(vae):
    scaling = getattr(vae.config, "scaling_factor", None) or 1.0
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return float(scaling), float(shift)


def encode_rgb(vae, rgb01: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W in [0, 1] -> scaled latents (posterior mean: deterministic)."""
    scaling, shift = latent_norm(vae)
    z = vae.encode((rgb01 * 2 - 1).to(device=vae.device, dtype=vae.dtype)).latent_dist.mean
    return (z - shift) * scaling


def decode_rgb(vae, latents: torch.Tensor) -> torch.Tensor:
    scaling, shift = latent_norm(vae)
    x = vae.decode((latents / scaling + shift).to(device=vae.device, dtype=vae.dtype)).sample
    return (x.float() * 0.5 + 0.5).clamp(0, 1)


def encode_layer(vae, rgba01: torch.Tensor, encoder=None) -> torch.Tensor:
    """RGBA layer -> its latent: the transparent codec's when an encoder is given, else the base VAE's
    latent of the layer premultiplied onto grey (what the codec's zero-initialised encoder gives too)."""
    if encoder is not None:
        from ..models.transparent_codec import encode_rgba

        return encode_rgba(vae, encoder, rgba01)
    a = rgba01[:, 3:4]
    return encode_rgb(vae, rgba01[:, :3] * a + 0.5 * (1 - a))


def alpha_from_grey(image: np.ndarray, background: np.ndarray, on_grey: np.ndarray) -> np.ndarray:
    """Alpha from the layer seen twice: over the background (the input) and over grey (the decoded latent).

    `I - B = a (F - B)` and `G - 1/2 = a (F - 1/2)` give `(I - B) - (G - 1/2) = a (1/2 - B)`:
    least squares over the channels; unreliable where the background is grey itself.
    """
    d = (image - background) - (on_grey - 0.5)
    v = 0.5 - background
    den = (v * v).sum(-1)
    a = (d * v).sum(-1) / np.maximum(den, 1e-6)
    grey_diff = np.abs(on_grey - 0.5).max(-1)
    a = np.where(den > 0.02, a, np.clip(grey_diff * 4, 0, 1))
    return np.clip(a, 0, 1).astype(np.float32)


def _resize(x: np.ndarray, w: int, h: int, nearest: bool = False) -> np.ndarray:
    import cv2

    if x.shape[1] == w and x.shape[0] == h:
        return x
    return cv2.resize(x, (w, h), interpolation=cv2.INTER_NEAREST if nearest else
                      (cv2.INTER_AREA if x.shape[1] > w else cv2.INTER_LINEAR))


@torch.no_grad()
def sample_decomposition(pipe, image: np.ndarray, mask: np.ndarray, generator=None, num_inference_steps: int = 20,
                         progress: bool = False):
    """Run the diffusion model at its native resolution. Returns (background, layer alpha, layer on grey)
    as float32 arrays at the input's size."""
    from diffusers import DDIMScheduler

    model, vae = pipe.decomposer, pipe.vae
    f = model.config.vae_scale_factor
    side = model.config.sample_size * f
    h, w = image.shape[:2]
    img = torch.from_numpy(_resize(image, side, side)).permute(2, 0, 1)[None].float()
    m = torch.from_numpy(_resize(mask.astype(np.float32), side, side))[None, None]
    device, dtype = model.device, model.dtype
    zc = encode_rgb(vae, img).to(device, dtype)
    cond = model.condition(zc, m.to(device))
    c = model.config.latent_channels
    scheduler = pipe.scheduler if pipe.scheduler is not None else DDIMScheduler(prediction_type="v_prediction")
    scheduler.set_timesteps(num_inference_steps, device=device)
    shape = (1, 2 * c, model.config.sample_size, model.config.sample_size)
    latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    steps = scheduler.timesteps
    for t in (pipe.progress_bar(steps) if progress else steps):
        inp = scheduler.scale_model_input(latents, t)
        bg_out, fg_out = model(inp[:, :c], inp[:, c:], cond, t)
        latents = scheduler.step(torch.cat([bg_out, fg_out], 1), t, latents).prev_sample
    z_bg, z_fg = latents[:, :c], latents[:, c:]
    bg = decode_rgb(vae, z_bg)[0].permute(1, 2, 0).cpu().numpy()
    codec = getattr(pipe, "codec", None)
    if codec is not None:
        from ..models.transparent_codec import decode_rgba

        rgba = decode_rgba(vae, codec, z_fg, tta=False)[0].permute(1, 2, 0).cpu().numpy()
        alpha = rgba[..., 3]
        on_grey = rgba[..., :3] * alpha[..., None] + 0.5 * (1 - alpha[..., None])
    else:
        on_grey = decode_rgb(vae, z_fg)[0].permute(1, 2, 0).cpu().numpy()
        alpha = alpha_from_grey(_resize(image, side, side), bg, on_grey)
    return (_resize(bg, w, h).astype(np.float32), np.clip(_resize(alpha, w, h), 0, 1).astype(np.float32),
            _resize(on_grey, w, h).astype(np.float32))


def run_decomposer(pipe, image, proposal, hole, generator=None, num_inference_steps: int = 20, completion=None,
                   others=None):
    """One learned peel: (background for the hole or None = use the classical completion, layer alpha)."""
    bg, alpha, _ = sample_decomposition(pipe, image, proposal.mask, generator, num_inference_steps)
    mode = getattr(pipe, "background_mode", "residual")
    if mode not in BACKGROUND_MODES:
        raise LayergenError(f"unknown background_mode {mode!r}; expected one of {BACKGROUND_MODES}")
    if mode == "classical":
        return None, alpha
    if mode == "learned" or completion is None:
        return bg, alpha
    # residual: classical fill + what the model changes, decoded — no VAE reconstruction floor
    classical = completion(image, hole, ignore=None if others is None else others & ~hole)
    return np.clip(classical + (bg - _vae_roundtrip(pipe, classical)), 0, 1).astype(np.float32), alpha


@torch.no_grad()
def _vae_roundtrip(pipe, image: np.ndarray) -> np.ndarray:
    f = pipe.decomposer.config.vae_scale_factor
    side = pipe.decomposer.config.sample_size * f
    h, w = image.shape[:2]
    x = torch.from_numpy(_resize(image, side, side)).permute(2, 0, 1)[None].float()
    out = decode_rgb(pipe.vae, encode_rgb(pipe.vae, x))[0].permute(1, 2, 0).cpu().numpy()
    return _resize(out, w, h).astype(np.float32)


def load_decomposition_pipeline(path=None, background_mode: str = "residual", **kwargs):
    """The learned `DecompositionPipeline` from a folder (default: the bundled mini family, assets/layergen-mini).

    The folder holds `layer_matte/` (a `LayerMatteNet`, what the mini family ships) and/or the latent
    diffusion decomposer: `decomposer/`, `vae/` and optionally `scheduler/` and `codec/` (a
    TransparentDecoder). A folder that is itself a saved `LayerMatteNet` works too. In the mini family
    `vae/` is shared with the text-to-layer model, so the decomposer's own scheduler config lives in
    `decomposer/scheduler_config.json` (preferred over `scheduler/` when present).
    Weights stored in fp16 load as fp32 (CPU inference).
    """
    from diffusers import AutoencoderKL, DDIMScheduler

    from ..pipelines.pipeline_decomposition import DecompositionPipeline
    from .matte_net import LayerMatteNet, find_layer_matte

    path = Path(path) if path else DEFAULT_DECOMPOSER
    matte_dir = find_layer_matte(path)
    matte = LayerMatteNet.from_pretrained(matte_dir, torch_dtype=torch.float32).eval() if matte_dir else None
    if not (path / "decomposer" / "config.json").is_file():
        if matte is None:
            raise ModelNotFoundError(
                f"{path}: no learned decomposer here (expected layer_matte/config.json or decomposer/config.json). "
                "Train one with training/train_layer_matte.py, or omit --model/--learned to use the classical "
                "pipeline")
        return DecompositionPipeline(matte=matte, **kwargs)
    if not (path / "vae" / "config.json").is_file():
        raise ModelNotFoundError(f"{path}: the learned decomposer needs its VAE in {path / 'vae'}")
    decomposer = LayerDecomposer.from_pretrained(path / "decomposer", torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True, torch_dtype=torch.float32).eval()
    codec = None
    if (path / "codec" / "config.json").is_file():
        from ..models.transparent_codec import TransparentDecoder

        codec = TransparentDecoder.from_pretrained(path / "codec").eval()
    if (path / "decomposer" / "scheduler_config.json").is_file():
        scheduler = DDIMScheduler.from_pretrained(path / "decomposer")
    elif (path / "scheduler").is_dir():
        scheduler = DDIMScheduler.from_pretrained(path / "scheduler")
    else:
        scheduler = DDIMScheduler(prediction_type="v_prediction")
    pipe = DecompositionPipeline(decomposer=decomposer, vae=vae, codec=codec, scheduler=scheduler, matte=matte,
                                 **kwargs)
    pipe.background_mode = background_mode
    return pipe


def save_decomposition_pipeline(dest, decomposer, vae, scheduler, codec=None) -> Path:
    """Write the folder `load_decomposition_pipeline` reads (atomically)."""
    from ..atomic import atomic_dir

    with atomic_dir(dest) as tmp:
        decomposer.save_pretrained(Path(tmp) / "decomposer")
        vae.save_pretrained(Path(tmp) / "vae")
        scheduler.save_pretrained(Path(tmp) / "scheduler")
        if codec is not None:
            codec.save_pretrained(Path(tmp) / "codec")
    return Path(dest)
