"""LayerDiffuse-style transparent latent codec ("latent transparency").

A frozen RGB VAE (SD 1.5 / SDXL / the bundled mini VAE) cannot store alpha. LayerDiffuse
keeps it frozen and adds two small models around it:

* `TransparentEncoder`: RGBA -> a latent *offset*. The base VAE encodes the RGB premultiplied
  onto mid-grey, ``(rgb * 2 - 1) * a``; the final latent is ``mean + std * offset`` — the
  offset takes the place of the sampling noise, so alpha hides inside the posterior and the
  latent stays a valid latent of the grey-backed image.
* `TransparentDecoder`: a UNet that reads the base VAE's decoded RGB (in [0, 1]) plus the
  (unscaled) latent and returns straight-alpha RGBA, optionally with LayerDiffuse's 8-pass
  flip/rotation test-time augmentation and a per-pixel median.

The classes are configured, not specialised: their defaults are the published LayerDiffuse
layout (so `layerdiffuse_keys.load_layerdiffuse_weights` loads the released SD 1.5 / SDXL
files, or a FLUX-class port with 16 latent channels), and `MINI_ENCODER_CONFIG` /
`MINI_DECODER_CONFIG` are small versions for the CPU-trained mini family.

Reference: Zhang & Agrawala, "Transparent Image Layer Diffusion using Latent Transparency"
(2024); lllyasviel/LayerDiffuse_DiffusersCLI ``lib_layerdiffuse/vae.py`` (read, not copied).

Tensor conventions at this module's boundary: RGBA in [0, 1], channel order R, G, B, A,
straight (not premultiplied) colour. Published checkpoints emit A, R, G, B; the key mapper
permutes their output conv once at load time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block, get_up_block
from torch import nn

from ..errors import LayergenError

__all__ = [
    "MINI_DECODER_CONFIG",
    "MINI_ENCODER_CONFIG",
    "TransparentDecoder",
    "TransparentEncoder",
    "checkerboard_composite",
    "decode_rgba",
    "encode_rgba",
    "pad_rgb",
    "premultiply_on_grey",
    "tta_transforms",
    "vae_scale_factor",
]

# Small configs for the bundled mini family (CPU-trainable in minutes, ~1.3M params together):
# latent injected at 1/8 like the published model, attention only at the lowest (1/8) level.
MINI_ENCODER_CONFIG = dict(block_out_channels=(16, 32, 64, 128), latent_channels=4)
MINI_DECODER_CONFIG = dict(
    block_out_channels=(16, 32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    latent_channels=4,
    latent_injection_index=3,
)


# TTA runs several orientations per forward, up to this many pixels per call.
_TTA_PIXELS_PER_CALL = 1 << 21


def _zero_(module: nn.Module) -> nn.Module:
    """Zero-initialise a layer so a freshly added branch starts as a no-op."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _check_rgba(rgba: torch.Tensor, name: str = "rgba") -> None:
    if not torch.is_tensor(rgba) or rgba.ndim != 4 or rgba.shape[1] != 4:
        shape = tuple(rgba.shape) if torch.is_tensor(rgba) else type(rgba).__name__
        raise LayergenError(f"{name} must be a B x 4 x H x W tensor (RGBA in [0, 1]), got {shape}")


def pad_rgb(rgba: torch.Tensor) -> torch.Tensor:
    """Fill invisible pixels with a smooth, alpha-weighted blur of the visible colours.

    Why: the encoder should see colour *everywhere*, not the arbitrary RGB stored under
    alpha = 0. We build an area pyramid of premultiplied colour and alpha, then from the
    coarsest level upwards composite each level over the upsampled estimate
    (``fg = c + fg * (1 - a)``), which is what the published encoder was trained on.
    Returns B x 3 x H x W in [0, 1]; visible pixels keep their colour (scaled by alpha at
    partial coverage plus fill for the rest).
    """
    _check_rgba(rgba)
    rgb, alpha = rgba[:, :3].float(), rgba[:, 3:].float()
    levels = [(rgb * alpha, alpha)]
    while min(levels[-1][1].shape[-2:]) > 1:
        c, a = levels[-1]
        h, w = c.shape[-2:]
        size = (max(1, h // 2), max(1, w // 2))
        levels.append((F.interpolate(c, size=size, mode="area"), F.interpolate(a, size=size, mode="area")))
    c_top, a_top = levels[-1]
    fg = c_top.sum(dim=(2, 3), keepdim=True) / a_top.sum(dim=(2, 3), keepdim=True).clamp_min(1e-8)
    for c, a in reversed(levels):
        if fg.shape[-2:] != c.shape[-2:]:
            fg = F.interpolate(fg, size=c.shape[-2:], mode="bilinear", align_corners=False)
        fg = c + fg * (1.0 - a)
    return fg.clamp(0, 1).to(rgba.dtype)


def premultiply_on_grey(rgba: torch.Tensor) -> torch.Tensor:
    """RGBA in [0, 1] -> the base VAE's input in [-1, 1]: colour over mid-grey, ``(rgb*2-1)*a``."""
    _check_rgba(rgba)
    return (rgba[:, :3] * 2.0 - 1.0) * rgba[:, 3:]


def checkerboard_composite(rgba: torch.Tensor, tile: int = 8) -> torch.Tensor:
    """Straight RGBA -> RGB over a light/dark grey checkerboard, for previews (B x 3 x H x W)."""
    _check_rgba(rgba)
    h, w = rgba.shape[-2:]
    yy = torch.arange(h, device=rgba.device)[:, None] // tile
    xx = torch.arange(w, device=rgba.device)[None, :] // tile
    board = torch.where((yy + xx) % 2 == 0, 0.8, 0.6).to(rgba.dtype)[None, None]
    a = rgba[:, 3:]
    return rgba[:, :3] * a + board * (1 - a)


def _pad_to(x: torch.Tensor, mult_h: int, mult_w: int, mode: str = "replicate") -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = (-h) % mult_h, (-w) % mult_w
    if ph == 0 and pw == 0:
        return x
    if mode == "constant":
        return F.pad(x, (0, pw, 0, ph))
    return F.pad(x, (0, pw, 0, ph), mode=mode)


class TransparentEncoder(ModelMixin, ConfigMixin):
    """RGBA -> latent offset at the base VAE's resolution (``H / 2**(len(block_out_channels)-1)``).

    A plain conv stack with SiLU, two 3x3 convs per level, stride 2 on the first conv of every
    level after the first, and a zero-initialised output conv (so an untrained encoder leaves
    the base VAE's behaviour untouched). Parameters live in ``blocks`` (an `nn.Sequential`
    with SiLUs at the odd indices), which is exactly the published key layout
    ``blocks.{0..16}`` for the default config.

    Input: straight RGBA in [0, 1]; internally the network sees ``[alpha, pad_rgb(rgba)]``
    like the published model. Output: ``offset_scale * blocks(...)``; ``offset_scale`` lets a
    port with weights trained under a different output scale load unchanged.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        block_out_channels: tuple[int, ...] = (32, 64, 128, 256),
        latent_channels: int = 4,
        offset_scale: float = 1.0,
    ):
        super().__init__()
        if in_channels != 4:
            raise LayergenError("TransparentEncoder takes [alpha, padded RGB]: in_channels must be 4")
        layers: list[nn.Module] = []
        prev = in_channels
        for i, ch in enumerate(block_out_channels):
            layers += [nn.Conv2d(prev, ch, 3, stride=1 if i == 0 else 2, padding=1), nn.SiLU()]
            layers += [nn.Conv2d(ch, ch, 3, padding=1), nn.SiLU()]
            prev = ch
        layers.append(_zero_(nn.Conv2d(prev, latent_channels, 3, padding=1)))
        self.blocks = nn.Sequential(*layers)

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def forward(self, rgba: torch.Tensor) -> torch.Tensor:
        """Straight RGBA B x 4 x H x W in [0, 1] -> offset B x C x ceil(H/f) x ceil(W/f)."""
        _check_rgba(rgba)
        f = self.downscale_factor
        x = _pad_to(rgba, f, f, mode="constant")  # transparent padding
        x = torch.cat([x[:, 3:], pad_rgb(x)], dim=1).to(self.dtype)
        return self.blocks(x) * self.config.offset_scale


class TransparentDecoder(ModelMixin, ConfigMixin):
    """Base-VAE RGB (in [0, 1]) + unscaled latent -> straight RGBA (R, G, B, A).

    A diffusers-block UNet without time embedding. The latent enters through a
    zero-initialised 1x1 conv (``latent_conv_in``) added to the features right before down
    block ``latent_injection_index`` (the latent's own resolution), so an untrained decoder
    behaves like a plain image-to-image UNet and learns to read alpha hints from the latent.
    Defaults reproduce the published LayerDiffuse ``UNet1024`` (~104M parameters); see
    `MINI_DECODER_CONFIG` for the mini one.

    `forward` is one raw pass (for training): any H x W works (replicate-padded to the UNet's
    multiple and cropped back) as long as the pixels are ``2**latent_injection_index`` times
    the latent. `decode` adds clamping and the 8-pass flip/rotation median.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 4,
        latent_channels: int = 4,
        latent_injection_index: int = 3,
        down_block_types: tuple[str, ...] = ("DownBlock2D",) * 4 + ("AttnDownBlock2D",) * 3,
        up_block_types: tuple[str, ...] = ("AttnUpBlock2D",) * 3 + ("UpBlock2D",) * 4,
        block_out_channels: tuple[int, ...] = (32, 32, 64, 128, 256, 512, 512),
        layers_per_block: int = 2,
        attention_head_dim: int | None = 8,
        norm_num_groups: int = 4,
        norm_eps: float = 1e-5,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        n = len(block_out_channels)
        if not (len(down_block_types) == len(up_block_types) == n):
            raise LayergenError("down_block_types, up_block_types and block_out_channels must have the same length")
        if not 1 <= latent_injection_index < n:
            raise LayergenError(f"latent_injection_index must be in [1, {n - 1}], got {latent_injection_index}")

        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        self.latent_conv_in = _zero_(nn.Conv2d(latent_channels, block_out_channels[latent_injection_index - 1], 1))

        def heads(ch):
            return attention_head_dim if attention_head_dim is not None else ch

        self.down_blocks = nn.ModuleList()
        out_ch = block_out_channels[0]
        for i, kind in enumerate(down_block_types):
            in_ch, out_ch = out_ch, block_out_channels[i]
            self.down_blocks.append(get_down_block(
                kind, num_layers=layers_per_block, in_channels=in_ch, out_channels=out_ch, temb_channels=None,
                add_downsample=i < n - 1, resnet_eps=norm_eps, resnet_act_fn="silu", resnet_groups=norm_num_groups,
                attention_head_dim=heads(out_ch), downsample_padding=1, resnet_time_scale_shift="default",
                downsample_type="conv", dropout=0.0))

        self.mid_block = UNetMidBlock2D(
            in_channels=block_out_channels[-1], temb_channels=None, dropout=0.0, resnet_eps=norm_eps,
            resnet_act_fn="silu", output_scale_factor=1.0, resnet_time_scale_shift="default",
            attention_head_dim=heads(block_out_channels[-1]), resnet_groups=norm_num_groups, attn_groups=None,
            add_attention=mid_block_add_attention)

        self.up_blocks = nn.ModuleList()
        rev = list(reversed(block_out_channels))
        out_ch = rev[0]
        for i, kind in enumerate(up_block_types):
            prev_ch, out_ch = out_ch, rev[i]
            in_ch = rev[min(i + 1, n - 1)]
            self.up_blocks.append(get_up_block(
                kind, num_layers=layers_per_block + 1, in_channels=in_ch, out_channels=out_ch,
                prev_output_channel=prev_ch, temb_channels=None, add_upsample=i < n - 1, resnet_eps=norm_eps,
                resnet_act_fn="silu", resnet_groups=norm_num_groups, attention_head_dim=heads(out_ch),
                resnet_time_scale_shift="default", upsample_type="conv", dropout=0.0))

        self.conv_norm_out = nn.GroupNorm(num_channels=block_out_channels[0], num_groups=norm_num_groups, eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, 3, padding=1)

    # -- geometry ---------------------------------------------------------------------------
    @property
    def latent_scale(self) -> int:
        """Pixels per latent cell the decoder expects (8 for SD-class VAEs)."""
        return 2 ** self.config.latent_injection_index

    @property
    def pixel_multiple(self) -> int:
        """The UNet needs H and W to be multiples of this (64 for the published model)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def _pad_inputs(self, pixel: torch.Tensor, latent: torch.Tensor):
        if pixel.ndim != 4 or latent.ndim != 4 or pixel.shape[0] != latent.shape[0]:
            raise LayergenError(f"decoder expects B x 3 x H x W pixels and B x C x h x w latents, got "
                                f"{tuple(pixel.shape)} and {tuple(latent.shape)}")
        s = self.latent_scale
        if pixel.shape[-2] != latent.shape[-2] * s or pixel.shape[-1] != latent.shape[-1] * s:
            raise LayergenError(f"pixels {tuple(pixel.shape[-2:])} must be {s}x the latent {tuple(latent.shape[-2:])}")
        lm = max(1, self.pixel_multiple // s)
        return _pad_to(pixel, lm * s, lm * s), _pad_to(latent, lm, lm)

    # -- one pass -----------------------------------------------------------------------------
    def forward(self, pixel: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """One raw (unclamped) pass: B x 3 x H x W in [0, 1] + B x C x H/8 x W/8 -> B x 4 x H x W."""
        h, w = pixel.shape[-2:]
        pixel, latent = self._pad_inputs(pixel, latent)
        pixel, latent = pixel.to(self.dtype), latent.to(self.dtype)
        sample = self.conv_in(pixel)
        residuals = (sample,)
        for i, block in enumerate(self.down_blocks):
            if i == self.config.latent_injection_index:
                sample = sample + self.latent_conv_in(latent)
            sample, res = block(hidden_states=sample, temb=None)
            residuals += res
        sample = self.mid_block(sample, None)
        for block in self.up_blocks:
            k = len(block.resnets)
            res, residuals = residuals[-k:], residuals[:-k]
            sample = block(sample, res, None)
        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))
        return sample[..., :h, :w]

    # -- inference ----------------------------------------------------------------------------
    def decode(self, pixel: torch.Tensor, latent: torch.Tensor, tta: bool = True) -> torch.Tensor:
        """Clamped straight RGBA in [0, 1]; with ``tta`` the per-pixel median of 8 dihedral passes.

        Why the median: the UNet is not exactly rotation/flip equivariant; averaging its
        orientations removes direction-dependent artefacts, and the median (unlike the mean)
        ignores the one pass that hallucinates an edge.
        """
        if not tta:
            return self(pixel, latent).clamp(0, 1)
        h, w = pixel.shape[-2:]
        pixel, latent = self._pad_inputs(pixel, latent)  # pad once so every orientation sees the same content
        outs = [None] * 8
        # Batch passes of equal shape together (all 8 when square, two groups of 4 otherwise), a few
        # million pixels per forward at most so large images do not multiply peak memory by 8.
        groups = ([0, 2, 4, 6], [1, 3, 5, 7]) if pixel.shape[-2] != pixel.shape[-1] else ([*range(8)],)
        pixels = pixel.shape[0] * pixel.shape[-2] * pixel.shape[-1]
        per_call = max(1, min(8, _TTA_PIXELS_PER_CALL // max(1, pixels)))
        groups = [g[i:i + per_call] for g in groups for i in range(0, len(g), per_call)]
        for group in groups:
            ts = [tta_transforms()[j] for j in group]
            px = torch.cat([fwd(pixel) for fwd, _ in ts])
            lt = torch.cat([fwd(latent) for fwd, _ in ts])
            y = self(px, lt).clamp(0, 1).chunk(len(group))
            for j, (_, inv), yj in zip(group, ts, y):
                outs[j] = inv(yj)
        return torch.stack(outs).median(dim=0).values[..., :h, :w]


def tta_transforms():
    """The 8 dihedral transforms LayerDiffuse uses, as (forward, inverse) pairs on B x C x H x W.

    Index ``4 * flip + k``: optional horizontal flip, then ``rot90`` by k quarter turns.
    """
    def make(flip, k):
        def fwd(x):
            return torch.rot90(torch.flip(x, dims=(3,)) if flip else x, k=k, dims=(2, 3))

        def inv(y):
            y = torch.rot90(y, k=-k, dims=(2, 3))
            return torch.flip(y, dims=(3,)) if flip else y
        return fwd, inv
    return [make(flip, k) for flip in (False, True) for k in range(4)]


# -- helpers the pipelines call ---------------------------------------------------------------

def vae_scale_factor(vae) -> int:
    """Pixels per latent cell of a diffusers AutoencoderKL (8 for SD / SDXL / FLUX)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _latent_norm(vae):
    scaling = getattr(vae.config, "scaling_factor", None) or 1.0
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return float(scaling), float(shift)


def encode_rgba(vae, encoder: TransparentEncoder, rgba: torch.Tensor, generator: torch.Generator | None = None,
                sample: bool = False) -> torch.Tensor:
    """Straight RGBA B x 4 x H x W in [0, 1] -> diffusion-ready latents ``(z - shift) * scaling``.

    ``z = mean + std * (offset + eps)`` where the base VAE encodes the RGB premultiplied onto
    grey and ``offset`` comes from `encoder`; ``eps`` is zero unless ``sample`` (then drawn
    from ``generator``). Sizes that are not a multiple of the VAE factor are padded with
    transparent pixels (bottom/right); crop the decoded result back.
    """
    _check_rgba(rgba)
    f = vae_scale_factor(vae)
    if encoder.downscale_factor != f:
        raise LayergenError(f"transparent encoder downsamples by {encoder.downscale_factor} but the VAE by {f}")
    rgba = _pad_to(rgba.float().clamp(0, 1), f, f, mode="constant")
    dist = vae.encode(premultiply_on_grey(rgba).to(device=vae.device, dtype=vae.dtype)).latent_dist
    noise = encoder(rgba.to(device=encoder.device)).to(dist.mean)
    if sample:
        from diffusers.utils.torch_utils import randn_tensor
        noise = noise + randn_tensor(dist.mean.shape, generator=generator, device=dist.mean.device,
                                     dtype=dist.mean.dtype)
    z = dist.mean + dist.std * noise
    scaling, shift = _latent_norm(vae)
    return (z - shift) * scaling


def decode_rgba(vae, decoder: TransparentDecoder, latents: torch.Tensor, tta: bool = True) -> torch.Tensor:
    """Diffusion latents -> straight RGBA B x 4 x H x W in [0, 1] (base VAE decode + transparent decoder)."""
    if latents.ndim != 4:
        raise LayergenError(f"latents must be B x C x h x w, got {tuple(latents.shape)}")
    scaling, shift = _latent_norm(vae)
    z = latents / scaling + shift
    pixel = vae.decode(z.to(device=vae.device, dtype=vae.dtype)).sample
    pixel = (pixel.float() * 0.5 + 0.5).clamp(0, 1)
    return decoder.decode(pixel.to(decoder.device), z.to(decoder.device), tta=tta).float()
