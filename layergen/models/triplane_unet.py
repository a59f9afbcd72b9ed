"""Layer-conditioned diffusion UNet over channel-stacked tri-planes (HumanLiff stage 2).

A tri-plane (3, C, R, R) is stacked into one (3C, R, R) image and denoised by a diffusers
`UNet2DModel`. Two conditions:

* the layer index k (0 body, 1 pants, ...) is a class label: its embedding is added to the
  timestep embedding (UNet2DModel's `num_class_embeds`);
* the tri-plane of the layer below ("hierarchical fusion") goes through a ControlNet-style
  side encoder with the main encoder's block structure. Every side feature map passes a
  zero-initialised 1x1 conv and is added to the main UNet's skip connection at the same
  resolution (and to the mid-block output), so at initialisation the model is exactly the
  unconditional UNet and the condition is blended in as training finds it useful.
  HumanLiff feeds the side encoder x_t + x_cond; we concatenate [x_t, x_cond] instead,
  because our targets are residuals whose scale differs from the condition's.

`sample_scales[k]` and `cond_scale` (set by the training script from data statistics) map
plane values to the unit-ish range the noise schedule expects; the pipeline divides them
back out. They live in the config so a saved model is self-describing.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DModel, UNet2DOutput
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block


def zero_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class LayeredTriplaneUNet(ModelMixin, ConfigMixin):
    """UNet2DModel (class = layer index) + zero-initialised side encoder for the layer below."""

    @register_to_config
    def __init__(self, plane_channels: int = 9, plane_resolution: int = 32,
                 block_out_channels: tuple = (32, 64, 64), layers_per_block: int = 1,
                 down_block_types: tuple | None = None, up_block_types: tuple | None = None,
                 norm_num_groups: int = 8, num_layer_classes: int = 5, add_attention: bool = True,
                 attention_head_dim: int = 8, side_mid_block: bool = True,
                 sample_scales: tuple | None = None, cond_scale: float = 1.0):
        super().__init__()
        C = 3 * plane_channels
        n = len(block_out_channels)
        down_block_types = tuple(down_block_types or ("DownBlock2D",) * n)
        up_block_types = tuple(up_block_types or ("UpBlock2D",) * n)
        self.unet = UNet2DModel(sample_size=plane_resolution, in_channels=C, out_channels=C,
                                block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                                down_block_types=down_block_types, up_block_types=up_block_types,
                                norm_num_groups=norm_num_groups, num_class_embeds=num_layer_classes,
                                add_attention=add_attention, attention_head_dim=attention_head_dim)
        temb = block_out_channels[0] * 4
        # side encoder: same block structure as the main encoder, input [x_t, x_cond]
        self.side_conv_in = nn.Conv2d(2 * C, block_out_channels[0], kernel_size=3, padding=1)
        self.side_blocks = nn.ModuleList()
        skip_channels = [block_out_channels[0]]
        out_ch = block_out_channels[0]
        for i, kind in enumerate(down_block_types):
            in_ch, out_ch = out_ch, block_out_channels[i]
            final = i == n - 1
            self.side_blocks.append(get_down_block(
                kind, num_layers=layers_per_block, in_channels=in_ch, out_channels=out_ch, temb_channels=temb,
                add_downsample=not final, resnet_eps=1e-5, resnet_act_fn="silu", resnet_groups=norm_num_groups,
                attention_head_dim=attention_head_dim, downsample_padding=1, resnet_time_scale_shift="default"))
            skip_channels += [out_ch] * layers_per_block + ([] if final else [out_ch])
        self.side_zero = nn.ModuleList(zero_conv(c) for c in skip_channels)
        if side_mid_block:
            self.side_mid = UNetMidBlock2D(in_channels=block_out_channels[-1], temb_channels=temb,
                                           resnet_groups=norm_num_groups, attention_head_dim=attention_head_dim,
                                           add_attention=add_attention)
            self.side_mid_zero = zero_conv(block_out_channels[-1])
        else:
            self.side_mid = self.side_mid_zero = None

    @property
    def num_planes_channels(self) -> int:
        return 3 * self.config.plane_channels

    def _embedding(self, sample, timestep, class_labels):
        u = self.unet
        t = timestep
        if not torch.is_tensor(t):
            t = torch.tensor([t], dtype=torch.long, device=sample.device)
        elif t.dim() == 0:
            t = t[None].to(sample.device)
        t = t * torch.ones(sample.shape[0], dtype=t.dtype, device=t.device)
        emb = u.time_embedding(u.time_proj(t).to(dtype=self.dtype))
        if class_labels is None:
            raise ValueError("class_labels (the layer index) is required")
        return emb + u.class_embedding(class_labels).to(dtype=self.dtype)

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor, cond: torch.Tensor | None = None,
                return_dict: bool = True):
        """sample, cond: (B, 3C, R, R) (cond = layer below, zeros for the body); class_labels: (B,) layer index."""
        u = self.unet
        emb = self._embedding(sample, timestep, class_labels)
        if cond is None:
            cond = torch.zeros_like(sample)
        # side encoder
        s = self.side_conv_in(torch.cat([sample, cond], 1))
        side = [s]
        for blk in self.side_blocks:
            s, res = blk(hidden_states=s, temb=emb)
            side += list(res)
        # main encoder, side features added to every skip
        h = u.conv_in(sample)
        skips = [h]
        for blk in u.down_blocks:
            h, res = blk(hidden_states=h, temb=emb)
            skips += list(res)
        skips = [a + z(b) for a, z, b in zip(skips, self.side_zero, side)]
        if u.mid_block is not None:
            h = u.mid_block(h, emb)
        if self.side_mid is not None:
            h = h + self.side_mid_zero(self.side_mid(s, emb))
        for blk in u.up_blocks:
            res, skips = tuple(skips[-len(blk.resnets):]), skips[:-len(blk.resnets)]
            h = blk(h, res, emb)
        out = u.conv_out(u.conv_act(u.conv_norm_out(h)))
        if not return_dict:
            return (out,)
        return UNet2DOutput(sample=out)
