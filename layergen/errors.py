"""Errors that users can act on.

Every error a user can cause (bad file, bad argument, missing model) is a
`LayergenError`; the CLI prints it as one line and exits with status 2, the
studio shows it as a Gradio error. Anything else is a bug and keeps its
traceback.
"""


class LayergenError(Exception):
    """Base class for errors caused by input, not by a bug."""


class FormatError(LayergenError):
    """A file is corrupt, truncated or in an unsupported format."""


class LayerError(LayergenError, ValueError):
    """A layer or stack operation got invalid arguments (mode, size, index, blend mode...)."""


class ModelNotFoundError(LayergenError, FileNotFoundError):
    """A model folder is missing; the message says what to pass instead."""
