"""Engine backends behind one interface (``Backend``)."""
from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch

from .artifacts import ENGINE_METADATA_NAME, MANIFEST_NAME
from .base import Backend, BackendError, OutOfDeviceMemory
from .onnx_backend import OnnxRuntimeBackend
from .tensorrt_backend import TensorRTBackend
from .torch_backend import TorchBackend, resolve_device

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt", "auto")


def create_backend(
    kind: str = "torch", *, checkpoint: Any = None, device: str | torch.device | None = None,
    download: bool = False, **options: Any,
) -> Backend:
    """Build a backend by name.

    Args:
        kind: one of ``BACKENDS``. "onnxruntime" needs ``onnx_dir=`` (``cellsam-trt export``),
            "tensorrt" needs ``engine_dir=`` (``cellsam-trt build-engines``). "auto" takes
            TensorRT engines if present and loadable, else ONNX Runtime if an export is
            present, else torch (engines are looked for in ``engine_dir``, then ``onnx_dir``).
        checkpoint: weights file in the released format (None: the default location). With
            onnxruntime/tensorrt it is optional and, when given, the graphs or engines must
            have been made from it (sha256 in their manifest).
        device: torch device for inputs/outputs and post-processing.
        download: fetch the released weights if absent (torch).
        **options: ``onnx_dir``, ``engine_dir``, and backend-specific options
            (torch: precision; onnxruntime: providers, max_decoder_boxes, threads;
            tensorrt: verify_hashes). With "auto", options a backend does not take are
            not passed to it.
    """
    if kind not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {kind!r}")
    onnx_dir = options.pop("onnx_dir", None)
    engine_dir = options.pop("engine_dir", None)
    if kind == "onnxruntime":
        if onnx_dir is None:
            raise ValueError("onnx_dir: backend 'onnxruntime' needs the export folder (cellsam-trt export --out DIR)")
        return OnnxRuntimeBackend(onnx_dir, checkpoint=checkpoint, device=device, **options)
    if kind == "tensorrt":
        engine_dir = engine_dir if engine_dir is not None else onnx_dir
        if engine_dir is None:
            raise ValueError("engine_dir: backend 'tensorrt' needs the engine folder (cellsam-trt build-engines --out DIR)")
        return TensorRTBackend(engine_dir, checkpoint=checkpoint, device=device, **options)
    if kind == "auto":
        return _auto_backend(checkpoint, device, download, onnx_dir, engine_dir, options)
    return _torch_backend(checkpoint, device, download, options)


def _torch_backend(checkpoint: Any, device: Any, download: bool, options: dict[str, Any]) -> TorchBackend:
    from ..checkpoint import load_checkpoint

    return TorchBackend(load_checkpoint(checkpoint, download=download), device=device, **options)


def _accepted(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in options.items() if k in params}


def _auto_backend(checkpoint: Any, device: Any, download: bool, onnx_dir: Any, engine_dir: Any,
                  options: dict[str, Any]) -> Backend:
    """TensorRT if its engines load here, else ONNX Runtime if an export is present, else torch.

    A present artefact that is refused (other GPU, other checkpoint, corrupt file) is
    logged as a warning with the reason before falling back.
    """
    engines = engine_dir if engine_dir is not None else onnx_dir
    if engines is not None and (Path(engines).expanduser() / ENGINE_METADATA_NAME).is_file():
        try:
            return TensorRTBackend(engines, checkpoint=checkpoint, device=device, **_accepted(TensorRTBackend, options))
        except BackendError as err:
            log.warning("backend auto: TensorRT engines in %s not used: %s", engines, err)
    if onnx_dir is not None and (Path(onnx_dir).expanduser() / MANIFEST_NAME).is_file():
        try:
            return OnnxRuntimeBackend(onnx_dir, checkpoint=checkpoint, device=device,
                                      **_accepted(OnnxRuntimeBackend, options))
        except BackendError as err:
            log.warning("backend auto: ONNX graphs in %s not used: %s", onnx_dir, err)
    return _torch_backend(checkpoint, device, download, _accepted(TorchBackend, options))


__all__ = [
    "BACKENDS", "Backend", "BackendError", "OnnxRuntimeBackend", "OutOfDeviceMemory", "TensorRTBackend",
    "TorchBackend", "create_backend", "resolve_device",
]
