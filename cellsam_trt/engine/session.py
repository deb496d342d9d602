"""A session: loaded weights on a backend, segmenting images that are one model input each.

One encoder pass per image; every box goes through the decoder in batched calls; masks are
upsampled, thresholded and painted on the backend's device, only inside the windows where
they can be foreground (``core.GraphCore``).
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..modeling.config import InferenceConfig
from ..runtime.base import Backend
from . import memory
from .core import FinderOutput, GraphCore, PreparedImage, SegmentationDetails, Timer, validate_boxes, warn_no_cells
from .memory import release_freed_host_memory
from .options import SegmentOptions
from .source import ImageSource

if TYPE_CHECKING:
    from .embedding import ImageEmbedding

log = logging.getLogger(__name__)


class Session:
    """Loaded weights on a backend that segment images given as one model input each.

    ``cellsam_trt.CellSAM`` is this with the size dispatch (images larger than a tile are
    tiled) and stacks, and documents the thread safety, the settings and the arguments;
    the tiled run (``large``) segments its tiles through ``segment_batch`` here, and a dask
    worker holds one of these.
    """

    def __init__(self, backend: Backend, inference: InferenceConfig | None = None) -> None:
        if not isinstance(backend, Backend):
            raise TypeError(f"backend: expected a cellsam_trt Backend, got {type(backend).__name__}")
        self.backend = backend
        self.inference = inference or InferenceConfig(chunk_size=backend.default_chunk_size)
        self._device_lock = threading.Lock()
        self.core = GraphCore(backend, self._device_lock)

    @classmethod
    def from_checkpoint(
        cls, checkpoint: Any = None, *, backend: str = "auto", device: str | torch.device | None = None,
        download: bool = False, inference: InferenceConfig | None = None, cache: Any = None,
        build: bool | None = None, **backend_options: Any,
    ) -> Session:
        """Load weights (released format) and build the chosen backend.

        Args:
            checkpoint: path, or None for ``~/.deepcell/models/cellsam_v1.2/cellsam_general.pt``.
            backend: "auto" (default: TensorRT, else ONNX Runtime, else torch; see
                ``cellsam_trt.runtime.create_backend``), "tensorrt", "onnxruntime" or "torch".
                The ONNX graphs and TensorRT engines come from ``onnx_dir=`` /
                ``engine_dir=`` when given, else from the artifact cache, which makes them
                on first use (``cellsam_trt.runtime.cache``; ViT-B: about a minute to export).
            device: torch device; default CUDA when available.
            download: fetch the released weights when absent (needs DEEPCELL_ACCESS_TOKEN).
            inference: default thresholds and chunk size.
            cache: artifact cache root (default ``$CELLSAM_TRT_CACHE`` or the user cache folder).
            build: allow making missing graphs / engines (default: yes, unless
                ``CELLSAM_TRT_NO_BUILD=1``).
            **backend_options: ``onnx_dir``, ``engine_dir`` and options of the backend
                (onnxruntime: providers, threads, max_decoder_boxes; torch: precision).
        """
        from ..runtime import create_backend

        made = create_backend(backend, checkpoint=checkpoint, device=device, download=download, cache=cache,
                              build=build, **backend_options)
        return cls(made, inference)

    @classmethod
    def from_network(cls, network: Any, *, device: str | torch.device | None = None,
                     inference: InferenceConfig | None = None) -> Session:
        """Wrap an in-memory ``CellSAMNetwork`` with the torch backend."""
        from ..runtime import TorchBackend

        return cls(TorchBackend(network, device=device), inference)

    def segment(self, image: Any, *, boxes: Any = None, return_details: bool = False,
                options: SegmentOptions | None = None, warn_level: int = 2, **settings: Any,
                ) -> np.ndarray | tuple[np.ndarray, SegmentationDetails]:
        """Segment cells in one image taken as one model input (``CellSAM.segment`` tiles
        larger images first).

        Args:
            image, boxes, return_details: as ``cellsam_trt.CellSAM.segment`` (an image, or an
                ``ImageEmbedding`` from ``embed``; user boxes in image pixels skip CellFinder).
            options, **settings: the call's ``SegmentOptions`` (keywords replace its fields;
                ``cellsam_trt.CellSAM.segment`` lists them). ``tile_size`` does not tile here:
                it only names the remedy when the image cannot fit in memory whole.
            warn_level: the ``stacklevel`` of the ``NoCellsWarning`` for an image without
                cells, counted from this method (a subclass calling it adds its frame).

        Returns:
            labels (H, W) int32: 0 background, cells 1..K (uint32 above 65535 cells on the
            tiled path). With ``return_details``, a tuple.
        """
        from .embedding import ImageEmbedding

        timer = Timer(self.backend)
        if isinstance(image, ImageEmbedding):
            with timer.stage("checks"):
                opts = SegmentOptions.of(options, **settings)
                item = self._embedded_item(image, boxes)
            labels, details = self._run_one(item, timer, opts, return_details, release=False)
        else:
            with timer.stage("checks"):
                opts = SegmentOptions.of(options, **settings)
                check_whole_image_memory(spatial_shape(image, opts.channel_axis),
                                         "segment() of a {}x{} image as one model input",
                                         "free memory" if opts.tile_size is not None else
                                         "leave tile_size at its default to segment it in tiles (memory then bounded "
                                         "by a few tiles)")
            item = self.core.prepare(image, boxes, self.core.normalization(opts.normalize), opts.channel_axis, timer)
            labels, details = self._run_one(item, timer, opts, return_details, release=True)
        timer.close()
        if not labels.any():
            warn_no_cells("the image", stacklevel=warn_level + 1)
        return (labels, details) if return_details else labels

    def embed(self, image: Any, *, cellfinder: bool = True, cache_dir: str | os.PathLike | None = None,
              options: SegmentOptions | None = None, **settings: Any) -> ImageEmbedding:
        """Preprocess an image and run the encoder (and CellFinder) once, for many ``segment``
        or ``interactive.Annotation`` calls on it.

        The image is one model input, as ``segment(image, tile_size=None)`` takes it.

        Args:
            image: as ``segment``.
            cellfinder: also run CellFinder, so that ``segment(embedding)`` without boxes
                works (False: user boxes only, one graph call less).
            cache_dir: a folder of saved embeddings: one saved there for this image (same
                content, options and weights) is loaded instead of computed, and a computed
                one is saved there.
            options, **settings: ``SegmentOptions``; ``normalize`` and ``channel_axis`` apply
                here (the rest apply to the ``segment`` calls on the embedding).

        Returns:
            an ``ImageEmbedding`` (embedding on the backend's device; ``nbytes`` says its size).
        """
        from .embedding import ImageEmbedding, embedding_key, image_key

        opts = SegmentOptions.of(options, **settings)
        normalization = self.core.normalization(opts.normalize)
        key = image_key(image, normalization, opts.channel_axis)
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
        check_whole_image_memory(spatial_shape(image, opts.channel_axis), "embed() of a {}x{} image", "free memory")
        # empty user boxes: prepare skips CellFinder's input
        item = self.core.prepare(image, None if cellfinder else np.zeros((0, 4), np.float32), normalization,
                                 opts.channel_axis)
        with self._device_lock:
            self.core.embed([item], [Timer(self.backend)])
        finder = None if item.finder is None else (item.finder.logits, item.finder.boxes)
        out = ImageEmbedding(item.embedding, item.height, item.width, finder, key, weights)
        if path is not None:
            out.save(path)
        self._release_host_memory()
        return out

    def segment_batch(
        self,
        images: Sequence[Any],
        *,
        boxes: Sequence[Any] | None = None,
        return_details: bool = False,
        warn_empty: bool = True,
        options: SegmentOptions | None = None,
        **settings: Any,
    ) -> list[np.ndarray] | list[tuple[np.ndarray, SegmentationDetails]]:
        """Segment several images with ONE batched encoder call and ONE batched CellFinder call.

        Each image gets exactly what ``segment`` would compute for it alone (same
        preprocessing, thresholds and clean-up; batched graph calls may differ from single
        ones in the last float bits). Images may differ in size: each is squashed to the
        model input on its own (``tile_size`` does not apply here). Tiles of a large image
        (``cellsam_trt.large``) and frames of a stack come here.

        Args:
            images: B images, each as ``segment`` accepts.
            boxes: None, or B entries each None (CellFinder) or (N_i, 4) user boxes.
            warn_empty: emit a ``NoCellsWarning`` per image without cells.
            options, **settings: as ``segment``, applied to every image.

        Returns:
            B label images (H_i, W_i) int32, or B (labels, details) tuples. In each
            ``details.timings`` the encoder and cellfinder times are the batch's time
            divided by the number of images that went through that graph.
        """
        opts = SegmentOptions.of(options, **settings)
        images = list(images)
        if boxes is None:
            boxes = [None] * len(images)
        else:
            boxes = list(boxes)
            if len(boxes) != len(images):
                raise ValueError(f"boxes: expected one entry per image ({len(images)}), got {len(boxes)}")
        if not images:
            return []
        timers = [Timer(self.backend) for _ in images]
        items = []
        normalization = self.core.normalization(opts.normalize)
        for index, (image, user_boxes) in enumerate(zip(images, boxes)):
            try:
                items.append(self.core.prepare(image, user_boxes, normalization, opts.channel_axis, timers[index]))
            except ValueError as err:
                raise ValueError(f"images[{index}]: {err}") from None
        results = self.core.run(items, self.thresholds(opts), timers, postprocess=opts.postprocess,
                                remove_boundaries=opts.remove_boundaries, return_details=return_details)
        del items
        self._release_host_memory()
        out = []
        for i, result in enumerate(results):
            if warn_empty and not result.labels.any():
                warn_no_cells(f"image {i} of the batch")
            out.append((result.labels, result.details) if return_details else result.labels)
        return out

    def thresholds(self, opts: SegmentOptions) -> InferenceConfig:
        """The session's ``InferenceConfig`` with a call's overrides; decoder chunks no larger
        than the backend takes."""
        inference = opts.thresholds(self.inference)
        if self.backend.max_decoder_boxes is not None:
            inference = replace(inference, chunk_size=min(inference.chunk_size, self.backend.max_decoder_boxes))
        return inference

    def _run_one(self, item: PreparedImage, timer: Timer, opts: SegmentOptions, return_details: bool,
                 release: bool) -> tuple[np.ndarray, SegmentationDetails | None]:
        [result] = self.core.run([item], self.thresholds(opts), [timer], postprocess=opts.postprocess,
                                 remove_boundaries=opts.remove_boundaries, return_details=return_details,
                                 progress=opts.progress)
        del item
        if release:
            with timer.stage("release"):
                self._release_host_memory()
        return result.labels, result.details

    def _embedded_item(self, embedded: ImageEmbedding, boxes: Any) -> PreparedImage:
        """An ``ImageEmbedding`` as a prepared image whose graphs have run."""
        device = self.backend.device
        embedded.check_made_by(self.backend, "image")
        user_boxes = None if boxes is None else validate_boxes(boxes, embedded.height, embedded.width)
        if user_boxes is None and embedded.finder is None:
            raise ValueError("boxes: this embedding was made with embed(..., cellfinder=False); pass boxes= or "
                             "embed the image with cellfinder=True")
        finder = None if user_boxes is not None else FinderOutput(*(t.to(device) for t in embedded.finder))
        return PreparedImage(embedded.height, embedded.width, user_boxes, None, None,
                             embedding=embedded.embedding.to(device), finder=finder)

    def _release_host_memory(self) -> None:
        # On the CPU the graphs' activations were host memory: give the freed pages back
        # before the next call's encoder peak (on a GPU the host side is small).
        if self.backend.device.type == "cpu":
            release_freed_host_memory()


def spatial_shape(image: Any, channel_axis: int | None) -> tuple[int, int] | None:
    """(H, W) of an image, or None for input the whole-image path rejects (it says why)."""
    try:
        return ImageSource(image, channel_axis).shape
    except (ValueError, TypeError):
        return None


def check_whole_image_memory(shape: tuple[int, int] | None, what: str, remedy: str) -> None:
    """MemoryError, before any work, when an image as one model input cannot fit in host
    memory (``memory.WHOLE_IMAGE_BYTES_PER_PIXEL``); ``what`` takes the height and width."""
    if shape is not None:
        memory.check_host_memory(shape[0] * shape[1] * memory.WHOLE_IMAGE_BYTES_PER_PIXEL, what.format(*shape), remedy)
