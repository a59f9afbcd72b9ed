"""torch Datasets over the procedural generators (samples are made on the fly, pure functions of the index).

Index i maps to seed `seed_offset + i`; keep `seed_offset + len < HELDOUT_SEED_START`
for training sets and use `seed_offset=HELDOUT_SEED_START` for held-out sets.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .scenes import HELDOUT_SEED_START, make_object_layer, make_scene, object_on_neutral


def _chw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


class SceneImageDataset(Dataset):
    """RGB images for the base VAE, in [-1, 1]: scene composites and object layers on neutral grey.

    Both domains matter: the frozen VAE later encodes transparent layers premultiplied
    onto grey (LayerDiffuse convention) as well as full scenes.
    """

    def __init__(self, size: int = 128, length: int = 500_000, seed_offset: int = 0, object_fraction: float = 0.5):
        self.size, self.length, self.seed_offset, self.object_fraction = size, length, seed_offset, object_fraction

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        seed = self.seed_offset + int(i)
        if np.random.default_rng([seed, 7]).random() < self.object_fraction:
            img = object_on_neutral(make_object_layer(seed, self.size, centred=False).rgba)
        else:
            img = make_scene(seed, self.size).composite.astype(np.float32) / 255.0
        return {"pixel_values": _chw(img.astype(np.float32) * 2.0 - 1.0)}


class ObjectLayerDataset(Dataset):
    """Transparent object layers: `rgba` (4 x H x W, straight, [0, 1]), `caption` and attributes.

    `background=True` also returns the scene background (3 x H x W in [0, 1]) the object was
    placed on, for background-conditioned training.
    """

    def __init__(self, size: int = 128, length: int = 500_000, seed_offset: int = 0, centred: bool = True,
                 background: bool = False, **object_kwargs):
        self.size, self.length, self.seed_offset = size, length, seed_offset
        self.centred, self.background, self.object_kwargs = centred, background, object_kwargs

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        seed = self.seed_offset + int(i)
        obj = make_object_layer(seed, self.size, centred=self.centred, **self.object_kwargs)
        item = {"rgba": _chw(obj.rgba.astype(np.float32) / 255.0), "caption": obj.caption, "shape": obj.shape,
                "colour": obj.colour, "material": obj.material, "effect": obj.effect,
                "box": torch.tensor(obj.box)}
        if self.background:
            scene = make_scene(seed, self.size, num_objects=0)
            item["background"] = _chw(scene.background.astype(np.float32) / 255.0)
            item["background_caption"] = scene.background_caption
        return item


def heldout(dataset_cls, length: int, **kwargs):
    """The held-out split of a dataset class: seeds from HELDOUT_SEED_START on."""
    return dataset_cls(length=length, seed_offset=HELDOUT_SEED_START, **kwargs)
