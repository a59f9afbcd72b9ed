"""Cameras, rays and the volume renderer: conventions and exact values on analytic fields."""
import math

import numpy as np
import pytest
import torch

from layergen.models.volume_renderer import (VolumeRenderer, composite, get_rays, interval_widths, intrinsics,
                                             look_at, masked_psnr, masked_ssim, orbit_cameras, ray_box_intersect,
                                             sample_pdf, stratified_samples, to_straight_rgba)


def empty_field(points, dirs):
    return torch.zeros(points.shape[0]), torch.full((points.shape[0], 3), 0.5)


def slab_field(colour=(0.2, 0.4, 0.6), half=0.2, sigma=1e4):
    col = torch.tensor(colour)

    def f(points, dirs):
        inside = (points[:, 2].abs() < half) & (points[:, :2].abs() < 0.5).all(-1)
        return inside.float() * sigma, col.expand(points.shape[0], 3)

    return f


def test_front_camera_conventions():
    c2w = orbit_cameras(1)[0]
    assert torch.allclose(c2w[:3, 3], torch.tensor([0.0, 3.2 * math.sin(math.radians(10)), 3.2 * math.cos(math.radians(10))]), atol=1e-5)
    # OpenCV frame: right = +x world, down ~ -y world, forward towards the origin
    assert torch.allclose(c2w[:3, 0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)
    assert c2w[1, 1] < 0 and c2w[2, 2] < 0
    # a point on the mannequin's left (+x) appears on the right half of the image
    K = intrinsics(64)
    w2c = torch.linalg.inv(c2w)
    p = w2c[:3, :3] @ torch.tensor([0.5, 0.0, 0.0]) + w2c[:3, 3]
    u = K[0, 0] * p[0] / p[2] + K[0, 2]
    assert u > 32
    # azimuth +90 degrees puts the camera on +x
    assert orbit_cameras(4)[1][0, 3] > 3.0


def test_rays_pass_through_pixel_centres():
    c2w = look_at((0.0, 0.0, 3.0))
    K = intrinsics((4, 6), fov_deg=40.0)
    o, d = get_rays(c2w, K, 4, 6)
    assert o.shape == d.shape == (1, 4, 6, 3)
    assert torch.allclose(d.norm(dim=-1), torch.ones(1, 4, 6))
    # project the ray of pixel (row 1, col 4) back: it must land on (4.5, 1.5)
    pt = o[0, 1, 4] + 2.0 * d[0, 1, 4]
    cam = torch.linalg.inv(c2w)[:3, :3] @ pt + torch.linalg.inv(c2w)[:3, 3]
    assert torch.allclose(K[0, 0] * cam[0] / cam[2] + K[0, 2], torch.tensor(4.5), atol=1e-4)
    assert torch.allclose(K[1, 1] * cam[1] / cam[2] + K[1, 2], torch.tensor(1.5), atol=1e-4)
    # symmetric image: the four centre rays are mirror images
    assert torch.allclose(d[0, 1, 2, 0], -d[0, 1, 3, 0]) and torch.allclose(d[0, 1, 2, 1], -d[0, 2, 2, 1])


def test_ray_box_and_interval_widths():
    o = torch.tensor([[0.0, 0.0, 3.0], [0.0, 5.0, 3.0]])
    d = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, -1.0]])
    near, far = ray_box_intersect(o, d)
    assert torch.allclose(near[0], torch.tensor(2.0)) and torch.allclose(far[0], torch.tensor(4.0))
    assert far[1] == near[1]  # a miss: no samples
    t = stratified_samples(near[:1], far[:1], 8)
    assert torch.allclose(interval_widths(t, near[:1], far[:1]).sum(), torch.tensor(2.0))


def test_empty_field_renders_transparent():
    r = VolumeRenderer(num_coarse=16, num_importance=16)
    out = r.render_views(empty_field, orbit_cameras(2), intrinsics(16), 16, 16)
    assert torch.equal(out["rgba"], torch.zeros(2, 16, 16, 4))


def test_opaque_slab_renders_its_colour_and_depth():
    r = VolumeRenderer(num_coarse=64, num_importance=32)
    c2w = look_at((0.0, 0.0, 3.0))
    out = r.render_views(slab_field(), c2w, intrinsics(16, fov_deg=30.0), 16, 16)
    rgba, depth = out["rgba"][0], out["depth"][0]
    centre = rgba[6:10, 6:10]
    assert torch.allclose(centre[..., 3], torch.ones(4, 4), atol=1e-4)
    assert torch.allclose(centre[..., :3], torch.tensor([0.2, 0.4, 0.6]).expand(4, 4, 3), atol=1e-4)
    # the front face is at z = 0.2, i.e. 2.8 from the camera along the axis (within one sample)
    assert abs(depth[7, 7].item() - 2.8) < 0.05
    assert rgba[0, 0, 3] == 0  # corner ray misses the slab (|x|, |y| > 0.5 there)


def test_uniform_medium_matches_beer_lambert():
    sigma = 0.5
    field = lambda p, d: (torch.full((p.shape[0],), sigma), torch.ones(p.shape[0], 3))  # noqa: E731
    r = VolumeRenderer(num_coarse=7, num_importance=5)
    o, d = torch.tensor([[0.0, 0.0, 3.0]]), torch.tensor([[0.0, 0.0, -1.0]])
    out = r.render_rays(field, o, d)
    assert out["acc"].item() == pytest.approx(1 - math.exp(-sigma * 2.0), abs=1e-5)


def test_importance_samples_land_where_the_weight_is():
    bins = torch.linspace(0, 1, 11)[None]
    w = torch.zeros(1, 10)
    w[0, 6] = 1.0
    t = sample_pdf(bins, w, 32)
    assert ((t >= 0.6 - 1e-3) & (t <= 0.7 + 1e-3)).float().mean() > 0.95


def test_composite_weights_and_straight_alpha():
    sigma = torch.tensor([[0.0, 1e4, 1e4]])
    rgb = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]])
    col, acc, w = composite(sigma, rgb, torch.full((1, 3), 0.1))
    assert torch.allclose(w, torch.tensor([[0.0, 1.0, 0.0]]), atol=1e-6)
    assert torch.allclose(to_straight_rgba(col * 0.5, acc * 0.5), torch.tensor([[0.0, 1.0, 0.0, 0.5]]), atol=1e-5)


def test_training_render_has_gradients():
    s = torch.tensor(2.0, requires_grad=True)
    field = lambda p, d: (s * torch.ones(p.shape[0]), torch.ones(p.shape[0], 3) * 0.5)  # noqa: E731
    r = VolumeRenderer(num_coarse=8, num_importance=8)
    out = r.render_rays(field, torch.tensor([[0.0, 0.0, 3.0]]), torch.tensor([[0.0, 0.0, -1.0]]), perturb=True,
                        reuse_coarse=False)
    out["acc"].sum().backward()
    assert s.grad is not None and s.grad.item() > 0


def test_masked_metrics():
    a = np.zeros((16, 16, 4), np.float32)
    a[4:12, 4:12] = [0.5, 0.5, 0.5, 1.0]
    assert masked_psnr(a, a) == float("inf") and masked_ssim(a, a) == pytest.approx(1.0)
    b = a.copy()
    b[4:12, 4:12, :3] += 0.1
    # error 0.1 on every masked pixel: PSNR = 20 dB exactly; background is not counted
    assert masked_psnr(a, b) == pytest.approx(20.0, abs=1e-4)
    assert masked_ssim(a, b) < 1.0


def test_proposal_grid_render_matches_full_sampling():
    from layergen.models.triplane import grid_points
    from layergen.models.volume_renderer import grid_density_fn

    field = slab_field()
    pts = grid_points(32).reshape(-1, 3)
    dens = field(pts, pts)[0].reshape(32, 32, 32)
    prop = grid_density_fn(dens, dilate=1)
    assert torch.allclose(grid_density_fn(dens, dilate=0)(pts), dens.reshape(-1))   # exact at voxel centres
    r = VolumeRenderer(num_coarse=48, num_importance=32)
    c2w, K = look_at((0.3, 0.2, 3.0)), intrinsics(16, fov_deg=30.0)
    full = r.render_views(field, c2w, K, 16, 16)["rgba"][0]
    fast = r.render_views(field, c2w, K, 16, 16, proposal=prop)["rgba"][0]
    inside = full[..., 3] > 0.99
    assert inside.sum() > 20
    assert torch.allclose(fast[inside], full[inside], atol=1e-3)
    assert torch.equal(fast[full[..., 3] == 0], full[full[..., 3] == 0])          # empty rays stay empty
