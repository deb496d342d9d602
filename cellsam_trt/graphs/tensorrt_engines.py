"""TensorRT engines from the ONNX export (``cellsam-trt build-engines``), built on the target GPU.

    onnx_dir/{encoder,cellfinder,decoder}.fp16.onnx + manifest.json     (default: FP16 engines)
    onnx_dir/{encoder,cellfinder,decoder}.onnx + manifest.json          (--fp32)
      -> engine_dir/{encoder,cellfinder,decoder}.engine + engines.json (+ timing.cache)

One code path for TensorRT 10 and 11: a strongly typed network (``STRONGLY_TYPED``, the
only kind TensorRT 11 builds) parsed by ``trt.OnnxParser``, so each layer runs in the type
its ONNX tensors have. FP16 comes from the export's mixed-precision graphs (float16 with
FP32 islands, ``cellsam_trt.graphs.mixed_precision``), not from builder flags: TensorRT 11 removed
the FP16 / precision-constraint flags and per-layer precisions, and this module uses none
(``tests/test_tensorrt_backend.py`` scans for them). One optimization profile per engine:

    encoder, cellfinder   image B:     min 1 / opt 1   / max 8     (--max-batch)
    decoder               boxes N:     min 1 / opt 256 / max 1024  (--max-boxes; the runtime chunks above)

and a timing cache file that makes rebuilds fast. ``engines.json`` records the GPU name,
compute capability, TensorRT version, the precision and the hash of the graph each engine
was built from, and the export manifest's checkpoint hash; the TensorRT backend refuses
engines whose record does not match the machine or checkpoint.

``tensorrt`` is imported only when a build starts; without it the command fails with one
message saying how to install it.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import write_public
from ..runtime.artifacts import (
    BOX_GRAPHS,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BOXES,
    DEFAULT_OPT_BOXES,
    ENGINE_METADATA_FORMAT,
    ENGINE_METADATA_NAME,
    ENGINE_METADATA_VERSION,
    GRAPH_NAMES,
    GRAPH_SPECS,
    MANIFEST_NAME,
    PRECISIONS,
    box_profile_shapes,
    file_sha256,
    image_profile_shapes,
    load_manifest,
)
from ..runtime.base import BackendError
from ..runtime.tensorrt_backend import current_gpu, require_tensorrt

log = logging.getLogger(__name__)

TIMING_CACHE_NAME = "timing.cache"



def strongly_typed_flags(trt) -> int:
    """``create_network`` flags of a strongly typed network (the only kind TensorRT 11 builds).

    The flag exists in TensorRT 10 too, so one build path serves both: every layer runs in
    the type its ONNX tensors have (float16 in the mixed-precision graphs, float32 in their
    islands and in the FP32 graphs), and no builder precision flag is set.
    """
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    if flag is None:
        raise BackendError(
            f"TensorRT {getattr(trt, '__version__', '?')} has no strongly typed networks "
            "(NetworkDefinitionCreationFlag.STRONGLY_TYPED); install TensorRT 10 or 11 with "
            "`pip install 'cellsam-trt[tensorrt]'`"
        )
    return 1 << int(flag)


def layer_precisions(trt, network) -> dict[str, int]:
    """How many layers of ``network`` produce float16 and float32 outputs (what the graph's types give)."""
    names = {trt.float16: "float16", trt.float32: "float32"}
    counts = {"float16": 0, "float32": 0}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kinds = {names.get(layer.get_output(j).dtype) for j in range(layer.num_outputs)} - {None}
        for kind in kinds:
            counts[kind] += 1
    return counts


def profile_shapes(config, graph: str, *, max_batch: int, max_boxes: int, opt_boxes: int) -> dict[str, tuple]:
    """(min, opt, max) shapes of every input of ``graph``."""
    if graph in BOX_GRAPHS:
        return box_profile_shapes(config, graph, max_boxes, opt_boxes)
    return image_profile_shapes(config, graph, max_batch, opt_batch=1)


def build_engine(
    trt,
    onnx_path: Path,
    engine_path: Path,
    shapes: dict[str, tuple],
    *,
    workspace_bytes: int | None = None,
    timing_cache: Path | None = None,
    logger=None,
) -> dict[str, Any]:
    """Build one engine from an ONNX file and write it atomically.

    Args:
        trt: the tensorrt module.
        onnx_path: graph to parse (external weights beside it are found by the parser); its
            tensor types decide the precision: a mixed-precision graph gives an FP16 engine
            with FP32 islands, an FP32 graph an FP32 engine.
        engine_path: serialized engine destination.
        shapes: {input name: (min, opt, max)} for the one optimization profile.
        workspace_bytes: cap of the builder's workspace pool (None: TensorRT's default).
        timing_cache: file that is read before and updated after the build.

    Returns:
        Metadata of the engine: file, sha256, size, build seconds, profile, and the count of
        layers with float16 / float32 outputs.
    """
    logger = logger or trt.Logger(trt.Logger.WARNING)
    t0 = time.perf_counter()
    builder = trt.Builder(logger)
    # Strongly typed (see strongly_typed_flags); explicit batch is implied since TensorRT 10.
    network = builder.create_network(strongly_typed_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT's ONNX parser rejects {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    precisions = layer_precisions(trt, network)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    write_public(engine_path, bytes(serialized))
    if timing_cache is not None:
        write_public(timing_cache, bytes(config.get_timing_cache().serialize()))
    return {
        "file": engine_path.name,
        "sha256": file_sha256(engine_path),
        "size_bytes": engine_path.stat().st_size,
        "build_seconds": round(time.perf_counter() - t0, 1),
        "profile": {name: {"min": list(lo), "opt": list(opt), "max": list(hi)} for name, (lo, opt, hi) in shapes.items()},
        "layer_precisions": precisions,
    }


def build_engines(
    onnx_dir: str | os.PathLike,
    engine_dir: str | os.PathLike | None = None,
    *,
    graphs: Sequence[str] = GRAPH_NAMES,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_boxes: int = DEFAULT_MAX_BOXES,
    opt_boxes: int = DEFAULT_OPT_BOXES,
    precision: str = "fp16",
    workspace_gib: float | None = None,
    timing_cache: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Build engines for the graphs of an ONNX export; writes ``engines.json`` last.

    Args:
        onnx_dir: export folder (``cellsam-trt export``); its manifest is checked.
        engine_dir: destination (default: ``onnx_dir``, where ``backend="auto"`` finds them).
        graphs: which engines to build.
        max_batch: image profile max B (opt and min 1).
        max_boxes, opt_boxes: decoder profile max and opt N (min 1).
        precision: "fp16" builds from the export's mixed-precision graphs
            (``<graph>.fp16.onnx``, FP32 islands chosen at export), "fp32" from the FP32 graphs.
        workspace_gib: builder workspace cap.
        timing_cache: timing cache file (default ``engine_dir/timing.cache``).
        device: CUDA device to build for.
        checkpoint: refuse an export made from another checkpoint.

    Returns:
        The engine metadata written to ``engine_dir/engines.json``.
    """
    graphs = tuple(graphs)
    if not graphs or any(g not in GRAPH_SPECS for g in graphs):
        raise ValueError(f"graphs: expected names from {GRAPH_NAMES}, got {graphs}")
    for label, value in (("max_batch", max_batch), ("max_boxes", max_boxes), ("opt_boxes", opt_boxes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label}: expected a positive integer, got {value!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    manifest = load_manifest(onnx_dir, graphs=graphs, checkpoint=checkpoint, precision=precision)
    trt = require_tensorrt()
    gpu = current_gpu(device)
    out = Path(engine_dir).expanduser() if engine_dir is not None else manifest.folder
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(timing_cache) if timing_cache is not None else out / TIMING_CACHE_NAME
    old = out / ENGINE_METADATA_NAME
    if old.exists():
        old.unlink()  # it would describe engines about to be replaced
    logger = trt.Logger(trt.Logger.WARNING)
    entries = {}
    cuda_device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    with torch.cuda.device(cuda_device):
        for graph in graphs:
            shapes = profile_shapes(manifest.config, graph, max_batch=max_batch, max_boxes=max_boxes, opt_boxes=opt_boxes)
            log.info("building %s engine (%s)", graph, shapes)
            entry = build_engine(trt, manifest.graph_path(graph, precision), out / GRAPH_SPECS[graph].engine_file,
                                 shapes, workspace_bytes=int(workspace_gib * 2**30) if workspace_gib else None,
                                 timing_cache=cache, logger=logger)
            source = manifest.file_entry(graph, precision)
            entry["onnx_file"], entry["onnx_sha256"] = source["file"], source["sha256"]
            entries[graph] = entry
    meta = {
        "format": ENGINE_METADATA_FORMAT,
        "version": ENGINE_METADATA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tensorrt_version": trt.__version__,
        "gpu": gpu,
        "checkpoint": manifest.data["checkpoint"],
        "onnx_dir": str(manifest.folder),
        "manifest_sha256": file_sha256(manifest.folder / MANIFEST_NAME),
        "model_config": manifest.data["model_config"],
        "uses_model_cp": manifest.uses_model_cp,
        "precision": {"mode": precision, "strongly_typed": True,
                      "fp32_ops": manifest.file_entry(graphs[0], "fp16").get("fp32_ops") if precision == "fp16" else None},
        "max_batch": max_batch,
        "max_decoder_boxes": max_boxes,
        "timing_cache": str(cache),
        "engines": entries,
    }
    write_public(out / ENGINE_METADATA_NAME, (json.dumps(meta, indent=2) + "\n").encode())
    return meta


def compare_arrays(reference: np.ndarray | torch.Tensor, test: np.ndarray | torch.Tensor) -> dict[str, float]:
    """Errors of ``test`` against ``reference`` (same shape).

    Returns:
        max_abs: max |test - ref|; max_rel: max_abs / max |ref| (relative to the output's
        scale: elementwise ratios explode where ref is ~0); mean_abs.
    """
    ref = _numpy(reference).astype(np.float64)
    out = _numpy(test).astype(np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"test: shape {out.shape} differs from the reference's {ref.shape}")
    if ref.size == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "mean_abs": 0.0}
    diff = np.abs(out - ref)
    scale = float(np.abs(ref).max())
    max_abs = float(diff.max())
    return {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf),
            "mean_abs": float(diff.mean())}


def mask_agreement(reference_logits: np.ndarray | torch.Tensor, test_logits: np.ndarray | torch.Tensor,
                   mask_threshold: float = 0.4) -> dict[str, float]:
    """Per-mask IoU of foreground (sigmoid > ``mask_threshold``) between two (N, ..., H, W) logit stacks.

    Returns:
        mean_iou, min_iou over the N masks (a mask empty in both counts as IoU 1).
    """
    ref = _numpy(reference_logits)
    out = _numpy(test_logits)
    if ref.shape != out.shape:
        raise ValueError(f"test_logits: shape {out.shape} differs from the reference's {ref.shape}")
    if not 0 < mask_threshold < 1:
        raise ValueError(f"mask_threshold: expected a probability in (0, 1), got {mask_threshold}")
    if ref.shape[0] == 0:
        return {"mean_iou": 1.0, "min_iou": 1.0}
    cut = math.log(mask_threshold / (1 - mask_threshold))
    a = (ref > cut).reshape(len(ref), -1)
    b = (out > cut).reshape(len(out), -1)
    inter = (a & b).sum(1)
    union = (a | b).sum(1)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return {"mean_iou": float(iou.mean()), "min_iou": float(iou.min())}


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def verification_inputs(config, adapted: bool, *, size: int = 512, seed: int = 0,
                        image: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Realistic graph inputs: both model inputs, (1, 3, S, S) float32 each, of ``image`` (any
    image ``segment`` takes) or, by default, of a synthetic ``size`` x ``size`` cell image."""
    from ..dev.synthetic import synthetic_cells
    from ..engine import preprocess as pre

    if image is None:
        image = synthetic_cells(size, size, n_cells=60, seed=seed)
    image = pre.to_tensor(pre.normalize_image(pre.format_image(image)))
    return (pre.embedding_input(image, config.image_size, adapted), pre.cellfinder_input(image, config.image_size, adapted))


def verify_backend(reference, test, *, num_boxes: int = 64, batch: int = 1, seed: int = 0) -> list[dict[str, Any]]:
    """Compare two backends on the same inputs: every output's errors, mask IoU for the decoder.

    The decoder of both runs on the reference's embedding and the reference's top-scoring
    CellFinder boxes, so its errors are its own.

    Returns:
        Rows {"graph", "output", "max_abs", "max_rel", "mean_abs"[, "mean_iou", "min_iou"]}.
    """
    from ..engine import postprocess as post

    config = reference.config
    emb_in, finder_in = verification_inputs(config, reference.adapted_inputs, seed=seed)
    if batch > 1:
        # other images in the batch: flipped copies (different content, same statistics)
        emb_in = torch.cat([emb_in] + [emb_in.flip(-1 - (i % 2)) for i in range(batch - 1)])
        finder_in = torch.cat([finder_in] + [finder_in.flip(-1 - (i % 2)) for i in range(batch - 1)])
    rows = []
    ref_emb = reference.encoder(emb_in)
    rows.append({"graph": "encoder", "output": "embedding", **compare_arrays(ref_emb, test.encoder(emb_in))})
    ref_logits, ref_boxes = reference.cellfinder(finder_in)
    logits, boxes = test.cellfinder(finder_in)
    rows.append({"graph": "cellfinder", "output": "logits", **compare_arrays(ref_logits, logits)})
    rows.append({"graph": "cellfinder", "output": "boxes", **compare_arrays(ref_boxes, boxes)})
    _, top = post.score_boxes(ref_logits[0].cpu(), ref_boxes[0].cpu(), config.image_size)
    top = top[:num_boxes]
    if test.max_decoder_boxes is not None:
        top = top[:test.max_decoder_boxes]
    embedding = ref_emb[:1]
    ref_masks, ref_iou = reference.decoder(embedding, top)
    masks, iou = test.decoder(embedding, top)
    rows.append({"graph": "decoder", "output": "mask_logits", **compare_arrays(ref_masks, masks),
                 **mask_agreement(ref_masks, masks)})
    rows.append({"graph": "decoder", "output": "iou", **compare_arrays(ref_iou, iou)})
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'graph':<11}{'output':<13}{'max abs':>11}{'max rel':>11}{'mean abs':>11}{'mask IoU mean/min':>20}"]
    for r in rows:
        iou = f"{r['mean_iou']:.4f}/{r['min_iou']:.4f}" if "mean_iou" in r else ""
        lines.append(f"{r['graph']:<11}{r['output']:<13}{r['max_abs']:>11.3g}{r['max_rel']:>11.3g}{r['mean_abs']:>11.3g}{iou:>20}")
    return "\n".join(lines)


def verify_engines(engine_dir: str | os.PathLike, onnx_dir: str | os.PathLike | None = None, *,
                   reference: str = "onnxruntime", checkpoint: str | os.PathLike | None = None,
                   num_boxes: int = 64, batch: int = 1, device: str | None = None) -> list[dict[str, Any]]:
    """Engines vs ONNX Runtime (CPU, fp32, the exported graphs) or vs torch (``checkpoint``)."""
    from ..runtime.onnx_backend import OnnxRuntimeBackend
    from ..runtime.tensorrt_backend import TensorRTBackend, load_engine_metadata
    from ..runtime.torch_backend import TorchBackend

    engines = TensorRTBackend(engine_dir, device=device, checkpoint=checkpoint)
    if reference == "torch":
        from ..modeling.checkpoint import load_checkpoint

        if checkpoint is None:
            raise ValueError("checkpoint: --reference torch needs the checkpoint the engines were built from")
        ref = TorchBackend(load_checkpoint(checkpoint), device=engines.device)
    elif reference == "onnxruntime":
        onnx_dir = onnx_dir if onnx_dir is not None else load_engine_metadata(engine_dir)["onnx_dir"]
        ref = OnnxRuntimeBackend(onnx_dir, providers="cpu", device="cpu")
    else:
        raise ValueError(f"reference: expected 'onnxruntime' or 'torch', got {reference!r}")
    return verify_backend(ref, engines, num_boxes=num_boxes, batch=batch)
