"""benchmarks/action_mask_separation.py: what a mask score keeps of each kind of gradient change."""

import json

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("action_mask_separation")


def _grads(draws=16, b=4, rows=2, dim=32, seed=0):
    """Synthetic per-sample gradients: the action partner differs from the anchor in the first half of the
    channels, the context partner in the second; the species probe changes what the context changes, the colour
    probe what the action changes, and the action partner's species twin differs from it where the species probe
    does."""
    g = torch.Generator().manual_seed(seed)
    anchor = torch.randn(draws, b, rows, dim, generator=g, dtype=torch.float64)
    pose, ctx = torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64)
    pose[: dim // 2], ctx[dim // 2:] = 1, 1

    def moved(where, start=anchor):
        return start + where * torch.randn(draws, b, rows, dim, generator=g, dtype=torch.float64) * 3

    partner = moved(pose)
    return torch.stack([anchor, moved(ctx), partner, moved(ctx), moved(pose), moved(ctx, partner)], dim=1)


def test_kept_fractions_follow_what_each_change_moves(bench):
    kept = bench.kept_fractions(_grads())
    shipped, rotated, random = kept["shipped"], kept["rotated"], kept["random"]
    assert shipped["pose"] > 0.95 and shipped["context"] < 0.05  # the statistics see the separation ...
    assert shipped["species"] < 0.05 and shipped["colour"] > 0.95  # ... and the probes follow their channels
    assert rotated["pose"] > 0.9 and rotated["species"] < 0.1
    assert kept["twin"]["pose"] > 0.95 and kept["twin"]["species"] < 0.05 and kept["twin_rotated"]["species"] < 0.1
    assert all(0.2 < random[k] < 0.8 for k in ("pose", "context", "species", "colour"))
    # entangled: the species probe moves the pose channels, so no score can keep pose and drop species
    g = _grads()
    g[:, 3] = g[:, 0] + (g[:, 2] - g[:, 0]) * 0.9
    tangled = bench.kept_fractions(g)
    assert abs(tangled["shipped"]["pose"] - tangled["shipped"]["species"]) < 0.05


def test_probes_change_one_factor_and_keep_the_random_draws(bench):
    from layergen.data.figures import HELDOUT_SEED_START, exemplar_set

    samples = exemplar_set("jump", 4, seed=HELDOUT_SEED_START, size=64)
    probes = bench.probes(samples, HELDOUT_SEED_START, "jump", 64)
    for kind in ("species", "colour"):
        assert len(probes[kind]) == 4
        for s, img in zip(samples, probes[kind]):
            same = (img == s.image).all(-1).mean()
            assert 0.5 < same < 1.0, kind  # same background and placement; the figure differs


def test_quick_run_writes_the_report(bench, tmp_path):
    out = tmp_path / "sep.json"
    report = bench.main(["--quick", "--settings", "distinct", "--draws", "4", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    row = report["summary"]["distinct"]["trained"]["shipped"]
    assert set(row) == {"pose", "context", "species", "colour", "update", "pose_over_species"}
    assert all(0 <= row[k] <= 1 for k in ("pose", "context", "species", "colour", "update"))
    assert np.isfinite(row["pose_over_species"])
