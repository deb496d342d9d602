"""cellsam-trt: fast, faithful CellSAM inference (PyTorch, ONNX Runtime, TensorRT).

>>> import cellsam_trt
>>> labels = cellsam_trt.segment(image)  # doctest: +SKIP
"""
from .checkpoint import CheckpointError, load_checkpoint, write_random_checkpoint
from .config import InferenceConfig, ModelConfig
from .embedding import ImageEmbedding
from .interactive import Annotation
from .io import ImageFile, read_image
from .options import SegmentOptions
from .pipeline import (
    CellSAM,
    NoCellsWarning,
    SegmentationDetails,
    segment,
    segment_stack,
    unload,
)

__version__ = "0.1.0"

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
