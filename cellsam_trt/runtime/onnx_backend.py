"""ONNX Runtime backend: the exported graphs on the CPU, CUDA or TensorRT execution providers."""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .artifacts import (
    BOX_GRAPHS,
    GRAPH_NAMES,
    GRAPH_SPECS,
    PRECISIONS,
    bind_symbols,
    box_profile_shapes,
    check_input,
    image_profile_shapes,
    load_manifest,
    resolve_shape,
)
from .base import (
    Backend,
    BackendError,
    OutOfDeviceMemory,
    in_batches,
    is_out_of_memory,
    masks_of_kept,
    release_cached_memory,
)
from .torch_backend import resolve_device

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
PROVIDER_ALIASES = {"cpu": CPU, "cuda": CUDA, "tensorrt": TENSORRT, "trt": TENSORRT}
GPU_PROVIDERS = (CUDA, TENSORRT)


def import_onnxruntime():
    """``onnxruntime``, or a BackendError saying how to install it."""
    try:
        import onnxruntime
    except ImportError as err:
        raise BackendError(
            f"backend 'onnxruntime' needs the onnxruntime package ({err}); install it with "
            "`pip install onnxruntime` (CPU) or `pip install onnxruntime-gpu` (CUDA / TensorRT providers)"
        ) from None
    return onnxruntime


def normalize_providers(providers: str | Sequence[str] | None) -> list[str]:
    """User provider names ("cpu", "cuda", "tensorrt" or full ONNX Runtime names) -> full
    names in priority order, CPU always last (it runs whatever the others leave).
    """
    if providers is None:
        requested: list[str] = []
    elif isinstance(providers, str):
        requested = [providers]
    else:
        requested = list(providers)
    full = []
    for p in requested:
        if not isinstance(p, str):
            raise ValueError(f"providers: expected provider names, got {p!r}")
        name = PROVIDER_ALIASES.get(p.lower(), p)
        if name not in (CPU, CUDA, TENSORRT):
            raise ValueError(
                f"providers: unknown provider {p!r}; expected 'cpu', 'cuda', 'tensorrt' "
                f"(or {CPU}, {CUDA}, {TENSORRT})"
            )
        if name not in full:
            full.append(name)
    if TENSORRT in full and CUDA not in full:
        full.insert(full.index(TENSORRT) + 1, CUDA)  # TensorRT EP hands unsupported nodes to CUDA
    if CPU in full:
        full.remove(CPU)
    return full + [CPU]


class OnnxRuntimeBackend(Backend):
    """Runs the graphs of an export folder (``cellsam-trt export``) with ONNX Runtime.

    Args:
        onnx_dir: export folder with manifest.json and the three .onnx files.
        checkpoint: when given, refuse graphs exported from another checkpoint file (sha256).
        device: torch device of the outputs (default: CUDA when a GPU provider is used and
            torch sees a GPU, else CPU).
        providers: "cpu" (default), "cuda", "tensorrt", or a list in priority order; CPU is
            always appended. A requested provider that this onnxruntime build lacks is refused.
        max_decoder_boxes: most boxes per decoder call (None: no limit).
        threads: intra-op threads per session (None: ONNX Runtime's default).
        verify_hashes: check the graph files against the manifest's sha256.
        trt_cache_dir: engine cache of the TensorRT provider (default: onnx_dir/ort-trt-cache).
        trt_max_batch: largest image batch the TensorRT provider's profile admits; larger
            encoder / CellFinder batches are split (and decoder calls default to 1024 boxes).
        cpu_arena: ONNX Runtime's CPU memory arena for every graph (True) or none (False);
            default: the decoder only (the arena holds on to the peak of every call: small
            for decoder chunks, gigabytes for the encoder and CellFinder).
        precision: "fp32" runs ``<graph>.onnx``; "fp16" runs the mixed-precision
            ``<graph>.fp16.onnx`` of the export (float16 compute with float32 islands, the
            graphs FP16 TensorRT engines are built from; inputs and outputs stay float32).
            On the CPU, ONNX Runtime computes the float16 ops that lack a CPU kernel in
            float32 between casts, so an fp16 session is for checking accuracy, not speed.

    Raises:
        BackendError: missing/changed/corrupt graph files, another checkpoint, or an
            unavailable provider (the message lists the available ones).
    """

    name = "onnxruntime"

    def __init__(
        self,
        onnx_dir: str | os.PathLike,
        *,
        checkpoint: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        providers: str | Sequence[str] | None = None,
        max_decoder_boxes: int | None = None,
        threads: int | None = None,
        verify_hashes: bool = True,
        trt_cache_dir: str | os.PathLike | None = None,
        trt_max_batch: int = 8,
        precision: str = "fp32",
        cpu_arena: bool | None = None,
    ) -> None:
        if max_decoder_boxes is not None and (isinstance(max_decoder_boxes, bool) or not isinstance(max_decoder_boxes, int) or max_decoder_boxes < 1):
            raise ValueError(f"max_decoder_boxes: expected a positive integer or None, got {max_decoder_boxes!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads: expected a positive integer or None, got {threads!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
        ort = import_onnxruntime()
        wanted = normalize_providers(providers)
        available = ort.get_available_providers()
        missing = [p for p in wanted if p not in available]
        if missing:
            raise BackendError(
                f"providers: {', '.join(missing)} not available in this onnxruntime {ort.__version__} "
                f"(available: {', '.join(available)}); install onnxruntime-gpu with a matching CUDA "
                "(and TensorRT) for GPU providers, or use providers='cpu'"
            )
        uses_gpu = any(p in GPU_PROVIDERS for p in wanted)
        if device is None:
            device = "cuda" if uses_gpu and torch.cuda.is_available() else "cpu"
        self.device = resolve_device(device)
        self.providers = wanted
        # the TensorRT provider builds engines for a fixed shape range: stay inside it
        self.max_decoder_boxes = max_decoder_boxes or (1024 if TENSORRT in wanted else None)
        self.max_batch = trt_max_batch if TENSORRT in wanted else None
        # On the CPU a decoder call's activations are ~20 MB per box (ViT-B: peak 5.2 GiB for
        # 256 boxes, 0.5 GiB for 8, no slower per box): small calls bound the memory.
        self.default_chunk_size = 256 if uses_gpu else 8
        self.precision = precision
        self.manifest = load_manifest(onnx_dir, checkpoint=checkpoint, verify_hashes=verify_hashes, precision=precision)
        self.folder = self.manifest.folder
        self.config = self.manifest.config
        self.adapted_inputs = self.manifest.uses_model_cp
        # IO binding hands ONNX Runtime torch's CUDA buffers: no host round trip.
        self.io_binding = uses_gpu and self.device.type == "cuda"
        self._gpu_id = self.device.index if self.device.type == "cuda" and self.device.index is not None else 0
        cache = Path(trt_cache_dir) if trt_cache_dir is not None else self.folder / "ort-trt-cache"
        self.sessions = {}
        self._release_arena = ort.RunOptions()
        self._release_arena.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        for graph in GRAPH_NAMES:
            options = ort.SessionOptions()
            if threads is not None:
                options.intra_op_num_threads = threads
            # ONNX Runtime's CPU arena keeps the largest activations it ever held (ViT-B:
            # 4.1 GiB after one encoder call, 13.6 GiB after one 256-box decoder call).
            # The decoder's small calls reuse the same few buffers, and the arena saves
            # their allocation (-22 % per box at 8 boxes per call, 0.5 GiB kept); the
            # encoder and CellFinder run once per image and lose ~3 % without it
            # (bench/NOTES.md, section 4).
            options.enable_cpu_mem_arena = (graph in BOX_GRAPHS) if cpu_arena is None else cpu_arena
            self.sessions[graph] = self._session(ort, graph, options, cache, trt_max_batch)
        # what the decoder's last call of an image gives back (GPU providers keep their
        # activations on the device)
        self._decoder_arena = self.sessions["decoder"].get_session_options().enable_cpu_mem_arena and not uses_gpu
        self._shapes = {g: self.manifest.shapes(g) for g in GRAPH_NAMES}

    def _provider_list(self, graph: str, cache: Path, trt_max_batch: int) -> list:
        out: list = []
        for p in self.providers:
            if p == CPU:
                out.append(p)
            elif p == CUDA:
                out.append((p, {"device_id": self._gpu_id}))
            else:
                if graph in BOX_GRAPHS:
                    profile = box_profile_shapes(self.config, graph, self.max_decoder_boxes or 1024)
                else:
                    profile = image_profile_shapes(self.config, graph, trt_max_batch)

                def spec(i: int, profile=profile) -> str:
                    return ",".join(f"{name}:{'x'.join(map(str, shapes[i]))}" for name, shapes in profile.items())

                cache.mkdir(parents=True, exist_ok=True)
                out.append((p, {
                    "device_id": self._gpu_id, "trt_fp16_enable": True,
                    "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                    "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
                    "trt_profile_min_shapes": spec(0), "trt_profile_opt_shapes": spec(1),
                    "trt_profile_max_shapes": spec(2),
                }))
        return out

    def _session(self, ort, graph: str, options, cache: Path, trt_max_batch: int):
        path = self.manifest.graph_path(graph, self.precision)
        try:
            session = ort.InferenceSession(str(path), sess_options=options,
                                           providers=self._provider_list(graph, cache, trt_max_batch))
        except Exception as err:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise BackendError(
                f"onnx_dir: ONNX Runtime cannot load {path} ({type(err).__name__}: {str(err).strip()[:300]}); "
                f"the file is corrupt or not a cellsam-trt graph. Re-export with: cellsam-trt export "
                f"--checkpoint CHECKPOINT --out {self.folder}"
            ) from None
        dropped = [p for p in self.providers if p not in session.get_providers()]
        if dropped:
            # onnxruntime lists GPU providers it then fails to load (missing CUDA/cuDNN/TensorRT
            # libraries) and silently runs on the CPU instead
            raise BackendError(
                f"providers: ONNX Runtime could not start {', '.join(dropped)} for {path.name} (it fell back to "
                f"{', '.join(session.get_providers())}); check the CUDA / cuDNN / TensorRT libraries that "
                "onnxruntime-gpu needs (see its log above), or use providers='cpu'"
            )
        spec = GRAPH_SPECS[graph]
        names = (tuple(i.name for i in session.get_inputs()), tuple(o.name for o in session.get_outputs()))
        if names != (spec.inputs, spec.outputs):
            raise BackendError(f"onnx_dir: {path} has inputs/outputs {names}, expected {(spec.inputs, spec.outputs)}")
        return session

    def _run(self, graph: str, inputs: dict[str, Tensor], run_options=None) -> list[Tensor]:
        for name, tensor in inputs.items():
            check_input(graph, name, tensor, self.config)
        if self.io_binding:
            return self._run_bound(graph, inputs)
        feeds = {name: t.detach().to("cpu", torch.float32).contiguous().numpy() for name, t in inputs.items()}
        try:
            outputs = self.sessions[graph].run(list(GRAPH_SPECS[graph].outputs), feeds, run_options)
        except Exception as err:
            raise _run_error(graph, err, inputs) from None
        return [torch.from_numpy(np.ascontiguousarray(o)).to(self.device) for o in outputs]

    def _run_bound(self, graph: str, inputs: dict[str, Tensor]) -> list[Tensor]:
        session = self.sessions[graph]
        binding = session.io_binding()
        shapes = self._shapes[graph]
        feeds = {name: t.detach().to(self.device, torch.float32).contiguous() for name, t in inputs.items()}
        symbols = bind_symbols(shapes, feeds)
        for name, t in feeds.items():
            binding.bind_input(name, "cuda", self._gpu_id, np.float32, tuple(t.shape), t.data_ptr())
        outputs = []
        try:
            for name in GRAPH_SPECS[graph].outputs:
                out = torch.empty(resolve_shape(shapes[name], symbols), dtype=torch.float32, device=self.device)
                binding.bind_output(name, "cuda", self._gpu_id, np.float32, tuple(out.shape), out.data_ptr())
                outputs.append(out)
            # ONNX Runtime computes on its own CUDA stream: torch's writes to the inputs must be done.
            torch.cuda.current_stream(self.device).synchronize()
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()
        except Exception as err:
            raise _run_error(graph, err, inputs) from None
        return outputs

    def encoder(self, images: Tensor) -> Tensor:
        return in_batches(lambda part: self._run("encoder", {"image": part}), images, self.max_batch)[0]

    def cellfinder(self, images: Tensor) -> tuple[Tensor, Tensor]:
        logits, boxes = in_batches(lambda part: self._run("cellfinder", {"image": part}), images, self.max_batch)
        return logits, boxes

    def decoder(self, embedding: Tensor, boxes: Tensor, *, keep_iou: float | None = None,
                last_call: bool = False) -> tuple[Tensor, Tensor]:
        if self.max_decoder_boxes is not None and len(boxes) > self.max_decoder_boxes:
            raise ValueError(f"boxes: {len(boxes)} boxes exceed max_decoder_boxes={self.max_decoder_boxes}; chunk them")
        # ONNX Runtime gives arena memory back only at the end of a run that asks for it:
        # the image's last decoder call does, so the next encoder call starts without it.
        options = self._release_arena if last_call and self._decoder_arena else None
        iou, image_tokens, hyper = self._run("decoder", {"embedding": embedding, "boxes": boxes}, options)
        masks = masks_of_kept(lambda t, h: self._run("mask_head", {"image_tokens": t, "hyper": h}, options)[0],
                              image_tokens, hyper, iou, keep_iou, self.config.sam.low_res_size)
        return masks, iou

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": str(self.device), "providers": list(self.providers),
                "precision": self.precision,
                "onnx_dir": str(self.folder), "checkpoint_sha256": self.manifest.checkpoint_sha256}


def _run_error(graph: str, err: BaseException, inputs: dict[str, Tensor]) -> BackendError:
    """One error type per failure: OutOfDeviceMemory (the pipeline retries smaller), else BackendError."""
    message = str(err).strip()
    sizes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items())
    if is_out_of_memory(err):
        release_cached_memory()
        return OutOfDeviceMemory(f"{graph} with {sizes}: {type(err).__name__}: {message[:300]}")
    return BackendError(f"{graph} with {sizes}: ONNX Runtime failed: {type(err).__name__}: {message[:300]}")
