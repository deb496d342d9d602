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

The parts live in their own modules: the tile grid and region reading in ``tile_grid``,
the chunked normalisation in ``large_normalize``, the stitching rule (which tile keeps each
cell, and why this rule rather than IoU merging) in ``stitch``. This module runs them.

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
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import memory
from . import preprocess as pre
from .core import validate_boxes
from .io import IMAGE_SUFFIXES, LAZY_TIFF_BYTES, read_image  # noqa: F401  (file reading lives in io; names kept here)
from .large_normalize import (  # noqa: F401  (the normalisation's names, kept importable from here)
    CLAHE_KERNEL,
    CLAHE_MARGIN_KERNELS,
    PERCENTILE,
    ChannelNorm,
    channel_statistics,
    clahe_region,
    finish_normalization,
    finish_statistics,
    fit_normalization,
    merge_statistics,
    normalize_large,
    percentile_of_top,
    region_extremes,
    scale_clahe,
    top_count,
)
from .options import SegmentOptions, check_tiling  # noqa: F401  (check_tiling: kept importable from here)
from .stitch import (  # noqa: F401  (the stitching's names, kept importable from here)
    INT32_MAX_CELLS,
    TiledDetails,
    TileResult,
    band_width,
    cell_table,
    combine_tables,
    compact_labels,
    compaction_table,
    details_from_segmentation,
    label_dtype,
    paint_results,
    paint_tile,
    resolve_band,
    stitch_tiles,
    tile_candidates,
)
from .tile_grid import ImageSource, Tile, TileGrid, open_image, regions  # noqa: F401

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------- tile segmentation

def tile_batches(tiles: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive groups of tile indices (raster order); the same grouping everywhere makes
    the single-process and dask paths run identical batched graph calls."""
    tiles = list(tiles)
    return [tiles[i:i + batch_size] for i in range(0, len(tiles), batch_size)]


def assign_boxes(grid: TileGrid, boxes: np.ndarray) -> dict[int, np.ndarray]:
    """User boxes (N, 4) x1, y1, x2, y2 in image pixels -> {tile index: boxes in tile pixels}.

    Each box goes to the tile whose core holds its centre and is clipped to that tile's
    window (a box larger than the overlap allows is cut; a warning says how many).
    """
    if len(boxes) == 0:
        return {}
    owner = grid.owner((boxes[:, 1] + boxes[:, 3]) / 2, (boxes[:, 0] + boxes[:, 2]) / 2)
    out: dict[int, np.ndarray] = {}
    clipped = 0
    for index in np.unique(owner):
        t = grid.tile(int(index))
        local = boxes[owner == index] - np.array([t.x0, t.y0, t.x0, t.y0], dtype=np.float32)
        limit = np.array([t.x1 - t.x0, t.y1 - t.y0] * 2, dtype=np.float32)
        inside = np.clip(local, 0, limit)
        clipped += int((inside != local).any(axis=1).sum())
        out[int(index)] = inside
    if clipped:
        log.warning("%d boxes reach beyond the tile that holds their centre and were clipped to it; "
                    "raise overlap to keep them whole", clipped)
    return out


def segment_tile_batch(session: Any, grid: TileGrid, indices: Sequence[int], read_tile: Callable[[Tile], np.ndarray],
                       tile_boxes: dict[int, np.ndarray] | None = None, *, options: SegmentOptions | None = None,
                       **settings: Any) -> list[TileResult]:
    """Segment a batch of tiles with one batched encoder / CellFinder call and keep their core cells.

    Args:
        session: a ``CellSAM``.
        grid: the tiling; indices: tiles of this batch.
        read_tile: tile -> normalised (h, w, 3) float image in [0, 1].
        tile_boxes: user boxes per tile in tile pixels (then every decoded cell is kept).
        options, **settings: the run's ``SegmentOptions``; the tiles take its bbox_threshold,
            chunk_size and postprocess (they are normalised already, and outlines are drawn
            after stitching).
    """
    opts = replace(SegmentOptions.of(options, **settings), normalize=False, channel_axis=-1, remove_boundaries=False,
                   progress=False)
    tiles = [grid.tile(i) for i in indices]
    images = [read_tile(t) for t in tiles]
    boxes = None if tile_boxes is None else [tile_boxes.get(t.index, np.zeros((0, 4), np.float32)) for t in tiles]
    outputs = session.segment_batch(images, boxes=boxes, return_details=True, warn_empty=False, options=opts)
    return [TileResult.from_tile(labels, t, grid, keep_all=tile_boxes is not None, details=details)
            for t, (labels, details) in zip(tiles, outputs)]


@dataclass(frozen=True)
class TiledRun:
    """One tiled segmentation: the plan and its phases, wherever they run.

    ``segment_large`` runs the phases in this process; ``scale.segment_dask`` maps them over
    dask workers (or, for a run with bounded memory, ``InProcessClient``'s tasks). Both get
    the same tiles, batches, per-tile results and stitching, hence the same labels.

    Attributes:
        source: the image, read region by region.
        grid: the tiles.
        options: the call's settings.
        tile_boxes: user boxes per tile in tile pixels (``assign_boxes``), or None (CellFinder).
    """

    source: ImageSource
    grid: TileGrid
    options: SegmentOptions
    tile_boxes: dict[int, np.ndarray] | None = None

    @classmethod
    def plan(cls, source: ImageSource, options: SegmentOptions, boxes: Any = None) -> TiledRun:
        """Tiles for ``source`` (``options.tile_size`` / ``overlap``) and the user boxes per
        tile (validated against the image)."""
        if options.tile_size is None:
            raise ValueError("tile_size: a tiled run needs a tile side (an integer >= 64), got None")
        grid = TileGrid.plan(source.height, source.width, options.tile_size, options.overlap)
        user_boxes = None if boxes is None else validate_boxes(boxes, source.height, source.width)
        return cls(source, grid, options, None if user_boxes is None else assign_boxes(grid, user_boxes))

    @property
    def active(self) -> list[int]:
        """Tiles that are segmented: all, or with user boxes those that hold any."""
        return list(range(len(self.grid))) if self.tile_boxes is None else sorted(self.tile_boxes)

    def batches(self) -> list[list[int]]:
        """The tile batches, in raster order (``tile_batches``)."""
        return tile_batches(self.active, self.options.batch_size)

    def reader(self, clahe: Any = None, norm: Sequence[ChannelNorm] | None = None) -> Callable[[Tile], np.ndarray]:
        """tile -> its normalised pixels: from the whole image's CLAHE output ``clahe`` (an
        (H, W, 3) uint16 array-like: numpy or zarr) and ``norm``, or, without normalisation,
        from the image itself."""
        if clahe is None:
            return lambda t: self.source.read(t.y0, t.y1, t.x0, t.x1)
        return lambda t: scale_clahe(np.asarray(clahe[t.y0:t.y1, t.x0:t.x1]), norm)

    def segment_tiles(self, session: Any, batch: Sequence[int], read_tile: Callable[[Tile], np.ndarray]
                      ) -> list[TileResult]:
        """Phase 2: one batch of tiles through ``session`` (``segment_tile_batch``)."""
        boxes = None if self.tile_boxes is None else {i: self.tile_boxes[i] for i in batch if i in self.tile_boxes}
        return segment_tile_batch(session, self.grid, batch, read_tile, boxes, options=self.options)

    def resolve(self, tables: Sequence[TileResult]) -> tuple[dict[int, int], int]:
        """Phase 3: which tile keeps each cell (``resolve_band``, in place); returns each
        tile's id offset (raster order = id order) and the number of ids handed out."""
        resolve_band(tables)
        offsets, total = {}, 0
        for r in tables:
            if r.count:
                offsets[r.index] = total
            total += r.count
        return offsets, total

    def details(self, tables: Sequence[TileResult], lut: np.ndarray | None, total: int,
                timings: dict[str, float]) -> TiledDetails:
        """Phase 4: one row per final label (``lut``: the renumbering, None if none), with a
        warning when kept cells touch an inner tile edge."""
        details = combine_tables(tables, lut, self.grid, total, timings)
        if details.cut_cells:
            log.warning("%d cells touch an inner tile edge in the tile they were taken from and may be cut; "
                        "raise overlap (now %d) above the largest cell diameter", details.cut_cells,
                        self.options.overlap)
        return details


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
        output: a zarr group to write the labels to (``scale.segment_dask``'s layout), tile by
            tile: memory stays bounded by a few tiles plus the model whatever the image size,
            and the zarr ``labels`` array is returned instead of a numpy array.
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
    from .pipeline import NoCellsWarning

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
        from .postprocess import remove_boundaries as outline

        out = outline(out)
    labels, lut = compact_labels(out, total)
    details = run.details(tables, lut, total, timings)
    timings["stitch"] = time.perf_counter() - t0
    if not labels.any():
        warnings.warn("No cells detected in the image; returning all-zero labels.", NoCellsWarning, stacklevel=2)
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
    """``segment_large`` through ``scale.segment_dask``'s phases, in this process.

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
    from . import scale
    from .pipeline import NoCellsWarning
    from .workers import InProcessClient

    with InProcessClient(session) as client, tempfile.TemporaryDirectory(prefix="cellsam-trt-tiles-") as scratch:
        target = output if output is not None else os.path.join(scratch, "run.zarr")
        labels, details = scale.segment_dask(image, client, output=target, boxes=boxes, return_details=True,
                                             options=options)
        if output is None:
            labels = np.asarray(labels[...])
    if details.num_cells == 0:  # as the in-memory run warns
        warnings.warn("No cells detected in the image; returning all-zero labels.", NoCellsWarning, stacklevel=3)
    return (labels, details) if return_details else labels


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="tiles", unit="tile")
