"""Engine backends behind one interface (``Backend``), and the choice between them.

The names below are imported on first use (``cellsam_trt.lazy``): the artefact cache and
the graph contract's constants load without torch or ONNX Runtime.
"""
from typing import TYPE_CHECKING

from ..lazy import lazy_names

_WHERE = {
    "BACKENDS": ".base", "Backend": ".base", "BackendError": ".base", "OutOfDeviceMemory": ".base",
    "OnnxRuntimeBackend": ".onnx_backend", "TensorRTBackend": ".tensorrt_backend",
    "TorchBackend": ".torch_backend", "resolve_device": ".torch_backend", "create_backend": ".choice",
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_names(__name__, _WHERE)

if TYPE_CHECKING:
    from .base import BACKENDS, Backend, BackendError, OutOfDeviceMemory
    from .choice import create_backend
    from .onnx_backend import OnnxRuntimeBackend
    from .tensorrt_backend import TensorRTBackend
    from .torch_backend import TorchBackend, resolve_device
