"""The graph-running core every segmentation goes through.

One image, a batch of images, the tiles of a large image (in this process or on a dask
worker), the frames of a stack and an embedded image all run the same four stages, with a
typed result between each:

    prepare       image -> ``PreparedImage`` (formatted, normalised, the two model inputs)
    embed         ``PreparedImage``s -> their embedding and ``FinderOutput``
                  (one batched encoder call, one batched CellFinder call)
    decode        ``PreparedImage`` -> ``DecodedMasks`` (CellFinder's thresholded boxes or the
                  user's, decoded in chunks, painted on the backend's device)
    finish        ``DecodedMasks`` -> ``Segmented`` (clean-up, labels, details)

``GraphCore.run`` chains them; ``CellSAM`` (``pipeline.py``) is the public face.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..modeling.config import InferenceConfig
from ..progress import progress_bar
from ..runtime.base import Backend, OutOfDeviceMemory, is_out_of_memory, kept_rows
from . import device_preprocess as device_pre
from . import postprocess as post
from . import preprocess as pre
from .memory import fit_chunk_size

log = logging.getLogger(__name__)

# the stages of ``Timer.timings`` that make the model inputs, and those after the decoder
PREPROCESS_STAGES = ("format", "upload", "clip", "clahe", "inputs")
POSTPROCESS_STAGES = ("download", "cleanup")


class NoCellsWarning(UserWarning):
    """segment() found nothing to label; the result is all zeros."""


def warn_no_cells(what: str = "the image", *, stacklevel: int = 3) -> None:
    """The one ``NoCellsWarning`` text: ``what`` names the image (or frames) without cells;
    ``stacklevel`` counts from the caller of this function's caller."""
    warnings.warn(f"No cells detected in {what}; returning all-zero labels.", NoCellsWarning, stacklevel=stacklevel)


@dataclass
class SegmentationDetails:
    """What segment(return_details=True) returns beside the labels.

    Attributes:
        boxes: (K, 4) float32 xyxy in image pixels of the masks that passed the IoU filter,
            in decoding order (mask k was painted with label k+1 before clean-up).
        scores: (K,) float32 CellFinder score of each (NaN for user boxes).
        iou: (K,) float32 predicted mask IoU.
        labels_of_boxes: (K,) int32 final label of each box's mask (0: removed by clean-up
            or fully covered by later masks).
        embedding: (1, C, 64, 64) float32 image embedding.
        num_candidates: boxes sent to the decoder (before the IoU filter).
        timings: seconds per stage: checks (the call's settings and memory), the
            preprocessing steps (``PREPROCESS_STAGES``: format, upload to the device, clip,
            clahe, inputs; upload only where the device makes the inputs), encoder and
            cellfinder (the graphs), boxes (CellFinder's box selection), decoder (the decoder
            graphs and painting), download (the labels to the host), cleanup (hole filling,
            small objects, the optional clean-ups), details, release (host memory given back
            on the CPU); for one ``segment`` call also total (its wall clock) and
            unattributed (total minus the stages). In a batch the encoder and CellFinder
            times are the batch's divided by its images.
        backend: the backend that ran ("torch", "onnxruntime" or "tensorrt").
        path: "whole": the image ran as one model input (larger images return
            ``tiling.TiledDetails``, whose ``path`` is "tiled").
    """

    boxes: np.ndarray
    scores: np.ndarray
    iou: np.ndarray
    labels_of_boxes: np.ndarray
    embedding: np.ndarray
    num_candidates: int
    timings: dict[str, float] = field(default_factory=dict)
    backend: str = ""
    path: str = "whole"


@dataclass
class FinderOutput:
    """CellFinder's raw outputs for one image: logits (Q, 2) and boxes (Q, 4) cxcywh in [0, 1]."""

    logits: Tensor
    boxes: Tensor


@dataclass
class PreparedImage:
    """One image, formatted and validated, with its model inputs (1, 3, S, S).

    ``embedding`` (1, C, G, G) and ``finder`` are set by ``GraphCore.embed`` (or given, for an
    embedded image: then the model inputs are None). ``finder`` stays None with user boxes.
    """

    height: int
    width: int
    user_boxes: np.ndarray | None
    model_input: Tensor | None
    finder_input: Tensor | None
    embedding: Tensor | None = None
    finder: FinderOutput | None = None


@dataclass
class DecodedMasks:
    """The boxes of one image, decoded and painted.

    Attributes:
        boxes_model: (N, 4) xyxy in model pixels, every box sent to the decoder.
        scores: (N,) CellFinder scores (NaN for user boxes).
        painter: the masks that passed the IoU filter, painted with labels 1..K in order.
        kept: (K,) int64 indices into ``boxes_model`` of those masks.
        kept_iou: (K,) float32 their predicted IoU.
    """

    boxes_model: Tensor
    scores: Tensor
    painter: post.MaskPainter
    kept: np.ndarray
    kept_iou: np.ndarray


@dataclass
class Segmented:
    """One image's result: labels (H, W) int32 and, on request, its details."""

    labels: np.ndarray
    details: SegmentationDetails | None


@contextlib.contextmanager
def synchronized_stage(synchronize: Callable[[], None], record: Callable[[float], None]):
    """Time the block: ``record(seconds)`` once the block ended and ``synchronize()`` returned
    (device work is asynchronous: without the wait a stage would end before its work)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        synchronize()
        record(time.perf_counter() - started)


class Timer:
    """Seconds per stage of one image (the backend synchronised at the end of each stage).

    A single ``segment`` call's timings account for the whole call: ``close`` adds ``total``
    (the wall clock since the timer was made) and ``unattributed`` (what no stage measured).
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.timings: dict[str, float] = {}
        self.started = time.perf_counter()

    def stage(self, name: str):
        """A context that adds its seconds, the device synchronised at its end, to ``name``."""
        return synchronized_stage(self.backend.synchronize, lambda seconds: self.add(name, seconds))

    def add(self, name: str, seconds: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + seconds

    def close(self) -> dict[str, float]:
        """Add ``total`` and ``unattributed`` (total minus the stages) and return the timings."""
        total = time.perf_counter() - self.started
        measured = sum(v for k, v in self.timings.items() if k not in ("total", "unattributed"))
        self.timings["total"] = total
        self.timings["unattributed"] = max(0.0, total - measured)
        return self.timings


def validate_boxes(boxes: Any, height: int, width: int) -> np.ndarray:
    """User boxes (N, 4) x1, y1, x2, y2 in image pixels -> float32 array, as given; ValueError
    for malformed boxes (shape, non-finite values, x2 < x1 or y2 < y1) and for boxes entirely
    outside the (height, width) image. A box that overlaps the image may reach past its edge.
    """
    try:
        arr = np.asarray(boxes)
    except (ValueError, TypeError) as err:
        raise ValueError(f"boxes: cannot be read as an (N, 4) array ({err})") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) and not np.iscomplexobj(arr)):
        raise ValueError(f"boxes: expected real numbers, got dtype {arr.dtype}")
    if arr.shape in ((0,), (0, 4)):  # [] or an (0, 4) array: no boxes
        return np.zeros((0, 4), dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes: expected shape (N, 4) as x1, y1, x2, y2, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("boxes: contain NaN or infinite values")
    x1, y1, x2, y2 = arr.T
    bad = np.flatnonzero((x2 < x1) | (y2 < y1))
    if len(bad):
        raise ValueError(f"boxes: x2 < x1 or y2 < y1 in rows {bad[:10].tolist()} (expected x1, y1, x2, y2)")
    # A box may reach past the image's edge (CellFinder's own boxes do, and the released code
    # passes such boxes to the prompt encoder unchanged): only one with no part in the image
    # is refused.
    out = np.flatnonzero((x2 < 0) | (y2 < 0) | (x1 > width) | (y1 > height))
    if len(out):
        raise ValueError(
            f"boxes: rows {out[:10].tolist()} lie entirely outside the {width}x{height} (W x H) image"
        )
    return arr.astype(np.float32)


class GraphCore:
    """The four stages (module docstring) on one backend.

    Args:
        backend: the graphs.
        device_lock: held around the graph calls and the painting of one call (the device
            is the bottleneck, and TensorRT execution contexts must not be shared).
    """

    def __init__(self, backend: Backend, device_lock: threading.Lock) -> None:
        self.backend = backend
        self.device_lock = device_lock
        self._device_normalization: bool | None = None

    @property
    def device_normalization(self) -> bool:
        """Whether ``normalize=True`` runs on the backend's device (``device_preprocess``):
        on CUDA, once a start-up check on a test image found the device path within
        ``device_preprocess.DEVICE_TOLERANCE`` of the host path; on the CPU the host path
        (scikit-image, bit-identical to the released code) is the default."""
        if self._device_normalization is None:
            device = self.backend.device
            self._device_normalization = device.type == "cuda" and device_pre.self_check(
                device, self.backend.config.image_size, self.backend.adapted_inputs)
        return self._device_normalization

    def normalization(self, normalize: Any) -> str | None:
        """The CLAHE implementation a ``SegmentOptions.normalize`` runs here: "torch" for
        True where ``device_normalization``, else ``preprocess.clahe_method``."""
        method = pre.clahe_method(normalize)
        if method == "skimage" and normalize is True and self.device_normalization:
            return "torch"
        return method

    def prepare(self, image: Any, boxes: Any, clahe: str | None, channel_axis: int | None,
                timer: Timer | None = None) -> PreparedImage:
        """Validate and format one image; build both model inputs (CellFinder's only without user boxes).

        Args:
            clahe: the normalisation (``normalization``; None: the image lies in [0, 1]);
                "torch" makes the inputs on the backend's device (``device_preprocess``).
            timer: gets the ``PREPROCESS_STAGES``.
        """
        backend = self.backend
        size = backend.config.image_size
        stage = (timer or Timer(backend)).stage
        with stage("format"):
            channels = pre.checked_channels(image, channel_axis=channel_axis)
            height, width = channels.shape[:2]
            user_boxes = None if boxes is None else validate_boxes(boxes, height, width)
            if clahe is None and (channels.min() < 0 or channels.max() > 1):
                raise ValueError(f"image: with normalize=False values must lie in [0, 1], found "
                                 f"[{channels.min():g}, {channels.max():g}]")
            if clahe != "torch":
                image3 = pre.place_channels(channels)
        if clahe == "torch":  # the image goes to the device as it is; everything else happens there
            model_input, finder_input = device_pre.model_inputs(
                channels, backend.device, size, backend.adapted_inputs, finder=user_boxes is None, stage=stage)
            return PreparedImage(height, width, user_boxes, model_input, finder_input)
        if clahe is not None:
            with stage("clip"):
                image3 = pre.percentile_clip(image3)
            with stage("clahe"):
                image3 = pre.clahe(image3, method=clahe)
        with stage("inputs"):
            tensor = pre.to_tensor(image3)
            model_input = pre.embedding_input(tensor, size, backend.adapted_inputs)
            finder_input = pre.cellfinder_input(tensor, size, backend.adapted_inputs) if user_boxes is None else None
        return PreparedImage(height, width, user_boxes, model_input, finder_input)

    def embed(self, items: Sequence[PreparedImage], timers: Sequence[Timer]) -> None:
        """One batched encoder call over the items without an embedding, one batched
        CellFinder call over those that need boxes; sets ``embedding`` and ``finder``.

        Each image's timer gets the batch's time divided by the images that took part. The
        caller holds ``device_lock``.
        """
        backend = self.backend
        todo = [i for i, item in enumerate(items) if item.embedding is None]
        if todo:
            t0 = time.perf_counter()
            embeddings = backend.encoder(torch.cat([items[i].model_input for i in todo]))
            backend.synchronize()
            _share(timers, todo, "encoder", time.perf_counter() - t0)
            for j, i in enumerate(todo):
                items[i].embedding = embeddings[j:j + 1]
        todo = [i for i, item in enumerate(items) if item.user_boxes is None and item.finder is None]
        if todo:
            t0 = time.perf_counter()
            logits, raw_boxes = backend.cellfinder(torch.cat([items[i].finder_input for i in todo]))
            backend.synchronize()
            _share(timers, todo, "cellfinder", time.perf_counter() - t0)
            for j, i in enumerate(todo):
                items[i].finder = FinderOutput(logits[j], raw_boxes[j])

    def decode(self, item: PreparedImage, opts: InferenceConfig, timer: Timer, progress: bool) -> DecodedMasks:
        """Boxes in model space (CellFinder's, thresholded, or the user's), then decoded and
        painted masks. The caller holds ``device_lock``."""
        backend = self.backend
        size = backend.config.image_size
        if item.user_boxes is None:
            with timer.stage("boxes"):  # CellFinder's scores, top boxes and threshold (its graph: "cellfinder")
                scores, boxes_model = post.cellfinder_boxes(item.finder.logits, item.finder.boxes, size,
                                                            opts.bbox_threshold)
        else:
            boxes_model = torch.from_numpy(pre.boxes_to_model(item.user_boxes, item.height, item.width, size))
            boxes_model = boxes_model.to(backend.device)
            scores = torch.full((len(item.user_boxes),), float("nan"), device=backend.device)
        with timer.stage("decoder"):
            painter, kept, kept_iou = self._decode_chunks(item.embedding, boxes_model, (item.height, item.width),
                                                          opts, progress)
        return DecodedMasks(boxes_model, scores, painter, kept, kept_iou)

    def finish(self, item: PreparedImage, decoded: DecodedMasks, opts: InferenceConfig, timer: Timer, *,
               postprocess: bool, remove_boundaries: bool, return_details: bool) -> Segmented:
        """Clean-up of the painted labels, and the details."""
        with timer.stage("download"):
            labels = decoded.painter.result().cpu().numpy()
        with timer.stage("cleanup"):
            dropped = len(decoded.boxes_model) - len(decoded.kept)
            if dropped:
                log.info("%d of %d masks dropped: predicted IoU below %s", dropped, len(decoded.boxes_model),
                         opts.iou_threshold)
            if postprocess:
                labels = post.morphological_postprocess(labels)
            before = labels.copy() if return_details else None
            labels = post.fill_holes_and_remove_small(labels, opts.min_size)
            if remove_boundaries:
                labels = post.remove_boundaries(labels)
        if not return_details:
            return Segmented(labels, None)
        with timer.stage("details"):
            details = self._details(item, decoded, before, labels, timer)
        return Segmented(labels, details)

    def _details(self, item: PreparedImage, decoded: DecodedMasks, before: np.ndarray, labels: np.ndarray,
                 timer: Timer) -> SegmentationDetails:
        kept = decoded.kept
        return SegmentationDetails(
            boxes=self.image_boxes(item, decoded.boxes_model, kept),
            scores=decoded.scores.cpu().numpy()[kept],
            iou=decoded.kept_iou,
            labels_of_boxes=_labels_of_boxes(before, labels, len(kept)),
            embedding=item.embedding.cpu().numpy(),
            num_candidates=len(decoded.boxes_model),
            timings=timer.timings,
            backend=self.backend.name,
        )

    def image_boxes(self, item: PreparedImage, boxes_model: Tensor, kept: np.ndarray) -> np.ndarray:
        """(K, 4) the kept boxes in image pixels (the user's own boxes as given)."""
        if item.user_boxes is not None:
            return item.user_boxes[kept]
        size = self.backend.config.image_size
        return pre.boxes_to_image(boxes_model.cpu().numpy()[kept], item.height, item.width, size)

    def run(self, items: Sequence[PreparedImage], opts: InferenceConfig, timers: Sequence[Timer], *,
            postprocess: bool, remove_boundaries: bool, return_details: bool, progress: bool = False,
            ) -> list[Segmented]:
        """embed -> decode -> finish for prepared images (graph calls batched over them)."""
        with self.device_lock:
            self.embed(items, timers)
            decoded = [self.decode(item, opts, timer, progress) for item, timer in zip(items, timers)]
        return [self.finish(item, d, opts, timer, postprocess=postprocess, remove_boundaries=remove_boundaries,
                            return_details=return_details)
                for item, d, timer in zip(items, decoded, timers)]

    def new_painter(self, out_shape: tuple[int, int], opts: InferenceConfig) -> post.MaskPainter:
        """An empty label image (H, W) to paint masks into, on the backend's device."""
        backend = self.backend
        return post.MaskPainter(out_shape, low_res=backend.config.sam.low_res_size, model_size=backend.config.image_size,
                                mask_threshold=opts.mask_threshold, device=backend.device)

    def _decode_chunks(self, embedding: Tensor, boxes: Tensor, out_shape: tuple[int, int], opts: InferenceConfig,
                       progress: bool) -> tuple[post.MaskPainter, np.ndarray, np.ndarray]:
        """Decode all boxes in chunks into a new painter: the painter, then ``paint_boxes``'s result."""
        painter = self.new_painter(out_shape, opts)
        return (painter, *self.paint_boxes(embedding, boxes, painter, opts, progress=progress))

    def paint_boxes(self, embedding: Tensor, boxes: Tensor, painter: post.MaskPainter, opts: InferenceConfig, *,
                    first_label: int = 1, progress: bool = False,
                    on_chunk: Callable[[int, int, Tensor, Tensor, np.ndarray, np.ndarray], None] | None = None,
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Decode (N, 4) model-space boxes in chunks and paint the masks passing the IoU filter,
        numbered ``first_label``, ``first_label + 1``, ... in box order.

        Returns the indices of the kept boxes and their IoU predictions. The backend computes
        masks only for the boxes that pass the IoU filter (``Backend.decoder``'s
        ``keep_iou``). A chunk that runs out of device memory is retried at half the size
        (masks are painted with max(), so re-painting part of a chunk changes nothing); only a
        single box that does not fit is an error. ``on_chunk(start, first label, mask logits
        of the kept boxes (k, 1, L, L), iou of every box of the chunk (n, 1), the kept rows of
        the chunk (k,), the painter's (k, 8) windows of the kept masks)`` is called once per
        chunk that went through.
        """
        backend = self.backend
        chunk = fit_chunk_size(backend.config, backend.device, painter.height, painter.width,
                               opts.chunk_size) if len(boxes) else 1
        kept_index, kept_iou = [], []
        next_label, start = first_label, 0
        bar = _progress(len(boxes), chunk, progress)
        while start < len(boxes):
            part = boxes[start:start + chunk]
            try:
                mask_logits, iou = backend.decoder(embedding, part, keep_iou=opts.iou_threshold,
                                                   last_call=start + len(part) >= len(boxes))
                # one download per chunk, before the painting: the kept rows and their IoU both
                # come from it (the next chunk's first label depends on how many were kept),
                # and the painting's kernels then run while the next chunk is issued
                iou_host = iou.cpu()
                # labels follow the kept order, so chunks are painted in order
                windows = painter.paint(mask_logits[:, 0], next_label)
            except RuntimeError as err:
                # the backend's OutOfDeviceMemory, or the painter's own allocations failing
                if not (isinstance(err, OutOfDeviceMemory) or is_out_of_memory(err)):
                    raise
                if chunk == 1:
                    raise MemoryError(f"one box does not fit in device memory on {backend.device}: {err}") from None
                chunk = max(1, chunk // 2)
                log.warning("decoder ran out of device memory; retrying with %d boxes per call", chunk)
                continue
            rows = kept_rows(iou_host, opts.iou_threshold).numpy()
            if on_chunk is not None:
                on_chunk(start, next_label, mask_logits, iou, rows, windows)
            kept_index.append(rows + start)
            kept_iou.append(iou_host[rows, 0].numpy())
            next_label += len(rows)
            start += len(part)
            if bar is not None:
                bar.update(len(part))
        if bar is not None:
            bar.close()
        if not kept_index:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        return np.concatenate(kept_index), np.concatenate(kept_iou)


def _share(timers: Sequence[Timer], indices: Sequence[int], stage: str, seconds: float) -> None:
    """Spread the time of one batched graph call evenly over the images that took part."""
    for i in indices:
        timers[i].add(stage, seconds / len(indices))


def _progress(total: int, chunk: int, enabled: bool):
    return progress_bar(total, "decoding boxes", "box", enabled and total > chunk)


def _labels_of_boxes(before: np.ndarray, after: np.ndarray, count: int) -> np.ndarray:
    """Final label of each painted mask: the label that its pixels carry after clean-up."""
    out = np.zeros(count, dtype=np.int32)
    fg = before > 0
    pairs = np.unique(np.stack([before[fg], after[fg]]), axis=1) if fg.any() else np.zeros((2, 0), int)
    for original, final in pairs.T:
        if final > 0 and 1 <= original <= count:
            out[original - 1] = final
    return out
