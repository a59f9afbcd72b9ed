"""Published LayerDiffuse checkpoint layout -> our classes.

The published key/shape tables below are written down from the released layout
(UNet1024: 7 levels (32, 32, 64, 128, 256, 512, 512), 2 resnets down / 3 up, attention in the
3 lowest levels + mid, 1x1 `latent_conv_in` 4 -> 64; encoder `blocks.{0..16}`), NOT taken from
our models, so a wrong mapping or a drifted architecture makes these tests fail.
"""
import pytest
import torch
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block, get_up_block
from torch import nn

from layergen.errors import FormatError, ModelNotFoundError
from layergen.models.layerdiffuse_keys import (
    LAYERDIFFUSE_DECODER_CONFIG, LAYERDIFFUSE_ENCODER_CONFIG, convert_layerdiffuse_state_dict,
    infer_layerdiffuse_config, load_layerdiffuse_weights, to_layerdiffuse_state_dict)
from layergen.models.transparent_codec import TransparentDecoder, TransparentEncoder, pad_rgb


# -- the published layout, written down -------------------------------------------------------

def published_decoder_table(channels=(32, 32, 64, 128, 256, 512, 512), attn_levels=(4, 5, 6), latent_channels=4,
                            layers=2):
    """key -> shape of a UNet1024 state dict, derived from the UNet's skip-connection bookkeeping."""
    t = {}

    def conv(name, o, i, k):
        t[f"{name}.weight"], t[f"{name}.bias"] = (o, i, k, k), (o,)

    def norm(name, c):
        t[f"{name}.weight"], t[f"{name}.bias"] = (c,), (c,)

    def resnet(p, cin, cout):
        norm(f"{p}.norm1", cin)
        conv(f"{p}.conv1", cout, cin, 3)
        norm(f"{p}.norm2", cout)
        conv(f"{p}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{p}.conv_shortcut", cout, cin, 1)

    def attention(p, c):
        norm(f"{p}.group_norm", c)
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            t[f"{p}.{proj}.weight"], t[f"{p}.{proj}.bias"] = (c, c), (c,)

    n = len(channels)
    conv("conv_in", channels[0], 3, 3)
    conv("latent_conv_in", channels[2], latent_channels, 1)
    skips = [channels[0]]  # every tensor the down path hands to the up path
    prev = channels[0]
    for i, c in enumerate(channels):
        for j in range(layers):
            resnet(f"down_blocks.{i}.resnets.{j}", prev if j == 0 else c, c)
            if i in attn_levels:
                attention(f"down_blocks.{i}.attentions.{j}", c)
            skips.append(c)
        if i < n - 1:
            conv(f"down_blocks.{i}.downsamplers.0.conv", c, c, 3)
            skips.append(c)
        prev = c
    resnet("mid_block.resnets.0", prev, prev)
    attention("mid_block.attentions.0", prev)
    resnet("mid_block.resnets.1", prev, prev)
    for i, c in enumerate(reversed(channels)):
        for j in range(layers + 1):
            resnet(f"up_blocks.{i}.resnets.{j}", (prev if j == 0 else c) + skips.pop(), c)
            if n - 1 - i in attn_levels:
                attention(f"up_blocks.{i}.attentions.{j}", c)
        if i < n - 1:
            conv(f"up_blocks.{i}.upsamplers.0.conv", c, c, 3)
        prev = c
    assert not skips
    norm("conv_norm_out", channels[0])
    conv("conv_out", 4, channels[0], 3)
    return t


def published_encoder_table(channels=(32, 32, 64, 64, 128, 128, 256, 256), latent_channels=4):
    t, prev = {}, 4
    for k, c in enumerate(list(channels) + [latent_channels]):
        t[f"blocks.{2 * k}.weight"], t[f"blocks.{2 * k}.bias"] = (c, prev, 3, 3), (c,)
        prev = c
    return t


def meta_state_dict(table):
    return {k: torch.empty(shape, device="meta") for k, shape in table.items()}


def numel(table):
    return sum(torch.Size(s).numel() for s in table.values())


# -- every published key has a home -----------------------------------------------------------

def test_written_down_tables_match_the_published_sizes():
    # ~104M (208 MB fp16) and ~1.18M (2.37 MB fp16) parameters in the released files.
    assert 103.5e6 < numel(published_decoder_table()) < 104.7e6
    assert 1.17e6 < numel(published_encoder_table()) < 1.19e6
    assert sorted(published_encoder_table()) == sorted(f"blocks.{i}.{p}" for i in range(0, 17, 2)
                                                       for p in ("weight", "bias"))


@pytest.mark.parametrize("latent_channels", [4, 16])  # SD 1.5 / SDXL, FLUX-class port
def test_published_decoder_keys_all_have_a_home(latent_channels):
    table = published_decoder_table(latent_channels=latent_channels)
    sd = meta_state_dict(table)
    config = infer_layerdiffuse_config(sd, "decoder")
    assert config == {**LAYERDIFFUSE_DECODER_CONFIG, "latent_channels": latent_channels}
    with torch.device("meta"):
        model = TransparentDecoder(**config)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    converted = convert_layerdiffuse_state_dict(sd, "decoder")
    assert set(converted) == set(ours) == set(table)
    assert {k: tuple(v.shape) for k, v in converted.items()} == ours
    model.load_state_dict(converted, strict=True, assign=True)


@pytest.mark.parametrize("latent_channels", [4, 16])
def test_published_encoder_keys_all_have_a_home(latent_channels):
    table = published_encoder_table(latent_channels=latent_channels)
    sd = meta_state_dict(table)
    config = infer_layerdiffuse_config(sd, "encoder")
    assert config == {**LAYERDIFFUSE_ENCODER_CONFIG, "latent_channels": latent_channels}
    with torch.device("meta"):
        model = TransparentEncoder(**config)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == table
    model.load_state_dict(convert_layerdiffuse_state_dict(sd, "encoder"), strict=True, assign=True)


def test_defaults_are_the_published_layout():
    with torch.device("meta"):
        dec, enc = TransparentDecoder(), TransparentEncoder()
    assert {k: tuple(v.shape) for k, v in dec.state_dict().items()} == published_decoder_table()
    assert {k: tuple(v.shape) for k, v in enc.state_dict().items()} == published_encoder_table()


# -- numeric placement: a from-scratch reconstruction of the published forward pass ------------

class PublishedUNet1024(nn.Module):
    """The published decoder's forward (conv_in, latent added before down block 3, diffusers blocks,
    [A, R, G, B] out), rebuilt here independently of `TransparentDecoder` at a small width."""

    def __init__(self, ch, attn_levels, groups=4, head_dim=8):
        super().__init__()
        n = len(ch)
        common = dict(temb_channels=None, resnet_eps=1e-5, resnet_act_fn="silu", resnet_groups=groups,
                      attention_head_dim=head_dim, resnet_time_scale_shift="default", dropout=0.0)
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        self.latent_conv_in = nn.Conv2d(4, ch[2], 1)
        self.down_blocks = nn.ModuleList(
            get_down_block("AttnDownBlock2D" if i in attn_levels else "DownBlock2D", num_layers=2,
                           in_channels=ch[max(i - 1, 0)], out_channels=ch[i], add_downsample=i < n - 1,
                           downsample_padding=1, downsample_type="conv", **common) for i in range(n))
        self.mid_block = UNetMidBlock2D(in_channels=ch[-1], temb_channels=None, resnet_eps=1e-5, resnet_groups=groups,
                                        attention_head_dim=head_dim, resnet_act_fn="silu")
        rev = ch[::-1]
        self.up_blocks = nn.ModuleList(
            get_up_block("AttnUpBlock2D" if n - 1 - i in attn_levels else "UpBlock2D", num_layers=3,
                         in_channels=rev[min(i + 1, n - 1)], out_channels=rev[i],
                         prev_output_channel=rev[max(i - 1, 0)],
                         add_upsample=i < n - 1, upsample_type="conv", **common) for i in range(n))
        self.conv_norm_out = nn.GroupNorm(groups, ch[0], eps=1e-5)
        self.conv_out = nn.Conv2d(ch[0], 4, 3, padding=1)

    def forward(self, x, latent):
        h = self.conv_in(x)
        skips = [h]
        for i, block in enumerate(self.down_blocks):
            if i == 3:
                h = h + self.latent_conv_in(latent)
            h, res = block(h, None)
            skips += list(res)
        h = self.mid_block(h, None)
        for block in self.up_blocks:
            k = len(block.resnets)
            h = block(h, tuple(skips[-k:]), None)
            skips = skips[:-k]
        return self.conv_out(nn.functional.silu(self.conv_norm_out(h)))


def small_published_decoder():
    torch.manual_seed(0)
    ref = PublishedUNet1024(ch=[8, 8, 16, 16, 16, 32, 32], attn_levels=(4, 5, 6)).eval()
    with torch.no_grad():
        for p in ref.parameters():  # every tensor distinct and non-trivial, norms included
            p.add_(torch.randn_like(p) * 0.05)
    return ref


def test_reconstruction_matches_the_written_down_table():
    ref = small_published_decoder()
    table = published_decoder_table(channels=(8, 8, 16, 16, 16, 32, 32))
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == table


@torch.no_grad()
def test_decoder_mapping_places_every_tensor():
    ref = small_published_decoder()
    sd = ref.state_dict()
    ours = load_layerdiffuse_weights(sd, kind="decoder")
    px, lt = torch.rand(2, 3, 64, 64), torch.randn(2, 4, 8, 8)
    expected = ref(px, lt)  # [A, R, G, B]
    got = ours(px, lt)  # [R, G, B, A]
    assert torch.allclose(got, expected[:, [1, 2, 3, 0]], atol=1e-5)
    assert torch.equal(ours.conv_out.weight[3], sd["conv_out.weight"][0])
    assert torch.equal(ours.conv_out.bias[:3], sd["conv_out.bias"][1:])
    # Exporting gives back the published tensors exactly.
    back = to_layerdiffuse_state_dict(ours)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


@torch.no_grad()
def test_encoder_mapping_places_every_tensor():
    torch.manual_seed(0)
    convs = [nn.Conv2d(i, o, 3, stride=s, padding=1) for i, o, s in
             [(4, 32, 1), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2),
              (256, 256, 1), (256, 4, 1)]]
    layers = []
    for c in convs:
        layers += [c, nn.SiLU()]
    ref = nn.Sequential(*layers[:-1])
    sd = {f"blocks.{k}": v for k, v in ref.state_dict().items()}
    ours = load_layerdiffuse_weights(sd, kind="encoder", offset_scale=300.0)
    assert ours.config.offset_scale == 300.0
    rgba = torch.rand(1, 4, 32, 24)
    expected = ref(torch.cat([rgba[:, 3:], pad_rgb(rgba)], 1)) * 300.0
    assert torch.allclose(ours(rgba), expected, atol=1e-4)


@torch.no_grad()
def test_wrapper_prefix_legacy_attention_names_and_fp16():
    ref = small_published_decoder()
    sd = {}
    for k, v in ref.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".{new}.", f".{old}.")
        sd[f"model.{k}"] = v.half()
    ours = load_layerdiffuse_weights(sd, kind=None)  # kind detected from the keys
    assert isinstance(ours, TransparentDecoder) and ours.dtype == torch.float32
    px, lt = torch.rand(1, 3, 64, 64), torch.randn(1, 4, 8, 8)
    ref.half().float()  # the same fp16-rounded weights
    assert torch.allclose(ours(px, lt), ref(px, lt)[:, [1, 2, 3, 0]], atol=1e-4)


# -- strictness and files --------------------------------------------------------------------

def test_loading_is_strict():
    sd = small_published_decoder().state_dict()
    extra = dict(sd, **{"down_blocks.0.resnets.0.extra.weight": torch.zeros(1)})
    with pytest.raises(FormatError, match="unexpected"):
        load_layerdiffuse_weights(extra)
    missing = {k: v for k, v in sd.items() if k != "mid_block.attentions.0.to_q.bias"}
    with pytest.raises(FormatError, match="missing"):
        load_layerdiffuse_weights(missing)
    bad = dict(sd, **{"mid_block.attentions.0.to_q.weight": torch.zeros(32, 16)})
    with pytest.raises(FormatError, match="shape mismatch"):
        load_layerdiffuse_weights(bad)
    with pytest.raises(FormatError, match="encoder, not a decoder"):
        load_layerdiffuse_weights({"blocks.0.weight": torch.zeros(8, 4, 3, 3)}, kind="decoder")
    with pytest.raises(FormatError):
        load_layerdiffuse_weights({"something.else": torch.zeros(1)})


def test_loads_from_files(tmp_path):
    from safetensors.torch import save_file
    sd = small_published_decoder().state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "vae_transparent_decoder.safetensors"))
    model = load_layerdiffuse_weights(tmp_path / "vae_transparent_decoder.safetensors")
    assert torch.equal(model.conv_in.weight, sd["conv_in.weight"])
    with pytest.raises(ModelNotFoundError):
        load_layerdiffuse_weights(tmp_path / "nope.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(FormatError):
        load_layerdiffuse_weights(tmp_path / "broken.safetensors")
