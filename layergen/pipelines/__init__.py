"""Pipelines (diffusers `DiffusionPipeline` subclasses, one per file). Imported lazily: torch loads on first use."""
import importlib

_EXPORTS = {
    "TransparentLayerPipeline": "pipeline_transparent_layer",
    "ForegroundOnBackgroundPipeline": "pipeline_foreground_on_background",
    "BackgroundBehindForegroundPipeline": "pipeline_background_behind_foreground",
    "MultiLayerPipeline": "pipeline_multilayer",
    "LayeredHumanPipeline": "pipeline_layered_human",
    "LayeredHumanOutput": "pipeline_layered_human",
    "LayerPipelineOutput": "pipeline_output",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
