"""cellsam-trt: fast, faithful CellSAM inference (PyTorch, ONNX Runtime, TensorRT).

>>> import cellsam_trt
>>> labels = cellsam_trt.segment(image)  # doctest: +SKIP
"""
from .api import CellSAM, segment, segment_stack, unload
from .engine.core import NoCellsWarning, SegmentationDetails
from .engine.embedding import ImageEmbedding
from .engine.options import SegmentOptions
from .interactive import Annotation
from .io import ImageFile, read_image
from .modeling.checkpoint import CheckpointError, load_checkpoint, write_random_checkpoint
from .modeling.config import InferenceConfig, ModelConfig
from .version import __version__ as __version__

__all__ = [
    "Annotation",
    "CellSAM",
    "CheckpointError",
    "ImageEmbedding",
    "ImageFile",
    "InferenceConfig",
    "ModelConfig",
    "NoCellsWarning",
    "SegmentOptions",
    "SegmentationDetails",
    "load_checkpoint",
    "read_image",
    "segment",
    "segment_stack",
    "unload",
    "write_random_checkpoint",
]
