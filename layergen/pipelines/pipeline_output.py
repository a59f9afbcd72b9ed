"""Output dataclasses of the layergen pipelines."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffusers.utils import BaseOutput


@dataclass
class LayerPipelineOutput(BaseOutput):
    """`images`: one composited PIL RGBA image (or array) per sample; `stacks`: the `LayerStack` behind each."""

    images: Any
    stacks: list
