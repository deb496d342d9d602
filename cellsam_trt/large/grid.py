"""The tile grid of a large image, and reading regions of it.

``TileGrid`` cuts an H x W image into overlapping square tiles of side T (overlap O) and
gives each tile a core: the part closer to its own centre than to its neighbours', split at
the middle of each overlap. The cores partition the image; ``stitch`` keeps each cell in
the tile whose core holds its centroid. ``ImageSource`` reads regions of any array-like
(numpy, zarr, memory-mapped TIFF / .npy) as formatted (h, w, 3) float64, so that a slide
larger than memory is read region by region.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ..engine.options import check_tiling

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tile:
    """One tile: its window [y0, y1) x [x0, x1) and its core [cy0, cy1) x [cx0, cx1) (image pixels)."""

    index: int
    row: int
    col: int
    y0: int
    y1: int
    x0: int
    x1: int
    cy0: int
    cy1: int
    cx0: int
    cx1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0


def _axis_plan(length: int, tile: int, overlap: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Tile starts along one axis (evenly spread, first 0, last length - tile) and the core
    boundaries (n + 1 values; core k = [b[k], b[k+1]), split at the middle of each overlap)."""
    if length <= tile:
        return (0,), (0, length)
    n = math.ceil((length - overlap) / (tile - overlap))
    span = length - tile
    # integer rounding of k * span / (n - 1): consecutive starts differ by at most tile - overlap
    starts = tuple((k * span + (n - 1) // 2) // (n - 1) for k in range(n))
    bounds = (0,) + tuple((starts[k] + starts[k - 1] + tile) // 2 for k in range(1, n)) + (length,)
    return starts, bounds


@dataclass(frozen=True)
class TileGrid:
    """Overlapping square tiles covering an H x W image.

    Tiles are square so that squashing them to the model input keeps the cells' aspect
    ratio: an image narrower than T gets tiles as wide as it is (and an overlap of at most
    half of that).

    Attributes:
        height, width: image size.
        tile_size, overlap: the tile side and minimum overlap between neighbouring tiles
            actually used (the requested T and O, reduced for images narrower than T; an
            image no larger than T is one tile of its own shape).
        starts_y, starts_x: tile starts per axis.
        bounds_y, bounds_x: core boundaries per axis (len(starts) + 1 values).
    """

    height: int
    width: int
    tile_size: int
    overlap: int
    starts_y: tuple[int, ...]
    starts_x: tuple[int, ...]
    bounds_y: tuple[int, ...]
    bounds_x: tuple[int, ...]

    @classmethod
    def plan(cls, height: int, width: int, tile_size: int = 1024, overlap: int = 128) -> TileGrid:
        """Plan tiles; ValueError naming the argument for invalid sizes."""
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 2:
                raise ValueError(f"{name}: expected an integer >= 2, got {value!r}")
        check_tiling(tile_size, overlap)
        height, width = int(height), int(width)
        if max(height, width) <= tile_size:
            # one tile, the whole image (squashed to the model input, as segment() does)
            return cls(height, width, max(height, width), 0, (0,), (0,), (0, height), (0, width))
        side = min(int(tile_size), height, width)
        overlap = min(int(overlap), side // 2)
        sy, by = _axis_plan(height, side, overlap)
        sx, bx = _axis_plan(width, side, overlap)
        return cls(height, width, side, overlap, sy, sx, by, bx)

    @property
    def tile_height(self) -> int:
        return min(self.tile_size, self.height)

    @property
    def tile_width(self) -> int:
        return min(self.tile_size, self.width)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of tiles."""
        return len(self.starts_y), len(self.starts_x)

    def __len__(self) -> int:
        return len(self.starts_y) * len(self.starts_x)

    def tile(self, index: int) -> Tile:
        rows, cols = self.shape
        if not 0 <= index < rows * cols:
            raise IndexError(f"tile index {index} outside 0..{rows * cols - 1}")
        r, c = divmod(index, cols)
        y0, x0 = self.starts_y[r], self.starts_x[c]
        return Tile(index, r, c, y0, y0 + self.tile_height, x0, x0 + self.tile_width,
                    self.bounds_y[r], self.bounds_y[r + 1], self.bounds_x[c], self.bounds_x[c + 1])

    def tiles(self) -> list[Tile]:
        """All tiles in raster order (the order that decides ids and pixel ties)."""
        return [self.tile(i) for i in range(len(self))]

    def owner(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Index of the tile whose core holds each point (y, x) in image pixels (clamped to the image)."""
        r = np.searchsorted(np.asarray(self.bounds_y[1:-1]), np.asarray(y), side="right")
        c = np.searchsorted(np.asarray(self.bounds_x[1:-1]), np.asarray(x), side="right")
        return r * len(self.starts_x) + c

    def overlapping(self, y0: int, y1: int, x0: int, x1: int) -> list[Tile]:
        """Tiles whose window intersects the region [y0, y1) x [x0, x1), raster order."""
        return [t for t in self.tiles() if t.y0 < y1 and y0 < t.y1 and t.x0 < x1 and x0 < t.x1]


def regions(height: int, width: int, block: int) -> list[tuple[int, int, int, int]]:
    """Split an image into block x block regions (y0, y1, x0, x1), raster order.

    A remainder under 2 px is merged into the previous block (image formatting needs 2 px);
    such a merged region still covers whole blocks of a zarr array chunked by ``block``.
    """
    def cuts(length: int) -> list[int]:
        c = list(range(0, length, block)) + [length]
        if len(c) > 2 and c[-1] - c[-2] < 2:
            del c[-2]
        return c

    ys, xs = cuts(height), cuts(width)
    return [(ys[i], ys[i + 1], xs[j], xs[j + 1]) for i in range(len(ys) - 1) for j in range(len(xs) - 1)]
