"""Load the published LayerDiffuse transparent VAE encoder/decoder files into our classes.

The released ``vae_transparent_decoder`` (SD 1.5 / SDXL, "UNet1024") is built from diffusers
UNet blocks, so its keys are already ours; two things differ:

* output channel order: published ``[A, R, G, B]``, ours ``[R, G, B, A]`` — we permute the
  rows of ``conv_out`` once at load time (and back on export);
* wrappers and old diffusers versions: a ``model.`` prefix (the decoder/encoder wrappers'
  own state dicts) and pre-0.14 attention names (``query/key/value/proj_attn``) are accepted.

The released ``vae_transparent_encoder`` is ``blocks.{0..16}`` (convs at even indices of an
``nn.Sequential`` with SiLUs between), which `TransparentEncoder` reproduces key for key.

The architecture is read from the tensors (channels, depth, where attention sits, latent
channels: 4 for SD-class, 16 for FLUX-class ports), so the same loader also takes a mini codec
exported with `to_layerdiffuse_state_dict`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..errors import FormatError, LayergenError, ModelNotFoundError

__all__ = [
    "LAYERDIFFUSE_DECODER_CONFIG",
    "LAYERDIFFUSE_ENCODER_CONFIG",
    "PUBLISHED_TO_OURS_OUT",
    "convert_layerdiffuse_state_dict",
    "infer_layerdiffuse_config",
    "load_layerdiffuse_weights",
    "to_layerdiffuse_state_dict",
]

# The published layouts (what `infer_layerdiffuse_config` finds in the released files).
LAYERDIFFUSE_ENCODER_CONFIG = dict(in_channels=4, block_out_channels=(32, 64, 128, 256), latent_channels=4)
LAYERDIFFUSE_DECODER_CONFIG = dict(
    in_channels=3, out_channels=4, latent_channels=4, latent_injection_index=3,
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D",) * 3,
    up_block_types=("AttnUpBlock2D",) * 3 + ("UpBlock2D",) * 4,
    block_out_channels=(32, 32, 64, 128, 256, 512, 512), layers_per_block=2,
    attention_head_dim=8, norm_num_groups=4, norm_eps=1e-5, mid_block_add_attention=True,
)

# Our output channel i comes from published channel PUBLISHED_TO_OURS_OUT[i] ([A,R,G,B] -> [R,G,B,A]).
PUBLISHED_TO_OURS_OUT = (1, 2, 3, 0)
_OURS_TO_PUBLISHED_OUT = (3, 0, 1, 2)

_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_PREFIXES = ("model.", "module.", "transparent_decoder.", "transparent_encoder.")


def _load_state_dict(path_or_state_dict) -> dict:
    if isinstance(path_or_state_dict, dict):
        return dict(path_or_state_dict)
    path = Path(os.fspath(path_or_state_dict))
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
        if len(files) != 1:
            raise ModelNotFoundError(f"{path}: expected one .safetensors/.bin/.pt weights file, found {len(files)}")
        path = files[0]
    if not path.is_file():
        raise ModelNotFoundError(f"LayerDiffuse weights not found: {path} "
                                 "(pass the vae_transparent_*.safetensors file)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt / truncated / not a checkpoint
        raise FormatError(f"cannot read weights from {path}: {exc}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise FormatError(f"{path} is not a state dict of tensors")
    return sd


def _strip(sd: dict) -> dict:
    """Drop wrapper prefixes and rename pre-0.14 diffusers attention keys."""
    out = {}
    for k, v in sd.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        m = re.match(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$", k)
        if m:
            k = f"{m.group(1)}.{_LEGACY_ATTN[m.group(2)]}.{m.group(3)}"
            if v.ndim == 4:  # very old checkpoints stored attention projections as 1x1 convs
                v = v[:, :, 0, 0]
        out[k] = v
    return out


def _detect_kind(sd: dict) -> str:
    if any(k.startswith("blocks.") for k in sd):
        return "encoder"
    if "latent_conv_in.weight" in sd or "conv_in.weight" in sd:
        return "decoder"
    raise FormatError("not a LayerDiffuse transparent VAE file: no 'blocks.*' (encoder) or 'conv_in' (decoder) keys")


def infer_layerdiffuse_config(state_dict: dict, kind: str) -> dict:
    """Read the architecture (a config for our class) off a published-layout state dict."""
    sd = _strip(state_dict)
    try:
        if kind == "encoder":
            idx = sorted({int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.weight$", k))})
            if not idx or idx != list(range(0, 2 * len(idx), 2)) or len(idx) % 2 == 0:
                raise FormatError(f"encoder conv indices {idx} are not 0, 2, 4, ... (an odd count)")
            levels = (len(idx) - 1) // 2
            chans = tuple(int(sd[f"blocks.{4 * i}.weight"].shape[0]) for i in range(levels))
            return dict(in_channels=int(sd["blocks.0.weight"].shape[1]), block_out_channels=chans,
                        latent_channels=int(sd[f"blocks.{idx[-1]}.weight"].shape[0]))
        n = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"^down_blocks\.(\d+)\.", k)))
        chans = tuple(int(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in range(n))
        has_attn = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in sd) for i in range(n)]
        up_attn = [any(k.startswith(f"up_blocks.{i}.attentions.") for k in sd) for i in range(n)]
        layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"^down_blocks\.0\.resnets\.(\d+)\.", k)))
        lat_ch = int(sd["latent_conv_in.weight"].shape[0])
        inject = _injection_index(chans, lat_ch)
        return dict(
            in_channels=int(sd["conv_in.weight"].shape[1]), out_channels=int(sd["conv_out.weight"].shape[0]),
            latent_channels=int(sd["latent_conv_in.weight"].shape[1]), latent_injection_index=inject,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in has_attn),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in up_attn),
            # GroupNorm group count and head size are not stored in tensors: the published values.
            block_out_channels=chans, layers_per_block=layers, attention_head_dim=8, norm_num_groups=4,
            norm_eps=1e-5, mid_block_add_attention=any(k.startswith("mid_block.attentions.") for k in sd),
        )
    except (KeyError, ValueError, StopIteration) as exc:
        raise FormatError(f"cannot read the LayerDiffuse {kind} layout from the state dict: {exc}") from None


def _injection_index(chans, lat_ch) -> int:
    # Published: latent_conv_in outputs block_out_channels[2] and joins before down block 3 (1/8
    # resolution of an 8x VAE). Channel counts repeat (32, 32, ...), so prefer index 3 when it fits.
    if len(chans) > 3 and chans[2] == lat_ch:
        return 3
    for i in range(1, len(chans)):
        if chans[i - 1] == lat_ch:
            return i
    raise FormatError(f"latent_conv_in has {lat_ch} output channels, matching no down block")


def convert_layerdiffuse_state_dict(state_dict: dict, kind: str) -> dict:
    """Published-layout state dict -> our class's keys and channel order (tensors are not copied)."""
    sd = _strip(state_dict)
    if kind == "decoder":
        for name in ("conv_out.weight", "conv_out.bias"):
            if name in sd and sd[name].shape[0] == 4:
                sd[name] = sd[name][list(PUBLISHED_TO_OURS_OUT)]
    return sd


def to_layerdiffuse_state_dict(model) -> dict:
    """Our encoder/decoder -> the published key layout and channel order (for other tools)."""
    from .transparent_codec import TransparentDecoder
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if isinstance(model, TransparentDecoder):
        for name in ("conv_out.weight", "conv_out.bias"):
            if sd[name].shape[0] == 4:
                sd[name] = sd[name][list(_OURS_TO_PUBLISHED_OUT)]
    return sd


def load_layerdiffuse_weights(path_or_state_dict, kind: str | None = "decoder", offset_scale: float = 1.0,
                              torch_dtype: torch.dtype | None = None, **config_overrides):
    """Build a `TransparentDecoder` / `TransparentEncoder` from a published LayerDiffuse file.

    ``kind`` is "decoder", "encoder" or None (detect from the keys). Loading is strict: a
    missing or unexpected key, or a shape mismatch, raises `FormatError`. ``offset_scale``
    multiplies the encoder's output: 1.0 matches how the forge/ComfyUI ports feed the
    released encoder; lllyasviel's DiffusersCLI port uses 300.0 with its own
    ``ld_diffusers_*_vae_transparent_encoder`` weights. ``config_overrides`` replace inferred
    config entries that tensors cannot reveal (``norm_num_groups``, ``attention_head_dim``,
    ``latent_injection_index`` when channel counts repeat).
    """
    from .transparent_codec import TransparentDecoder, TransparentEncoder
    raw = _load_state_dict(path_or_state_dict)
    found = _detect_kind(_strip(raw))
    if kind is None:
        kind = found
    if kind not in ("decoder", "encoder"):
        raise LayergenError(f"kind must be 'decoder' or 'encoder', got {kind!r}")
    if kind != found:
        raise FormatError(f"these weights look like a transparent {found}, not a {kind}")
    config = {**infer_layerdiffuse_config(raw, kind), **config_overrides}
    sd = convert_layerdiffuse_state_dict(raw, kind)
    if kind == "encoder":
        model = TransparentEncoder(offset_scale=offset_scale, **config)
    else:
        model = TransparentDecoder(**config)
    ours = model.state_dict()
    missing = sorted(set(ours) - set(sd))
    unexpected = sorted(set(sd) - set(ours))
    bad = sorted(k for k in set(ours) & set(sd) if tuple(ours[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or bad:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", bad)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''} ({len(keys)})")
        raise FormatError(f"LayerDiffuse {kind} weights do not fit: " + "; ".join(parts))
    model.load_state_dict({k: v.to(ours[k].dtype) for k, v in sd.items()}, strict=True)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    return model.eval()
