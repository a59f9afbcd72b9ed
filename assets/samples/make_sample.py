"""Build assets/samples/sample.ora: a small layered picture for demos, docs and tests.

Deterministic (pure numpy maths, no randomness, fixed zip timestamps), so
re-running it reproduces the committed file byte for byte with the same
Pillow/zlib. It exercises what layered formats must carry: partial alpha, an
offset layer that hangs off the canvas, a multiply layer with opacity, and a
hidden layer.

    python assets/samples/make_sample.py [OUT]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from layergen.layers import Layer, LayerStack, save

WIDTH, HEIGHT = 192, 128


def _rgba(rgb, alpha) -> np.ndarray:
    """Float RGB (H x W x 3 or a colour) and float alpha (H x W) in [0, 1] -> uint8 RGBA."""
    alpha = np.clip(alpha, 0.0, 1.0)
    rgb = np.broadcast_to(np.asarray(rgb, np.float64), alpha.shape + (3,))
    out = np.concatenate([rgb, alpha[..., None]], axis=-1)
    return np.floor(np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _disc(h, w, cx, cy, rx, ry, soft) -> np.ndarray:
    """Alpha of an ellipse with a linear soft edge `soft` pixels wide."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    d = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    return np.clip((1.0 - d) * min(rx, ry) / soft + 0.5, 0.0, 1.0)


def build() -> LayerStack:
    stack = LayerStack(WIDTH, HEIGHT, metadata={"title": "layergen sample", "generator": "make_sample.py"})

    t = np.linspace(0.0, 1.0, HEIGHT)[:, None, None]
    sky = (1 - t) * np.array([0.36, 0.58, 0.90]) + t * np.array([0.98, 0.82, 0.62])
    stack.add(Layer(_rgba(np.broadcast_to(sky, (HEIGHT, WIDTH, 3)), np.ones((HEIGHT, WIDTH))), "Sky",
                    metadata={"kind": "background", "prompt": "evening sky gradient"}))

    # A soft-edged sun, offset and hanging off the right edge of the canvas.
    sun_a = _disc(56, 56, 28, 28, 26, 26, soft=5.0)
    stack.add(Layer(_rgba([1.0, 0.86, 0.35], sun_a), "Sun", x=150, y=14,
                    metadata={"kind": "instance", "prompt": "a soft yellow sun"}))

    # A hill whose colour is multiplied into the sky; semi-opaque, partly below the canvas.
    hill_a = _disc(80, 240, 120, 80, 130, 62, soft=3.0)
    stack.add(Layer(_rgba([0.45, 0.70, 0.40], hill_a), "Hill", x=-24, y=62, opacity=0.85, blend_mode="multiply",
                    metadata={"kind": "instance", "prompt": "a green hill"}))

    # A hidden construction guide: a half-transparent red frame.
    guide = np.zeros((HEIGHT - 16, WIDTH - 16))
    guide[:2, :] = guide[-2:, :] = guide[:, :2] = guide[:, -2:] = 0.5
    stack.add(Layer(_rgba([0.9, 0.1, 0.1], guide), "Guides", x=8, y=8, visible=False,
                    metadata={"kind": "other"}))
    return stack


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else Path(__file__).with_name("sample.ora")
    print(f"wrote {save(build(), out)}")


if __name__ == "__main__":
    main()
