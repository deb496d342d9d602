"""``cellsam-trt bench``: stage-by-stage latency against the number of boxes, per backend,
beside the released per-box loop, on one device.

What one run measures (a 1024x1024 3-channel generated cell image by default):

- for every backend kind that can run here (torch fp32, torch fp16 on CUDA, ONNX Runtime
  and TensorRT when their artefacts are given) and every box count N (user boxes, so N is
  exact) plus one run with CellFinder's boxes: the whole ``CellSAM.segment`` call and its
  stages - preprocess (CPU), CellFinder graph, box selection, encoder graph, decoder graph
  (all chunks), mask postprocess + labels (painting + clean-up) - as median and spread over
  repeats after warm-up, and the peak CUDA memory of each configuration;
- the released algorithm (``cellsam_trt.reference.per_box_labels``: one decoder call per
  box, full-resolution upsampling on the CPU, numpy painting) on the same device and
  weights, and the speed-up baseline / ours per N;
- the preprocessing steps one by one (how much of it is scikit-image CLAHE);
- optionally (``--painter``) the mask painter alone against the per-box upsampling, with
  synthetic masks (no model needed).

How stages are timed: the session's backend is wrapped so that every graph call is timed
on the device (CUDA events on a GPU, the host clock on the CPU); the pipeline's own stage
timings (``SegmentationDetails.timings``, which synchronise the device at each stage end)
give the rest: mask postprocess = pipeline "decoder" stage - decoder graph time +
pipeline "postprocess" stage. ``total`` is the host wall time of the whole call.

Masks: random weights (no checkpoint given) make every mask a pattern spread over the whole
image, which no trained model produces and which would make painting cost what it never
costs with real weights. With ``--masks cells`` (the default for random weights) the
decoder graph still runs and is timed, but its mask logits are replaced by the logits of
the ellipse inscribed in each box (both for us and for the baseline); the time spent making
them is measured and subtracted. With a real checkpoint the default is ``--masks model``.

Output: ``<out>/<device-name>/<date>.json`` with every number, and beside it ``.md``
(tables) and ``.png`` (log-log latency against N). ``render_report`` rebuilds both from the
JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import postprocess as post
from . import preprocess as pre
from .config import InferenceConfig, ModelConfig
from .io import atomic_write
from .pipeline import CellSAM, NoCellsWarning
from .runtime.base import Backend, BackendError, OutOfDeviceMemory, is_out_of_memory
from .synthetic import bench_image, cell_boxes, cell_logits

log = logging.getLogger(__name__)

FORMAT = "cellsam-trt-bench"
VERSION = 1
DEFAULT_NS = (1, 10, 100, 500, 1000, 2000, 3500)
SMOKE_NS = (1, 10)
BACKEND_KINDS = ("torch-fp32", "torch-fp16", "onnxruntime", "tensorrt")
# Comma-separated row names ("torch-fp32/user/10", "baseline/user/10", "decoder/sam_repeat/16")
# whose measurement raises torch.cuda.OutOfMemoryError: how the per-row handling of a real
# out-of-memory row is exercised without a GPU (bench/gpu_session.sh with SMOKE=1).
SIMULATE_OOM_ENV = "CELLSAM_TRT_BENCH_SIMULATE_OOM"
# stage keys of a run record, in report order
STAGES = ("preprocess", "cellfinder", "boxes", "encoder", "decoder", "masks", "total")
SUB_STAGES = ("paint", "cleanup", "decoder_and_masks", "total_excl_clahe")
BASELINE_STAGES = ("preprocess", "cellfinder", "boxes", "encoder", "per_box", "cleanup", "decoder_and_masks", "total")
STAGE_TITLES = {
    "preprocess": "preprocess (CPU)",
    "cellfinder": "CellFinder graph",
    "boxes": "box scoring + threshold",
    "encoder": "encoder graph",
    "decoder": "decoder graph (all chunks)",
    "masks": "mask postprocess + labels",
    "total": "total segment()",
    "paint": "mask upsampling + painting",
    "cleanup": "hole filling + small-label removal",
    "total_excl_clahe": "total minus median CLAHE time",
    "per_box": "per-box decoder + full-res upsampling + painting",
    "decoder_and_masks": "decoder + mask postprocess + labels",
}


# --------------------------------------------------------------------------- inputs


# --------------------------------------------------------------------------- timing


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """Seconds -> {"median", "q1", "q3", "min", "max", "n", "samples"} (seconds)."""
    a = np.asarray(list(samples), dtype=np.float64)
    if a.size == 0:
        raise ValueError("samples: nothing was measured")
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "min": float(a.min()), "max": float(a.max()),
            "n": int(a.size), "samples": [float(x) for x in a]}


def simulate_oom(row: str) -> None:
    """Raise torch.cuda.OutOfMemoryError when ``row`` is listed in $CELLSAM_TRT_BENCH_SIMULATE_OOM."""
    if row in {r.strip() for r in os.environ.get(SIMULATE_OOM_ENV, "").split(",")}:
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated for {row} by ${SIMULATE_OOM_ENV})")


def row_failure(err: BaseException) -> str | None:
    """The reason a bench row failed, for the report, when it should not stop the bench:
    out of memory (the pipeline's MemoryError, or a device allocation failure from any
    library) or a backend that cannot run; None for anything else (a bug: raise)."""
    if isinstance(err, OutOfDeviceMemory) or is_out_of_memory(err):
        kind = "out of memory"
    elif isinstance(err, BackendError):
        kind = "backend error"
    else:
        return None
    return f"{kind}: {type(err).__name__}: {str(err).strip()[:500]}"


def _release_device_memory(device: torch.device) -> None:
    """Give cached blocks back after a failed row (call it outside the ``except`` block:
    the exception's traceback keeps the failed call's tensors alive until then)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


class DeviceClock:
    """Times regions of device work: CUDA events on a GPU (summed per name), else the host clock.

    Events are only read in ``collect``, after a synchronisation, so timing adds no host
    sync inside the region's caller.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._pending: list[tuple[str, Any, Any]] = []

    @contextlib.contextmanager
    def region(self, name: str) -> Iterator[None]:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(self.device))
            try:
                yield
            finally:
                end.record(torch.cuda.current_stream(self.device))
                self._pending.append((name, start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._pending.append((name, t0, time.perf_counter()))

    def collect(self) -> dict[str, float]:
        """Seconds per region name since the last collect (sums over repeated regions)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        out: dict[str, float] = defaultdict(float)
        for name, start, end in self._pending:
            out[name] += start.elapsed_time(end) / 1000 if self.cuda else end - start
        self._pending.clear()
        return dict(out)


class TimedBackend(Backend):
    """Delegates to another backend, timing each graph call with a ``DeviceClock``.

    With ``cell_masks`` the decoder's mask logits are replaced by ``cell_logits`` of the
    boxes (the decoder still runs and is timed; making the replacement is timed as
    "synthetic_masks" so that it can be subtracted).
    """

    def __init__(self, inner: Backend, clock: DeviceClock, cell_masks: bool = False) -> None:
        self.inner = inner
        self.clock = clock
        self.cell_masks = cell_masks
        self.name = inner.name
        self.device = inner.device
        self.config = inner.config
        self.adapted_inputs = inner.adapted_inputs
        self.max_decoder_boxes = inner.max_decoder_boxes
        self.decoder_calls = 0

    def encoder(self, images: Tensor) -> Tensor:
        with self.clock.region("encoder"):
            return self.inner.encoder(images)

    def cellfinder(self, images: Tensor) -> tuple[Tensor, Tensor]:
        with self.clock.region("cellfinder"):
            return self.inner.cellfinder(images)

    def decoder(self, embedding: Tensor, boxes: Tensor, *, last_call: bool = False) -> tuple[Tensor, Tensor]:
        with self.clock.region("decoder"):
            masks, iou = self.inner.decoder(embedding, boxes, last_call=last_call)
        self.decoder_calls += 1
        if self.cell_masks:
            with self.clock.region("synthetic_masks"):
                masks = cell_logits(boxes.to(masks.device), masks.shape[-1], self.config.image_size)[:, None]
        return masks, iou

    def synchronize(self) -> None:
        self.inner.synchronize()

    def describe(self) -> dict:
        return self.inner.describe()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _peak_memory(device: torch.device, record: dict[str, Any]) -> Iterator[None]:
    """Record torch's CUDA memory of the block: allocated before, peak during (bytes)."""
    if device.type != "cuda":
        record["resident_bytes"] = None
        record["peak_memory_bytes"] = None
        yield
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    record["resident_bytes"] = int(torch.cuda.memory_allocated(device))
    yield
    torch.cuda.synchronize(device)
    record["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))


# --------------------------------------------------------------------------- measurements


def measure_pipeline(session: CellSAM, clock: DeviceClock, image: np.ndarray, boxes: np.ndarray | None,
                     warmup: int, repeats: int, clahe_seconds: float | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """Time ``session.segment`` (whose backend is a ``TimedBackend`` reading ``clock``).

    Returns:
        the run record (stages as ``summarize`` dicts, box counts, memory) and the labels of
        the last repeat.
    """
    device = session.backend.device
    samples: dict[str, list[float]] = defaultdict(list)
    record: dict[str, Any] = {}
    labels = None
    with _peak_memory(device, record):
        for i in range(warmup + repeats):
            clock.collect()
            session.backend.decoder_calls = 0
            _sync(device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NoCellsWarning)
                t0 = time.perf_counter()
                labels, details = session.segment(image, boxes=boxes, return_details=True, tile_size=None)
                wall = time.perf_counter() - t0
            graph = clock.collect()
            if i < warmup:
                continue
            t = details.timings
            synthetic = graph.get("synthetic_masks", 0.0)
            decoder = graph.get("decoder", 0.0)
            samples["preprocess"].append(t["preprocess"])
            samples["encoder"].append(graph["encoder"])
            if "cellfinder" in graph:
                samples["cellfinder"].append(graph["cellfinder"])
                samples["boxes"].append(t["cellfinder"] - graph["cellfinder"])
            samples["decoder"].append(decoder)
            paint = t.get("decoder", 0.0) - decoder - synthetic
            samples["paint"].append(paint)
            samples["cleanup"].append(t["postprocess"])
            samples["masks"].append(paint + t["postprocess"])
            samples["decoder_and_masks"].append(decoder + paint + t["postprocess"])
            samples["total"].append(wall - synthetic)
            if clahe_seconds is not None:
                samples["total_excl_clahe"].append(wall - synthetic - clahe_seconds)
            if synthetic:
                samples["synthetic_masks"].append(synthetic)
            for name, seconds in t.items():
                samples[f"pipeline.{name}"].append(seconds)
    record.update(
        n=int(details.num_candidates),
        kept=int(len(details.iou)),
        cells=int(labels.max()),
        decoder_calls=int(session.backend.decoder_calls),
        stages={k: summarize(v) for k, v in samples.items() if not k.startswith("pipeline.")},
        pipeline_timings={k.split(".", 1)[1]: summarize(v) for k, v in samples.items() if k.startswith("pipeline.")},
    )
    return record, labels


class _BoxSpy(nn.Module):
    """Stands in for SAM's prompt encoder: remembers the last boxes, then delegates."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.last_boxes: Tensor | None = None

    def forward(self, points=None, boxes=None, masks=None):
        self.last_boxes = boxes
        return self.inner(points=points, boxes=boxes, masks=masks)

    def get_dense_pe(self) -> Tensor:
        return self.inner.get_dense_pe()


class _CellMaskDecoder(nn.Module):
    """Stands in for SAM's mask decoder: runs it, then returns ``cell_logits`` of the spied boxes."""

    def __init__(self, inner: nn.Module, spy: _BoxSpy, model_size: int, clock: DeviceClock) -> None:
        super().__init__()
        self.inner, self.spy, self.model_size, self.clock = inner, spy, model_size, clock

    def forward(self, **kwargs):
        low_res, iou = self.inner(**kwargs)
        with self.clock.region("synthetic_masks"):
            boxes = self.spy.last_boxes.reshape(-1, 4)
            low_res = cell_logits(boxes, low_res.shape[-1], self.model_size).reshape(low_res.shape).to(low_res.dtype)
        return low_res, iou


@contextlib.contextmanager
def _cell_masks_in(network: nn.Module, clock: DeviceClock) -> Iterator[None]:
    """Make ``network.sam``'s decoder return ``cell_logits`` masks (restored on exit)."""
    sam = network.sam
    prompt_encoder, mask_decoder = sam.prompt_encoder, sam.mask_decoder
    spy = _BoxSpy(prompt_encoder)
    sam.prompt_encoder = spy
    sam.mask_decoder = _CellMaskDecoder(mask_decoder, spy, network.config.image_size, clock)
    try:
        yield
    finally:
        sam.prompt_encoder = prompt_encoder
        sam.mask_decoder = mask_decoder


@torch.inference_mode()
def measure_baseline(network: nn.Module, image: np.ndarray, boxes: np.ndarray | None, device: torch.device,
                     warmup: int, repeats: int, cell_masks: bool,
                     options: InferenceConfig | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """Time the released algorithm (``reference.per_box_labels``) stage by stage on ``device``.

    Stages end with a device synchronisation and use the host clock (the per-box loop
    copies every mask to the host anyway). The network must already be on ``device``.

    Returns:
        the run record and the final labels of the last repeat.
    """
    from .reference import per_box_labels

    opts = options or InferenceConfig()
    size = network.config.image_size
    clock = DeviceClock(device)
    samples: dict[str, list[float]] = defaultdict(list)
    record: dict[str, Any] = {}
    labels = None
    masks_context = _cell_masks_in(network, clock) if cell_masks else contextlib.nullcontext()

    def stage(name: str, t0: float, times: dict[str, float]) -> float:
        _sync(device)
        now = time.perf_counter()
        times[name] = times.get(name, 0.0) + now - t0
        return now

    with _peak_memory(device, record), masks_context:
        for i in range(warmup + repeats):
            times: dict[str, float] = {}
            clock.collect()
            _sync(device)
            start = t0 = time.perf_counter()
            image3 = pre.normalize_image(pre.format_image(image))
            height, width = image3.shape[:2]
            tensor = pre.to_tensor(image3)
            model_input = pre.embedding_input(tensor, size, network.uses_model_cp)
            finder_input = pre.cellfinder_input(tensor, size, network.uses_model_cp) if boxes is None else None
            t0 = stage("preprocess", t0, times)
            embedding = network.sam.image_encoder(model_input.to(device))
            t0 = stage("encoder", t0, times)
            if boxes is None:
                logits, raw = network.cellfinder.decode_head(finder_input.to(device))
                t0 = stage("cellfinder", t0, times)
                scores, model_boxes = post.score_boxes(logits[0], raw[0], size)
                _, model_boxes = post.select_boxes(scores, model_boxes, opts.bbox_threshold)
                t0 = stage("boxes", t0, times)
            else:
                scale = np.array([size / width, size / height] * 2, dtype=np.float32)
                model_boxes = torch.from_numpy(np.asarray(boxes, dtype=np.float32) * scale).to(device)
            painted = per_box_labels(network, embedding, model_boxes, (height, width), opts.iou_threshold, opts.mask_threshold)
            t0 = stage("per_box", t0, times)
            labels = post.fill_holes_and_remove_small(painted, opts.min_size)
            stage("cleanup", t0, times)
            total = time.perf_counter() - start
            synthetic = clock.collect().get("synthetic_masks", 0.0)
            if i < warmup:
                continue
            times["per_box"] -= synthetic
            for name, seconds in times.items():
                samples[name].append(seconds)
            samples["decoder_and_masks"].append(times["per_box"] + times["cleanup"])
            samples["total"].append(total - synthetic)
            if synthetic:
                samples["synthetic_masks"].append(synthetic)
    record.update(n=int(len(model_boxes)), cells=int(labels.max()), stages={k: summarize(v) for k, v in samples.items()})
    return record, labels


def preprocess_breakdown(image: np.ndarray, size: int = 1024, adapted: bool = True, repeats: int = 3) -> dict[str, Any]:
    """Time each preprocessing step on ``image`` (CPU), CLAHE per non-constant channel.

    The OpenCV CLAHE option (``normalize="opencv"``) is timed in a loop of its own on the
    same clipped input (not part of ``total``), and its deviation is measured on the
    normalised image and on both model inputs.

    Returns:
        {"steps": {step: summarize}, "clahe_opencv": summarize, "opencv_deviation": {...},
        "clahe_channels": int, "image_shape": [...]}.
    """
    samples: dict[str, list[float]] = defaultdict(list)
    opencv_seconds: list[float] = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        image3 = pre.format_image(image)
        t1 = time.perf_counter()
        clipped = pre.percentile_clip(image3)
        t2 = time.perf_counter()
        pre.clahe(clipped)
        t3 = time.perf_counter()
        tensor = pre.to_tensor(clipped)
        pre.embedding_input(tensor, size, adapted)
        t4 = time.perf_counter()
        pre.cellfinder_input(tensor, size, adapted)
        t5 = time.perf_counter()
        samples["format_image"].append(t1 - t0)
        samples["percentile_clip"].append(t2 - t1)
        samples["clahe"].append(t3 - t2)
        samples["embedding_input"].append(t4 - t3)
        samples["cellfinder_input"].append(t5 - t4)
        samples["total"].append(t5 - t0)
    for _ in range(max(1, repeats)):
        clipped = pre.percentile_clip(pre.format_image(image))
        t0 = time.perf_counter()
        pre.clahe(clipped, method="opencv")
        opencv_seconds.append(time.perf_counter() - t0)
    formatted = pre.format_image(image)
    channels = int(sum(not (formatted[..., c] == formatted[0, 0, c]).all() for c in range(3)))
    return {"steps": {k: summarize(v) for k, v in samples.items()}, "clahe_opencv": summarize(opencv_seconds),
            "opencv_deviation": opencv_deviation(formatted, size, adapted), "clahe_channels": channels,
            "image_shape": list(image.shape)}


def opencv_deviation(formatted: np.ndarray, size: int = 1024, adapted: bool = True) -> dict[str, dict[str, float]]:
    """How far ``normalize="opencv"`` moves the normalised image and the two model inputs from scikit-image's.

    Args:
        formatted: (H, W, 3) float64, ``preprocess.format_image`` output.

    Returns:
        {"normalized" | "embedding_input" | "cellfinder_input": {"max", "mean", "p999"}} of
        the absolute differences, over non-constant channels (each input in its own units).
    """
    images = {m: pre.normalize_image(formatted.copy(), m) for m in pre.CLAHE_METHODS}
    active = [c for c in range(3) if images["skimage"][..., c].any() or images["opencv"][..., c].any()]
    tensors = {m: pre.to_tensor(x) for m, x in images.items()}
    pairs = {
        "normalized": (images["opencv"][..., active], images["skimage"][..., active]),
        "embedding_input": tuple(pre.embedding_input(tensors[m], size, adapted)[0, active].numpy()
                                 for m in ("opencv", "skimage")),
        "cellfinder_input": tuple(pre.cellfinder_input(tensors[m], size, adapted)[0, active].numpy()
                                  for m in ("opencv", "skimage")),
    }
    out = {}
    for name, (ours, theirs) in pairs.items():
        diff = np.abs(ours.astype(np.float64) - theirs)
        out[name] = {"max": float(diff.max()), "mean": float(diff.mean()), "p999": float(np.quantile(diff, 0.999))}
    return out


def per_box_paint(logits: Tensor, out_shape: tuple[int, int], model_size: int = 1024, mask_threshold: float = 0.4) -> np.ndarray:
    """The released post-processing of decoder masks, one mask at a time, on the CPU.

    (N, L, L) logits -> (H, W) int64 labels: each mask upsampled L -> model_size ->
    out_shape (bilinear), thresholded, and painted as ``max(k * mask_k)``.
    """
    from .reference import paint_masks, upsample_mask

    return paint_masks([upsample_mask(low, model_size, out_shape, mask_threshold) for low in logits], out_shape)


def painter_bench(ns: Sequence[int], device: torch.device | str = "cpu", out_shape: tuple[int, int] = (1024, 1024),
                  low_res: int = 256, model_size: int = 1024, repeats: int = 3, per_box_max_n: int = 200,
                  seed: int = 0) -> list[dict[str, Any]]:
    """``MaskPainter`` against the per-box upsampling (``per_box_paint``), no model needed.

    Masks are ``cell_logits`` of ``cell_boxes`` (cell-sized ellipses). Each row:
    {"n", "painter": summarize, "per_box": summarize | None, "identical": bool | None}.
    """
    device = torch.device(device)
    clock = DeviceClock(device)
    rows = []
    for n in ns:
        boxes = torch.from_numpy(cell_boxes(n, model_size, model_size, seed=seed))
        logits = cell_logits(boxes, low_res, model_size).to(device)
        times = []
        for _ in range(repeats + 1):  # first call warms up
            clock.collect()
            with clock.region("paint"):
                painter = post.MaskPainter(out_shape, low_res=low_res, model_size=model_size, device=device)
                painter.paint(logits, 1)
                labels = painter.result().cpu()
            times.append(clock.collect()["paint"])
        row: dict[str, Any] = {"n": int(n), "painter": summarize(times[1:]), "per_box": None, "identical": None}
        if n <= per_box_max_n:
            reference, times = None, []
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                reference = per_box_paint(logits, out_shape, model_size)
                times.append(time.perf_counter() - t0)
            row["per_box"] = summarize(times)
            row["identical"] = bool(np.array_equal(reference, labels.numpy()))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- backends


@dataclass
class BenchOptions:
    """What ``run_bench`` measures; see ``cellsam-trt bench --help``.

    caps: largest N per measured thing ("baseline", or a backend kind); larger N are
        skipped and listed in the report.
    masks: "auto" (cells for random weights, model for a checkpoint), "model" or "cells".
    """

    config: str | None = None
    checkpoint: str | None = None
    device: str | None = None
    ns: tuple[int, ...] = DEFAULT_NS
    cellfinder: bool = True
    backends: tuple[str, ...] = BACKEND_KINDS
    onnx_dir: str | None = None
    export_onnx: str | None = None
    ort_providers: tuple[str, ...] | None = None
    engine_dir: str | None = None
    warmup: int = 1
    repeats: int = 5
    baseline: bool = True
    baseline_repeats: int = 3
    caps: dict[str, int] = field(default_factory=dict)
    chunk_size: int | None = None
    bbox_threshold: float = 0.4
    masks: str = "auto"
    image_size: int = 1024
    cells: int = 800
    seed: int = 0
    painter: bool = False
    painter_ns: tuple[int, ...] = (1, 10, 100, 500, 1000, 2000, 3500)
    preprocess_repeats: int = 3
    throughput: int | None = None
    throughput_options: dict[str, Any] = field(default_factory=dict)
    out_dir: str = "bench/results"
    name: str | None = None
    smoke: bool = False

    def validate(self) -> None:
        if not self.ns or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.ns):
            raise ValueError(f"n: expected positive box counts, got {self.ns}")
        if self.warmup < 0 or self.repeats < 1 or self.baseline_repeats < 1:
            raise ValueError("warmup/repeats: expected warmup >= 0 and repeats >= 1")
        bad = [b for b in self.backends if b not in BACKEND_KINDS]
        if bad or not self.backends:
            raise ValueError(f"backends: expected names from {BACKEND_KINDS}, got {self.backends}")
        if self.masks not in ("auto", "model", "cells"):
            raise ValueError(f"masks: expected 'auto', 'model' or 'cells', got {self.masks!r}")
        for key, cap in self.caps.items():
            if key not in ("baseline",) + BACKEND_KINDS or cap < 0:
                raise ValueError(f"cap: expected NAME=N with NAME in baseline, {', '.join(BACKEND_KINDS)}, got {key}={cap}")
        if not 0 <= self.bbox_threshold <= 1:
            raise ValueError(f"bbox_threshold: expected a number in [0, 1], got {self.bbox_threshold}")
        if self.onnx_dir and self.export_onnx:
            raise ValueError("onnx_dir/export_onnx: give one of them, not both")
        if self.throughput is not None and self.throughput < 64:
            raise ValueError(f"throughput: expected the side of the large image (>= 64 px), got {self.throughput}")


def smoke_options(out_dir: str) -> BenchOptions:
    """Seconds on a CPU: tiny config, N <= 10, one repeat, no warm-up, a 256x256 image.

    No CellFinder run: with steered tiny weights CellFinder keeps a hundred boxes or more,
    which alone would take seconds to decode on a CPU.
    """
    return BenchOptions(config="tiny", device="cpu", ns=SMOKE_NS, warmup=0, repeats=1, baseline_repeats=1,
                        cellfinder=False, image_size=256, cells=40, preprocess_repeats=1,
                        out_dir=out_dir, smoke=True, painter=True, painter_ns=SMOKE_NS, throughput=640,
                        throughput_options=dict(tile_size=384, overlap=64, batch_size=2, box_limit=12))


def _load_network(opts: BenchOptions, image: np.ndarray, device: torch.device):
    """(network, description): the checkpoint's weights, or random weights steered on ``image``."""
    from .checkpoint import load_checkpoint, random_network
    from .testing import steer_random_network

    if opts.checkpoint:
        network = load_checkpoint(opts.checkpoint, config=ModelConfig.named(opts.config) if opts.config else None)
        return network, {"weights": "checkpoint", "checkpoint": str(opts.checkpoint), "config": network.config.name}
    name = opts.config or ("cellsam-vit-b" if device.type == "cuda" else "tiny")
    t0 = time.perf_counter()
    network = random_network(ModelConfig.named(name), seed=opts.seed)
    if opts.smoke:
        # fewer probe boxes: steering's mask-coverage search dominates a smoke run, and
        # smoke runs replace the masks anyway
        steer_random_network(network, image, probe_boxes=2)
    else:
        steer_random_network(network, image)
    log.info("random %s weights steered in %.1f s", name, time.perf_counter() - t0)
    return network, {"weights": "random, steered on the bench image (cellsam_trt.testing)", "config": name,
                     "seed": opts.seed}


def _onnx_folder(opts: BenchOptions, network) -> str | None:
    """The ONNX export to use: the given folder, or a fresh export of ``network``."""
    if opts.onnx_dir:
        return opts.onnx_dir
    if not opts.export_onnx:
        return None
    from .checkpoint import write_checkpoint
    from .export_onnx import export_checkpoint

    folder = Path(opts.export_onnx)
    checkpoint = write_checkpoint(network.cpu(), folder / "bench-weights.pt")
    export_checkpoint(checkpoint, folder / "onnx")
    return str(folder / "onnx")


def _make_backend(kind: str, network, device: torch.device, opts: BenchOptions, onnx_dir: str | None) -> Backend:
    """Build one backend kind; raises BackendError/ValueError/ImportError when it cannot run here."""
    from .runtime import TorchBackend, create_backend

    if kind in ("torch-fp32", "torch-fp16"):
        return TorchBackend(network, device=device, precision=kind.split("-")[1])
    if kind == "onnxruntime":
        if onnx_dir is None:
            raise BackendError("no ONNX export given (--onnx-dir DIR, or --export-onnx DIR to export the bench weights)")
        providers = list(opts.ort_providers) if opts.ort_providers else None
        if providers is None and device.type == "cuda":
            import onnxruntime

            providers = ["cuda"] if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else ["cpu"]
        return create_backend("onnxruntime", checkpoint=opts.checkpoint, onnx_dir=onnx_dir, providers=providers,
                              device=device if providers and providers != ["cpu"] else "cpu")
    if opts.engine_dir is None:
        raise BackendError("no TensorRT engines given (--engine-dir DIR from `cellsam-trt build-engines`)")
    return create_backend("tensorrt", checkpoint=opts.checkpoint, engine_dir=opts.engine_dir, device=device)


# --------------------------------------------------------------------------- machine


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> dict[str, Any] | None:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "modified_files": bool(dirty)}


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the numbers come from: CPU, GPU, driver, library versions."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": _memory_bytes(),
        "device": str(device),
        "gpu": None,
        "libraries": {name: _version(name) for name in (
            "torch", "torchvision", "numpy", "scipy", "scikit-image", "scikit-learn", "segment-anything",
            "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "matplotlib", "cellsam-trt")},
        "git": _git_commit(),
    }
    info["libraries"]["torch_cuda"] = torch.version.cuda
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = {"name": props.name, "memory_bytes": int(props.total_memory),
               "compute_capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
               "cudnn": torch.backends.cudnn.version(), "driver": None}
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20, check=True).stdout.split()
            gpu["driver"] = out[0] if out else None
        except (OSError, subprocess.SubprocessError):
            pass
        info["gpu"] = gpu
    return info


def device_name(device: torch.device) -> str:
    """Folder name of a device's reports: the GPU's name, or "cpu-" + the CPU's."""
    if device.type == "cuda":
        return _slug(torch.cuda.get_device_name(device))
    return "cpu-" + _slug(_cpu_name())


def save_report(report: dict[str, Any], out: str | Path | None, stem: str, device: torch.device, render) -> Path:
    """Write a bench script's JSON report and its markdown (``render(report)``) beside it.

    ``out``: the JSON path; None: ``bench/results/<device>/<stem>-<date>.json`` of this
    source tree. Prints the markdown; returns the JSON path.
    """
    import datetime

    path = Path(out) if out else (Path(__file__).resolve().parent.parent / "bench" / "results" / device_name(device)
                                  / f"{stem}-{datetime.date.today().isoformat()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    text = render(report)
    path.with_suffix(".md").write_text(text)
    print(text)
    print(f"report: {path}", file=sys.stderr)
    return path


# --------------------------------------------------------------------------- the run


def run_bench(opts: BenchOptions, network=None) -> dict[str, Any]:
    """Measure everything ``opts`` asks for; returns the report (JSON-ready dict).

    Args:
        opts: what to measure.
        network: a ``CellSAMNetwork`` to use instead of loading/steering one (tests).
    """
    from .runtime import resolve_device

    opts.validate()
    device = resolve_device(opts.device)
    t_start = time.perf_counter()
    image = bench_image(opts.image_size, opts.cells, seed=opts.seed)
    if network is None:
        network, weights = _load_network(opts, image, device)
    else:
        weights = {"weights": "given network", "config": network.config.name}
    masks = opts.masks if opts.masks != "auto" else ("model" if opts.checkpoint else "cells")
    cell_masks = masks == "cells"
    inference = InferenceConfig(bbox_threshold=opts.bbox_threshold)
    if opts.chunk_size is not None:
        inference = replace(inference, chunk_size=opts.chunk_size)
    height, width = image.shape[:2]
    box_sets: list[tuple[str, int | None, np.ndarray | None]] = [
        ("user", n, cell_boxes(n, height, width, seed=opts.seed + 1)) for n in opts.ns]
    if opts.cellfinder:
        box_sets.append(("cellfinder", None, None))

    report: dict[str, Any] = {
        "format": FORMAT, "version": VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "device_name": opts.name or device_name(device),
        "config": {
            "model": network.config.name, "weights": weights, "masks": masks, "image_shape": list(image.shape),
            "image": f"cellsam_trt.synthetic.bench_image(size={opts.image_size}, n_cells={opts.cells}, seed={opts.seed})",
            "boxes": f"cellsam_trt.synthetic.cell_boxes(n, {height}, {width}, seed={opts.seed + 1})",
            "ns": list(opts.ns), "cellfinder_run": opts.cellfinder, "warmup": opts.warmup, "repeats": opts.repeats,
            "baseline_repeats": opts.baseline_repeats, "caps": dict(opts.caps), "inference": asdict(inference),
            "smoke": opts.smoke,
        },
        "backends": {}, "runs": [], "baseline": [], "skipped": [], "preprocess": None, "painter": None, "precision": None,
        "throughput": None,
        "comparisons": [],
    }

    log.info("preprocessing breakdown")
    report["preprocess"] = preprocess_breakdown(image, network.config.image_size, network.uses_model_cp,
                                                opts.preprocess_repeats)
    clahe_seconds = report["preprocess"]["steps"]["clahe"]["median"]
    network = network.eval().to(device)

    onnx_dir = None
    if "onnxruntime" in opts.backends:
        try:
            onnx_dir = _onnx_folder(opts, network)
        except Exception as err:  # export failures are reported, the rest of the bench goes on
            report["skipped"].append({"what": "onnxruntime", "reason": f"export failed: {type(err).__name__}: {err}"})
        network = network.to(device)
    ours_labels: dict[tuple[str, str, int | None], np.ndarray] = {}
    finder_n: int | None = None  # boxes CellFinder keeps on this image (the baseline's cap applies to it)
    for kind in opts.backends:
        try:
            backend = _make_backend(kind, network, device, opts, onnx_dir)
        except (BackendError, ValueError, ImportError, OSError) as err:
            report["backends"][kind] = {"status": "skipped", "reason": str(err)}
            log.info("%s skipped: %s", kind, err)
            continue
        report["backends"][kind] = {"status": "ok", "describe": backend.describe()}
        clock = DeviceClock(backend.device)
        session = CellSAM(TimedBackend(backend, clock, cell_masks), inference)
        cap = opts.caps.get(kind)
        for source, n, boxes in box_sets:
            if cap is not None and n is not None and n > cap:
                report["skipped"].append({"what": kind, "boxes": source, "n": n, "reason": f"capped at N <= {cap}"})
                continue
            log.info("%s, %s boxes, N=%s", kind, source, n)
            failure = None
            try:
                simulate_oom(f"{kind}/{source}/{n}")
                record, labels = measure_pipeline(session, clock, image, boxes, opts.warmup, opts.repeats, clahe_seconds)
            except Exception as err:  # one failed row (out of memory, say) must not end the bench
                failure = row_failure(err)
                if failure is None:
                    raise
            if failure is not None:
                clock.collect()  # drop the failed row's pending events
                _release_device_memory(device)
                log.warning("%s, %s boxes, N=%s failed: %s", kind, source, n, failure)
                report["skipped"].append({"what": kind, "boxes": source, "n": n, "reason": failure})
                continue
            record.update(backend=kind, boxes=source)
            report["runs"].append(record)
            ours_labels[(kind, source, n)] = labels
            if source == "cellfinder" and finder_n is None:
                finder_n = record["n"]
        del session, backend
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if opts.baseline:
        network = network.to(device)
        cap = opts.caps.get("baseline")
        for source, n, boxes in box_sets:
            count = finder_n if source == "cellfinder" else n
            if cap is not None and count is not None and count > cap:
                report["skipped"].append({"what": "baseline", "boxes": source, "n": count, "reason": f"capped at N <= {cap}"})
                continue
            log.info("baseline, %s boxes, N=%s", source, count)
            failure = None
            try:
                simulate_oom(f"baseline/{source}/{n}")
                record, reference = measure_baseline(network, image, boxes, device, min(opts.warmup, 1),
                                                     opts.baseline_repeats, cell_masks, inference)
            except Exception as err:
                failure = row_failure(err)
                if failure is None:
                    raise
            if failure is not None:
                _release_device_memory(device)
                log.warning("baseline, %s boxes, N=%s failed: %s", source, count, failure)
                report["skipped"].append({"what": "baseline", "boxes": source, "n": count, "reason": failure})
                continue
            record["boxes"] = source
            report["baseline"].append(record)
            for (kind, src, requested), labels in ours_labels.items():
                if (src, requested) == (source, n):
                    report["comparisons"].append({
                        "backend": kind, "boxes": source, "n": record["n"],
                        "differing_pixels": int((reference != labels).sum()),
                        "cells": int(labels.max()), "baseline_cells": int(reference.max()),
                    })

    report["speedup"] = speedups(report)
    # the sections after the timed rows: one that runs out of memory is listed under
    # "skipped" and the report is still written
    if opts.painter:
        log.info("painter micro-benchmark")
        report["painter"] = _section(report, "painter", device, lambda: {
            "out_shape": [1024, 1024], "low_res": 256, "device": str(device),
            "rows": painter_bench(opts.painter_ns, device, per_box_max_n=opts.caps.get("baseline", 200),
                                  repeats=opts.preprocess_repeats),
        })
    if device.type == "cuda" and "torch-fp16" in opts.backends:
        log.info("fp16 accuracy against fp32")
        report["precision"] = _section(report, "precision", device,
                                       lambda: fp16_accuracy(network, image, inference, device, opts.seed))
    if opts.throughput:
        log.info("large-image throughput, single process vs 2 dask workers")
        report["throughput"] = _section(report, "throughput", device, lambda: large_image_throughput(opts, device))
    report["bench_seconds"] = time.perf_counter() - t_start
    return report


def _section(report: dict[str, Any], what: str, device: torch.device, measure):
    """``measure()``, or None with the reason under report["skipped"] when it fails as a
    bench row may (``row_failure``)."""
    failure = None
    try:
        simulate_oom(what)
        return measure()
    except Exception as err:
        failure = row_failure(err)
        if failure is None:
            raise
    _release_device_memory(device)
    log.warning("%s failed: %s", what, failure)
    report["skipped"].append({"what": what, "reason": failure})
    return None


def fp16_accuracy(network, image: np.ndarray, inference: InferenceConfig, device: torch.device,
                  seed: int = 0) -> dict[str, Any]:
    """torch fp16 (autocast) against fp32 on the same weights, with the model's own masks:
    CellFinder's boxes, and 500 given boxes (``accuracy.precision_agreement``)."""
    from .accuracy import precision_agreement
    from .runtime import TorchBackend

    fp32 = CellSAM(TorchBackend(network, device=device), inference)
    fp16 = CellSAM(TorchBackend(network, device=device, precision="fp16"), inference)
    height, width = image.shape[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoCellsWarning)
        return {"cellfinder": precision_agreement(fp32, fp16, image),
                "user_500": precision_agreement(fp32, fp16, image, cell_boxes(500, height, width, seed=seed + 1))}


def large_image_throughput(opts: BenchOptions, device: torch.device) -> dict[str, Any]:
    """``scale.throughput_report`` on a ``opts.throughput``-sided synthetic slide.

    With a checkpoint, CellFinder finds the cells; with random weights the slide's own cell
    boxes are decoded (random CellFinder weights keep an arbitrary number of boxes).
    """
    from .scale import throughput_report

    settings = dict(tile_size=1024, overlap=128, batch_size=4, n_workers=2)
    settings.update(opts.throughput_options)
    if opts.checkpoint is None:
        settings.setdefault("use_cellfinder", False)
    try:
        return throughput_report(opts.checkpoint, height=opts.throughput, width=opts.throughput,
                                 device=str(device), seed=opts.seed, **settings)
    except ImportError as err:  # dask / zarr are an optional extra
        return {"skipped": f"needs the dask extra (pip install 'cellsam-trt[dask]'): {err}"}


def speedups(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per run with a baseline at the same boxes: baseline / ours for the total and for decoder + masks."""
    base = {(b["boxes"], b["n"]): b for b in report["baseline"]}
    out = []
    for run in report["runs"]:
        b = base.get((run["boxes"], run["n"]))
        if b is None:
            continue
        ours_masks = run["stages"]["decoder_and_masks"]["median"]
        out.append({
            "backend": run["backend"], "boxes": run["boxes"], "n": run["n"],
            "total": b["stages"]["total"]["median"] / run["stages"]["total"]["median"],
            "decoder_and_masks": b["stages"]["decoder_and_masks"]["median"] / ours_masks if ours_masks > 0 else None,
        })
    return out


# --------------------------------------------------------------------------- reports


def write_report(report: dict[str, Any], out_dir: str | os.PathLike = "bench/results") -> dict[str, Path]:
    """Write ``<out_dir>/<device_name>/<date>.json`` (never over an earlier report) and its .md + .png."""
    folder = Path(out_dir) / report["device_name"]
    folder.mkdir(parents=True, exist_ok=True)
    stem = report["created"][:10]
    if report["config"].get("smoke"):
        stem += "-smoke"
    path, k = folder / f"{stem}.json", 2
    while path.exists():
        path, k = folder / f"{stem}-{k}.json", k + 1
    text = json.dumps(report, indent=1) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    md, png = render_report(path)
    return {"json": path, "markdown": md, "png": png}


def _ms(stats: dict[str, Any] | None, spread: bool = True) -> str:
    if not stats:
        return "-"
    med = stats["median"] * 1000
    fmt = (lambda v: f"{v:.3g}") if abs(med) < 100 else (lambda v: f"{v:.0f}")
    if not spread or stats["n"] < 2:
        return fmt(med)
    return f"{fmt(med)} ({fmt(stats['q1'] * 1000)}–{fmt(stats['q3'] * 1000)})"


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def markdown_report(report: dict[str, Any]) -> str:
    """The report's tables as markdown."""
    m, c = report["machine"], report["config"]
    gpu = m.get("gpu") or {}
    lines = [
        f"# CellSAM latency: {report['device_name']} ({report['created'][:10]})",
        "",
        f"Device **{m['device']}**" + (f": {gpu['name']}, driver {gpu.get('driver')}, CUDA {m['libraries'].get('torch_cuda')}"
                                        if gpu else f": CPU {m['cpu']}, {m['cpu_count']} cores, torch threads {m['torch_threads']}")
        + f". torch {m['libraries'].get('torch')}, onnxruntime {m['libraries'].get('onnxruntime')}, "
          f"tensorrt {m['libraries'].get('tensorrt')}, scikit-image {m['libraries'].get('scikit-image')}.",
        f"Model **{c['model']}** ({c['weights'].get('weights')}); image {c['image_shape']} ({c['image']}); "
        f"masks: **{c['masks']}**; {c['warmup']} warm-up + {c['repeats']} timed calls per row "
        f"(baseline {c['baseline_repeats']}); decoder chunk {c['inference']['chunk_size']}; "
        f"bbox_threshold {c['inference']['bbox_threshold']}.",
        "",
    ]
    if c["masks"] == "cells":
        lines += ["Mask logits are box-inscribed ellipses (`--masks cells`): the decoder graph runs and is timed, "
                  "but random weights give image-wide masks that would make painting unrepresentative.", ""]
    if c.get("smoke"):
        lines += ["**Smoke run** (tiny config, few boxes, one repeat): checks that the bench works, not speed.", ""]
    lines += ["## Latency per stage", "",
              "Milliseconds, median (interquartile range). `masks` = mask upsampling + painting + hole filling; "
              "`total` = the whole `segment()` call (wall clock). Baseline = the released per-box loop "
              "(`reference.per_box_labels`) on the same device; speed-up = baseline / ours.", ""]
    header = ["backend", "boxes", "N", "kept", "preprocess", "CellFinder", "boxes sel.", "encoder", "decoder", "masks",
              "total", "total − CLAHE", "peak GPU GiB", "baseline total", "× total", "× dec+masks"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = {(b["boxes"], b["n"]): b for b in report["baseline"]}
    speed = {(s["backend"], s["boxes"], s["n"]): s for s in report.get("speedup", [])}
    for run in report["runs"]:
        s = run["stages"]
        b = base.get((run["boxes"], run["n"]))
        sp = speed.get((run["backend"], run["boxes"], run["n"]))
        row = [run["backend"], run["boxes"], str(run["n"]), str(run["kept"]), _ms(s.get("preprocess")),
               _ms(s.get("cellfinder")), _ms(s.get("boxes")), _ms(s.get("encoder")), _ms(s.get("decoder")),
               _ms(s.get("masks")), _ms(s.get("total")), _ms(s.get("total_excl_clahe"), False),
               _gib(run.get("peak_memory_bytes")), _ms(b["stages"]["total"]) if b else "-",
               f"{sp['total']:.1f}" if sp else "-",
               f"{sp['decoder_and_masks']:.1f}" if sp and sp["decoder_and_masks"] else "-"]
        lines.append("| " + " | ".join(row) + " |")
    if report["baseline"]:
        lines += ["", "## Baseline (released per-box loop) per stage", "",
                  "| boxes | N | preprocess | CellFinder | boxes sel. | encoder | per-box loop | clean-up | total |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for b in report["baseline"]:
            s = b["stages"]
            lines.append("| " + " | ".join([b["boxes"], str(b["n"]), _ms(s.get("preprocess")), _ms(s.get("cellfinder")),
                                             _ms(s.get("boxes")), _ms(s.get("encoder")), _ms(s.get("per_box")),
                                             _ms(s.get("cleanup")), _ms(s.get("total"))]) + " |")
    if report.get("comparisons"):
        lines += ["", "Labels against the baseline (same boxes, last repeat): "
                  + "; ".join(f"{x['backend']} {x['boxes']} N={x['n']}: {x['differing_pixels']} px differ"
                              for x in report["comparisons"]) + "."]
    p = report.get("preprocess")
    if p:
        total = p["steps"]["total"]["median"]
        lines += ["", "## Preprocessing (CPU)", "",
                  f"Image {p['image_shape']}, CLAHE on {p['clahe_channels']} non-constant channel(s).", "",
                  "| step | ms | share |", "|---|---|---|"]
        for step, stats in p["steps"].items():
            lines.append(f"| {step} | {_ms(stats)} | {stats['median'] / total:.0%} |")
        if p.get("clahe_opencv"):
            cv, sk = p["clahe_opencv"]["median"], p["steps"]["clahe"]["median"]
            lines += ["", f"Option `normalize=\"opencv\"` (`--clahe opencv`): OpenCV's CLAHE takes {_ms(p['clahe_opencv'])} "
                      f"ms against scikit-image's {_ms(p['steps']['clahe'])} ms ({sk / cv:.1f}×); the preprocessing "
                      f"total would drop from {total * 1e3:.3g} to {(total - sk + cv) * 1e3:.3g} ms. It is not "
                      "bit-identical: absolute differences from scikit-image (non-constant channels):", "",
                      "| compared | max | mean | 99.9th pct |", "|---|---|---|---|"]
            for name, d in p["opencv_deviation"].items():
                lines.append(f"| {name} | {d['max']:.3g} | {d['mean']:.3g} | {d['p999']:.3g} |")
            lines += ["", "`normalized` is on the [0, 1] scale; `embedding_input` is in SAM's pixel-normalised "
                      "units and `cellfinder_input` in min-max [0, 1] units (both after the 1024² resize)."]
    painter = report.get("painter")
    if painter:
        lines += ["", "## Mask painting alone (synthetic cell masks, no model)", "",
                  f"{painter['low_res']}² logits → {painter['out_shape'][0]}×{painter['out_shape'][1]} labels on "
                  f"{painter['device']}. MaskPainter (windowed, batched) vs the released per-box upsampling on the CPU.",
                  "", "| N | MaskPainter ms | per-box ms | speed-up | identical labels |", "|---|---|---|---|---|"]
        for row in painter["rows"]:
            pb = row["per_box"]
            sp = f"{pb['median'] / row['painter']['median']:.1f}" if pb else "-"
            ident = "-" if row["identical"] is None else ("yes" if row["identical"] else "NO")
            lines.append(f"| {row['n']} | {_ms(row['painter'])} | {_ms(pb)} | {sp} | {ident} |")
    lines += precision_markdown(report.get("precision"))
    lines += throughput_markdown(report.get("throughput"))
    skipped = [f"- {k}: {v['reason']}" for k, v in report["backends"].items() if v["status"] != "ok"]
    skipped += [f"- {s['what']}" + (f" {s['boxes']} N={s.get('n')}" if "boxes" in s else "") + f": {s['reason']}"
                for s in report["skipped"]]
    if skipped:
        lines += ["", "## Not measured", ""] + skipped
    lines += ["", f"Bench wall time {report.get('bench_seconds', 0):.0f} s. Git: {(m.get('git') or {}).get('commit')}"
              f"{' (modified files)' if (m.get('git') or {}).get('modified_files') else ''}.", ""]
    return "\n".join(lines)


def precision_markdown(result: dict[str, Any] | None) -> list[str]:
    """The fp16-vs-fp32 accuracy section (nothing when it was not run)."""
    if not result:
        return []
    lines = ["", "## fp16 accuracy (torch autocast vs fp32, the model's own masks)", "",
             "Cells match at IoU > 0.5. The bar for reduced precision (docs/ARCHITECTURE.md): matched-cell F1 >= 0.99, per-cell IoU >= 0.97.", "",
             "| boxes | cells fp32 / fp16 | F1 | IoU mean | IoU p5 | IoU min | boxes matched (IoU >= 0.9) |",
             "|---|---|---|---|---|---|---|"]

    def num(v):
        return "-" if v is None else f"{v:.4f}"

    for name, r in result.items():
        lab, box = r["labels"], r["boxes"]
        lines.append(f"| {name} | {lab['reference_cells']} / {lab['test_cells']} | {lab['f1']:.4f} | "
                     f"{num(lab['iou_mean'])} | {num(lab['iou_p5'])} | {num(lab['iou_min'])} | "
                     f"{box['matched']} of {box['reference_boxes']} |")
    return lines


def throughput_markdown(result: dict[str, Any] | None) -> list[str]:
    """The large-image section of the markdown report (nothing when it was not run)."""
    if not result:
        return []
    lines = ["", "## Large image: single process vs dask workers", ""]
    if "skipped" in result:
        return lines + [f"Not measured: {result['skipped']}"]
    img, st, single, dist = result["image"], result["settings"], result["single"], result["dask"]
    boxes = "CellFinder boxes" if st["cellfinder"] else f"{st['boxes']} given cell boxes"
    lines += [f"{img['height']}×{img['width']} synthetic slide ({img['megapixels']} MP), {result['tiles']} tiles of "
              f"{st['tile_size']} px (overlap {st['overlap']}, batch {st['batch_size']}), {st['backend']} on "
              f"{st['device']}, {boxes}; "
              f"weights: {st['weights']}. Model loading not included.", "",
              "| path | s | MP/s | cells | cells/s |", "|---|---|---|---|---|"]
    for name, r in (("single process", single), (f"dask, {dist['workers']} workers", dist)):
        lines.append(f"| {name} | {r['seconds']:.2f} | {r['megapixels_per_s']:.3g} | {r['cells']} | {r['cells_per_s']:.3g} |")
    lines += ["", f"Speed-up {result['speedup']:.2f}×; labels identical: {'yes' if result['identical_labels'] else 'NO'}."]
    return lines


def plot_report(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Log-log latency against N per stage and backend, the baseline beside, and the speed-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    kinds = list(dict.fromkeys(r["backend"] for r in report["runs"]))
    colours = {k: f"C{i}" for i, k in enumerate(kinds)}

    def series(records, stage):
        rows = sorted((r for r in records if r["boxes"] == "user" and stage in r["stages"]), key=lambda r: r["n"])
        n = np.array([r["n"] for r in rows], float)
        med = np.array([r["stages"][stage]["median"] for r in rows]) * 1000
        lo = np.array([r["stages"][stage]["q1"] for r in rows]) * 1000
        hi = np.array([r["stages"][stage]["q3"] for r in rows]) * 1000
        finder = [r for r in records if r["boxes"] == "cellfinder" and stage in r["stages"]]
        return n, med, lo, hi, finder

    def log_axes(ax, title, ylabel="ms (median, IQR band)"):
        ax.set_title(title)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("boxes N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)

    panels = [("decoder", axes[0, 0], None), ("masks", axes[0, 1], None),
              ("decoder_and_masks", axes[0, 2], "decoder_and_masks"), ("total", axes[1, 0], "total")]
    for stage, ax, base_stage in panels:
        for kind in kinds:
            n, med, lo, hi, finder = series([r for r in report["runs"] if r["backend"] == kind], stage)
            if len(n):
                ax.plot(n, med, "o-", color=colours[kind], label=kind)
                ax.fill_between(n, lo, hi, color=colours[kind], alpha=0.2)
            for r in finder:
                ax.plot([r["n"]], [r["stages"][stage]["median"] * 1000], "*", ms=12, color=colours[kind])
        if base_stage and report["baseline"]:
            n, med, lo, hi, finder = series(report["baseline"], base_stage)
            if len(n):
                ax.plot(n, med, "s--", color="k", label="baseline (released per-box loop)")
                ax.fill_between(n, lo, hi, color="k", alpha=0.1)
            for r in finder:
                ax.plot([r["n"]], [r["stages"][base_stage]["median"] * 1000], "*", ms=12, color="k")
        log_axes(ax, STAGE_TITLES[stage])

    # stages that do not depend on N: one bar group per backend (CellFinder run if any)
    ax = axes[1, 1]
    fixed = ("preprocess", "cellfinder", "boxes", "encoder")
    width = 0.8 / max(1, len(kinds))
    for i, kind in enumerate(kinds):
        runs = [r for r in report["runs"] if r["backend"] == kind]
        run = next((r for r in runs if r["boxes"] == "cellfinder"), runs[0])
        values = [run["stages"][s]["median"] * 1000 if s in run["stages"] else np.nan for s in fixed]
        ax.bar(np.arange(len(fixed)) + i * width, values, width, color=colours[kind], label=kind)
    ax.set_xticks(np.arange(len(fixed)) + width * (len(kinds) - 1) / 2)
    ax.set_xticklabels([STAGE_TITLES[s].replace(" + ", "\n+ ") for s in fixed], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms (median)")
    ax.set_title("stages independent of N")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    if kinds:
        ax.legend(fontsize=8)

    ax = axes[1, 2]
    for kind in kinds:
        rows = sorted((s for s in report.get("speedup", []) if s["backend"] == kind and s["boxes"] == "user"),
                      key=lambda s: s["n"])
        if rows:
            ax.plot([s["n"] for s in rows], [s["total"] for s in rows], "o-", color=colours[kind], label=f"{kind} total")
            ax.plot([s["n"] for s in rows], [s["decoder_and_masks"] or np.nan for s in rows], "^:", color=colours[kind],
                    label=f"{kind} decoder + masks")
    log_axes(ax, "speed-up over the per-box baseline", "baseline / ours (medians)")
    c = report["config"]
    fig.suptitle(f"CellSAM {c['model']} on {report['device_name']} ({report['created'][:10]}); masks: {c['masks']}"
                 f"; ★ = CellFinder boxes" + ("; SMOKE RUN" if c.get("smoke") else ""), fontsize=11)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=72, format="png"))
    plt.close(fig)
    return path


def render_report(json_path: str | os.PathLike) -> tuple[Path, Path]:
    """(Re)write the markdown and PNG beside a report JSON; returns their paths."""
    json_path = Path(json_path)
    try:
        report = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"report: cannot read {json_path} as JSON ({err})") from None
    if report.get("format") != FORMAT:
        raise ValueError(f"report: {json_path} is not a {FORMAT} report")
    md = json_path.with_suffix(".md")
    text = markdown_report(report)
    atomic_write(md, lambda tmp: Path(tmp).write_text(text))
    return md, plot_report(report, json_path.with_suffix(".png"))


# --------------------------------------------------------------------------- command line


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _cap(text: str) -> tuple[str, int]:
    name, _, value = text.partition("=")
    if name not in ("baseline",) + BACKEND_KINDS or not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=N with NAME in baseline, {', '.join(BACKEND_KINDS)}; got {text!r}")
    return name, int(value)


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    if args.smoke:
        opts = smoke_options(args.out_dir)
        if args.device:
            opts.device = args.device
        return opts
    return BenchOptions(
        config=args.config, checkpoint=args.checkpoint, device=args.device, ns=args.n, cellfinder=not args.no_cellfinder,
        backends=tuple(args.backends.split(",")), onnx_dir=args.onnx_dir, export_onnx=args.export_onnx,
        ort_providers=tuple(args.ort_providers.split(",")) if args.ort_providers else None, engine_dir=args.engine_dir,
        warmup=args.warmup, repeats=args.repeats, baseline=not args.no_baseline, baseline_repeats=args.baseline_repeats,
        caps=dict(args.cap or []), chunk_size=args.chunk_size, bbox_threshold=args.bbox_threshold, masks=args.masks, image_size=args.image_size,
        cells=args.cells, seed=args.seed, painter=args.painter, throughput=args.throughput, out_dir=args.out_dir,
        name=args.name,
    )


def run(args: argparse.Namespace) -> int:
    if args.render:
        md, png = render_report(args.render)
        print(f"wrote {md} and {png}")
        return 0
    opts = options_from_args(args)
    report = run_bench(opts)
    paths = write_report(report, opts.out_dir)
    print(markdown_report(report))
    print(f"wrote {paths['json']}, {paths['markdown']}, {paths['png']}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--smoke", action="store_true", help="seconds-long check on the CPU (tiny config, N=1,10, one repeat)")
    p.add_argument("--config", choices=["tiny", "cellsam-vit-b"],
                   help="architecture of random weights (default: cellsam-vit-b on CUDA, tiny on the CPU)")
    p.add_argument("--checkpoint", help="real CellSAM weights (default: random weights steered on the bench image)")
    p.add_argument("--device", help="torch device (default: cuda if available)")
    p.add_argument("--n", type=_int_list, default=DEFAULT_NS, help="user-box counts, comma-separated "
                   f"(default {','.join(map(str, DEFAULT_NS))})")
    p.add_argument("--no-cellfinder", action="store_true", help="skip the run with CellFinder's boxes")
    p.add_argument("--backends", default=",".join(BACKEND_KINDS),
                   help=f"comma-separated subset of {','.join(BACKEND_KINDS)}; unavailable ones are skipped with the reason")
    p.add_argument("--onnx-dir", help="ONNX export (cellsam-trt export) of the same weights, for onnxruntime")
    p.add_argument("--export-onnx", metavar="DIR", help="export the bench weights to DIR and bench onnxruntime on them")
    p.add_argument("--ort-providers", help="onnxruntime providers, comma-separated (default: cuda when available, else cpu)")
    p.add_argument("--engine-dir", help="TensorRT engines (cellsam-trt build-engines) of the same weights")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per configuration (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per configuration (default 5)")
    p.add_argument("--baseline-repeats", type=int, default=3, help="timed calls of the per-box baseline (default 3)")
    p.add_argument("--no-baseline", action="store_true", help="skip the released per-box loop")
    p.add_argument("--cap", type=_cap, action="append", metavar="NAME=N",
                   help="largest N for baseline or a backend kind, e.g. --cap baseline=1000 (repeatable)")
    p.add_argument("--chunk-size", type=int, help="boxes per decoder call (default 256)")
    p.add_argument("--bbox-threshold", type=float, default=0.4, help="CellFinder threshold weight (default 0.4, as released)")
    p.add_argument("--masks", choices=["auto", "model", "cells"], default="auto",
                   help="mask logits painted: the model's, or box-inscribed ellipses (default: cells for random weights)")
    p.add_argument("--image-size", type=int, default=1024, help="side of the generated image (default 1024)")
    p.add_argument("--cells", type=int, default=800, help="cells drawn in the generated image (default 800)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--painter", action="store_true", help="also time the mask painter alone against per-box upsampling")
    p.add_argument("--throughput", type=int, metavar="SIDE",
                   help="also measure a SIDE x SIDE synthetic slide: single process vs 2 dask workers (MP/s, cells/s)")
    p.add_argument("--out-dir", default="bench/results", help="reports go to OUT_DIR/<device-name>/ (default bench/results)")
    p.add_argument("--name", help="device folder name (default: GPU name, or cpu-<CPU name>)")
    p.add_argument("--render", metavar="JSON", help="only rewrite the markdown and PNG of an existing report")


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="latency per stage against the number of boxes, per backend, vs the per-box loop")
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bench/bench_latency.py`` (same options as ``cellsam-trt bench``)."""
    from .cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])
