"""The entry points: ``segment()``, ``segment_stack()`` and ``CellSAM``, which decides per
image whether it is one model input (``engine.session``), tiles (``large.tiling``) or a
stack of frames (``stack``)."""
from __future__ import annotations

import inspect
import threading
from typing import Any

import numpy as np
import torch

from .engine.core import SegmentationDetails
from .engine.options import SegmentOptions
from .engine.session import Session, spatial_shape


class CellSAM(Session):
    """A loaded CellSAM that segments many images without reloading weights.

    Safe to share between threads: preprocessing runs in parallel, the graph calls and mask
    painting of one image at a time (the device is the bottleneck, and TensorRT execution
    contexts must not be shared).

    >>> session = CellSAM.from_checkpoint("cellsam_general.pt", device="cuda")  # doctest: +SKIP
    >>> labels = session.segment(image)                                          # doctest: +SKIP

    Every segmenting method takes the call's settings (``SegmentOptions``: normalize,
    bbox_threshold, postprocess, remove_boundaries, chunk_size, channel_axis, tile_size,
    overlap, batch_size, block, progress) as keywords or as ``options=SegmentOptions(...)``.
    The session's methods (``embed``, ``segment_batch``, ``thresholds``) are
    ``engine.session.Session``'s; ``segment`` adds the tiled path for large images, and
    ``segment_stack`` segments stacks.

    Args:
        backend: a ``Backend`` (torch, onnxruntime or tensorrt) holding the graphs.
        inference: default thresholds and chunk size (``InferenceConfig``; default: the
            released thresholds and the backend's ``default_chunk_size``).
    """

    def segment(self, image: Any, *, boxes: Any = None, return_details: bool = False,
                options: SegmentOptions | None = None, **settings: Any,
                ) -> np.ndarray | tuple[np.ndarray, SegmentationDetails]:
        """Segment cells.

        Args:
            image: (H, W) or (H, W, C<=3) / (C, H, W), any real dtype. Channels fill the last
                slots of (blank, nuclear, whole-cell); a 2-D image is the whole-cell channel.
                Or an ``io.ImageFile`` from ``read_image`` (array + the axes its file
                records: the channel axis comes from them; a file with T or Z axes goes to
                ``segment_stack``). Or an ``ImageEmbedding`` from ``embed``: no
                preprocessing and no encoder call (the options of those steps are the
                embedding's), the same labels.
            boxes: optional (N, 4) x1, y1, x2, y2 in image pixels; skips CellFinder.
            return_details: also return a ``SegmentationDetails``.
            options, **settings: the call's ``SegmentOptions`` (keywords replace its fields):
                bbox_threshold: CellFinder confidence weight (default 0.4).
                normalize: percentile clip + CLAHE first: True (the released algorithm;
                    on CUDA run on the GPU by its torch port once the session's start-up
                    check passes), "skimage" (on the host, bit-identical to the released
                    code), "torch" (the port, on the model's device) or "opencv" (OpenCV's
                    CLAHE: 2-3x faster on that step, not bit-identical; ``cellsam-trt
                    bench`` reports the deviation). With False, the image must already lie
                    in [0, 1].
                postprocess: the released optional morphological clean-up.
                remove_boundaries: zero a one-pixel outline around each cell.
                chunk_size: boxes per decoder call (default: the backend's, 256; 4 for torch
                    on the CPU).
                channel_axis: axis of the channels for 3-D input (default: the smallest axis).
                progress: show a progress bar over decoder chunks (over tiles when tiled).
                tile_size, overlap: an image with a side longer than ``tile_size`` (default
                    1024, the model input) is segmented in overlapping tiles at native scale
                    and stitched (``cellsam_trt.large.tiling.segment_large``, as the CLI does; memory bounded,
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
        from .engine.embedding import ImageEmbedding

        opts = SegmentOptions.of(options, **settings)
        image, opts = _file_image(image, opts)
        if not isinstance(image, ImageEmbedding):
            shape = spatial_shape(image, opts.channel_axis)
            if opts.tile_size is not None and shape is not None and max(shape) > opts.tile_size:
                from .large.tiling import segment_large

                return segment_large(self, image, boxes=boxes, return_details=return_details, options=opts)
        return super().segment(image, boxes=boxes, return_details=return_details, options=opts, warn_level=3)

    def segment_stack(self, stack: Any, *, axes: str | None = None, return_details: bool = False,
                      options: SegmentOptions | None = None, **settings: Any) -> Any:
        """Segment every frame of a time-lapse / z-stack on its own, frames batched through the
        graphs: labels with the input's axes without C (e.g. (T, H, W) for axes "TCYX"), each
        frame labelled 1..K_f. See ``stack.segment_stack`` for the arguments."""
        from .stack import segment_stack

        return segment_stack(self, stack, axes=axes, return_details=return_details, options=options, **settings)


def _file_image(image: Any, opts: SegmentOptions) -> tuple[Any, SegmentOptions]:
    """An ``io.ImageFile`` -> (its array, options with the channel axis its axes name); other
    input unchanged. An axis the file does not label is read as for a plain array (the
    smallest holds the channels), with an ``AxesGuessWarning`` where that could be wrong."""
    import warnings
    from dataclasses import replace

    from .axes import AxesGuessWarning, resolve_layout
    from .io import ImageFile

    if not isinstance(image, ImageFile):
        return image, opts
    channel_axis = opts.channel_axis if len(image.shape) > 2 else None
    layout = resolve_layout(image.shape, image.axes, channel_axis=channel_axis)
    if layout.is_stack:
        raise ValueError(f"image: {image.path} has stack axes {layout.axes} (shape {image.shape}); segment its "
                         "frames with segment_stack(image), or pass one frame")
    for message in layout.guessed:
        warnings.warn(f"{image.path}: {message}", AxesGuessWarning, stacklevel=4)
    array = image.array
    if not isinstance(array, np.ndarray) and (opts.tile_size is None or max(layout.plane_shape) <= opts.tile_size):
        # one model input: read whole (a lazily read file is read region by region only when tiled)
        array = np.asarray(array[(slice(None),) * len(image.shape)])
    return array, replace(opts, channel_axis=layout.channel_axis)


_SESSION_LOCK = threading.Lock()
_LAST_SESSION: dict[str, Any] = {}


def _loaded_session(checkpoint: Any, backend: str, device: Any, download: bool,
                    backend_options: dict[str, Any]) -> CellSAM:
    """The session for these arguments, loaded once and kept for the next ``segment()`` call.

    It is identified by the weights file (path, size and mtime: a rewritten file reloads),
    the backend, the resolved device and the backend options.
    """
    from .modeling.checkpoint import locate_checkpoint
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
    ``cellsam_trt.runtime.cache``); the session is kept, so later calls with the same arguments
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


# segment()'s keywords that choose the session; segment_stack takes the same ones, with
# segment()'s defaults (one signature to keep)
SESSION_KEYWORDS = ("checkpoint", "model", "backend", "device", "onnx_dir", "engine_dir", "cache", "build", "download")


def segment_stack(stack: Any, *, axes: str | None = None, return_details: bool = False,
                  options: SegmentOptions | None = None, **arguments: Any) -> Any:
    """Segment every frame of a time-lapse / z-stack on its own, with the session ``segment()`` uses.

    Args:
        stack: array-like, or an ``io.ImageFile`` from ``io.read_image`` (its axes are used).
        axes: one letter per dimension, e.g. "TYX", "ZYX", "TCYX" (T time, Z depth, C at most
            3 channels, Y, X).
        return_details: also return one details object per frame.
        options, **arguments: the session's keywords as ``segment`` takes them (checkpoint,
            model, backend, device, onnx_dir, engine_dir, cache, build, download), and the
            call's ``SegmentOptions`` as ``CellSAM.segment_stack`` (batch_size, progress,
            normalize, ...).

    Returns:
        labels int32 with the input's axes without C; each frame labelled 1..K_f.
    """
    defaults = inspect.signature(segment).parameters
    chosen = {name: arguments.pop(name, defaults[name].default) for name in SESSION_KEYWORDS}
    session = _session_for(**chosen)
    return session.segment_stack(stack, axes=axes, return_details=return_details, options=options, **arguments)
