"""Layer documents, exact compositing and layered file formats. Importable without torch."""
from .compositing import BLEND_MODES, composite_layers
from .layer import LAYER_KINDS, Layer, LayerStack, as_rgba_array
from .formats import FORMATS, detect_format, load, save

__all__ = ["BLEND_MODES", "FORMATS", "LAYER_KINDS", "Layer", "LayerStack", "as_rgba_array", "composite_layers",
           "detect_format", "load", "save"]
