"""TensorRT backend: serialized engines (``cellsam-trt build-engines``) run on torch CUDA memory.

The part of the Python API that TensorRT 10 and 11 share: ``trt.Runtime.deserialize_cuda_engine``,
named I/O tensors, ``context.set_input_shape`` / ``set_tensor_address`` on torch tensors
(torch allocates the outputs; TensorRT its own scratch memory) and
``context.execute_async_v3`` on one torch CUDA stream. No pycuda, no binding indices.

An engine only runs on the GPU model (compute capability) and TensorRT version it was
built with; ``engines.json`` records both, plus the checkpoint hash of the ONNX export, and
the backend refuses a mismatch with the command that rebuilds the engines.
``tensorrt`` is imported lazily: without it this module still imports, and creating the
backend raises one BackendError saying how to install it.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..modeling.config import ModelConfig
from .artifacts import (
    ENGINE_METADATA_FORMAT,
    ENGINE_METADATA_NAME,
    ENGINE_METADATA_VERSION,
    GRAPH_NAMES,
    GRAPH_SPECS,
    build_hint,
    check_checkpoint_hash,
    check_input,
    file_sha256,
    read_record,
)
from .base import Backend, BackendError, OutOfDeviceMemory, in_batches, masks_of_kept
from .torch_backend import resolve_device

log = logging.getLogger(__name__)

# Supported: TensorRT 10 and 11 (the same range as pyproject's `tensorrt` extra). 10 is the
# first with named-tensor execution only; 11 is the newest release, checked against its
# Python bindings' names. A later major may remove more of the API: it is tried with a warning.
TENSORRT_MIN_MAJOR = 10
TENSORRT_MAX_MAJOR = 11


def require_tensorrt():
    """The ``tensorrt`` module (>= 10), or a BackendError naming the fix."""
    try:
        import tensorrt as trt
    except ImportError as err:
        raise BackendError(
            f"TensorRT is not installed ({err}). On a machine with an NVIDIA GPU and driver install it with "
            "`pip install 'tensorrt>=10,<12'` (or `pip install -e '.[tensorrt]'`), then build engines with "
            "`cellsam-trt build-engines`; elsewhere use backend='onnxruntime' or backend='torch'."
        ) from None
    try:
        major = int(str(trt.__version__).split(".")[0])
    except ValueError:
        major = 0
    if major < TENSORRT_MIN_MAJOR:
        raise BackendError(
            f"TensorRT {trt.__version__} is too old: cellsam-trt uses the TensorRT {TENSORRT_MIN_MAJOR} API "
            f"(named tensors, execute_async_v3); upgrade with `pip install 'cellsam-trt[tensorrt]'`"
        )
    if major > TENSORRT_MAX_MAJOR:
        log.warning("TensorRT %s is newer than the versions cellsam-trt supports (%d to %d.x); trying it anyway",
                    trt.__version__, TENSORRT_MIN_MAJOR, TENSORRT_MAX_MAJOR)
    return trt


def current_gpu(device: torch.device | str | None = None) -> dict[str, str]:
    """{"name": ..., "compute_capability": "major.minor"} of a CUDA device, read through torch."""
    if not torch.cuda.is_available():
        raise BackendError("TensorRT needs a CUDA GPU, but torch sees none (check the driver and CUDA_VISIBLE_DEVICES)")
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    major, minor = torch.cuda.get_device_capability(device)
    return {"name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}


def load_engine_metadata(engine_dir: str | os.PathLike, graphs: Sequence[str] = GRAPH_NAMES) -> dict[str, Any]:
    """Parsed ``engines.json`` of ``engine_dir`` with its required fields present.

    Raises:
        BackendError: missing folder/file, other format, or missing graph entries.
    """
    folder = Path(engine_dir).expanduser()
    hint = build_hint(None, folder)
    meta = read_record(folder, ENGINE_METADATA_NAME, "engine_dir", hint,
                       (ENGINE_METADATA_FORMAT, ENGINE_METADATA_VERSION), "cellsam-trt engine metadata")
    hint = build_hint(meta.get("onnx_dir"), folder)
    try:
        meta["gpu"]["name"], meta["gpu"]["compute_capability"], meta["tensorrt_version"]
        meta["checkpoint"]["sha256"], meta["model_config"], meta["uses_model_cp"]
        engines = meta["engines"]
    except (KeyError, TypeError) as err:
        raise BackendError(f"engine_dir: {folder / ENGINE_METADATA_NAME} lacks {err}. {hint}") from None
    missing = [g for g in graphs if g not in engines]
    if missing:
        raise BackendError(f"engine_dir: no {', '.join(missing)} engine recorded in {folder / ENGINE_METADATA_NAME}. {hint}")
    return meta


def check_engine_metadata(
    meta: Mapping[str, Any],
    *,
    gpu_name: str,
    compute_capability: str,
    tensorrt_version: str,
    checkpoint: str | os.PathLike | None = None,
    engine_dir: str | os.PathLike = "ENGINE_DIR",
) -> None:
    """Refuse engines built elsewhere: another GPU model or compute capability, another
    TensorRT version, or (when ``checkpoint`` is given) another checkpoint.

    Needs no TensorRT: the caller passes what the current machine has.

    Raises:
        BackendError: stating what was built for what, and the command that rebuilds.
    """
    hint = build_hint(meta.get("onnx_dir"), engine_dir)
    built_gpu = meta["gpu"]
    problems = []
    if str(built_gpu["compute_capability"]) != str(compute_capability):
        problems.append(
            f"compute capability {built_gpu['compute_capability']} ({built_gpu['name']}) but this GPU is "
            f"{compute_capability} ({gpu_name})"
        )
    elif built_gpu["name"] != gpu_name:
        problems.append(f"GPU {built_gpu['name']!r} but this GPU is {gpu_name!r}")
    if str(meta["tensorrt_version"]) != str(tensorrt_version):
        problems.append(f"TensorRT {meta['tensorrt_version']} but this TensorRT is {tensorrt_version}")
    if problems:
        raise BackendError(
            f"engine_dir: the engines in {engine_dir} were built for " + "; and for ".join(problems)
            + f". TensorRT engines only run where they were built. {hint}"
        )
    if checkpoint is not None:
        check_checkpoint_hash(meta["checkpoint"]["sha256"], checkpoint, f"the engines in {engine_dir}", hint)


def _torch_dtypes(trt) -> dict:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8,
             trt.bool: torch.bool}
    for trt_name, torch_type in (("int64", torch.int64), ("bfloat16", torch.bfloat16)):
        if hasattr(trt, trt_name):
            table[getattr(trt, trt_name)] = torch_type
    return table


class EngineRunner:
    """One deserialized engine with its execution context (single optimization profile)."""

    def __init__(self, trt, runtime, path: Path, graph: str, device: torch.device, hint: str) -> None:
        self.graph = graph
        self.device = device
        try:
            data = path.read_bytes()
        except OSError as err:
            raise BackendError(f"engine_dir: cannot read {path} ({err}). {hint}") from None
        with torch.cuda.device(device):
            engine = runtime.deserialize_cuda_engine(data)
            if engine is None:
                raise BackendError(
                    f"engine_dir: TensorRT cannot deserialize {path} (corrupt, or built by another TensorRT "
                    f"version or for another GPU). {hint}"
                )
            context = engine.create_execution_context()
            if context is None:
                raise BackendError(f"{graph}: TensorRT could not create an execution context (out of GPU memory?)")
        self.engine, self.context = engine, context
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = tuple(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.outputs = tuple(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        spec = GRAPH_SPECS[graph]
        if set(self.inputs) != set(spec.inputs) or set(self.outputs) != set(spec.outputs):
            raise BackendError(
                f"engine_dir: {path} has inputs {self.inputs} and outputs {self.outputs}, expected "
                f"{spec.inputs} and {spec.outputs}. {hint}"
            )
        dtypes = _torch_dtypes(trt)
        self.dtypes = {n: dtypes[engine.get_tensor_dtype(n)] for n in names}
        # (min, opt, max) shapes of profile 0, per input
        self.profile = {n: tuple(tuple(s) for s in engine.get_tensor_profile_shape(n, 0)) for n in self.inputs}

    def max_dim0(self, name: str) -> int:
        return int(self.profile[name][2][0])

    def _check_profile(self, name: str, shape: tuple[int, ...]) -> None:
        lo, _, hi = self.profile[name]
        if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            raise ValueError(
                f"{self.graph} {name}: shape {shape} is outside the engine's profile {lo}..{hi}; rebuild the "
                "engines with a larger --max-batch / --max-boxes"
            )

    def __call__(self, inputs: Mapping[str, Tensor], stream: torch.cuda.Stream) -> list[Tensor]:
        device = self.device
        caller = torch.cuda.current_stream(device)
        # The engine reads what the caller's stream wrote, and the caller reads what it writes.
        stream.wait_stream(caller)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            feeds = {}
            for name in self.inputs:
                t = inputs[name].detach().to(device=device, dtype=self.dtypes[name]).contiguous()
                self._check_profile(name, tuple(t.shape))
                if not self.context.set_input_shape(name, tuple(t.shape)):
                    raise BackendError(f"{self.graph}: TensorRT rejected input shape {tuple(t.shape)} for {name}")
                self.context.set_tensor_address(name, t.data_ptr())
                feeds[name] = t
            outputs = []
            for name in GRAPH_SPECS[self.graph].outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise BackendError(f"{self.graph}: TensorRT could not infer the shape of {name} ({shape})")
                try:
                    out = torch.empty(shape, dtype=self.dtypes[name], device=device)
                except torch.cuda.OutOfMemoryError as err:
                    torch.cuda.empty_cache()
                    raise OutOfDeviceMemory(f"{self.graph}: output {name} {shape}: {err}") from None
                self.context.set_tensor_address(name, out.data_ptr())
                outputs.append(out)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise BackendError(f"{self.graph}: TensorRT execute_async_v3 failed (see the TensorRT log above)")
        caller.wait_stream(stream)
        # Tell torch's allocator which streams use these buffers, so memory is not reused early.
        for t in feeds.values():
            t.record_stream(stream)
        for out in outputs:
            out.record_stream(caller)
        return outputs


def engine_files(meta: Mapping[str, Any], folder: Path, verify_hashes: bool = True) -> dict[str, Path]:
    """The engine file of each graph recorded in engines.json, checked to exist and (with
    ``verify_hashes``) to be unchanged since it was built; BackendError naming the fix if not."""
    hint = build_hint(meta.get("onnx_dir"), folder)
    paths = {}
    for graph in GRAPH_NAMES:
        entry = meta["engines"][graph]
        if not isinstance(entry, Mapping) or not isinstance(entry.get("file"), str):
            raise BackendError(f"engine_dir: the {graph} entry of {folder / ENGINE_METADATA_NAME} names no file. {hint}")
        path = folder / entry["file"]
        if not path.is_file():
            raise BackendError(f"engine_dir: {graph} engine {path} is missing. {hint}")
        if verify_hashes and file_sha256(path) != entry.get("sha256"):
            raise BackendError(f"engine_dir: {path} changed since it was built (sha256 differs from engines.json). {hint}")
        paths[graph] = path
    return paths


class TensorRTBackend(Backend):
    """Runs the engines of an engine folder (``cellsam-trt build-engines``).

    Args:
        engine_dir: folder with encoder.engine, cellfinder.engine, decoder.engine, engines.json.
        checkpoint: when given, refuse engines built from another checkpoint (sha256).
        device: CUDA device (default: the current one).
        verify_hashes: compare engine files with the sha256 in engines.json.

    Attributes:
        max_decoder_boxes: the decoder profile's max N (the pipeline chunks by it).
        max_batch: the image profile's max B; larger encoder/cellfinder batches are split.

    Raises:
        BackendError: TensorRT or CUDA missing, engines for another GPU / TensorRT version /
            checkpoint, missing or corrupt engine files.
    """

    name = "tensorrt"

    def __init__(
        self,
        engine_dir: str | os.PathLike,
        *,
        checkpoint: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        verify_hashes: bool = True,
    ) -> None:
        trt = require_tensorrt()
        if not torch.cuda.is_available():
            raise BackendError("backend 'tensorrt' needs a CUDA GPU, but torch sees none; use backend='onnxruntime' or 'torch'")
        self.device = resolve_device(device if device is not None else "cuda")
        if self.device.type != "cuda":
            raise BackendError(f"device: TensorRT engines run on a CUDA device, got {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        folder = Path(engine_dir).expanduser()
        meta = load_engine_metadata(folder)
        gpu = current_gpu(self.device)
        check_engine_metadata(meta, gpu_name=gpu["name"], compute_capability=gpu["compute_capability"],
                              tensorrt_version=trt.__version__, checkpoint=checkpoint, engine_dir=folder)
        hint = build_hint(meta.get("onnx_dir"), folder)
        try:
            self.config = ModelConfig.from_dict(meta["model_config"])
        except (KeyError, TypeError, ValueError) as err:
            raise BackendError(f"engine_dir: bad model_config in {folder / ENGINE_METADATA_NAME} ({err}). {hint}") from None
        self.adapted_inputs = bool(meta["uses_model_cp"])
        self.metadata = meta
        self.folder = folder
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.runners = {graph: EngineRunner(trt, self.runtime, path, graph, self.device, hint)
                        for graph, path in engine_files(meta, folder, verify_hashes).items()}
        self.stream = torch.cuda.Stream(self.device)
        self.max_decoder_boxes = min(self.runners["decoder"].max_dim0("boxes"),
                                     self.runners["mask_head"].max_dim0("image_tokens"))
        self.max_batch = min(self.runners[g].max_dim0("image") for g in ("encoder", "cellfinder"))

    def _images(self, graph: str, images: Tensor) -> list[Tensor]:
        check_input(graph, "image", images, self.config)
        runner = self.runners[graph]
        # Batches above the profile's max run in profile-sized slices.
        outputs = in_batches(lambda part: runner({"image": part}, self.stream), images, self.max_batch)
        return [o.float() for o in outputs]

    def encoder(self, images: Tensor) -> Tensor:
        return self._images("encoder", images)[0]

    def cellfinder(self, images: Tensor) -> tuple[Tensor, Tensor]:
        logits, boxes = self._images("cellfinder", images)
        return logits, boxes

    def decoder(self, embedding: Tensor, boxes: Tensor, *, keep_iou: float | None = None,
                last_call: bool = False) -> tuple[Tensor, Tensor]:
        check_input("decoder", "embedding", embedding, self.config)
        check_input("decoder", "boxes", boxes, self.config)
        if len(boxes) > self.max_decoder_boxes:
            raise ValueError(
                f"boxes: {len(boxes)} boxes exceed the decoder engine's max {self.max_decoder_boxes}; chunk them "
                "(CellSAM.segment does) or rebuild with a larger --max-boxes"
            )
        iou, image_tokens, hyper = self.runners["decoder"]({"embedding": embedding, "boxes": boxes}, self.stream)
        iou = iou.float()
        masks = masks_of_kept(lambda t, h: self.runners["mask_head"]({"image_tokens": t, "hyper": h}, self.stream)[0],
                              image_tokens, hyper, iou, keep_iou, self.config.sam.low_res_size)
        return masks, iou

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": str(self.device), "engine_dir": str(self.folder),
                "tensorrt_version": self.metadata["tensorrt_version"], "gpu": self.metadata["gpu"]["name"],
                "precision": self.metadata.get("precision", {}).get("mode"),
                "max_decoder_boxes": self.max_decoder_boxes, "max_batch": self.max_batch}
