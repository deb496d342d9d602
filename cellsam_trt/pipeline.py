"""segment(): image -> preprocess -> backend graphs -> postprocess -> labels.

One encoder pass per image; every box goes through the decoder in batched calls; masks are
upsampled, thresholded and painted on the backend's device, only inside the windows where
they can be foreground.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from . import memory
from . import postprocess as post
from . import preprocess as pre
from .config import InferenceConfig
from .memory import fit_chunk_size, release_freed_host_memory
from .runtime.base import Backend, OutOfDeviceMemory, is_out_of_memory

if TYPE_CHECKING:
    from .embedding import ImageEmbedding

log = logging.getLogger(__name__)


class NoCellsWarning(UserWarning):
    """segment() found nothing to label; the result is all zeros."""


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
        timings: seconds per stage.
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
class _Prepared:
    """One image, formatted and validated, with its model inputs (1, 3, S, S)."""

    height: int
    width: int
    user_boxes: np.ndarray | None
    model_input: Tensor | None  # None for an embedded image (the encoder has run)
    finder_input: Tensor | None


class _Timer:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.timings: dict[str, float] = {}

    def stage(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.backend.synchronize()
                timer.timings[name] = timer.timings.get(name, 0.0) + time.perf_counter() - self.t0

        return _Stage()


def validate_boxes(boxes: Any, height: int, width: int) -> np.ndarray:
    """User boxes (N, 4) x1, y1, x2, y2 in image pixels -> float32 array; ValueError if invalid."""
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
    out = np.flatnonzero((x1 < 0) | (y1 < 0) | (x2 > width) | (y2 > height))
    if len(out):
        raise ValueError(
            f"boxes: rows {out[:10].tolist()} reach outside the {width}x{height} (W x H) image"
        )
    return arr.astype(np.float32)


class CellSAM:
    """A loaded CellSAM that segments many images without reloading weights.

    Safe to share between threads: preprocessing runs in parallel, the graph calls and mask
    painting of one image at a time (the device is the bottleneck, and TensorRT execution
    contexts must not be shared).

    >>> session = CellSAM.from_checkpoint("cellsam_general.pt", device="cuda")  # doctest: +SKIP
    >>> labels = session.segment(image)                                          # doctest: +SKIP

    Args:
        backend: a ``Backend`` (torch, onnxruntime or tensorrt) holding the graphs.
        options: default thresholds and chunk size (``InferenceConfig``; default: the
            released thresholds and the backend's ``default_chunk_size``).
    """

    def __init__(self, backend: Backend, options: InferenceConfig | None = None) -> None:
        if not isinstance(backend, Backend):
            raise TypeError(f"backend: expected a cellsam_trt Backend, got {type(backend).__name__}")
        self.backend = backend
        self.options = options or InferenceConfig(chunk_size=backend.default_chunk_size)
        self._device_lock = threading.Lock()

    @classmethod
    def from_checkpoint(
        cls, checkpoint: Any = None, *, backend: str = "auto", device: str | torch.device | None = None,
        download: bool = False, options: InferenceConfig | None = None, cache: Any = None,
        build: bool | None = None, **backend_options: Any,
    ) -> CellSAM:
        """Load weights (released format) and build the chosen backend.

        Args:
            checkpoint: path, or None for ``~/.deepcell/models/cellsam_v1.2/cellsam_general.pt``.
            backend: "auto" (default: TensorRT, else ONNX Runtime, else torch; see
                ``cellsam_trt.runtime.create_backend``), "tensorrt", "onnxruntime" or "torch".
                The ONNX graphs and TensorRT engines come from ``onnx_dir=`` /
                ``engine_dir=`` when given, else from the artifact cache, which makes them
                on first use (``cellsam_trt.cache``; ViT-B: about a minute to export).
            device: torch device; default CUDA when available.
            download: fetch the released weights when absent (needs DEEPCELL_ACCESS_TOKEN).
            options: default thresholds and chunk size.
            cache: artifact cache root (default ``$CELLSAM_TRT_CACHE`` or the user cache folder).
            build: allow making missing graphs / engines (default: yes, unless
                ``CELLSAM_TRT_NO_BUILD=1``).
            **backend_options: ``onnx_dir``, ``engine_dir`` and options of the backend
                (onnxruntime: providers, threads, max_decoder_boxes; torch: precision).
        """
        from .runtime import create_backend

        made = create_backend(backend, checkpoint=checkpoint, device=device, download=download, cache=cache,
                              build=build, **backend_options)
        return cls(made, options)

    @classmethod
    def from_network(cls, network: Any, *, device: str | torch.device | None = None, options: InferenceConfig | None = None) -> CellSAM:
        """Wrap an in-memory ``CellSAMNetwork`` with the torch backend."""
        from .runtime import TorchBackend

        return cls(TorchBackend(network, device=device), options)

    def segment(
        self,
        image: Any,
        *,
        boxes: Any = None,
        bbox_threshold: float | None = None,
        normalize: bool | str = True,
        postprocess: bool = False,
        remove_boundaries: bool = False,
        chunk_size: int | None = None,
        channel_axis: int | None = None,
        return_details: bool = False,
        progress: bool = False,
        tile_size: int | None = 1024,
        overlap: int = 128,
    ) -> np.ndarray | tuple[np.ndarray, SegmentationDetails]:
        """Segment cells.

        Args:
            image: (H, W) or (H, W, C<=3) / (C, H, W), any real dtype. Channels fill the last
                slots of (blank, nuclear, whole-cell); a 2-D image is the whole-cell channel.
                Or an ``ImageEmbedding`` from ``embed``: no preprocessing and no encoder call
                (the options of those steps are the embedding's), the same labels.
            boxes: optional (N, 4) x1, y1, x2, y2 in image pixels; skips CellFinder.
            bbox_threshold: CellFinder confidence weight (default 0.4).
            normalize: percentile clip + CLAHE first: True (scikit-image CLAHE, as the
                released default) or "opencv" (OpenCV's CLAHE: 2-3x faster on that step, not
                bit-identical; ``cellsam-trt bench`` reports the deviation). With False, the
                image must already lie in [0, 1].
            postprocess: the released optional morphological clean-up.
            remove_boundaries: zero a one-pixel outline around each cell.
            chunk_size: boxes per decoder call (default: the backend's, 256; 4 for torch on the CPU).
            channel_axis: axis of the channels for 3-D input (default: the smallest axis).
            return_details: also return a ``SegmentationDetails``.
            progress: show a progress bar over decoder chunks.
            tile_size, overlap: an image with a side longer than ``tile_size`` (default 1024,
                the model input) is segmented in overlapping tiles at native scale and
                stitched (``tiling.segment_large``, as the CLI does; memory bounded, see its
                ``stream``), instead of being resized into one model input where cells would
                shrink below a pixel. ``tile_size=None`` forces the whole-image path (the
                released code's behaviour, bit-identical to it). With ``return_details`` the
                tiled path returns ``tiling.TiledDetails`` (``details.path == "tiled"``).

        Returns:
            labels (H, W) int32: 0 background, cells 1..K (uint32 above 65535 cells on the
            tiled path). With ``return_details``, a tuple.
        """
        from .embedding import ImageEmbedding
        from .tiling import check_tiling

        if isinstance(image, ImageEmbedding):
            return self._segment_embedded(image, boxes, bbox_threshold, postprocess, remove_boundaries, chunk_size,
                                          return_details, progress)
        shape = _spatial_shape(image, channel_axis)
        if tile_size is not None:
            check_tiling(tile_size, 0)
        if tile_size is not None and shape is not None and max(shape) > tile_size:
            from .tiling import segment_large

            return segment_large(self, image, tile_size=tile_size, overlap=overlap, boxes=boxes,
                                 bbox_threshold=bbox_threshold, normalize=normalize, postprocess=postprocess,
                                 remove_boundaries=remove_boundaries, chunk_size=chunk_size,
                                 channel_axis=channel_axis, return_details=return_details, progress=progress)
        _check_whole_image_memory(shape, "segment() of a {}x{} image as one model input",
                                  "free memory" if tile_size is not None else
                                  "leave tile_size at its default to segment it in tiles (memory then bounded by a "
                                  "few tiles)")
        opts = self._options(bbox_threshold, chunk_size)
        backend = self.backend
        timer = _Timer(backend)

        with timer.stage("preprocess"):
            item = self._prepare(image, boxes, normalize, channel_axis)

        with self._device_lock:
            with timer.stage("encoder"):
                embedding = backend.encoder(item.model_input)
            finder = None
            if item.user_boxes is None:
                with timer.stage("cellfinder"):
                    logits, raw_boxes = backend.cellfinder(item.finder_input)
                    finder = (logits[0], raw_boxes[0])
            decoded = self._boxes_and_masks(embedding, finder, item, opts, timer, progress)

        labels, details = self._finish(embedding, item, decoded, opts, timer, postprocess, remove_boundaries, return_details)
        del embedding, decoded
        self._release_host_memory()
        if not labels.any():
            warnings.warn("No cells detected in the image; returning all-zero labels.", NoCellsWarning, stacklevel=2)
        return (labels, details) if return_details else labels

    def embed(self, image: Any, *, normalize: bool | str = True, channel_axis: int | None = None,
              cellfinder: bool = True, cache_dir: str | os.PathLike | None = None) -> ImageEmbedding:
        """Preprocess an image and run the encoder (and CellFinder) once, for many ``segment``
        or ``interactive.Annotation`` calls on it.

        The image is one model input, as ``segment(image, tile_size=None)`` takes it.

        Args:
            image, normalize, channel_axis: as ``segment``.
            cellfinder: also run CellFinder, so that ``segment(embedding)`` without boxes
                works (False: user boxes only, one graph call less).
            cache_dir: a folder of saved embeddings: one saved there for this image (same
                content, options and weights) is loaded instead of computed, and a computed
                one is saved there.

        Returns:
            an ``ImageEmbedding`` (embedding on the backend's device; ``nbytes`` says its size).
        """
        from .embedding import ImageEmbedding, embedding_key, image_key

        key = image_key(image, pre.clahe_method(normalize), channel_axis)
        weights = self.backend.weights_identity()
        path = None
        if cache_dir is not None:
            path = Path(cache_dir) / f"{embedding_key(key, weights)}.npz"
            if path.is_file():
                saved = ImageEmbedding.load(path, weights=weights)
                if cellfinder and saved.finder is None:
                    log.info("embedding %s was saved without CellFinder's outputs; computing again", path)
                else:
                    return saved
        _check_whole_image_memory(_spatial_shape(image, channel_axis), "embed() of a {}x{} image", "free memory")
        # empty user boxes: _prepare skips CellFinder's input
        item = self._prepare(image, None if cellfinder else np.zeros((0, 4), np.float32), normalize, channel_axis)
        backend = self.backend
        with self._device_lock:
            embedding = backend.encoder(item.model_input)
            finder = None
            if cellfinder:
                logits, raw_boxes = backend.cellfinder(item.finder_input)
                finder = (logits[0], raw_boxes[0])
        out = ImageEmbedding(embedding, item.height, item.width, finder, key, weights)
        if path is not None:
            out.save(path)
        self._release_host_memory()
        return out

    def _segment_embedded(self, embedded: ImageEmbedding, boxes: Any, bbox_threshold: float | None,
                          postprocess: bool, remove_boundaries: bool, chunk_size: int | None, return_details: bool,
                          progress: bool) -> np.ndarray | tuple[np.ndarray, SegmentationDetails]:
        """``segment`` on an embedding: boxes (CellFinder's, from the embedding, or the user's), decoder, clean-up."""
        backend = self.backend
        embedded.check_made_by(backend, "image")
        user_boxes = None if boxes is None else validate_boxes(boxes, embedded.height, embedded.width)
        if user_boxes is None and embedded.finder is None:
            raise ValueError("boxes: this embedding was made with embed(..., cellfinder=False); pass boxes= or "
                             "embed the image with cellfinder=True")
        opts = self._options(bbox_threshold, chunk_size)
        timer = _Timer(backend)
        item = _Prepared(embedded.height, embedded.width, user_boxes, None, None)
        embedding = embedded.embedding.to(backend.device)
        finder = None if user_boxes is not None else tuple(t.to(backend.device) for t in embedded.finder)
        with self._device_lock:
            decoded = self._boxes_and_masks(embedding, finder, item, opts, timer, progress)
        labels, details = self._finish(embedding, item, decoded, opts, timer, postprocess, remove_boundaries,
                                       return_details)
        if not labels.any():
            warnings.warn("No cells detected in the image; returning all-zero labels.", NoCellsWarning, stacklevel=3)
        return (labels, details) if return_details else labels

    def segment_batch(
        self,
        images: Sequence[Any],
        *,
        boxes: Sequence[Any] | None = None,
        bbox_threshold: float | None = None,
        normalize: bool | str = True,
        postprocess: bool = False,
        remove_boundaries: bool = False,
        chunk_size: int | None = None,
        channel_axis: int | None = None,
        return_details: bool = False,
        warn_empty: bool = True,
    ) -> list[np.ndarray] | list[tuple[np.ndarray, SegmentationDetails]]:
        """Segment several images with ONE batched encoder call and ONE batched CellFinder call.

        Each image gets exactly what ``segment`` would compute for it alone (same
        preprocessing, thresholds and clean-up; batched graph calls may differ from single
        ones in the last float bits). Images may differ in size: each is squashed to the
        model input on its own. Tiles of a large image (``cellsam_trt.tiling``) come here.

        Args:
            images: B images, each as ``segment`` accepts.
            boxes: None, or B entries each None (CellFinder) or (N_i, 4) user boxes.
            warn_empty: emit a ``NoCellsWarning`` per image without cells.
            other arguments: as ``segment``, applied to every image.

        Returns:
            B label images (H_i, W_i) int32, or B (labels, details) tuples. In each
            ``details.timings`` the encoder and cellfinder times are the batch's time
            divided by the number of images that went through that graph.
        """
        images = list(images)
        if boxes is None:
            boxes = [None] * len(images)
        else:
            boxes = list(boxes)
            if len(boxes) != len(images):
                raise ValueError(f"boxes: expected one entry per image ({len(images)}), got {len(boxes)}")
        if not images:
            return []
        opts = self._options(bbox_threshold, chunk_size)
        backend = self.backend
        timers = [_Timer(backend) for _ in images]
        items = []
        for index, (image, user_boxes) in enumerate(zip(images, boxes)):
            with timers[index].stage("preprocess"):
                try:
                    items.append(self._prepare(image, user_boxes, normalize, channel_axis))
                except ValueError as err:
                    raise ValueError(f"images[{index}]: {err}") from None

        finder_index = [i for i, item in enumerate(items) if item.user_boxes is None]
        with self._device_lock:
            t0 = time.perf_counter()
            embeddings = backend.encoder(torch.cat([item.model_input for item in items]))
            backend.synchronize()
            _share(timers, range(len(items)), "encoder", time.perf_counter() - t0)
            finder: dict[int, tuple[Tensor, Tensor]] = {}
            if finder_index:
                t0 = time.perf_counter()
                logits, raw_boxes = backend.cellfinder(torch.cat([items[i].finder_input for i in finder_index]))
                backend.synchronize()
                _share(timers, finder_index, "cellfinder", time.perf_counter() - t0)
                finder = {i: (logits[j], raw_boxes[j]) for j, i in enumerate(finder_index)}
            decoded = [
                self._boxes_and_masks(embeddings[i:i + 1], finder.get(i), item, opts, timers[i], False)
                for i, item in enumerate(items)
            ]

        results = []
        for i, item in enumerate(items):
            labels, details = self._finish(
                embeddings[i:i + 1], item, decoded[i], opts, timers[i], postprocess, remove_boundaries, return_details,
            )
            if warn_empty and not labels.any():
                warnings.warn(f"No cells detected in image {i} of the batch; returning all-zero labels.",
                              NoCellsWarning, stacklevel=2)
            results.append((labels, details) if return_details else labels)
        del embeddings, decoded
        self._release_host_memory()
        return results

    def segment_stack(self, stack: Any, *, axes: str | None = None, batch_size: int = 4, **options: Any) -> Any:
        """Segment every frame of a time-lapse / z-stack on its own, frames batched through the
        graphs: labels with the input's axes without C (e.g. (T, H, W) for axes "TCYX"), each
        frame labelled 1..K_f. See ``stack.segment_stack`` for the arguments."""
        from .stack import segment_stack

        return segment_stack(self, stack, axes=axes, batch_size=batch_size, **options)

    def _release_host_memory(self) -> None:
        # On the CPU the graphs' activations were host memory: give the freed pages back
        # before the next call's encoder peak (on a GPU the host side is small).
        if self.backend.device.type == "cpu":
            release_freed_host_memory()

    def _prepare(self, image: Any, boxes: Any, normalize: bool | str, channel_axis: int | None) -> _Prepared:
        """Validate and format one image; build both model inputs (the CellFinder one only without user boxes)."""
        backend = self.backend
        size = backend.config.image_size
        method = pre.clahe_method(normalize)
        image3 = pre.format_image(image, channel_axis=channel_axis)
        height, width = image3.shape[:2]
        user_boxes = None if boxes is None else validate_boxes(boxes, height, width)
        if method is not None:
            image3 = pre.normalize_image(image3, method)
        elif image3.min() < 0 or image3.max() > 1:
            raise ValueError(
                f"image: with normalize=False values must lie in [0, 1], found [{image3.min():g}, {image3.max():g}]"
            )
        tensor = pre.to_tensor(image3)
        model_input = pre.embedding_input(tensor, size, backend.adapted_inputs)
        finder_input = pre.cellfinder_input(tensor, size, backend.adapted_inputs) if user_boxes is None else None
        return _Prepared(height, width, user_boxes, model_input, finder_input)

    def _boxes_and_masks(self, embedding: Tensor, finder: tuple[Tensor, Tensor] | None, item: _Prepared,
                         opts: InferenceConfig, timer: _Timer, progress: bool) -> tuple:
        """Boxes in model space (CellFinder's, thresholded, or the user's), then decoded and painted masks."""
        backend = self.backend
        size = backend.config.image_size
        if finder is not None:
            with timer.stage("cellfinder"):
                scores, boxes_model = post.score_boxes(finder[0], finder[1], size)
                scores, boxes_model = post.select_boxes(scores, boxes_model, opts.bbox_threshold)
        else:
            scale = np.array([size / item.width, size / item.height] * 2, dtype=np.float32)
            boxes_model = torch.from_numpy(item.user_boxes * scale).to(backend.device)
            scores = torch.full((len(item.user_boxes),), float("nan"), device=backend.device)
        with timer.stage("decoder"):
            painter, kept, kept_iou = self._decode(embedding, boxes_model, (item.height, item.width), opts, progress)
        return boxes_model, scores, painter, kept, kept_iou

    def _finish(self, embedding: Tensor, item: _Prepared, decoded: tuple, opts: InferenceConfig, timer: _Timer,
                postprocess: bool, remove_boundaries: bool, return_details: bool,
                ) -> tuple[np.ndarray, SegmentationDetails | None]:
        """Clean-up of the painted labels, and the details."""
        boxes_model, scores, painter, kept, kept_iou = decoded
        with timer.stage("postprocess"):
            labels = painter.result().cpu().numpy()
            dropped = len(boxes_model) - len(kept)
            if dropped:
                log.info("%d of %d masks dropped: predicted IoU below %s", dropped, len(boxes_model), opts.iou_threshold)
            if postprocess:
                labels = post.morphological_postprocess(labels)
            before = labels.copy() if return_details else None
            labels = post.fill_holes_and_remove_small(labels, opts.min_size)
            if remove_boundaries:
                labels = post.remove_boundaries(labels)
        if not return_details:
            return labels, None
        size = self.backend.config.image_size
        scale_back = np.array([item.width / size, item.height / size] * 2, dtype=np.float32)
        details = SegmentationDetails(
            boxes=boxes_model.cpu().numpy()[kept] * scale_back if item.user_boxes is None else item.user_boxes[kept],
            scores=scores.cpu().numpy()[kept],
            iou=kept_iou,
            labels_of_boxes=_labels_of_boxes(before, labels, len(kept)),
            embedding=embedding.cpu().numpy(),
            num_candidates=len(boxes_model),
            timings=timer.timings,
            backend=self.backend.name,
        )
        return labels, details

    def _decode(self, embedding: Tensor, boxes: Tensor, out_shape: tuple[int, int], opts: InferenceConfig,
                progress: bool) -> tuple[post.MaskPainter, np.ndarray, np.ndarray]:
        """Decode all boxes in chunks and paint the masks passing the IoU filter.

        Returns the painter, the indices of the kept boxes and their IoU predictions. A chunk
        that runs out of device memory is retried at half the size (masks are painted with
        max(), so re-painting part of a chunk changes nothing); only a single box that does
        not fit is an error.
        """
        backend = self.backend
        painter = post.MaskPainter(
            out_shape, low_res=backend.config.sam.low_res_size, model_size=backend.config.image_size,
            mask_threshold=opts.mask_threshold, device=backend.device,
        )
        chunk = fit_chunk_size(backend.config, backend.device, *out_shape, opts.chunk_size) if len(boxes) else 1
        kept_index, kept_iou = [], []
        next_label, start = 1, 0
        bar = _progress(len(boxes), chunk, progress)
        while start < len(boxes):
            part = boxes[start:start + chunk]
            try:
                mask_logits, iou = backend.decoder(embedding, part, last_call=start + len(part) >= len(boxes))
                keep = iou[:, 0] >= opts.iou_threshold
                # labels follow the kept order, so chunks are painted in order
                painter.paint(mask_logits[keep, 0], next_label)
            except RuntimeError as err:
                # the backend's OutOfDeviceMemory, or the painter's own allocations failing
                if not (isinstance(err, OutOfDeviceMemory) or is_out_of_memory(err)):
                    raise
                if chunk == 1:
                    raise MemoryError(f"one box does not fit in device memory on {backend.device}: {err}") from None
                chunk = max(1, chunk // 2)
                log.warning("decoder ran out of device memory; retrying with %d boxes per call", chunk)
                continue
            kept_index.append(torch.nonzero(keep)[:, 0].cpu().numpy() + start)
            kept_iou.append(iou[keep, 0].cpu().numpy())
            next_label += len(kept_index[-1])
            start += len(part)
            if bar is not None:
                bar.update(len(part))
        if bar is not None:
            bar.close()
        if not kept_index:
            return painter, np.zeros(0, np.int64), np.zeros(0, np.float32)
        return painter, np.concatenate(kept_index), np.concatenate(kept_iou)

    def _options(self, bbox_threshold: float | None, chunk_size: int | None) -> InferenceConfig:
        opts = self.options
        if bbox_threshold is not None:
            if not pre.is_real_number(bbox_threshold) or not 0 <= bbox_threshold <= 1:
                raise ValueError(f"bbox_threshold: expected a number in [0, 1], got {bbox_threshold!r}")
            opts = replace(opts, bbox_threshold=float(bbox_threshold))
        if chunk_size is not None:
            if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
                raise ValueError(f"chunk_size: expected a positive integer, got {chunk_size!r}")
            opts = replace(opts, chunk_size=int(chunk_size))
        if self.backend.max_decoder_boxes is not None:
            opts = replace(opts, chunk_size=min(opts.chunk_size, self.backend.max_decoder_boxes))
        return opts


def _spatial_shape(image: Any, channel_axis: int | None) -> tuple[int, int] | None:
    """(H, W) of an image, or None for input the whole-image path rejects (it says why)."""
    from .tiling import ImageSource

    try:
        return ImageSource(image, channel_axis).shape
    except (ValueError, TypeError):
        return None


def _check_whole_image_memory(shape: tuple[int, int] | None, what: str, remedy: str) -> None:
    """MemoryError, before any work, when an image as one model input cannot fit in host
    memory (``memory.WHOLE_IMAGE_BYTES_PER_PIXEL``); ``what`` takes the height and width."""
    if shape is not None:
        memory.check_host_memory(shape[0] * shape[1] * memory.WHOLE_IMAGE_BYTES_PER_PIXEL, what.format(*shape), remedy)


def _share(timers: list[_Timer], indices, stage: str, seconds: float) -> None:
    """Spread the time of one batched graph call evenly over the images that took part."""
    indices = list(indices)
    for i in indices:
        timers[i].timings[stage] = timers[i].timings.get(stage, 0.0) + seconds / len(indices)


def _progress(total: int, chunk: int, enabled: bool):
    if not enabled or total <= chunk:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="decoding boxes", unit="box")


def _labels_of_boxes(before: np.ndarray, after: np.ndarray, count: int) -> np.ndarray:
    """Final label of each painted mask: the label that its pixels carry after clean-up."""
    out = np.zeros(count, dtype=np.int32)
    fg = before > 0
    pairs = np.unique(np.stack([before[fg], after[fg]]), axis=1) if fg.any() else np.zeros((2, 0), int)
    for original, final in pairs.T:
        if final > 0 and 1 <= original <= count:
            out[original - 1] = final
    return out


_SESSION_LOCK = threading.Lock()
_LAST_SESSION: dict[str, Any] = {}


def _loaded_session(checkpoint: Any, backend: str, device: Any, download: bool,
                    backend_options: dict[str, Any]) -> CellSAM:
    """The session for these arguments, loaded once and kept for the next ``segment()`` call.

    It is identified by the weights file (path, size and mtime: a rewritten file reloads),
    the backend, the resolved device and the backend options.
    """
    from .checkpoint import locate_checkpoint
    from .runtime import BACKENDS, resolve_device

    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    path = locate_checkpoint(checkpoint, download=download)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, backend, str(resolve_device(device)),
           tuple(sorted((k, repr(v)) for k, v in backend_options.items())))
    with _SESSION_LOCK:
        if _LAST_SESSION.get("key") != key:
            _LAST_SESSION.clear()  # one session at a time: free the old weights before loading new ones
            _LAST_SESSION["session"] = CellSAM.from_checkpoint(checkpoint, backend=backend, device=device,
                                                               **backend_options)
            _LAST_SESSION["key"] = key
        return _LAST_SESSION["session"]


def unload() -> None:
    """Free the session that ``segment()`` keeps between calls (weights, graphs, engines)."""
    with _SESSION_LOCK:
        _LAST_SESSION.clear()


def _session_for(checkpoint: Any, model: Any, backend: str, device: Any, onnx_dir: Any, engine_dir: Any, cache: Any,
                 build: bool | None, download: bool) -> CellSAM:
    """The session the module-level functions use: ``model`` if given, else the kept one."""
    from .modeling import CellSAMNetwork

    if model is not None and checkpoint is not None:
        raise ValueError("pass either model= or checkpoint=, not both")
    if isinstance(model, CellSAM):
        return model
    if isinstance(model, CellSAMNetwork):
        return CellSAM.from_network(model, device=device)
    if model is None:
        backend_options = {k: v for k, v in (("onnx_dir", onnx_dir), ("engine_dir", engine_dir), ("cache", cache),
                                             ("build", build)) if v is not None}
        return _loaded_session(checkpoint, backend, device, download, backend_options)
    raise TypeError(f"model: expected a CellSAM session or CellSAMNetwork, got {type(model).__name__}")


def segment(
    image: Any,
    *,
    checkpoint: Any = None,
    model: Any = None,
    backend: str = "auto",
    device: str | torch.device | None = None,
    boxes: Any = None,
    bbox_threshold: float | None = None,
    return_details: bool = False,
    onnx_dir: Any = None,
    engine_dir: Any = None,
    cache: Any = None,
    build: bool | None = None,
    download: bool = False,
    **options: Any,
) -> np.ndarray | tuple[np.ndarray, SegmentationDetails]:
    """Segment cells in one image with the fastest backend this machine has.

    The first call loads the weights (and, on first use of a checkpoint, exports its ONNX
    graphs, or builds TensorRT engines on a GPU, into the artifact cache: see
    ``cellsam_trt.cache``); the session is kept, so later calls with the same arguments
    only segment. ``unload()`` frees it. For explicit control use ``CellSAM``.

    Args:
        image: (H, W) or (H, W, C<=3) / (C, H, W), any real dtype.
        checkpoint: weights file (released format); default ``~/.deepcell/models/...``.
        model: a ``CellSAM`` session or a ``CellSAMNetwork`` instead of ``checkpoint``.
        backend: "auto" (TensorRT, else ONNX Runtime, else torch), or one of them by name.
        device: torch device (default: CUDA when available).
        boxes: optional (N, 4) x1, y1, x2, y2 in image pixels (skips CellFinder).
        bbox_threshold: CellFinder confidence weight (default: the session's, 0.4).
        return_details: also return ``SegmentationDetails`` (``details.backend`` names the
            backend that ran).
        onnx_dir, engine_dir: use these export / engine folders instead of the cache.
        cache: artifact cache root (default ``$CELLSAM_TRT_CACHE`` or the user cache folder).
        build: allow making missing graphs / engines (default: yes, unless
            ``CELLSAM_TRT_NO_BUILD=1``).
        download: fetch the released weights when absent.
        **options: forwarded to ``CellSAM.segment`` (normalize, postprocess, chunk_size, ...).

    Returns:
        labels (H, W) int32, or (labels, details).
    """
    session = _session_for(checkpoint, model, backend, device, onnx_dir, engine_dir, cache, build, download)
    return session.segment(image, boxes=boxes, bbox_threshold=bbox_threshold, return_details=return_details, **options)


def segment_stack(
    stack: Any,
    *,
    axes: str | None = None,
    checkpoint: Any = None,
    model: Any = None,
    backend: str = "auto",
    device: str | torch.device | None = None,
    onnx_dir: Any = None,
    engine_dir: Any = None,
    cache: Any = None,
    build: bool | None = None,
    download: bool = False,
    **options: Any,
) -> Any:
    """Segment every frame of a time-lapse / z-stack on its own, with the session ``segment()`` uses.

    Args:
        stack: array-like, or an ``io.ImageFile`` from ``io.read_image`` (its axes are used).
        axes: one letter per dimension, e.g. "TYX", "ZYX", "TCYX" (T time, Z depth, C at most
            3 channels, Y, X).
        checkpoint, model, backend, device, onnx_dir, engine_dir, cache, build, download: as ``segment``.
        **options: as ``CellSAM.segment_stack`` (batch_size, progress, return_details, normalize, ...).

    Returns:
        labels int32 with the input's axes without C; each frame labelled 1..K_f.
    """
    session = _session_for(checkpoint, model, backend, device, onnx_dir, engine_dir, cache, build, download)
    return session.segment_stack(stack, axes=axes, **options)
