"""The layergen studio: a per-session layered document (`Document`), pluggable model backends, and a Gradio app.

`document` and `backends` do not import Gradio; `app` does (import it only to serve the UI).
"""
from .backends import Box, Condition, LayerBackend, PipelineBackend, ProceduralBackend, default_backends
from .document import Document

__all__ = ["Box", "Condition", "Document", "LayerBackend", "PipelineBackend", "ProceduralBackend",
           "default_backends"]
