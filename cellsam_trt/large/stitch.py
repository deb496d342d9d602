"""Stitching tiles into one label image: which tile keeps each cell, and painting.

The rule: "each cell comes from the tile where it is most central". The cores of the
tiles (the part of each tile closer to its own centre than to its neighbours', split at the
middle of each overlap) partition the image. A tile keeps a cell only when the cell's
centroid lies in its core, so every cell is taken from exactly one tile, and from the one
that sees it with the most context around it. A cell whose extent from its centroid is less
than O/2 lies wholly inside that tile, so it is never cut; a neighbour's view of the same
cell (whole or cut at the neighbour's edge) has its centroid outside the neighbour's core
and is dropped, so it is never duplicated. Where kept cells of two tiles claim the same
pixel, the tile whose core holds the pixel wins, otherwise the earlier tile in raster order.

We chose this over the released WSI code's IoU merging in the overlap because (1) it needs
no threshold (but the IoU that pairs two views of one cell in the band below) and cannot
chain unrelated cells into one label, (2) the decision is local to
one tile (but for the band below, settled from small per-cell tables), so stitching is a
single pass that can run chunk by chunk (dask, zarr) without a global graph of label
pairs, and (3) a cell is never a union of two partial predictions.
The price is a size limit: cells larger than the overlap can be cut; their number is
reported (``TiledDetails.cut_cells``) with a warning to raise ``overlap``.

Two views of one cell are not identical (each tile sees other context), so for a cell
whose centroid lies within a few pixels of a core boundary the two tiles may disagree on
the side: both would keep it (two halves, split at the boundary) or neither (a lost cell).
Cells whose centroid lies within ``band_width`` (overlap / 4) of an inner core boundary
are therefore matched across tiles by mask IoU (> 0.5) and each matched cell is kept
once, from the tile that has it inside its core, the deepest if several do
(``resolve_band``).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .grid import Tile, TileGrid

# labels are int32 like segment()'s up to this many cells, uint32 above
INT32_MAX_CELLS = 65535


@dataclass
class TileResult:
    """The cells one tile keeps.

    Attributes:
        index: tile index in the grid.
        labels: (h, w) int32 window labels holding only the kept cells, numbered 1..count
            (None once written elsewhere, e.g. to zarr).
        count: number of kept cells.
        boxes: (count, 4) float32 prompt box of each kept cell, x1, y1, x2, y2 in image pixels
            (NaN where no box maps to the cell).
        scores, iou: (count,) float32 CellFinder score (NaN for user boxes) and predicted IoU.
        cut: (count,) bool, the cell touches a tile edge inside the image (it may be cut).
        num_candidates: boxes this tile sent to the decoder.
        inside: (count,) bool, the cell's centroid lies in the tile's core.
        depth: (count,) float64, how far (px) the centroid lies inside the core from its
            nearest inner boundary (negative: outside).
        band: {cell: (y0, x0, mask)} the cells whose centroid lies within ``band_width`` px of an
            inner core boundary, their masks cropped to their bounding box (image pixels);
            ``resolve_band`` matches them with the neighbours' views.
        lut: candidate id -> kept id (0: dropped), set by ``resolve_band``.

    Before ``resolve_band`` the cells are the tile's candidates (centroid in the core or
    within the band around it); after it, the cells the tile keeps.
    """

    index: int
    labels: np.ndarray | None
    count: int
    boxes: np.ndarray
    scores: np.ndarray
    iou: np.ndarray
    cut: np.ndarray
    num_candidates: int = 0
    inside: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    depth: np.ndarray = field(default_factory=lambda: np.zeros(0))
    band: dict[int, tuple[int, int, np.ndarray]] = field(default_factory=dict)
    lut: np.ndarray | None = None

    @classmethod
    def from_tile(cls, labels: np.ndarray, tile: Tile, grid: TileGrid, *, keep_all: bool = False,
                  details: Any = None) -> TileResult:
        """The candidates of one tile's segmentation (``tile_candidates``), before ``resolve_band``.

        Args:
            labels: (h, w) integer labels of the tile window.
            keep_all: keep every cell (user boxes: each box is decoded in one tile only).
            details: the tile's ``SegmentationDetails``: each cell's prompt box (moved to
                image pixels), score and IoU; None leaves them NaN.
        """
        kept, originals, cut, inside, depth, band = tile_candidates(
            np.asarray(labels), tile, grid.height, grid.width, keep_all, band_width(grid))
        count = len(originals)
        if details is None:
            boxes = np.full((count, 4), np.nan, np.float32)
            scores, iou = np.full(count, np.nan, np.float32), np.full(count, np.nan, np.float32)
            num_candidates = 0
        else:
            boxes, scores, iou = cell_table(details, originals)
            boxes = boxes + np.array([tile.x0, tile.y0, tile.x0, tile.y0], dtype=np.float32)
            num_candidates = details.num_candidates
        # the smallest integer type keeps the tiles that wait for resolve_band small
        kept = kept.astype(np.uint16) if count <= np.iinfo(np.uint16).max else kept
        return cls(index=tile.index, labels=kept, count=count, boxes=boxes, scores=scores, iou=iou, cut=cut,
                   num_candidates=num_candidates, inside=inside, depth=depth, band=band)

    def save(self, path: str | os.PathLike) -> None:
        """The cell table (everything but the labels) as .npz, atomically; no pickles."""
        from ..io import atomic_write

        ids = sorted(self.band)
        corners = np.array([[self.band[k][0], self.band[k][1], *self.band[k][2].shape] for k in ids],
                           np.int64).reshape(-1, 4)
        masks = np.concatenate([self.band[k][2].ravel() for k in ids]) if ids else np.zeros(0, bool)
        arrays = dict(index=self.index, count=self.count, num_candidates=self.num_candidates, boxes=self.boxes,
                      scores=self.scores, iou=self.iou, cut=self.cut, inside=self.inside, depth=self.depth,
                      band_ids=np.array(ids, np.int64), band_corners=corners, band_masks=masks)
        atomic_write(path, lambda tmp: np.savez(tmp, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike) -> TileResult:
        """The table ``save`` wrote (the labels stay where they were written: ``labels`` is None)."""
        with np.load(path, allow_pickle=False) as z:
            band, start = {}, 0
            for k, (y0, x0, h, w) in zip(z["band_ids"].tolist(), z["band_corners"].tolist()):
                band[k] = (y0, x0, z["band_masks"][start:start + h * w].reshape(h, w))
                start += h * w
            return cls(index=int(z["index"]), labels=None, count=int(z["count"]), boxes=z["boxes"],
                       scores=z["scores"], iou=z["iou"], cut=z["cut"], num_candidates=int(z["num_candidates"]),
                       inside=z["inside"], depth=z["depth"], band=band)


def band_width(grid: TileGrid) -> float:
    """How far (px) from a core boundary two tiles' views of one cell may put its centroid
    on different sides: a quarter of the overlap, at least 2 px (0 without overlap)."""
    return 0.0 if grid.overlap == 0 else max(2.0, grid.overlap / 4)


def tile_candidates(labels: np.ndarray, tile: Tile, height: int, width: int, keep_all: bool = False,
                    band: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
    """The cells a tile may keep: centroid in its core, or within ``band`` px around it.

    Args:
        labels: (h, w) integer labels of the tile window (0 background).
        tile: the tile (window and core in image pixels).
        height, width: image size (tile edges on the image border cut nothing).
        keep_all: keep every cell (user boxes: each box is decoded in one tile only).
        band: width (px) of the band around inner core boundaries (``band_width``).

    Returns:
        labels (h, w) int32 with the candidates renumbered 1..k in increasing label order,
        their original labels (k,), whether each touches an inner tile edge (k,) bool,
        whether its centroid is in the core (k,) bool, the centroid's depth inside the core
        (k,) float64, and {candidate: (y0, x0, mask crop)} for the candidates in the band.
    """
    if labels.shape != tile.shape:
        raise ValueError(f"labels: expected the tile's shape {tile.shape}, got {labels.shape}")
    flat = labels.ravel().astype(np.int64)
    n = int(flat.max()) + 1 if flat.size else 1
    counts = np.bincount(flat, minlength=n)
    ys, xs = np.divmod(np.arange(flat.size), labels.shape[1])
    cy = np.bincount(flat, weights=ys, minlength=n) / np.maximum(counts, 1) + tile.y0
    cx = np.bincount(flat, weights=xs, minlength=n) / np.maximum(counts, 1) + tile.x0
    present = counts > 0
    present[0] = False
    inside = (cy >= tile.cy0) & (cy < tile.cy1) & (cx >= tile.cx0) & (cx < tile.cx1)
    # distance to the core's inner boundaries only: beyond the image border no tile competes
    sides = [cy - tile.cy0 if tile.cy0 > 0 else np.inf, tile.cy1 - cy if tile.cy1 < height else np.inf,
             cx - tile.cx0 if tile.cx0 > 0 else np.inf, tile.cx1 - cx if tile.cx1 < width else np.inf]
    depth = np.minimum.reduce([np.broadcast_to(side, cy.shape) for side in sides])
    if keep_all:
        keep = present
        in_band = np.zeros(n, bool)
    else:
        in_band = present & (np.abs(depth) < band)
        keep = present & (inside | in_band)
    kept = np.flatnonzero(keep)
    lut = np.zeros(n, dtype=np.int32)
    lut[kept] = np.arange(1, len(kept) + 1, dtype=np.int32)
    out = lut[labels]
    # edges of the window that lie inside the image: a cell touching one may continue outside
    edge = np.zeros(n, dtype=bool)
    if tile.y0 > 0:
        edge[np.unique(labels[0])] = True
    if tile.y1 < height:
        edge[np.unique(labels[-1])] = True
    if tile.x0 > 0:
        edge[np.unique(labels[:, 0])] = True
    if tile.x1 < width:
        edge[np.unique(labels[:, -1])] = True
    crops = {}
    if in_band.any():
        from scipy.ndimage import find_objects

        windows = find_objects(out)
        for original in np.flatnonzero(in_band):
            k = int(lut[original])
            wy, wx = windows[k - 1]
            crops[k] = (tile.y0 + wy.start, tile.x0 + wx.start, out[wy, wx] == k)
    return out, kept, edge[kept], inside[kept], depth[kept], crops


def _mask_iou(a: tuple[int, int, np.ndarray], b: tuple[int, int, np.ndarray]) -> float:
    (ay, ax, am), (by, bx, bm) = a, b
    y0, x0 = max(ay, by), max(ax, bx)
    y1, x1 = min(ay + am.shape[0], by + bm.shape[0]), min(ax + am.shape[1], bx + bm.shape[1])
    if y0 >= y1 or x0 >= x1:
        return 0.0
    inter = np.count_nonzero(am[y0 - ay:y1 - ay, x0 - ax:x1 - ax] & bm[y0 - by:y1 - by, x0 - bx:x1 - bx])
    return inter / (np.count_nonzero(am) + np.count_nonzero(bm) - inter)


def resolve_band(results: Sequence[TileResult], match_iou: float = 0.5, bucket: int = 64) -> None:
    """Decide which candidates each tile keeps, in place (sets ``lut``, filters the tables).

    A cell near a core boundary lies whole in both tiles, and the two views' centroids can
    fall on different sides of the boundary: by the centroid rule alone both tiles would
    keep it (two halves, split where the cores meet) or neither would (a lost cell). So the
    band candidates of different tiles whose masks overlap with IoU > ``match_iou`` are
    taken as one cell, and that cell keeps one view: one whose centroid lies in its own
    tile's core if there is one, the deepest in its core among those (ties: the earlier
    tile). Every other candidate is kept where its centroid lies in the core, as before.
    The decision depends only on the tables, so the single-process and dask paths make the
    same one.
    """
    entries = [(i, k, crop) for i, r in enumerate(results) for k, crop in sorted(r.band.items())]
    keep = [r.inside.copy() for r in results]
    parent = list(range(len(entries)))

    def root(e: int) -> int:
        while parent[e] != e:
            parent[e] = parent[parent[e]]
            e = parent[e]
        return e

    buckets: dict[tuple[int, int], list[int]] = {}
    for e, (_, _, (y0, x0, mask)) in enumerate(entries):
        for by in range(y0 // bucket, (y0 + mask.shape[0] - 1) // bucket + 1):
            for bx in range(x0 // bucket, (x0 + mask.shape[1] - 1) // bucket + 1):
                buckets.setdefault((by, bx), []).append(e)
    tested = set()
    for members in buckets.values():
        for a_pos, a in enumerate(members):
            for b in members[a_pos + 1:]:
                if entries[a][0] == entries[b][0] or (a, b) in tested:
                    continue
                tested.add((a, b))
                if _mask_iou(entries[a][2], entries[b][2]) > match_iou:
                    parent[root(b)] = root(a)
    groups: dict[int, list[int]] = {}
    for e in range(len(entries)):
        groups.setdefault(root(e), []).append(e)

    def rank(e: int) -> tuple[bool, float]:
        r, k = results[entries[e][0]], entries[e][1] - 1
        return bool(r.inside[k]), float(r.depth[k])

    for members in groups.values():
        if len(members) < 2:
            continue
        # inside its core beats outside (the half-open core decides a centroid on the
        # boundary), then the deeper view; entries are in tile order, so max() keeps the
        # earlier tile on ties
        best = max(members, key=rank)
        for e in members:
            i, k, _ = entries[e]
            keep[i][k - 1] = e == best

    for r, kept in zip(results, keep):
        lut = np.zeros(r.count + 1, dtype=np.int32)
        lut[1:][kept] = np.arange(1, int(kept.sum()) + 1, dtype=np.int32)
        r.lut = lut
        r.count = int(kept.sum())
        r.boxes, r.scores, r.iou, r.cut = r.boxes[kept], r.scores[kept], r.iou[kept], r.cut[kept]
        r.inside, r.depth = r.inside[kept], r.depth[kept]
        r.band = {}


def paint_tile(out: np.ndarray, origin: tuple[int, int], kept: np.ndarray, tile: Tile, offset: int,
               lut: np.ndarray | None = None) -> None:
    """Paint a tile's kept cells (ids 1..k -> offset+1..offset+k) into ``out``, in place.

    ``lut`` maps the ids in ``kept`` to 1..k first (0: not painted), as ``resolve_band`` sets.

    ``out`` covers the image region starting at ``origin`` (y, x); any region works, so the
    whole image and chunk-by-chunk painting give the same pixels when tiles are painted in
    raster order: inside the tile's core its cells overwrite, elsewhere they only fill
    background (the earliest tile wins there).
    """
    oy, ox = origin
    h, w = out.shape
    y0, y1 = max(tile.y0, oy), min(tile.y1, oy + h)
    x0, x1 = max(tile.x0, ox), min(tile.x1, ox + w)
    if y0 >= y1 or x0 >= x1:
        return
    src = kept[y0 - tile.y0:y1 - tile.y0, x0 - tile.x0:x1 - tile.x0]
    if lut is not None:
        src = lut[src]
    dst = out[y0 - oy:y1 - oy, x0 - ox:x1 - ox]
    fill = (src > 0) & (dst == 0)
    dst[fill] = src[fill].astype(out.dtype) + out.dtype.type(offset)
    cy0, cy1 = max(tile.cy0, y0), min(tile.cy1, y1)
    cx0, cx1 = max(tile.cx0, x0), min(tile.cx1, x1)
    if cy0 < cy1 and cx0 < cx1:
        csrc = src[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
        cdst = dst[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
        own = csrc > 0
        cdst[own] = csrc[own].astype(out.dtype) + out.dtype.type(offset)


def label_dtype(count: int) -> np.dtype:
    """int32 (as ``segment``) for up to 65535 cells, uint32 above."""
    return np.dtype(np.int32) if count <= INT32_MAX_CELLS else np.dtype(np.uint32)


def compaction_table(present: np.ndarray, total: int) -> np.ndarray | None:
    """Ids 0..total that still have pixels -> consecutive ids; None when nothing is missing."""
    keep = np.zeros(total + 1, dtype=bool)
    keep[present] = True
    keep[0] = True
    if keep.all():
        return None
    lut = np.cumsum(keep) - 1
    lut[~keep] = 0
    return lut.astype(np.uint32)


def stitch_tiles(grid: TileGrid, tile_labels: Sequence[np.ndarray], *, keep_all: bool = False) -> np.ndarray:
    """Per-tile label images -> one label image (the rule in the module docstring).

    Args:
        grid: the tiling.
        tile_labels: one (h, w) integer label image per tile, in grid order, each labelling
            the tile's window independently (ids may repeat between tiles).
        keep_all: keep every cell of every tile (no core selection).

    Returns:
        (H, W) labels, ids 1..K unique over the image in tile raster order, int32 (uint32
        above 65535 cells).
    """
    if len(tile_labels) != len(grid):
        raise ValueError(f"tile_labels: expected {len(grid)} tiles, got {len(tile_labels)}")
    results = [TileResult.from_tile(lab, t, grid, keep_all=keep_all) for lab, t in zip(tile_labels, grid.tiles())]
    resolve_band(results)
    labels, _ = compact_labels(*paint_results(grid, results))
    return labels


def paint_results(grid: TileGrid, results: Sequence[TileResult]) -> tuple[np.ndarray, int]:
    """Paint resolved tile results (raster order, as the chunked dask stitching paints) into
    a whole (H, W) uint32 image; returns it and the number of ids handed out."""
    out = np.zeros((grid.height, grid.width), dtype=np.uint32)
    offset = 0
    for r in results:
        paint_tile(out, (0, 0), r.labels, grid.tile(r.index), offset, r.lut)
        offset += r.count
    return out, offset


def compact_labels(labels: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Renumber uint32 labels consecutively if ids lost all pixels; cast to the output dtype."""
    present = np.zeros(total + 1, dtype=bool)
    present[labels.ravel()] = True
    lut = compaction_table(np.flatnonzero(present), total)
    if lut is not None:
        labels = lut[labels]
    dtype = label_dtype(total)
    # values < 2**31: the bit pattern is the same int32
    return (labels.view(np.int32) if dtype == np.int32 else labels), lut


def cell_table(details: Any, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Box, score and IoU of the first decoded box whose mask became each of ``labels``."""
    boxes = np.full((len(labels), 4), np.nan, dtype=np.float32)
    scores = np.full(len(labels), np.nan, dtype=np.float32)
    iou = np.full(len(labels), np.nan, dtype=np.float32)
    first: dict[int, int] = {}
    for k, final in enumerate(np.asarray(details.labels_of_boxes).tolist()):
        if final > 0 and final not in first:
            first[final] = k
    for row, label in enumerate(np.asarray(labels).tolist()):
        k = first.get(label)
        if k is not None:
            boxes[row] = details.boxes[k]
            scores[row] = details.scores[k]
            iou[row] = details.iou[k]
    return boxes, scores, iou


@dataclass
class TiledDetails:
    """What ``segment_large(return_details=True)`` returns beside the labels.

    Row k of the per-cell arrays describes label k + 1.

    Attributes:
        boxes: (K, 4) float32 prompt box (x1, y1, x2, y2, image pixels) whose mask became
            the label (NaN if none, e.g. a mask merged by hole filling).
        scores: (K,) float32 CellFinder score (NaN for user boxes).
        iou: (K,) float32 predicted mask IoU.
        tile_of_cell: (K,) int32 tile the cell was taken from (-1: image not tiled).
        grid: the tiling (None when the image fit in one tile).
        num_candidates: boxes sent to the decoder over all tiles.
        cut_cells: kept cells touching an inner tile edge (possibly cut: raise ``overlap``).
        timings: seconds per stage (normalize, tiles, stitch).
    """

    boxes: np.ndarray
    scores: np.ndarray
    iou: np.ndarray
    tile_of_cell: np.ndarray
    grid: TileGrid | None
    num_candidates: int
    cut_cells: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_cells(self) -> int:
        return len(self.iou)

    @property
    def path(self) -> str:
        """"tiled", or "whole" when the image fit in one tile."""
        return "whole" if self.grid is None else "tiled"

    @property
    def num_tiles(self) -> int:
        return 1 if self.grid is None else len(self.grid)


def details_from_segmentation(labels: np.ndarray, details: Any) -> TiledDetails:
    """``SegmentationDetails`` of an untiled image -> ``TiledDetails`` (one row per label 1..max)."""
    ids = np.arange(1, int(labels.max()) + 1 if labels.size else 1)
    boxes, scores, iou = cell_table(details, ids)
    return TiledDetails(boxes=boxes, scores=scores, iou=iou, tile_of_cell=np.full(len(ids), -1, np.int32), grid=None,
                        num_candidates=details.num_candidates, cut_cells=0, timings=dict(details.timings))


def combine_tables(tables: Sequence[TileResult], lut: np.ndarray | None, grid: TileGrid, total: int,
                    timings: dict[str, float]) -> TiledDetails:
    """Per-tile cell tables (tile order = id order) -> one row per final label."""
    def cat(name, shape, dtype):
        parts = [getattr(t, name) for t in tables]
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(shape, dtype)

    boxes = cat("boxes", (0, 4), np.float32)
    scores = cat("scores", (0,), np.float32)
    iou = cat("iou", (0,), np.float32)
    cut = cat("cut", (0,), bool)
    tile_of = np.concatenate([np.full(t.count, t.index, np.int32) for t in tables]) if tables else np.zeros(0, np.int32)
    if lut is not None:
        alive = lut[1:total + 1] > 0
        boxes, scores, iou, cut, tile_of = boxes[alive], scores[alive], iou[alive], cut[alive], tile_of[alive]
    return TiledDetails(boxes=boxes, scores=scores, iou=iou, tile_of_cell=tile_of, grid=grid,
                        num_candidates=sum(t.num_candidates for t in tables), cut_cells=int(cut.sum()), timings=timings)
