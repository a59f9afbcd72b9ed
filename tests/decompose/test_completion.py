import numpy as np
import pytest

from layergen.decompose.completion import (BiharmonicFill, OpenCVInpainting, PyramidFill, StructureFill,
                                           DiffusersInpainting)
from layergen.errors import LayergenError


def stripes(h=64, w=64, angle=0.6, period=9.0):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = np.clip(np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period) * 3, -1, 1) * 0.5 + 0.5
    a, b = np.array([0.8, 0.3, 0.2], np.float32), np.array([0.2, 0.4, 0.7], np.float32)
    return np.floor((a * (1 - t[..., None]) + b * t[..., None]) * 255 + 0.5).astype(np.float32) / 255


def disc(h, w, cx, cy, r):
    yy, xx = np.mgrid[0:h, 0:w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def psnr(a, b, m):
    return 10 * np.log10(1 / max(((a - b)[m] ** 2).mean(), 1e-12))


def test_structure_fill_continues_stripes_and_keeps_outside_exact():
    bg = stripes()
    hole = disc(64, 64, 30, 34, 14)
    img = bg.copy()
    img[hole] = [1.0, 1.0, 0.0]
    out = StructureFill()(img, hole)
    assert np.array_equal(out[~hole], img[~hole])
    assert psnr(out, bg, hole) > 30
    # the generic inpainters blur stripes away
    assert psnr(OpenCVInpainting()(img, hole), bg, hole) < psnr(out, bg, hole) - 8


def test_structure_fill_ignores_other_objects_when_fitting():
    bg = stripes(angle=0.0)
    hole, other = disc(64, 64, 20, 30, 10), disc(64, 64, 44, 30, 12)
    img = bg.copy()
    img[hole], img[other] = [1, 1, 0], [0, 1, 0]
    out = StructureFill()(img, hole, ignore=other)
    assert np.array_equal(out[other], img[other])  # ignored pixels are kept, never filled
    assert psnr(out, bg, hole) > 30


def test_pyramid_and_biharmonic_exact_on_flat_colour():
    img = np.full((40, 50, 3), 0.25, np.float32)
    hole = disc(40, 50, 20, 20, 8)
    img2 = img.copy()
    img2[hole] = 0.9
    for c in (PyramidFill(), BiharmonicFill(), OpenCVInpainting("ns")):
        assert np.abs(c(img2, hole) - img).max() < 2 / 255, c


def test_structure_fill_keeps_a_plain_colour_plain_next_to_a_shadow_tail():
    """A plain background has no direction, but it is 1-D; a smooth fill would continue the darkening of a
    shadow's tail at the hole's edge into a dark blob under the object."""
    bg = np.array([0.94, 0.9, 0.78], np.float32)
    img = np.broadcast_to(bg, (64, 64, 3)).copy()
    hole = disc(64, 64, 30, 30, 14)
    r = np.hypot(*(np.mgrid[0:64, 0:64] - 34.0))
    shade = np.clip((19 - r) / 6, 0, 1)[..., None] * 0.5  # a soft shadow reaching past the hole's edge
    img = np.where(hole[..., None], [0.1, 0.2, 0.8], img * (1 - shade)).astype(np.float32)
    out = StructureFill()(img, hole)
    assert np.abs(out[hole] - bg).max() < 0.02
    assert np.abs(BiharmonicFill()(img, hole)[hole] - bg).max() > 0.1  # what the fallback did


def test_structure_fill_falls_back_on_2d_content():
    rng = np.random.default_rng(0)
    img = rng.random((48, 48, 3)).astype(np.float32)
    hole = disc(48, 48, 24, 24, 6)
    out = StructureFill(fallback=PyramidFill())(img, hole)
    assert np.allclose(out, PyramidFill()(img, hole))


def test_completion_errors():
    img = np.zeros((16, 16, 3), np.float32)
    with pytest.raises(LayergenError, match="hole mask"):
        PyramidFill()(img, np.zeros((8, 8), bool))
    with pytest.raises(LayergenError, match="whole image"):
        PyramidFill()(img, np.ones((16, 16), bool))
    with pytest.raises(LayergenError, match="unknown OpenCV"):
        OpenCVInpainting("fast")


def test_diffusers_inpainting_wraps_any_pipeline_and_pastes_only_the_hole():
    from PIL import Image

    class FakeInpaint:
        def __call__(self, prompt, image, mask_image, height, width, **kw):
            assert image.size == (width, height) and mask_image.size == (width, height) and width % 8 == 0
            self.kw = kw

            class R:
                images = [Image.new("RGB", (width, height), (0, 255, 0))]
            return R()

    fake = FakeInpaint()
    img = np.full((30, 20, 3), 0.5, np.float32)
    hole = disc(30, 20, 10, 15, 4)
    out = DiffusersInpainting(fake, resolution=64, num_inference_steps=2)(img, hole)
    assert np.allclose(out[hole], [0, 1, 0]) and np.array_equal(out[~hole], img[~hole])
    assert fake.kw["num_inference_steps"] == 2
