"""Large images: overlapping tiles, batched graph calls, stitching into one label image.

Data flow (H, W the image size, T the tile side, O the overlap):

    image (H, W[, C]) array-like (numpy, zarr, memory-mapped TIFF/.npy)
      -> whole-image normalisation, computed in chunks (``fit_normalization`` + ``clahe_region``):
         bit-identical to ``preprocess.normalize_image`` on the whole image, so every tile
         sees the same pixel values as its neighbours in their overlap
      -> tiles T x T (``TileGrid``), B at a time through ``CellSAM.segment_batch``
         (one batched encoder call, one batched CellFinder call, then the usual per-image
         decoding and clean-up)
      -> per tile: the cells whose centroid lies in the tile's core or in a band around it
         (``tile_candidates``); band cells seen by two tiles are matched and kept once
         (``resolve_band``)
      -> paint the kept cells into the output with unique ids (``paint_tile``)
      -> labels (H, W) int32, or uint32 when more than 65535 cells

The parts live in their own modules: the tile grid in ``grid``, the chunked normalisation
in ``normalize``, the run's plan and phases in ``plan``, the stitching rule (which tile
keeps each cell, and why this rule rather than IoU merging) in ``stitch``, the run with
bounded memory in ``streamed``. This module runs them.

Defaults: T = 1024 is the model's input side, so tiles go through at native resolution
(no resizing); O = 128 keeps cells up to ~128 px across whole (typical cells in 10-40x
fluorescence are 10-60 px) at 1.3x the work of the untiled image. The released WSI path
cuts 400 px blocks with 56 px margins (512 px tiles, upsampled 2x to 1024): use
``tile_size=512, overlap=112`` for small cells (nuclei under ~15 px), at 4x the cost.
Images no larger than one tile go straight to ``CellSAM.segment``.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import replace
from typing import Any

import numpy as np

from ..engine import memory
from ..engine import preprocess as pre
from ..engine.core import warn_no_cells
from ..engine.options import SegmentOptions
from ..engine.source import ImageSource
from ..progress import progress_bar
from .grid import TileGrid
from .normalize import (
    normalize_large,
)
from .plan import TiledRun
from .stitch import (
    TiledDetails,
    TileResult,
    compact_labels,
    details_from_segmentation,
    paint_results,
)

log = logging.getLogger(__name__)



def segment_large(session: Any, image: Any, *, boxes: Any = None, return_details: bool = False,
                  output: str | os.PathLike | None = None, stream: bool | None = None,
                  options: SegmentOptions | None = None, **settings: Any,
                  ) -> np.ndarray | tuple[np.ndarray, TiledDetails]:
    """Segment an image of any size: tiles, batched graph calls, stitching (module docstring).

    Args:
        session: a ``CellSAM``.
        image: (H, W) or 3-D with <= 3 channels; a numpy array or a lazily read array-like
            (zarr, memmap, ``open_image``), read region by region.
        boxes: optional (N, 4) x1, y1, x2, y2 in image pixels (skips CellFinder; each box is
            decoded in the tile whose core holds its centre; tiles without boxes are skipped).
        return_details: also return ``TiledDetails``.
        output: a zarr group to write the labels to (``dask.segment_dask``'s layout), tile by
            tile: memory stays bounded by a few tiles plus the model whatever the image size,
            and the zarr ``labels`` array is returned instead of a numpy array. The store is
            a group, not the label array: read the labels later with
            ``zarr.open_group(output)["labels"]`` (or ``zarr.open(f"{output}/labels")``);
            beside them ``cells/boxes|scores|iou|tile`` (row k for label k + 1) and the run's
            settings and counts in the group's attributes.
        stream: run through scratch zarr stores on disk (``memory.tiled_host_bytes``) even
            without ``output``; None (default): when the in-memory run would need more than
            ``memory.STREAM_ABOVE_BYTES``. The labels are the same either way.
        options, **settings: the call's ``SegmentOptions`` (keywords replace its fields):
            tile_size: tile side T (default 1024, the model input: tiles run at native scale).
                Images with both sides <= T go to ``session.segment`` unchanged.
            overlap: minimum overlap O of neighbouring tiles (default 128): cells up to about
                O pixels across are never cut.
            batch_size: tiles per encoder / CellFinder call.
            normalize: whole-image percentile + CLAHE (True or "opencv", as ``segment``);
                False: image in [0, 1].
            bbox_threshold, postprocess, chunk_size: as ``CellSAM.segment``, applied per tile.
            remove_boundaries: zero a one-pixel outline around each cell (after stitching).
            channel_axis: channel axis of a 3-D image (default: the smallest axis).
            progress: a progress bar over tiles.
            block: side of the regions the normalisation works on (memory bound).

    Returns:
        labels (H, W): 0 background, 1..K unique over the image; int32, uint32 above 65535
        cells. With ``return_details``, (labels, details).

    Raises:
        MemoryError: before any work, when the estimated host memory exceeds what is
            available (the message gives both and what to do).
    """
    opts = SegmentOptions.of(options, **settings)
    source = ImageSource(image, opts.channel_axis)
    if opts.tile_size is None:
        raise ValueError("tile_size: segment_large needs a tile side (an integer >= 64), got None")
    if max(source.shape) <= opts.tile_size:
        # one tile: exactly segment()
        arr = image if isinstance(image, np.ndarray) else source.read(0, source.height, 0, source.width)
        axis = opts.channel_axis if isinstance(image, np.ndarray) else -1
        out = session.segment(arr, boxes=boxes, return_details=return_details,
                              options=replace(opts, channel_axis=axis, tile_size=None))
        if not return_details:
            return out
        labels, details = out
        return labels, details_from_segmentation(labels, details)

    run = TiledRun.plan(source, opts, boxes)
    estimate = memory.tiled_host_bytes(source.height, source.width, run.grid, opts.batch_size,
                                       normalized=opts.clahe is not None)
    if stream is None:
        stream = estimate["in_memory"] > memory.STREAM_ABOVE_BYTES
    if output is not None or stream:
        if output is None:
            memory.check_host_memory(estimate["streamed"], f"segment_large of a {source.height}x{source.width} image",
                                     "pass output='labels.zarr' to write the labels to disk instead of returning them")
        return _segment_streamed(session, image, output, boxes=boxes, return_details=return_details, options=opts)
    memory.check_host_memory(estimate["in_memory"], f"segment_large of a {source.height}x{source.width} image",
                             "pass output='labels.zarr' to write the labels to disk tile by tile")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    clahe, norm = normalize_large(source, opts.block, opts.clahe) if opts.clahe is not None else (None, None)
    timings["normalize"] = time.perf_counter() - t0
    read_tile = run.reader(clahe, norm)

    t0 = time.perf_counter()
    tables: list[TileResult] = []
    batches = run.batches()
    bar = _bar(sum(map(len, batches)), opts.progress)
    for batch in batches:
        tables += run.segment_tiles(session, batch, read_tile)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    timings["tiles"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    _, total = run.resolve(tables)
    out, _ = paint_results(run.grid, tables)
    for result in tables:
        result.labels = None
    if opts.remove_boundaries:
        from ..engine.postprocess import remove_boundaries as outline

        out = outline(out)
    labels, lut = compact_labels(out, total)
    details = run.details(tables, lut, total, timings)
    timings["stitch"] = time.perf_counter() - t0
    if not labels.any():
        warn_no_cells("the image")
    return (labels, details) if return_details else labels


def streams_by_default(height: int, width: int, tile_size: int, overlap: int, batch_size: int,
                       normalize: bool | str = True) -> bool:
    """Whether ``segment_large`` (without ``output`` or ``stream``) goes through scratch zarr
    stores: the image is larger than one tile and its in-memory run would need more than
    ``memory.STREAM_ABOVE_BYTES`` (``memory.tiled_host_bytes``)."""
    if max(height, width) <= tile_size:
        return False
    grid = TileGrid.plan(height, width, tile_size, overlap)
    normalized = pre.clahe_method(normalize) is not None
    return memory.tiled_host_bytes(height, width, grid, batch_size, normalized)["in_memory"] > memory.STREAM_ABOVE_BYTES


def _segment_streamed(session: Any, image: Any, output: Any, *, boxes: Any, return_details: bool,
                      options: SegmentOptions) -> Any:
    """``segment_large`` through ``streamed.segment_streamed``'s tasks, in this process.

    With ``output``: the zarr labels (and details) stay there. Without: the run goes to a
    temporary folder and the labels come back as a numpy array.
    """
    try:
        import zarr

        if int(zarr.__version__.split(".")[0]) < 3:
            raise ImportError(f"zarr {zarr.__version__} is installed")
    except ImportError as err:
        raise ImportError(f"segmenting this image with bounded memory writes scratch zarr stores and needs zarr 3 "
                          f"({err}): pip install 'zarr>=3' (Python >= 3.11), or pass stream=False if it fits "
                          "in memory") from None
    from .streamed import segment_streamed
    from .workers import InProcessClient

    with InProcessClient(session) as client, tempfile.TemporaryDirectory(prefix="cellsam-trt-tiles-") as scratch:
        target = output if output is not None else os.path.join(scratch, "run.zarr")
        labels, details = segment_streamed(image, client, output=target, boxes=boxes, return_details=True,
                                             options=options)
        if output is None:
            labels = np.asarray(labels[...])
    if details.num_cells == 0:  # as the in-memory run warns
        warn_no_cells("the image", stacklevel=4)
    return (labels, details) if return_details else labels


def _bar(total: int, enabled: bool):
    return progress_bar(total, "tiles", "tile", enabled)
