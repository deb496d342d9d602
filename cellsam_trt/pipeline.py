"""segment(): image -> preprocess -> backend graphs -> postprocess -> labels.

One encoder pass per image; every box goes through the decoder in batched calls; masks are
upsampled, thresholded and painted on the backend's device, only inside the windows where
they can be foreground.
"""
from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import memory
from .config import InferenceConfig
from .core import (  # noqa: F401  (SegmentationDetails and validate_boxes: kept importable from here)
    FinderOutput,
    GraphCore,
    PreparedImage,
    SegmentationDetails,
    Timer,
    validate_boxes,
)
from .memory import release_freed_host_memory
from .options import SegmentOptions
from .runtime.base import Backend

if TYPE_CHECKING:
    from .embedding import ImageEmbedding

log = logging.getLogger(__name__)


class NoCellsWarning(UserWarning):
    """segment() found nothing to label; the result is all zeros."""


class CellSAM:
    """A loaded CellSAM that segments many images without reloading weights.

    Safe to share between threads: preprocessing runs in parallel, the graph calls and mask
    painting of one image at a time (the device is the bottleneck, and TensorRT execution
    contexts must not be shared).

    >>> session = CellSAM.from_checkpoint("cellsam_general.pt", device="cuda")  # doctest: +SKIP
    >>> labels = session.segment(image)                                          # doctest: +SKIP

    Every segmenting method takes the call's settings (``SegmentOptions``: normalize,
    bbox_threshold, postprocess, remove_boundaries, chunk_size, channel_axis, tile_size,
    overlap, batch_size, block, progress) as keywords or as ``options=SegmentOptions(...)``.

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
        self.core = GraphCore(backend, self._device_lock)

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

    def segment(self, image: Any, *, boxes: Any = None, return_details: bool = False,
                options: SegmentOptions | None = None, **settings: Any,
                ) -> np.ndarray | tuple[np.ndarray, SegmentationDetails]:
        """Segment cells.

        Args:
            image: (H, W) or (H, W, C<=3) / (C, H, W), any real dtype. Channels fill the last
                slots of (blank, nuclear, whole-cell); a 2-D image is the whole-cell channel.
                Or an ``ImageEmbedding`` from ``embed``: no preprocessing and no encoder call
                (the options of those steps are the embedding's), the same labels.
            boxes: optional (N, 4) x1, y1, x2, y2 in image pixels; skips CellFinder.
            return_details: also return a ``SegmentationDetails``.
            options, **settings: the call's ``SegmentOptions`` (keywords replace its fields):
                bbox_threshold: CellFinder confidence weight (default 0.4).
                normalize: percentile clip + CLAHE first: True (scikit-image CLAHE, as the
                    released default) or "opencv" (OpenCV's CLAHE: 2-3x faster on that step,
                    not bit-identical; ``cellsam-trt bench`` reports the deviation). With
                    False, the image must already lie in [0, 1].
                postprocess: the released optional morphological clean-up.
                remove_boundaries: zero a one-pixel outline around each cell.
                chunk_size: boxes per decoder call (default: the backend's, 256; 4 for torch
                    on the CPU).
                channel_axis: axis of the channels for 3-D input (default: the smallest axis).
                progress: show a progress bar over decoder chunks (over tiles when tiled).
                tile_size, overlap: an image with a side longer than ``tile_size`` (default
                    1024, the model input) is segmented in overlapping tiles at native scale
                    and stitched (``tiling.segment_large``, as the CLI does; memory bounded,
                    see its ``stream``), instead of being resized into one model input where
                    cells would shrink below a pixel. ``tile_size=None`` forces the
                    whole-image path (the released code's behaviour, bit-identical to it).
                    With ``return_details`` the tiled path returns ``tiling.TiledDetails``
                    (``details.path == "tiled"``).
                batch_size, block: tiles per graph call and the normalisation's region
                    side on the tiled path.

        Returns:
            labels (H, W) int32: 0 background, cells 1..K (uint32 above 65535 cells on the
            tiled path). With ``return_details``, a tuple.
        """
        from .embedding import ImageEmbedding

        opts = SegmentOptions.of(options, **settings)
        if isinstance(image, ImageEmbedding):
            item = self._embedded_item(image, boxes)
            labels, details = self._run_one(item, Timer(self.backend), opts, return_details, release=False)
        else:
            shape = _spatial_shape(image, opts.channel_axis)
            if opts.tile_size is not None and shape is not None and max(shape) > opts.tile_size:
                from .tiling import segment_large

                return segment_large(self, image, boxes=boxes, return_details=return_details, options=opts)
            _check_whole_image_memory(shape, "segment() of a {}x{} image as one model input",
                                      "free memory" if opts.tile_size is not None else
                                      "leave tile_size at its default to segment it in tiles (memory then bounded "
                                      "by a few tiles)")
            timer = Timer(self.backend)
            with timer.stage("preprocess"):
                item = self.core.prepare(image, boxes, opts.clahe, opts.channel_axis)
            labels, details = self._run_one(item, timer, opts, return_details, release=True)
        if not labels.any():
            warnings.warn("No cells detected in the image; returning all-zero labels.", NoCellsWarning, stacklevel=2)
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
        key = image_key(image, opts.clahe, opts.channel_axis)
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
        _check_whole_image_memory(_spatial_shape(image, opts.channel_axis), "embed() of a {}x{} image",
                                  "free memory")
        # empty user boxes: prepare skips CellFinder's input
        item = self.core.prepare(image, None if cellfinder else np.zeros((0, 4), np.float32), opts.clahe,
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
        (``cellsam_trt.tiling``) and frames of a stack come here.

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
        for index, (image, user_boxes) in enumerate(zip(images, boxes)):
            with timers[index].stage("preprocess"):
                try:
                    items.append(self.core.prepare(image, user_boxes, opts.clahe, opts.channel_axis))
                except ValueError as err:
                    raise ValueError(f"images[{index}]: {err}") from None
        results = self.core.run(items, self.thresholds(opts), timers, postprocess=opts.postprocess,
                                remove_boundaries=opts.remove_boundaries, return_details=return_details)
        del items
        self._release_host_memory()
        out = []
        for i, result in enumerate(results):
            if warn_empty and not result.labels.any():
                warnings.warn(f"No cells detected in image {i} of the batch; returning all-zero labels.",
                              NoCellsWarning, stacklevel=2)
            out.append((result.labels, result.details) if return_details else result.labels)
        return out

    def segment_stack(self, stack: Any, *, axes: str | None = None, **options: Any) -> Any:
        """Segment every frame of a time-lapse / z-stack on its own, frames batched through the
        graphs: labels with the input's axes without C (e.g. (T, H, W) for axes "TCYX"), each
        frame labelled 1..K_f. See ``stack.segment_stack`` for the arguments."""
        from .stack import segment_stack

        return segment_stack(self, stack, axes=axes, **options)

    def thresholds(self, opts: SegmentOptions) -> InferenceConfig:
        """The session's ``InferenceConfig`` with a call's overrides; decoder chunks no larger
        than the backend takes."""
        inference = opts.thresholds(self.options)
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


def _spatial_shape(image: Any, channel_axis: int | None) -> tuple[int, int] | None:
    """(H, W) of an image, or None for input the whole-image path rejects (it says why)."""
    from .tile_grid import ImageSource

    try:
        return ImageSource(image, channel_axis).shape
    except (ValueError, TypeError):
        return None


def _check_whole_image_memory(shape: tuple[int, int] | None, what: str, remedy: str) -> None:
    """MemoryError, before any work, when an image as one model input cannot fit in host
    memory (``memory.WHOLE_IMAGE_BYTES_PER_PIXEL``); ``what`` takes the height and width."""
    if shape is not None:
        memory.check_host_memory(shape[0] * shape[1] * memory.WHOLE_IMAGE_BYTES_PER_PIXEL, what.format(*shape), remedy)



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
    return_details: bool = False,
    options: SegmentOptions | None = None,
    onnx_dir: Any = None,
    engine_dir: Any = None,
    cache: Any = None,
    build: bool | None = None,
    download: bool = False,
    **settings: Any,
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
        return_details: also return ``SegmentationDetails`` (``details.backend`` names the
            backend that ran).
        onnx_dir, engine_dir: use these export / engine folders instead of the cache.
        cache: artifact cache root (default ``$CELLSAM_TRT_CACHE`` or the user cache folder).
        build: allow making missing graphs / engines (default: yes, unless
            ``CELLSAM_TRT_NO_BUILD=1``).
        download: fetch the released weights when absent.
        options, **settings: the call's ``SegmentOptions`` (bbox_threshold, normalize,
            postprocess, remove_boundaries, chunk_size, channel_axis, tile_size, overlap,
            progress, ...), as ``CellSAM.segment``.

    Returns:
        labels (H, W) int32, or (labels, details).
    """
    session = _session_for(checkpoint, model, backend, device, onnx_dir, engine_dir, cache, build, download)
    return session.segment(image, boxes=boxes, return_details=return_details, options=options, **settings)


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
