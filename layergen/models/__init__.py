"""Models as diffusers `ModelMixin` + `ConfigMixin` classes.

Imports are lazy (PEP 562): `import layergen.models` stays cheap, and torch/diffusers load
only when a model class or helper is first touched.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "TransparentEncoder": "transparent_codec",
    "TransparentDecoder": "transparent_codec",
    "MINI_ENCODER_CONFIG": "transparent_codec",
    "MINI_DECODER_CONFIG": "transparent_codec",
    "encode_rgba": "transparent_codec",
    "decode_rgba": "transparent_codec",
    "pad_rgb": "transparent_codec",
    "premultiply_on_grey": "transparent_codec",
    "checkerboard_composite": "transparent_codec",
    "vae_scale_factor": "transparent_codec",
    "load_layerdiffuse_weights": "layerdiffuse_keys",
    "to_layerdiffuse_state_dict": "layerdiffuse_keys",
    "convert_layerdiffuse_state_dict": "layerdiffuse_keys",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
