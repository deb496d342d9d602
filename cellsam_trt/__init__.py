"""cellsam-trt: fast, faithful CellSAM inference (PyTorch, ONNX Runtime, TensorRT).

>>> import cellsam_trt
>>> labels = cellsam_trt.segment(image)  # doctest: +SKIP
"""
from .checkpoint import CheckpointError, load_checkpoint, write_random_checkpoint
from .config import InferenceConfig, ModelConfig
from .embedding import ImageEmbedding
from .interactive import Annotation
from .pipeline import CellSAM, NoCellsWarning, SegmentationDetails, segment, unload

__version__ = "0.1.0"

__all__ = [
    "Annotation",
    "CellSAM",
    "CheckpointError",
    "ImageEmbedding",
    "InferenceConfig",
    "ModelConfig",
    "NoCellsWarning",
    "SegmentationDetails",
    "load_checkpoint",
    "segment",
    "unload",
    "write_random_checkpoint",
]
