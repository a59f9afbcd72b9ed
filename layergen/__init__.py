"""layergen: layered generative content — transparent layers, multi-layer images,
decomposition, layered 3D humans and action inversion, on diffusers.

`import layergen` is cheap and does not import torch; pipelines load lazily.
"""
from .errors import FormatError, LayerError, LayergenError, ModelNotFoundError
from .layers import BLEND_MODES, Layer, LayerStack

__version__ = "0.1.0"

__all__ = ["BLEND_MODES", "FormatError", "Layer", "LayerError", "LayerStack", "LayergenError",
           "ModelNotFoundError", "__version__"]
