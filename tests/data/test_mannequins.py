"""Procedural layered mannequins: determinism, variety, layer containment, GT renders and region masks."""
import numpy as np
import pytest
import torch

from layergen.data.mannequins import (GARMENTS, LAYER_NAMES, POSES, SIGMA_MAX, Mannequin, PartSet, parse_layers,
                                      render_mannequin, sample_mannequin, sample_training_points)
from layergen.errors import LayergenError
from layergen.models.volume_renderer import intrinsics, orbit_cameras

ALL = ("pants", "shirt", "shoes", "hat")


def test_sampling_is_deterministic_and_varied():
    a, b = sample_mannequin(7), sample_mannequin(7)
    assert a.describe() == b.describe()
    ms = [sample_mannequin(s) for s in range(40)]
    assert len({m.pose for m in ms}) >= 3
    assert np.ptp([m.height for m in ms]) > 0.1 and np.ptp([m.girth for m in ms]) > 0.2
    assert len({tuple(np.round(m.skin, 2)) for m in ms}) >= 4
    assert {g.kind for m in ms for g in m.garments} == set(GARMENTS)
    for m in ms:  # garments always in canonical order, body first
        assert m.layers[0] == "body"
        assert [LAYER_NAMES.index(n) for n in m.layers] == sorted(LAYER_NAMES.index(n) for n in m.layers)


def test_explicit_garments_and_validation():
    m = sample_mannequin(3, garments=("pants", "shirt", "shoes", "hat"), pose="t_pose")
    assert m.layers == ("body", "pants", "shirt", "shoes", "hat") and m.pose == "t_pose"
    assert parse_layers("body, pants,shoes") == ("body", "pants", "shoes")
    for bad in ("pants,body", "body,cape", "body,shirt,shirt", "shirt", ""):
        with pytest.raises(LayergenError):
            parse_layers(bad)
    with pytest.raises(LayergenError):
        sample_mannequin(0, pose="cartwheel")


def test_batched_part_distances_match_reference():
    m = sample_mannequin(5, garments=ALL)
    pts = torch.rand(500, 3) * 2 - 1
    for parts, _ in m._components(4):
        ref = torch.stack([p.sdf(pts) for p in parts.parts], 1)
        assert torch.allclose(parts.distances(pts), ref, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_layers_contain_the_layer_below_and_keep_uncovered_parts(seed):
    """Layer k contains layer k-1 (density never drops) and is identical wherever the garment is not the nearest surface."""
    m = sample_mannequin(seed, garments=ALL, pose=POSES[seed])
    g = torch.Generator().manual_seed(seed)
    pts = torch.cat([sample_training_points(m, 4, 3000, g)["points"], torch.rand(1000, 3, generator=g) * 2 - 1])
    prev = m.evaluate(pts, 0)
    for k in range(1, len(m.layers)):
        cur = m.evaluate(pts, k)
        assert (cur["sigma"] >= prev["sigma"]).all()
        assert (cur["sdf"] <= prev["sdf"]).all()
        same = cur["sdf"] == prev["sdf"]
        assert same.float().mean() > 0.5
        assert torch.equal(cur["rgb"][same], prev["rgb"][same]) and torch.equal(cur["label"][same], prev["label"][same])
        # the garment is somewhere: some points changed to its label
        assert (cur["label"] == LAYER_NAMES.index(m.layers[k])).any()
        prev = cur


def test_uncovered_head_unchanged_by_pants_and_shoes():
    m = sample_mannequin(2, garments=("pants", "shoes"))
    head = torch.tensor(m.joints()["head"])
    pts = head + torch.randn(2000, 3, generator=torch.Generator().manual_seed(0)) * 0.08
    body = m.evaluate(pts, "body")
    for layer in ("pants", "shoes"):
        out = m.evaluate(pts, layer)
        assert torch.equal(out["sigma"], body["sigma"]) and torch.equal(out["rgb"], body["rgb"])


def test_training_points_targets():
    m = sample_mannequin(4)
    d = sample_training_points(m, -1, 2000, torch.Generator().manual_seed(0))
    assert d["points"].shape == (2000, 3) and d["rgb"].shape == (2000, 3)
    assert (d["points"].abs() <= 1).all()
    assert 0.05 < (d["alpha"] > 0.5).float().mean() < 0.8      # both inside and outside are supervised
    assert d["surface"].mean() > 0.2 and d["sigma"].max() <= SIGMA_MAX


def test_gt_renders_and_region_masks():
    m = sample_mannequin(1, garments=ALL, pose="a_pose")
    cams, K = orbit_cameras(1), intrinsics(40)
    out = render_mannequin(m, -1, cams, K, 40, num_coarse=48, num_importance=48, labels=True)
    rgba, lab = out["rgba"][0].numpy(), out["labels"][0].numpy()
    assert rgba.shape == (40, 40, 4) and rgba[0, 0, 3] == 0            # transparent background
    assert 0.05 < (rgba[..., 3] > 0.5).mean() < 0.5
    rows = {name: np.nonzero((lab == i).any(1))[0] for i, name in enumerate(LAYER_NAMES)}
    for name in LAYER_NAMES:
        assert rows[name].size, f"{name} not visible"
    # vertical order in the image (row 0 is the top): hat above shirt above pants above shoes
    mid = {n: rows[n].mean() for n in LAYER_NAMES}
    assert mid["hat"] < mid["shirt"] < mid["pants"] < mid["shoes"]
    # garment colours show where their labels are
    for i, g in enumerate(m.garments, start=1):
        px = rgba[lab == LAYER_NAMES.index(g.kind)][:, :3]
        assert np.abs(np.median(px, 0) / g.colour - 1).max() < 0.5
    body = render_mannequin(m, 0, cams, K, 40, num_coarse=48, num_importance=48, labels=True)["labels"][0].numpy()
    assert set(np.unique(body)) <= {-1, 0}


def test_part_surface_samples_lie_on_parts():
    m = sample_mannequin(6)
    parts: PartSet = m._components(0)[0][0]
    pts = parts.sample_surface(500, torch.Generator().manual_seed(0))
    d = parts.distances(pts).abs().min(1).values
    assert (d < 0.01).float().mean() > 0.9
    assert isinstance(m, Mannequin)
