"""The measurements of ``cellsam-trt bench``: one ``segment`` call stage by stage, the
released per-box algorithm stage by stage, the preprocessing steps, the mask painter alone.

Each returns JSON-ready records whose timings are ``timing.summarize`` dicts (seconds).
"""
from __future__ import annotations

import contextlib
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..api import CellSAM
from ..dev.synthetic import cell_boxes, cell_logits
from ..engine import postprocess as post
from ..engine import preprocess as pre
from ..engine.core import POSTPROCESS_STAGES, PREPROCESS_STAGES, NoCellsWarning
from ..modeling.config import InferenceConfig
from .timing import DeviceClock, peak_memory, summarize, sync


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
    with peak_memory(device, record):
        for i in range(warmup + repeats):
            clock.collect()
            session.backend.decoder_calls = 0
            sync(device)
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
            samples["preprocess"].append(sum(t.get(name, 0.0) for name in PREPROCESS_STAGES))
            samples["encoder"].append(graph["encoder"])
            if "cellfinder" in graph:
                samples["cellfinder"].append(graph["cellfinder"])
                # the pipeline's CellFinder time beside the graph itself: box selection
                samples["boxes"].append(t["cellfinder"] + t.get("boxes", 0.0) - graph["cellfinder"])
            samples["decoder"].append(decoder)
            paint = t.get("decoder", 0.0) - decoder - synthetic
            samples["paint"].append(paint)
            after = sum(t.get(name, 0.0) for name in POSTPROCESS_STAGES)  # labels to the host, clean-up
            samples["cleanup"].append(after)
            samples["masks"].append(paint + after)
            samples["decoder_and_masks"].append(decoder + paint + after)
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
    from ..dev.reference import per_box_labels

    opts = options or InferenceConfig()
    size = network.config.image_size
    clock = DeviceClock(device)
    samples: dict[str, list[float]] = defaultdict(list)
    record: dict[str, Any] = {}
    labels = None
    masks_context = _cell_masks_in(network, clock) if cell_masks else contextlib.nullcontext()

    def stage(name: str, t0: float, times: dict[str, float]) -> float:
        sync(device)
        now = time.perf_counter()
        times[name] = times.get(name, 0.0) + now - t0
        return now

    with peak_memory(device, record), masks_context:
        for i in range(warmup + repeats):
            times: dict[str, float] = {}
            clock.collect()
            sync(device)
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
                model_boxes = torch.from_numpy(pre.boxes_to_model(boxes, height, width, size)).to(device)
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
    images = {m: pre.normalize_image(formatted.copy(), m) for m in ("skimage", "opencv")}
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
    from ..dev.reference import paint_masks, upsample_mask

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


