"""Which backend runs: ``create_backend`` by name, and the ``auto`` choice (TensorRT engines,
else ONNX Runtime, else torch), through the artifact cache where no folder is given."""
from __future__ import annotations

import importlib.util
import inspect
import logging
from pathlib import Path
from typing import Any

import torch

from .artifacts import ENGINE_METADATA_NAME
from .base import BACKENDS, Backend, BackendError
from .onnx_backend import OnnxRuntimeBackend
from .tensorrt_backend import TensorRTBackend
from .torch_backend import TorchBackend, resolve_device

log = logging.getLogger(__name__)

def create_backend(
    kind: str = "auto", *, checkpoint: Any = None, device: str | torch.device | None = None,
    download: bool = False, cache: Any = None, build: bool | None = None, **backend_options: Any,
) -> Backend:
    """Build a backend by name.

    Args:
        kind: one of ``BACKENDS``.
            "auto" (default): TensorRT engines where they build or load on this GPU, else
            ONNX Runtime (the CUDA provider with onnxruntime-gpu on a GPU, the CPU provider
            on the CPU), else torch. On a GPU whose onnxruntime has no CUDA provider, torch
            on the GPU is chosen over ONNX Runtime on the CPU. Each backend that is passed
            over is logged with the reason.
            "onnxruntime" / "tensorrt": the graphs or engines in ``onnx_dir`` /
            ``engine_dir`` when given, else those of the artifact cache, made on first use.
            "torch": the PyTorch modules.
        checkpoint: weights file in the released format (None: the default location).
            Graphs and engines must have been made from it (sha256 in their manifest).
        device: torch device for inputs/outputs and post-processing (default: CUDA when
            torch sees a GPU).
        download: fetch the released weights if absent.
        cache: the artifact cache (an ``ArtifactCache``, or its root folder; default
            ``$CELLSAM_TRT_CACHE`` or the user cache folder).
        build: allow exporting graphs / building engines into the cache (default: yes,
            unless ``CELLSAM_TRT_NO_BUILD=1``).
        **backend_options: ``onnx_dir``, ``engine_dir``, and backend-specific options
            (torch: precision, attention, compile; onnxruntime: providers, max_decoder_boxes, threads;
            tensorrt: verify_hashes). With "auto", options a backend does not take are
            not passed to it.

    Raises:
        BackendError: an explicitly chosen backend cannot be made (the message names the
            cause: no graphs and building off, export failed, TensorRT missing, ...).
    """
    if kind not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {kind!r}")
    onnx_dir = backend_options.pop("onnx_dir", None)
    engine_dir = backend_options.pop("engine_dir", None)
    builder = _Builder(checkpoint, device, download, cache, build)
    if kind == "onnxruntime":
        return builder.onnxruntime(onnx_dir, backend_options)
    if kind == "tensorrt":
        return builder.tensorrt(engine_dir if engine_dir is not None else onnx_dir, backend_options)
    if kind == "auto":
        return builder.auto(onnx_dir, engine_dir, backend_options)
    return builder.torch(backend_options)


def _accepted(cls: type, backend_options: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in backend_options.items() if k in params}


class _Builder:
    """Makes one backend from a checkpoint, through the artifact cache where no folder is given."""

    def __init__(self, checkpoint: Any, device: Any, download: bool, cache: Any, build: bool | None) -> None:
        self.checkpoint = checkpoint
        self.device = device
        self.download = download
        self._cache = cache
        self.build = build

    @property
    def cache(self):
        from .cache import ArtifactCache

        if not isinstance(self._cache, ArtifactCache):
            self._cache = ArtifactCache(self._cache, build=self.build)
        return self._cache

    def checkpoint_file(self) -> Path:
        """The weights file (downloaded first when asked and absent); CheckpointError if missing."""
        from ..modeling.checkpoint import locate_checkpoint

        return locate_checkpoint(self.checkpoint, download=self.download)

    def torch(self, backend_options: dict[str, Any]) -> TorchBackend:
        from ..modeling.checkpoint import load_checkpoint

        return TorchBackend(load_checkpoint(self.checkpoint, download=self.download), device=self.device, **backend_options)

    def onnxruntime(self, onnx_dir: Any, backend_options: dict[str, Any]) -> OnnxRuntimeBackend:
        if onnx_dir is not None:
            return OnnxRuntimeBackend(onnx_dir, checkpoint=self.checkpoint, device=self.device, **backend_options)
        folder = self.cache.onnx_dir(self.checkpoint_file())
        # The cache has just checked the manifest (file hashes, checkpoint sha256).
        backend_options = {"verify_hashes": False, **backend_options}
        return OnnxRuntimeBackend(folder, device=self.device, **backend_options)

    def tensorrt(self, engine_dir: Any, backend_options: dict[str, Any]) -> TensorRTBackend:
        if engine_dir is not None:
            return TensorRTBackend(engine_dir, checkpoint=self.checkpoint, device=self.device, **backend_options)
        from .cache import EngineRequest
        from .tensorrt_backend import current_gpu, require_tensorrt

        trt = require_tensorrt()
        device = resolve_device(self.device)
        if device.type != "cuda":
            raise BackendError(f"device: TensorRT engines run on a CUDA GPU, not {device}")
        index = device.index if device.index is not None else torch.cuda.current_device()
        request = EngineRequest(gpu=current_gpu(device), tensorrt_version=str(trt.__version__), device=index)
        folder = self.cache.engine_dir(self.checkpoint_file(), request)
        backend_options = {"verify_hashes": False, **backend_options}
        return TensorRTBackend(folder, device=device, **backend_options)

    def auto(self, onnx_dir: Any, engine_dir: Any, backend_options: dict[str, Any]) -> Backend:
        """TensorRT, else ONNX Runtime, else torch; logs why each faster one was passed over."""
        device = resolve_device(self.device)
        passed_over: list[str] = []
        if device.type == "cuda" and importlib.util.find_spec("tensorrt") is None:
            passed_over.append("tensorrt: not installed (pip install 'cellsam-trt[tensorrt]')")
        elif device.type == "cuda":
            engines = engine_dir if engine_dir is not None else onnx_dir
            if engines is not None and not (Path(engines).expanduser() / ENGINE_METADATA_NAME).is_file():
                engines = None  # an export folder without engines: build them into the cache
            backend = self._attempt("tensorrt", lambda: self.tensorrt(engines, _accepted(TensorRTBackend, backend_options)),
                                    passed_over)
            if backend is not None:
                return backend
        else:
            passed_over.append(f"tensorrt: needs a CUDA GPU (device {device})")
        ort_options = _accepted(OnnxRuntimeBackend, backend_options)
        if device.type == "cuda" and "providers" not in ort_options:
            if not _onnxruntime_has_cuda():
                passed_over.append("onnxruntime: no CUDA provider (install onnxruntime-gpu); torch on the GPU "
                                   "is faster than ONNX Runtime on the CPU")
                return self._last_resort(backend_options, passed_over)
            ort_options["providers"] = "cuda"
        backend = self._attempt("onnxruntime", lambda: self.onnxruntime(onnx_dir, ort_options), passed_over)
        if backend is not None:
            return backend
        return self._last_resort(backend_options, passed_over)

    def _attempt(self, name: str, make, passed_over: list[str]) -> Backend | None:
        from ..modeling.checkpoint import CheckpointError

        try:
            backend = make()
        except CheckpointError:
            raise  # no weights: no backend can run, say so once
        except BackendError as err:
            log.warning("backend auto: %s not used: %s", name, err)
            passed_over.append(f"{name}: {str(err).splitlines()[0][:200]}")
            return None
        log.info("backend auto: using %s on %s%s", name, backend.device,
                 "" if not passed_over else " (" + "; ".join(passed_over) + ")")
        return backend

    def _last_resort(self, backend_options: dict[str, Any], passed_over: list[str]) -> TorchBackend:
        backend = self.torch(_accepted(TorchBackend, backend_options))
        log.info("backend auto: using torch on %s (%s)", backend.device, "; ".join(passed_over))
        return backend


def _onnxruntime_has_cuda() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()

