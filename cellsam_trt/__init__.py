"""cellsam-trt: fast, faithful CellSAM inference (PyTorch, ONNX Runtime, TensorRT).

>>> import cellsam_trt
>>> labels = cellsam_trt.segment(image)  # doctest: +SKIP

The public names below are imported on first use (``lazy``): importing the package is
quick and loads no model stack.
"""
from typing import TYPE_CHECKING

from .lazy import lazy_names
from .version import __version__ as __version__

_WHERE = {
    "Annotation": ".interactive",
    "CellSAM": ".api",
    "CheckpointError": ".modeling.checkpoint",
    "ImageEmbedding": ".engine.embedding",
    "ImageFile": ".io",
    "InferenceConfig": ".modeling.config",
    "ModelConfig": ".modeling.config",
    "NoCellsWarning": ".engine.core",
    "SegmentOptions": ".engine.options",
    "SegmentationDetails": ".engine.core",
    "load_checkpoint": ".modeling.checkpoint",
    "read_image": ".io",
    "segment": ".api",
    "segment_stack": ".api",
    "unload": ".api",
    "write_random_checkpoint": ".modeling.checkpoint",
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_names(__name__, _WHERE)

if TYPE_CHECKING:  # the same names for type checkers and editors
    from .api import CellSAM, segment, segment_stack, unload
    from .engine.core import NoCellsWarning, SegmentationDetails
    from .engine.embedding import ImageEmbedding
    from .engine.options import SegmentOptions
    from .interactive import Annotation
    from .io import ImageFile, read_image
    from .modeling.checkpoint import CheckpointError, load_checkpoint, write_random_checkpoint
    from .modeling.config import InferenceConfig, ModelConfig
