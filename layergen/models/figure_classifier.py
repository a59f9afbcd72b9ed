"""Small CNN classifiers of procedural figures: the *independent* judges of the action benchmark.

Trained on renders with known labels (`training/train_pose_classifier.py`), never on generator
output, so they can score a generator without sharing its biases:
* pose classifier: one head over `ACTIONS`;
* subject classifier: heads over `SPECIES` and `FIGURE_COLOURS`.

`pooling`: "flatten" keeps where things are (a pose is a spatial arrangement of limbs);
"global" (mean + max over positions) is translation-invariant — what a subject's identity
is, since species cues (ears, beak, antenna, eyes) can be anywhere in the frame.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class FigureClassifier(ModelMixin, ConfigMixin):
    """RGB 128 px (any size; resized to `input_size`) -> logits per head. `pooling="flatten"`:
    position-aware (flattened 4x4 features); `"global"`: mean and max over positions."""

    @register_to_config
    def __init__(self, heads: dict | None = None, input_size: int = 64, channels: tuple = (32, 64, 96, 128),
                 dropout: float = 0.2, pooling: str = "flatten"):
        super().__init__()
        heads = heads or {"action": ["stand"]}
        if pooling not in ("flatten", "global"):
            raise ValueError(f"pooling must be 'flatten' or 'global', got {pooling!r}")
        layers, c_in = [], 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        side = input_size // 2 ** len(channels)
        width = c_in * side * side if pooling == "flatten" else 2 * c_in
        self.drop = nn.Dropout(dropout)
        self.head_layers = nn.ModuleDict({name: nn.Linear(width, len(labels)) for name, labels in heads.items()})

    def forward(self, images: torch.Tensor) -> dict:
        """`images`: B x 3 x H x W in [0, 1]."""
        size = self.config.input_size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = nn.functional.interpolate(images, size=(size, size), mode="area")
        h = self.features(images * 2 - 1)
        if self.config.pooling == "global":
            h = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        else:
            h = h.flatten(1)
        h = self.drop(h)
        return {name: head(h) for name, head in self.head_layers.items()}

    @torch.no_grad()
    def predict(self, images, batch: int = 64) -> dict:
        """uint8 N x H x W x 3 array (or list of PIL/arrays) -> head -> list of label strings."""
        arr = np.stack([np.asarray(i)[..., :3] for i in images])
        out = {name: [] for name in self.config.heads}
        device = next(self.parameters()).device
        for k in range(0, len(arr), batch):
            x = torch.from_numpy(arr[k:k + batch]).permute(0, 3, 1, 2).float().div(255).to(device)
            logits = self(x)
            for name, labels in self.config.heads.items():
                out[name] += [labels[i] for i in logits[name].argmax(-1).tolist()]
        return out
