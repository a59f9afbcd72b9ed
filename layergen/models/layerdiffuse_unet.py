"""Load the UNet side of the published LayerDiffuse weights into a diffusers `UNet2DConditionModel`.

The released files name modules the way the original (SGM / LDM) UNet does, e.g.
`diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight::lora::0`. Three value
kinds exist:

* `...weight::lora::0` / `::lora::1`: rank-r LoRA factors (0 = up `out x r`, 1 = down `r x in`),
  as in `layer_xl_transparent_attn` (q/k/v/out of every attn1/attn2);
* `...::diff::`: a dense offset added to the base weight (`layer_xl_transparent_conv`, the
  two-step `fg2ble`/`bg2ble`/... models);
* plain diffusers-named tensors (`ld_diffusers_sdxl_attn`): dense offsets already in diffusers naming.

`load_layerdiffuse_unet(unet, state_dict)` maps every key to its diffusers module (the mapping is
derived from the UNet's own config, so it works for SD 1.5, SDXL and other layouts of the same
family) and fuses the change into the weights. Fused weights behave exactly like the original
patcher at scale 1; to undo, keep a copy of the UNet's state dict.

    from safetensors.torch import load_file
    load_layerdiffuse_unet(pipe.unet, load_file("layer_xl_transparent_attn.safetensors"))
"""
from __future__ import annotations

import re

import torch

from ..errors import LayergenError

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
           "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
        "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
        "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}


def sgm_block_map(unet) -> dict[str, str]:
    """SGM block prefixes -> diffusers module prefixes, derived from the UNet's config.

    SGM counts every resnet(+attention) unit and every downsampler as one `input_blocks.k`,
    and every up unit (with an upsampler folded into the last one) as one `output_blocks.k`.
    """
    cfg = unet.config
    lpb = cfg.layers_per_block
    lpb = [lpb] * len(cfg.down_block_types) if isinstance(lpb, int) else list(lpb)
    m: dict[str, str] = {}
    k = 1
    for i, kind in enumerate(cfg.down_block_types):
        for j in range(lpb[i]):
            m[f"input_blocks.{k}.0"] = f"down_blocks.{i}.resnets.{j}"
            if "CrossAttn" in kind:
                m[f"input_blocks.{k}.1"] = f"down_blocks.{i}.attentions.{j}"
            k += 1
        if i < len(cfg.down_block_types) - 1:
            m[f"input_blocks.{k}.0.op"] = f"down_blocks.{i}.downsamplers.0.conv"
            k += 1
    m["middle_block.0"] = "mid_block.resnets.0"
    m["middle_block.1"] = "mid_block.attentions.0"
    m["middle_block.2"] = "mid_block.resnets.1"
    up_lpb = list(reversed(lpb))
    k = 0
    for i, kind in enumerate(cfg.up_block_types):
        n = up_lpb[i] + 1
        for j in range(n):
            m[f"output_blocks.{k}.0"] = f"up_blocks.{i}.resnets.{j}"
            has_attn = "CrossAttn" in kind
            if has_attn:
                m[f"output_blocks.{k}.1"] = f"up_blocks.{i}.attentions.{j}"
            if j == n - 1 and i < len(cfg.up_block_types) - 1:
                m[f"output_blocks.{k}.{2 if has_attn else 1}.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
            k += 1
    return m


_SUFFIX = re.compile(r"^(?P<module>.+?)\.(?P<param>weight|bias)(?P<kind>::lora::[01]|::diff::)?$")


def sgm_to_diffusers_key(key: str, block_map: dict[str, str]) -> tuple[str, str, str]:
    """`diffusion_model.X.weight::lora::0` -> (diffusers module path, 'weight'|'bias', kind)."""
    key = key.removeprefix("model.").removeprefix("diffusion_model.")
    m = _SUFFIX.match(key)
    if not m:
        raise LayergenError(f"unrecognised LayerDiffuse key {key!r}")
    module, param, kind = m.group("module"), m.group("param"), (m.group("kind") or "").strip(":")
    if module in _TOP:
        return _TOP[module], param, kind
    for prefix in sorted(block_map, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            rest = module[len(prefix) + 1:]
            target = block_map[prefix]
            if ".resnets." in target:
                rest = _RESNET.get(rest, rest)
            return f"{target}.{rest}" if rest else target, param, kind
    raise LayergenError(f"LayerDiffuse key {key!r} has no counterpart in this UNet "
                        "; is the checkpoint made for another base model?")


@torch.no_grad()
def widen_conv_in(unet, in_channels: int):
    """Give `unet.conv_in` more input channels (new ones zero), as LayerDiffuse's two-step models need
    (their `::diff::` for conv_in has 8 or 12 input channels). Updates the config."""
    old = unet.conv_in
    if in_channels < old.in_channels:
        raise LayergenError(f"cannot shrink conv_in from {old.in_channels} to {in_channels} channels")
    new = torch.nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding).to(old.weight)
    new.weight.zero_()
    new.weight[:, :old.in_channels] = old.weight
    new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)
    return unet


def plan_layerdiffuse_unet(unet, state_dict) -> dict[str, dict]:
    """Map a published state dict onto `unet` without changing it: target param -> {kind: tensor(s)}.

    Raises LayergenError naming the first key without a home or with a shape mismatch.
    """
    params = dict(unet.named_parameters())
    block_map = sgm_block_map(unet)
    plan: dict[str, dict] = {}
    for key, value in state_dict.items():
        if "::" not in key and key in params:  # diffusers-named dense delta
            target, kind, part = key, "diff", None
        else:
            module, param, kind = sgm_to_diffusers_key(key, block_map)
            target = f"{module}.{param}"
            part = kind.split("::")[-1] if kind.startswith("lora") else None
            kind = "lora" if kind.startswith("lora") else "diff"
        if target not in params:
            raise LayergenError(f"LayerDiffuse key {key!r} maps to {target!r}, which this UNet does not have")
        entry = plan.setdefault(target, {})
        if kind == "lora":
            entry.setdefault("lora", {})["up" if part == "0" else "down"] = value
        else:
            entry["diff"] = value
    for target, entry in plan.items():
        shape = tuple(params[target].shape)
        if "diff" in entry and tuple(entry["diff"].shape) != shape:
            raise LayergenError(f"{target}: offset shape {tuple(entry['diff'].shape)} != weight shape {shape}")
        if "lora" in entry:
            lo = entry["lora"]
            if set(lo) != {"up", "down"}:
                raise LayergenError(f"{target}: LoRA needs both ::lora::0 (up) and ::lora::1 (down)")
            delta_shape = (lo["up"].shape[0], lo["down"].shape[1])
            if lo["up"].shape[1] != lo["down"].shape[0] or delta_shape != shape[:2] or len(shape) != 2:
                raise LayergenError(f"{target}: LoRA {tuple(lo['up'].shape)} x {tuple(lo['down'].shape)} "
                                    f"does not fit weight {shape}")
    return plan


@torch.no_grad()
def load_layerdiffuse_unet(unet, state_dict, scale: float = 1.0) -> int:
    """Fuse published LayerDiffuse UNet weights into `unet` in place; returns the number of tensors changed."""
    plan = plan_layerdiffuse_unet(unet, state_dict)
    params = dict(unet.named_parameters())
    for target, entry in plan.items():
        p = params[target]
        delta = torch.zeros_like(p, dtype=torch.float32)
        if "diff" in entry:
            delta += entry["diff"].to(torch.float32)
        if "lora" in entry:
            delta += entry["lora"]["up"].to(torch.float32) @ entry["lora"]["down"].to(torch.float32)
        p.add_((scale * delta).to(p.dtype))
    return len(plan)
