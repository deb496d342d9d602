"""One tiled run's plan and phases: which tiles, which user boxes each tile decodes, the
tile batches, one batch through a session, which tile keeps each cell, the cell table.

``tiling.segment_large`` runs the phases in this process; ``streamed.segment_streamed``
runs them as tasks (dask workers or this process with scratch zarr stores).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..engine.core import validate_boxes
from ..engine.options import SegmentOptions
from ..engine.source import ImageSource
from .grid import Tile, TileGrid
from .normalize import (
    ChannelNorm,
    scale_clahe,
)
from .stitch import (
    TiledDetails,
    TileResult,
    combine_tables,
    resolve_band,
)

log = logging.getLogger(__name__)


def tile_batches(tiles: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive groups of tile indices (raster order); the same grouping everywhere makes
    the single-process and dask paths run identical batched graph calls."""
    tiles = list(tiles)
    return [tiles[i:i + batch_size] for i in range(0, len(tiles), batch_size)]


def assign_boxes(grid: TileGrid, boxes: np.ndarray) -> dict[int, np.ndarray]:
    """User boxes (N, 4) x1, y1, x2, y2 in image pixels -> {tile index: boxes in tile pixels}.

    Each box goes to the tile whose core holds its centre (a centre beyond the image's edge
    counts as on the edge) and is clipped to that tile's window where the window meets
    another tile (a box larger than the overlap allows is cut; a warning says how many).
    Where the window's side is the image's edge the box is left as given, reaching past the
    edge as the whole-image path passes it to the prompt encoder (CellFinder's own boxes do).
    """
    if len(boxes) == 0:
        return {}
    owner = grid.owner((boxes[:, 1] + boxes[:, 3]) / 2, (boxes[:, 0] + boxes[:, 2]) / 2)
    out: dict[int, np.ndarray] = {}
    clipped = 0
    for index in np.unique(owner):
        t = grid.tile(int(index))
        local = boxes[owner == index] - np.array([t.x0, t.y0, t.x0, t.y0], dtype=np.float32)
        low_x, low_y = (0 if t.x0 > 0 else -np.inf), (0 if t.y0 > 0 else -np.inf)
        high_x = t.x1 - t.x0 if t.x1 < grid.width else np.inf
        high_y = t.y1 - t.y0 if t.y1 < grid.height else np.inf
        inside = np.clip(local, np.array([low_x, low_y] * 2), np.array([high_x, high_y] * 2)).astype(np.float32)
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

    ``tiling.segment_large`` runs the phases in this process; ``streamed.segment_streamed`` maps
    them over a runner's tasks (dask workers, or this process with bounded memory). Both get
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


