"""Transparent codec: shapes, gradients, padding, TTA equivariance, VAE helpers, save/load."""
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from layergen.errors import LayergenError
from layergen.models.transparent_codec import (
    MINI_DECODER_CONFIG, MINI_ENCODER_CONFIG, TransparentDecoder, TransparentEncoder, checkerboard_composite,
    decode_rgba, encode_rgba, pad_rgb, premultiply_on_grey, tta_transforms, vae_scale_factor)


def tiny_encoder(**kw):
    torch.manual_seed(0)
    return TransparentEncoder(block_out_channels=(4, 8, 8, 8), **kw)


def tiny_decoder(n_blocks=4, **kw):
    torch.manual_seed(0)
    ch = (8,) * n_blocks
    cfg = dict(block_out_channels=ch, layers_per_block=1, attention_head_dim=4,
               down_block_types=("DownBlock2D",) * (n_blocks - 1) + ("AttnDownBlock2D",),
               up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n_blocks - 1), latent_injection_index=3)
    cfg.update(kw)
    dec = TransparentDecoder(**cfg)
    # Wake the zero-initialised latent path so the latent matters in every test.
    with torch.no_grad():
        dec.latent_conv_in.weight.normal_(0, 0.5)
    return dec


def tiny_vae(scaling_factor=0.5, shift_factor=None):
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                         layers_per_block=1, norm_num_groups=4, sample_size=32, scaling_factor=scaling_factor,
                         shift_factor=shift_factor).eval()


def random_rgba(b=2, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rgba = torch.rand(b, 4, h, w, generator=g)
    rgba[:, 3] = (rgba[:, 3] > 0.5).float() * rgba[:, 3]  # real transparent holes
    return rgba


# -- helpers ---------------------------------------------------------------------------------

def test_premultiply_on_grey_exact_values():
    rgba = torch.tensor([[1.0, 0.0, 0.5, 1.0], [1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.5]]).T.reshape(1, 4, 1, 3)
    out = premultiply_on_grey(rgba)[0, :, 0].T
    assert torch.equal(out, torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 0.0], [0.5, -0.5, -0.5]]))


def test_pad_rgb_keeps_visible_colour_and_ignores_hidden_rgb():
    rgba = torch.zeros(1, 4, 16, 16)
    rgba[:, 0], rgba[:, 1], rgba[:, 2] = 0.9, 0.2, 0.1
    rgba[:, 3, 4:10, 5:12] = 1.0
    out = pad_rgb(rgba)
    # Opaque pixels keep their colour; the fill of a single-coloured object is that colour.
    assert torch.allclose(out, rgba[:, :3], atol=1e-5)
    # Whatever RGB hides under alpha 0 must not leak into the encoder's input.
    noisy = rgba.clone()
    noisy[:, :3] = torch.where(rgba[:, 3:] > 0, rgba[:, :3], torch.rand(1, 3, 16, 16))
    assert torch.allclose(pad_rgb(noisy), out, atol=1e-6)


def test_pad_rgb_fill_is_between_visible_colours():
    rgba = torch.zeros(1, 4, 16, 16)
    rgba[:, 0, :, :8] = 1.0  # red half
    rgba[:, 2, :, 8:] = 1.0  # blue half
    rgba[:, 3, :, :3] = 1.0
    rgba[:, 3, :, 13:] = 1.0
    out = pad_rgb(rgba)
    assert torch.equal(out[:, :, :, :3], rgba[:, :3, :, :3])
    # The hidden middle is a blend: red falls off towards the blue side.
    mid_r = out[0, 0, 8, 3:13]
    assert mid_r[0] > 0.6 and mid_r[-1] < 0.4 and bool((mid_r[1:] <= mid_r[:-1] + 1e-6).all())


def test_checkerboard_composite_values():
    rgba = torch.zeros(1, 4, 16, 16)
    out = checkerboard_composite(rgba, tile=8)
    assert out[0, 0, 0, 0] == pytest.approx(0.8) and out[0, 0, 0, 8] == pytest.approx(0.6)
    rgba[:, 3] = 1.0
    rgba[:, 1] = 0.25
    assert torch.allclose(checkerboard_composite(rgba), rgba[:, :3])


# -- encoder ---------------------------------------------------------------------------------

def test_encoder_starts_as_identity_and_trains():
    enc = tiny_encoder()
    x = random_rgba(2, 32, 32)
    out = enc(x)
    assert out.shape == (2, 4, 4, 4) and torch.count_nonzero(out) == 0  # zero-init: base VAE untouched
    with torch.no_grad():
        enc.blocks[-1].weight.normal_(0, 0.1)
    out = enc(x)
    out.square().mean().backward()
    assert out.abs().mean() > 1e-3
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())


def test_encoder_odd_sizes_and_offset_scale():
    enc = tiny_encoder(offset_scale=3.0)
    with torch.no_grad():
        enc.blocks[-1].weight.normal_(0, 0.1)
    x = random_rgba(1, 30, 21)
    out = enc(x)
    assert out.shape == (1, 4, 4, 3)
    # Padding is transparent pixels, so it equals an explicit zero pad; the scale is a plain multiplier.
    padded = F.pad(x, (0, 3, 0, 2))
    raw = enc.blocks(torch.cat([padded[:, 3:], pad_rgb(padded)], 1))
    assert torch.allclose(out, 3.0 * raw, atol=1e-6)


def test_encoder_rejects_bad_input():
    with pytest.raises(LayergenError):
        tiny_encoder()(torch.rand(1, 3, 16, 16))


# -- decoder ---------------------------------------------------------------------------------

def test_decoder_shapes_and_gradients():
    dec = tiny_decoder()
    px, lt = torch.rand(2, 3, 32, 32), torch.randn(2, 4, 4, 4)
    out = dec(px, lt)
    assert out.shape == (2, 4, 32, 32)
    out.square().mean().backward()
    missing = [n for n, p in dec.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_decoder_latent_path_is_zero_initialised():
    torch.manual_seed(0)
    dec = TransparentDecoder(**{**MINI_DECODER_CONFIG, "block_out_channels": (8, 8, 8, 8), "attention_head_dim": 4})
    px = torch.rand(1, 3, 32, 32)
    a, b = dec(px, torch.randn(1, 4, 4, 4)), dec(px, torch.randn(1, 4, 4, 4))
    assert torch.equal(a, b)
    with torch.no_grad():
        dec.latent_conv_in.weight.fill_(0.3)
    assert (dec(px, torch.randn(1, 4, 4, 4)) - dec(px, torch.zeros(1, 4, 4, 4))).abs().max() > 1e-3


def test_decoder_pads_odd_sizes_and_crops_back():
    # 5 blocks: the UNet needs multiples of 16 px (2 latent cells) -> 40x24 px / 5x3 latent get padded.
    dec = tiny_decoder(n_blocks=5).eval()
    assert dec.pixel_multiple == 16 and dec.latent_scale == 8
    px, lt = torch.rand(1, 3, 40, 24), torch.randn(1, 4, 5, 3)
    out = dec(px, lt)
    assert out.shape == (1, 4, 40, 24)
    manual = dec(F.pad(px, (0, 8, 0, 8), mode="replicate"), F.pad(lt, (0, 1, 0, 1), mode="replicate"))
    assert torch.allclose(out, manual[..., :40, :24], atol=1e-6)
    tta = dec.decode(px, lt, tta=True)
    assert tta.shape == (1, 4, 40, 24) and tta.min() >= 0 and tta.max() <= 1


def test_decoder_rejects_mismatched_latent():
    dec = tiny_decoder()
    with pytest.raises(LayergenError, match="8x the latent"):
        dec(torch.rand(1, 3, 32, 32), torch.randn(1, 4, 3, 3))


def _d4_symmetric(x):
    """Average over the 8 dihedral transforms: a tensor every flip/rotation leaves unchanged."""
    return sum(fwd(x) for fwd, _ in tta_transforms()) / 8


@torch.no_grad()
def test_tta_is_equivariant_and_plain_pass_is_not():
    dec = tiny_decoder().eval()
    px, lt = torch.rand(1, 3, 32, 32), torch.randn(1, 4, 4, 4)
    base = dec.decode(px, lt, tta=True)
    for fwd, _ in tta_transforms()[1:]:
        assert torch.allclose(dec.decode(fwd(px), fwd(lt), tta=True), fwd(base), atol=1e-5)
    # Without TTA a random UNet is visibly direction dependent (so the check above is not vacuous).
    rot = tta_transforms()[1][0]
    assert (dec.decode(rot(px), rot(lt), tta=False) - rot(dec.decode(px, lt, tta=False))).abs().max() > 1e-3
    # On a rotation/flip-symmetric input the TTA output is itself symmetric.
    sym = dec.decode(_d4_symmetric(px), _d4_symmetric(lt), tta=True)
    for fwd, _ in tta_transforms():
        assert torch.allclose(fwd(sym), sym, atol=1e-5)


@pytest.mark.parametrize("pixels_per_call", [1 << 21, 2 * 32 * 32 * 3])  # all passes at once / in chunks
@torch.no_grad()
def test_tta_is_the_median_of_eight_inverse_transformed_passes(monkeypatch, pixels_per_call):
    from layergen.models import transparent_codec
    monkeypatch.setattr(transparent_codec, "_TTA_PIXELS_PER_CALL", pixels_per_call)
    dec = tiny_decoder().eval()
    for h, w in ((32, 32), (32, 16)):  # square: one batch of 8; non-square: two shape groups
        px, lt = torch.rand(2, 3, h, w), torch.randn(2, 4, h // 8, w // 8)
        passes = [inv(dec(fwd(px), fwd(lt)).clamp(0, 1)) for fwd, inv in tta_transforms()]
        expected = torch.stack(passes).median(dim=0).values
        assert torch.allclose(dec.decode(px, lt, tta=True), expected, atol=1e-5)
        assert torch.equal(dec.decode(px, lt, tta=False), dec(px, lt).clamp(0, 1))


def test_mini_config_budget_and_resolution():
    torch.manual_seed(0)
    enc, dec = TransparentEncoder(**MINI_ENCODER_CONFIG), TransparentDecoder(**MINI_DECODER_CONFIG)
    n = sum(p.numel() for p in enc.parameters()) + sum(p.numel() for p in dec.parameters())
    assert n < 3_000_000
    assert enc.downscale_factor == 8 and dec.latent_scale == 8 and dec.pixel_multiple == 8
    with torch.no_grad():
        assert dec(torch.rand(1, 3, 128, 128), torch.randn(1, 4, 16, 16)).shape == (1, 4, 128, 128)


def test_save_and_load_roundtrip(tmp_path):
    enc, dec = tiny_encoder(offset_scale=2.5), tiny_decoder()
    with torch.no_grad():
        enc.blocks[-1].weight.normal_(0, 0.1)
    enc.save_pretrained(tmp_path / "enc")
    dec.save_pretrained(tmp_path / "dec")
    enc2 = TransparentEncoder.from_pretrained(tmp_path / "enc")
    dec2 = TransparentDecoder.from_pretrained(tmp_path / "dec")
    assert enc2.config.offset_scale == 2.5 and tuple(dec2.config.block_out_channels) == (8, 8, 8, 8)
    x, px, lt = random_rgba(1, 32, 32), torch.rand(1, 3, 32, 32), torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(enc(x), enc2(x)) and torch.equal(dec(px, lt), dec2(px, lt))


# -- VAE helpers -----------------------------------------------------------------------------

@torch.no_grad()
def test_encode_rgba_is_mean_plus_std_times_offset_scaled_and_shifted():
    vae, enc = tiny_vae(scaling_factor=0.5, shift_factor=0.1), tiny_encoder()
    assert vae_scale_factor(vae) == 8
    x = random_rgba(2, 32, 32)
    dist = vae.encode(premultiply_on_grey(x)).latent_dist
    # Untrained (zero) encoder: the deterministic latent is the posterior mean.
    assert torch.allclose(encode_rgba(vae, enc, x), (dist.mean - 0.1) * 0.5, atol=1e-6)
    enc.blocks[-1].weight.normal_(0, 0.1)
    off = enc(x)
    assert off.abs().mean() > 1e-3
    assert torch.allclose(encode_rgba(vae, enc, x), (dist.mean + dist.std * off - 0.1) * 0.5, atol=1e-6)
    s1 = encode_rgba(vae, enc, x, generator=torch.Generator().manual_seed(3), sample=True)
    s2 = encode_rgba(vae, enc, x, generator=torch.Generator().manual_seed(3), sample=True)
    assert torch.equal(s1, s2) and not torch.allclose(s1, encode_rgba(vae, enc, x))


@torch.no_grad()
def test_encode_rgba_pads_to_vae_multiple_with_transparency():
    vae, enc = tiny_vae(), tiny_encoder()
    x = random_rgba(1, 30, 20)
    lat = encode_rgba(vae, enc, x)
    assert lat.shape == (1, 4, 4, 3)
    assert torch.allclose(lat, encode_rgba(vae, enc, F.pad(x, (0, 4, 0, 2))), atol=1e-6)


@torch.no_grad()
def test_decode_rgba_feeds_unscaled_latent_and_vae_pixels():
    vae, dec = tiny_vae(scaling_factor=0.5, shift_factor=0.1), tiny_decoder().eval()
    lat = torch.randn(1, 4, 4, 4)
    out = decode_rgba(vae, dec, lat, tta=False)
    z = lat / 0.5 + 0.1
    px = (vae.decode(z).sample * 0.5 + 0.5).clamp(0, 1)
    assert out.shape == (1, 4, 32, 32) and out.min() >= 0 and out.max() <= 1
    assert torch.allclose(out, dec(px, z).clamp(0, 1), atol=1e-6)
    assert torch.allclose(decode_rgba(vae, dec, lat, tta=True), dec.decode(px, z, tta=True), atol=1e-6)


def test_helpers_reject_bad_shapes():
    vae, enc = tiny_vae(), tiny_encoder()
    with pytest.raises(LayergenError):
        encode_rgba(vae, enc, torch.rand(1, 3, 32, 32))
    with pytest.raises(LayergenError, match="downsamples"):
        encode_rgba(vae, TransparentEncoder(block_out_channels=(4, 8, 8)), torch.rand(1, 4, 32, 32))
    with pytest.raises(LayergenError):
        decode_rgba(vae, tiny_decoder(), torch.randn(4, 4, 4))
