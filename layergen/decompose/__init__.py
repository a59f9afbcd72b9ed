"""Components of image decomposition (see `layergen.pipelines.pipeline_decomposition`).

Each is a plain callable object, swappable in `DecompositionPipeline(...)`:

* proposals: `AutomaticProposer`, `BoxProposer`, `MaskProposer`, `PointProposer`
* matting: `ClosedFormMatting` (pymatting), `HardMatting`
* completion: `StructureFill` (default), `BiharmonicFill`, `PyramidFill`, `OpenCVInpainting`, `DiffusersInpainting`
* extraction: `Unblend` (keeps shadows/glows, exact re-composite), `HardCut`
* learned: `LayerDecomposer` (the mini latent-diffusion decomposer, `layergen.decompose.learned`)
"""
from .completion import (BackgroundCompleter, BiharmonicFill, DiffusersInpainting, OpenCVInpainting, PyramidFill,
                         StructureFill)
from .matting import AlphaMatting, ClosedFormMatting, ForegroundExtraction, HardCut, HardMatting, Unblend
from .proposals import (AutomaticProposer, BoxProposer, InstanceProposal, InstanceProposer, MaskProposer,
                        PointProposer, order_top_first)

__all__ = [
    "AlphaMatting", "AutomaticProposer", "BackgroundCompleter", "BiharmonicFill", "BoxProposer", "ClosedFormMatting",
    "DiffusersInpainting", "ForegroundExtraction", "HardCut", "HardMatting", "InstanceProposal", "InstanceProposer",
    "MaskProposer", "OpenCVInpainting", "PointProposer", "PyramidFill", "StructureFill", "Unblend",
    "order_top_first",
]
