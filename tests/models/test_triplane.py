"""Tri-plane math (projection, half-texel shift, flip), regularisers, decoder and the layer-conditioned UNet."""
import math

import pytest
import torch
import torch.nn.functional as F

from layergen.models.triplane import (TriplaneDecoder, clamp_planes_, flip_x, grid_points, plane_l1, plane_tv,
                                      project_points, sample_triplane, shift_offsets)
from layergen.models.triplane_unet import LayeredTriplaneUNet

R = 8


def texel_centre(j: int, res: int = R) -> float:
    return (2 * j + 1) / res - 1


def ramp_planes(res: int = R) -> torch.Tensor:
    """Every channel of every plane = 10 * column + row (+ 100 * plane), so reads are easy to predict."""
    cols = torch.arange(res, dtype=torch.float32)[None, :].expand(res, res)
    rows = torch.arange(res, dtype=torch.float32)[:, None].expand(res, res)
    base = 10 * cols + rows
    return torch.stack([(base + 100 * p)[None].expand(9, res, res) for p in range(3)])[None]  # (1, 3, 9, R, R)


def test_shift_offsets_are_half_a_texel():
    off = shift_offsets(32)
    assert torch.equal(off, torch.tensor([[0.0, 0.0], [1 / 32, 0.0], [0.0, 1 / 32]]))
    # half a texel: texel centres are 2/R apart in [-1, 1]
    assert math.isclose(off[1, 0].item() * 2, texel_centre(1, 32) - texel_centre(0, 32))
    assert torch.equal(shift_offsets(32, shift=False), torch.zeros(3, 2))


def test_projection_order_xy_xz_zy():
    p = torch.tensor([[0.1, 0.2, 0.3]])
    uv = project_points(p)
    assert torch.allclose(uv[:, 0], torch.tensor([[0.1, 0.2], [0.1, 0.3], [0.3, 0.2]]))


def test_shifted_subplanes_read_between_texels_hand_computed():
    """At a texel centre, sub-plane 0 reads the texel; sub-plane 1 the mean with its right
    neighbour (u + half texel); sub-plane 2 the mean with the neighbour below (v + half texel)."""
    planes = ramp_planes()
    j, i, k = 3, 5, 2  # x at column 3; y at row 5; z at column/row 2
    pt = torch.tensor([[[texel_centre(j), texel_centre(i), texel_centre(k)]]])
    f = sample_triplane(planes, pt, shift=True)[0, 0].view(3, 3, 3)  # plane, sub-plane, channel
    # XY: u = x (col j), v = y (row i)
    assert torch.allclose(f[0, 0], torch.full((3,), 10.0 * j + i))
    assert torch.allclose(f[0, 1], torch.full((3,), 10.0 * (j + 0.5) + i))
    assert torch.allclose(f[0, 2], torch.full((3,), 10.0 * j + i + 0.5))
    # XZ: u = x, v = z
    assert torch.allclose(f[1, 0], torch.full((3,), 100 + 10.0 * j + k))
    assert torch.allclose(f[1, 1], torch.full((3,), 100 + 10.0 * (j + 0.5) + k))
    assert torch.allclose(f[1, 2], torch.full((3,), 100 + 10.0 * j + k + 0.5))
    # ZY: u = z, v = y
    assert torch.allclose(f[2, 0], torch.full((3,), 200 + 10.0 * k + i))
    assert torch.allclose(f[2, 1], torch.full((3,), 200 + 10.0 * (k + 0.5) + i))
    assert torch.allclose(f[2, 2], torch.full((3,), 200 + 10.0 * k + i + 0.5))
    # without the shift every sub-plane reads the texel itself
    g = sample_triplane(planes, pt, shift=False)[0, 0].view(3, 3, 3)
    assert torch.allclose(g[0], torch.full((3, 3), 10.0 * j + i))


def test_sample_triplane_matches_grid_sample_per_subplane():
    torch.manual_seed(0)
    planes = torch.randn(2, 3, 9, R, R)
    pts = torch.rand(2, 50, 3) * 1.6 - 0.8
    feats = sample_triplane(planes, pts, shift=True)
    assert feats.shape == (2, 50, 27)
    uv = project_points(pts)
    for p in range(3):
        for s, (du, dv) in enumerate([(0, 0), (1 / R, 0), (0, 1 / R)]):
            grid = (uv[p] + torch.tensor([du, dv]))[:, None]               # (B, 1, N, 2)
            ref = F.grid_sample(planes[:, p, 3 * s:3 * s + 3], grid, align_corners=False)[:, :, 0].transpose(1, 2)
            assert torch.allclose(feats[..., 9 * p + 3 * s: 9 * p + 3 * s + 3], ref, atol=1e-6)


def test_features_of_a_plane_ignore_the_third_axis():
    torch.manual_seed(0)
    planes = torch.randn(1, 3, 9, R, R)
    a = torch.tensor([[[0.1, -0.2, 0.3]]])
    b = a.clone()
    b[..., 2] = -0.7  # move along z: only XZ and ZY features may change
    fa, fb = sample_triplane(planes, a), sample_triplane(planes, b)
    assert torch.equal(fa[..., :9], fb[..., :9])
    assert not torch.allclose(fa[..., 9:], fb[..., 9:])


@pytest.mark.parametrize("shift", [True, False])
def test_flip_x_mirrors_the_field_exactly(shift):
    torch.manual_seed(0)
    planes = torch.randn(1, 3, 9, R, R)
    pts = torch.rand(1, 200, 3) * 1.4 - 0.7      # stay away from the box edge (the dropped texel)
    mirrored = pts * torch.tensor([-1.0, 1.0, 1.0])
    a = sample_triplane(flip_x(planes, shift), pts, shift=shift)
    b = sample_triplane(planes, mirrored, shift=shift)
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.equal(flip_x(flip_x(planes, False), False), planes)


def test_regularisers_and_clamp_hand_computed():
    p = torch.zeros(1, 1, 1, 2, 3)
    p[..., 0, :] = torch.tensor([0.0, 1.0, 3.0])
    p[..., 1, :] = torch.tensor([0.0, 1.0, -3.0])
    # vertical diffs: |0|,|0|,|-6| -> mean 2; horizontal: 1,2,1,4 -> mean 2
    assert plane_tv(p).item() == pytest.approx(4.0)
    assert plane_l1(p).item() == pytest.approx(8.0 / 6)
    clamp_planes_(p)
    assert p.max().item() == 1.0 and p.min().item() == -1.0


def test_decoder_shapes_box_and_roundtrip(tmp_path):
    torch.manual_seed(0)
    dec = TriplaneDecoder(plane_resolution=R, hidden_dim=16, color_hidden_dim=8)
    planes = torch.randn(2, *dec.plane_shape) * 0.1
    pts = torch.rand(2, 30, 3) * 2 - 1
    pts[:, 0] = torch.tensor([1.5, 0.0, 0.0])  # outside the box: no density
    dirs = F.normalize(torch.randn(2, 30, 3), dim=-1)
    sigma, rgb = dec.query(planes, pts, dirs)
    assert sigma.shape == (2, 30) and rgb.shape == (2, 30, 3)
    assert (sigma >= 0).all() and (rgb >= 0).all() and (rgb <= 1).all()
    assert torch.equal(sigma[:, 0], torch.zeros(2))
    dec.save_pretrained(tmp_path / "dec")
    again = TriplaneDecoder.from_pretrained(tmp_path / "dec")
    s2, c2 = again.query(planes, pts, dirs)
    assert torch.equal(s2, sigma) and torch.equal(c2, rgb)
    grid = dec.density_grid(planes[0], 6)
    assert grid.shape == (6, 6, 6)
    # grid indexing is [z, y, x]
    gp = grid_points(4)
    assert torch.allclose(gp[0, 0, :, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    assert torch.allclose(gp[:, 0, 0, 2], torch.tensor([-0.75, -0.25, 0.25, 0.75]))


def test_unet_zero_initialised_side_encoder_and_conditioning():
    torch.manual_seed(0)
    unet = LayeredTriplaneUNet(plane_resolution=R, block_out_channels=(8, 16), norm_num_groups=4,
                               attention_head_dim=4)
    x, c = torch.randn(2, 27, R, R), torch.randn(2, 27, R, R)
    t, lab = torch.tensor([5, 700]), torch.tensor([0, 3])
    out = unet(x, t, lab, c).sample
    assert out.shape == x.shape
    # at initialisation the side encoder contributes exactly nothing: output = plain UNet2DModel
    assert torch.equal(out, unet.unet(x, t, lab).sample)
    # once the zero convs move, the condition changes the output; the class label always does
    with torch.no_grad():
        for z in unet.side_zero:
            z.weight.normal_(0, 0.1)
    assert not torch.allclose(unet(x, t, lab, c).sample, unet(x, t, lab, torch.zeros_like(c)).sample)
    assert not torch.allclose(unet(x, t, lab, c).sample, unet(x, t, torch.tensor([1, 2]), c).sample)
