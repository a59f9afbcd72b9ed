import logging
import time

import numpy as np

from layergen.decompose.matting import (ClosedFormMatting, HardCut, HardMatting, Unblend, dominant_colours,
                                        import_announced, minimal_alpha)


def scene_with_shadow(h=64, w=64):
    """gradient background, a red disc with a soft black drop shadow: (image, background, layer_rgb, layer_alpha)."""
    import cv2

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    bg = np.stack([0.3 + 0.5 * xx / w, 0.6 + 0.0 * yy, 0.8 - 0.4 * yy / h], -1).astype(np.float32)
    body = (((xx - 28) ** 2 + (yy - 28) ** 2) <= 12 ** 2).astype(np.float32)
    body = cv2.GaussianBlur(body, (0, 0), 0.6)
    shadow = cv2.GaussianBlur(np.roll(body, (4, 4), (0, 1)), (0, 0), 1.5) * 0.5 * (1 - body)
    a = body + shadow
    rgb = np.where(body[..., None] > 0, np.array([0.85, 0.15, 0.15], np.float32), 0.0)
    rgb = (rgb * body[..., None]) / np.maximum(a[..., None], 1e-6)  # straight colour of body-over-shadow
    img = rgb * a[..., None] + bg * (1 - a[..., None])
    q = lambda x: np.floor(x * 255 + 0.5) / 255
    return q(img).astype(np.float32), q(bg).astype(np.float32), rgb, a


def test_minimal_alpha_is_the_smallest_feasible():
    B = np.array([[0.5, 0.5, 0.5]], np.float32)
    D = np.array([[0.25, -0.25, 0.0]], np.float32)
    a = minimal_alpha(D, B)
    assert np.allclose(a, 0.5)
    F = B + D / a[:, None]
    assert F.min() >= -1e-6 and F.max() <= 1 + 1e-6 and np.isclose(np.abs(F - 0.5).max(), 0.5)


def test_unblend_recovers_shadow_alpha_and_recomposites_exactly():
    img, bg, rgb, a = scene_with_shadow()
    region = a > 0.002
    F, alpha = Unblend()(img, bg, region)
    recon = F * alpha[..., None] + bg * (1 - alpha[..., None])
    covered = alpha > 0  # where alpha is 0 the difference is within tolerance (the pipeline keeps it in the bg)
    assert np.abs(recon - img)[covered].max() < 1.5 / 255
    assert np.abs(bg - img)[region & ~covered].max() <= Unblend().tolerance + 1e-6
    shadow_px = (a > 0.2) & (rgb[..., 0] == 0)
    assert shadow_px.sum() > 20
    assert np.abs(alpha[shadow_px] - a[shadow_px]).mean() < 0.03  # shadow kept in the layer at its strength
    assert np.all(alpha[a > 0.99] > 0.97)


def test_hard_cut_drops_the_shadow():
    img, bg, rgb, a = scene_with_shadow()
    F, alpha = HardCut()(img, bg, a > 0.002, alpha_prior=(a > 0.5) & (rgb[..., 0] > 0.5))
    assert set(np.unique(alpha)) <= {0.0, 1.0}
    assert alpha[(a > 0.2) & (rgb[..., 0] == 0)].max() == 0


def test_closed_form_matting_softens_edges_and_keeps_interior():
    img, bg, rgb, a = scene_with_shadow()
    mask = a > 0.9
    alpha = ClosedFormMatting()(img, mask)
    assert alpha[14:42, 14:42].max() > 0.99 and alpha[28, 28] > 0.98
    assert alpha[0:5, 0:5].max() < 0.05
    assert np.array_equal(HardMatting()(img, mask), mask.astype(np.float32))


def test_dominant_colours_finds_the_two_flat_colours():
    px = np.concatenate([np.tile([[0.9, 0.1, 0.1]], (300, 1)), np.tile([[0.1, 0.2, 0.9]], (200, 1)),
                         np.random.default_rng(0).random((20, 3))]).astype(np.float32)
    c = dominant_colours(px)
    assert len(c) == 2 and np.allclose(c[0], [0.9, 0.1, 0.1]) and np.allclose(c[1], [0.1, 0.2, 0.9])


def test_a_slow_import_is_announced_and_a_fast_one_is_not(tmp_path, monkeypatch, caplog):
    # pymatting's first import compiles its numba kernels for about a minute: say so instead of looking hung
    (tmp_path / "slow_kernels.py").write_text("import time\ntime.sleep(0.5)\nVALUE = 1\n")
    (tmp_path / "fast_kernels.py").write_text("VALUE = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="layergen.decompose.matting"):
        assert import_announced("slow_kernels", "compiling...", after=0.1).VALUE == 1
        assert import_announced("fast_kernels", "not this", after=0.4).VALUE == 2
        assert import_announced("slow_kernels", "not again", after=0.0).VALUE == 1  # already imported
        time.sleep(0.5)  # a timer that was not cancelled would fire by now
    assert [r.getMessage() for r in caplog.records] == ["compiling..."]
