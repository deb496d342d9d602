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

Stitching rule: "each cell comes from the tile where it is most central". The cores of the
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

Defaults: T = 1024 is the model's input side, so tiles go through at native resolution
(no resizing); O = 128 keeps cells up to ~128 px across whole (typical cells in 10-40x
fluorescence are 10-60 px) at 1.3x the work of the untiled image. The released WSI path
cuts 400 px blocks with 56 px margins (512 px tiles, upsampled 2x to 1024): use
``tile_size=512, overlap=112`` for small cells (nuclei under ~15 px), at 4x the cost.
Images no larger than one tile go straight to ``CellSAM.segment``.

Whole-image normalisation: the released normalisation (99.9th percentile clip of the
non-zero values, min-max, CLAHE with 128 px kernels) has global parts (the percentile,
the min-max of the clipped image and of the CLAHE output) and a local part (CLAHE itself
reads only the 128-px kernels around a pixel). ``fit_normalization`` collects the global
numbers in one pass over chunks (the percentile exactly, from the top 0.1 % of values);
``clahe_region`` then runs scikit-image's CLAHE on a chunk plus two kernels of real
context, aligned to the whole image's kernel grid, which reproduces the whole-image result
bit for bit (tested). Normalising per tile instead would give neighbouring tiles different
contrast in their overlap and tie the result to the tile layout.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import memory
from . import preprocess as pre
from .io import IMAGE_SUFFIXES, LAZY_TIFF_BYTES, read_image  # noqa: F401  (file reading lives in io; names kept here)

log = logging.getLogger(__name__)

# the released normalisation (preprocess.percentile_clip / preprocess.clahe)
PERCENTILE = 99.9
CLAHE_KERNEL = pre.CLAHE_KERNEL
# context kept around a chunk for CLAHE: a pixel reads the two kernel rows/cols around it
CLAHE_MARGIN_KERNELS = 2
# labels are int32 like segment()'s up to this many cells, uint32 above
INT32_MAX_CELLS = 65535


# ----------------------------------------------------------------------------- tile grid

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


def check_tiling(tile_size: Any, overlap: Any) -> None:
    """ValueError unless 64 <= tile_size and 0 <= overlap <= tile_size // 2."""
    if isinstance(tile_size, bool) or not isinstance(tile_size, (int, np.integer)) or tile_size < 64:
        raise ValueError(f"tile_size: expected an integer >= 64, got {tile_size!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) or not 0 <= overlap <= tile_size // 2:
        raise ValueError(f"overlap: expected an integer in [0, tile_size // 2 = {tile_size // 2}], got {overlap!r}")


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


# ------------------------------------------------------------------------- image access

class ImageSource:
    """Reads regions of an image array-like as formatted (h, w, 3) float64, like ``format_image``.

    Args:
        image: (H, W) or 3-D with C <= 3 channels: numpy array, np.memmap, zarr array, or
            anything with ``shape``, ``dtype`` and numpy slicing. Read lazily, region by region.
        channel_axis: channel axis of a 3-D image (default: the smallest axis, as ``segment``).

    Only shape and dtype are checked here; values (finite) are checked per region read.
    """

    def __init__(self, image: Any, channel_axis: int | None = None) -> None:
        if isinstance(image, ImageSource):
            image = image.array
        if isinstance(image, (list, tuple)):
            image = np.asarray(image)
        if not hasattr(image, "shape") or not hasattr(image, "dtype") or not hasattr(image, "__getitem__"):
            raise ValueError(f"image: expected an array (H, W) or (H, W, C), got {type(image).__name__}")
        dtype = np.dtype(image.dtype)
        if dtype.kind == "O" or not (np.issubdtype(dtype, np.number) or dtype.kind == "b") \
                or np.issubdtype(dtype, np.complexfloating):
            raise ValueError(f"image: expected a real numeric dtype, got {dtype}")
        shape = tuple(int(s) for s in image.shape)
        if len(shape) not in (2, 3):
            raise ValueError(f"image: expected 2 dimensions (H, W) or 3 (H, W, C), got shape {shape}")
        if len(shape) == 3:
            axis = int(np.argmin(shape)) if channel_axis is None else channel_axis
            if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -3 <= axis <= 2:
                raise ValueError(f"channel_axis: must be 0, 1, 2 or negative, got {channel_axis!r}")
            axis = int(axis) % 3
            if shape[axis] > 3:
                raise ValueError(
                    f"image: at most 3 channels (blank, nuclear, whole-cell) are supported, got {shape[axis]} "
                    f"on axis {axis} of shape {shape}; pass channel_axis= or select channels"
                )
            self.channel_axis: int | None = axis
            spatial = [s for i, s in enumerate(shape) if i != axis]
        else:
            self.channel_axis = None
            spatial = list(shape)
        self.height, self.width = spatial
        if self.height < 2 or self.width < 2:
            raise ValueError(f"image: needs at least 2x2 pixels, got {self.height}x{self.width}")
        self.array = image
        self.dtype = dtype

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Region [y0, y1) x [x0, x1) -> (h, w, 3) float64 (channels in the last slots)."""
        index: list[slice] = [slice(y0, y1), slice(x0, x1)]
        if self.channel_axis is not None:
            index.insert(self.channel_axis, slice(None))
        crop = np.asarray(self.array[tuple(index)])
        return pre.format_image(crop, channel_axis=self.channel_axis)

    def __getstate__(self):
        # path-backed arrays (zarr over a TIFF, memmaps) are reopened where they are used
        state = dict(self.__dict__)
        opener = state.get("_opener")
        if opener is not None:
            state["array"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.__dict__.get("_opener") is not None and self.array is None:
            self.array = open_image(*self._opener)

    @classmethod
    def from_path(cls, path: str | os.PathLike, channel_axis: int | None = None) -> ImageSource:
        """Open an image file lazily (see ``open_image``); pickles as its path."""
        path = str(path)
        source = cls(open_image(path), channel_axis)
        source._opener = (path,)
        return source


def open_image(path: str | os.PathLike, lazy: bool | None = None) -> Any:
    """An image file as an array-like, read lazily where the format allows, without its
    singleton dimensions: ``io.read_image(path, lazy).array`` (``io.read_image`` also gives
    the axes the file records)."""
    return read_image(path, lazy).array


# ---------------------------------------------------------------- whole-image normalisation

@dataclass(frozen=True)
class ChannelNorm:
    """Whole-image numbers of one channel of the formatted image.

    constant: the clipped channel is constant (normalised to 0).
    top: clip level (99.9th percentile of the non-zero values).
    lo, hi: min and max after clipping (the min-max rescale).
    clahe_lo, clahe_hi: min and max of CLAHE's integer output over the image (set by
        ``finish_normalization``; the final min-max rescale).
    """

    constant: bool
    top: float = 0.0
    lo: float = 0.0
    hi: float = 0.0
    clahe_lo: float = 0.0
    clahe_hi: float = 0.0


@dataclass
class _ChannelPass:
    """Partial statistics of one channel over some regions."""

    count: int = 0
    minimum: float = math.inf
    maximum: float = -math.inf
    top: np.ndarray = field(default_factory=lambda: np.zeros(0))


def top_count(height: int, width: int, percentile: float = PERCENTILE) -> int:
    """How many of the largest non-zero values the percentile can need (an upper bound)."""
    return int(math.ceil(height * width * (1 - percentile / 100))) + 2


def channel_statistics(image3: np.ndarray, keep: int) -> list[_ChannelPass]:
    """Pass-1 statistics of a formatted region (h, w, 3): per channel the non-zero count,
    min, max and the ``keep`` largest non-zero values."""
    out = []
    for chan in range(3):
        plane = image3[..., chan]
        nonzero = plane[plane != 0]
        if len(nonzero) > keep:
            nonzero = np.partition(nonzero, len(nonzero) - keep)[len(nonzero) - keep:]
        out.append(_ChannelPass(int((plane != 0).sum()), float(plane.min()), float(plane.max()), nonzero.copy()))
    return out


def merge_statistics(a: list[_ChannelPass] | None, b: list[_ChannelPass], keep: int) -> list[_ChannelPass]:
    """Combine pass-1 statistics of two sets of regions (associative)."""
    if a is None:
        return b
    out = []
    for x, y in zip(a, b):
        top = np.concatenate([x.top, y.top])
        if len(top) > keep:
            top = np.partition(top, len(top) - keep)[len(top) - keep:]
        out.append(_ChannelPass(x.count + y.count, min(x.minimum, y.minimum), max(x.maximum, y.maximum), top))
    return out


def percentile_of_top(top: np.ndarray, count: int, percentile: float = PERCENTILE) -> float:
    """``np.percentile(values, percentile)`` (linear method) from the largest values only.

    Args:
        top: the largest values of the sample (any order), enough of them to hold the two
            order statistics the percentile interpolates.
        count: size of the whole sample.

    The arithmetic follows numpy's linear method step by step so that the result is the
    same float.
    """
    q = np.true_divide(percentile, 100)
    virtual = (count - 1) * q
    ordered = np.sort(top)
    skipped = count - len(ordered)
    if virtual >= count - 1:
        return float(ordered[-1])
    previous = int(np.floor(virtual))
    if previous - skipped < 0:
        raise ValueError("percentile_of_top: not enough top values for this percentile")
    a, b = ordered[previous - skipped], ordered[previous - skipped + 1]
    gamma = float(virtual - np.floor(virtual))
    diff = b - a
    return float(b - diff * (1 - gamma)) if gamma >= 0.5 else float(a + diff * gamma)


def finish_statistics(stats: list[_ChannelPass]) -> list[ChannelNorm]:
    """Pass-1 statistics -> clip level and min-max per channel (CLAHE range still unset)."""
    out = []
    for s in stats:
        if s.count == 0:
            out.append(ChannelNorm(constant=True))
            continue
        top = percentile_of_top(s.top, s.count)
        # clipping only lowers values above top, so min/max of the clipped channel follow
        lo, hi = min(s.minimum, top), min(s.maximum, top)
        out.append(ChannelNorm(constant=lo == hi, top=top, lo=lo, hi=hi))
    return out


def _clahe_crop(length: int, start: int, stop: int) -> tuple[int, int]:
    """Context window for CLAHE rows/cols [start, stop): whole kernels around it, aligned to the image's kernel grid."""
    k = CLAHE_KERNEL
    a = max(0, (start // k - CLAHE_MARGIN_KERNELS) * k)
    b = min(length, (-(-stop // k) + CLAHE_MARGIN_KERNELS) * k)
    return a, b


def clahe_region(source: ImageSource, norm: Sequence[ChannelNorm], y0: int, y1: int, x0: int, x1: int,
                 method: str = "skimage") -> np.ndarray:
    """CLAHE's integer output (before the final min-max) for a region, as on the whole image.

    Args:
        method: the CLAHE implementation (``preprocess.equalize_levels``).

    Returns:
        (h, w, 3) uint16; constant channels are 0.
    """
    from skimage.exposure import rescale_intensity
    from skimage.util import img_as_uint

    ay0, ay1 = _clahe_crop(source.height, y0, y1)
    ax0, ax1 = _clahe_crop(source.width, x0, x1)
    raw = source.read(ay0, ay1, ax0, ax1)
    out = np.zeros((y1 - y0, x1 - x0, 3), dtype=np.uint16)
    # the extremes of the rescaled channel are exactly 0 and 1, and img_as_uint is monotone
    full_range = tuple(int(v) for v in img_as_uint(np.array([0.0, 1.0])))
    for chan, n in enumerate(norm):
        if n.constant:
            continue
        plane = raw[..., chan]
        plane[plane > n.top] = n.top
        # the same steps as preprocess.clahe, with the whole image's ranges
        plane = rescale_intensity(plane, in_range=(n.lo, n.hi), out_range=(0.0, 1.0))
        result = pre.equalize_levels(pre.quantize_for_clahe(plane, in_range=full_range), method)
        out[..., chan] = result[y0 - ay0:y1 - ay0, x0 - ax0:x1 - ax0]
    return out


def finish_normalization(norm: Sequence[ChannelNorm], lows: Iterable[np.ndarray], highs: Iterable[np.ndarray]) -> list[ChannelNorm]:
    """Add CLAHE's output range (min of ``lows``, max of ``highs``, each (3,) per region)."""
    lo = np.min(np.stack(list(lows)), axis=0)
    hi = np.max(np.stack(list(highs)), axis=0)
    return [n if n.constant else ChannelNorm(False, n.top, n.lo, n.hi, float(lo[c]), float(hi[c]))
            for c, n in enumerate(norm)]


def scale_clahe(u16: np.ndarray, norm: Sequence[ChannelNorm]) -> np.ndarray:
    """(h, w, 3) uint16 CLAHE output -> normalised (h, w, 3) float32, as ``normalize_image`` + ``to_tensor``."""
    from skimage.exposure import rescale_intensity

    out = np.zeros(u16.shape, dtype=np.float32)
    for chan, n in enumerate(norm):
        if not n.constant:
            out[..., chan] = rescale_intensity(u16[..., chan].astype(np.float64), in_range=(n.clahe_lo, n.clahe_hi),
                                               out_range="dtype")
    return out


def region_extremes(u16: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return u16.reshape(-1, 3).min(axis=0), u16.reshape(-1, 3).max(axis=0)


def fit_normalization(source: ImageSource, block: int = 2048) -> list[ChannelNorm]:
    """Pass 1 over ``block``-sized regions: clip level and min-max per channel."""
    keep = top_count(source.height, source.width)
    stats = None
    for y0, y1, x0, x1 in regions(source.height, source.width, block):
        stats = merge_statistics(stats, channel_statistics(source.read(y0, y1, x0, x1), keep), keep)
    return finish_statistics(stats)


def normalize_large(source: ImageSource, block: int = 2048, method: str = "skimage"
                    ) -> tuple[np.ndarray, list[ChannelNorm]]:
    """Whole-image normalisation in chunks, in memory, with the CLAHE ``method`` (``preprocess.equalize_levels``).

    Returns:
        CLAHE output (H, W, 3) uint16 (2 bytes per value instead of 8) and the per-channel
        numbers; ``scale_clahe`` of any region of it equals that region of
        ``preprocess.normalize_image(format_image(image), method)`` cast to float32.
    """
    norm = fit_normalization(source, block)
    clahe = np.zeros((source.height, source.width, 3), dtype=np.uint16)
    lows, highs = [], []
    for y0, y1, x0, x1 in regions(source.height, source.width, block):
        part = clahe_region(source, norm, y0, y1, x0, x1, method)
        clahe[y0:y1, x0:x1] = part
        lo, hi = region_extremes(part)
        lows.append(lo)
        highs.append(hi)
    return clahe, finish_normalization(norm, lows, highs)


# ------------------------------------------------------------------------------ stitching

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
    results = []
    for lab, t in zip(tile_labels, grid.tiles()):
        kept, originals, cut, inside, depth, band = tile_candidates(
            np.asarray(lab), t, grid.height, grid.width, keep_all, band_width(grid))
        nan = np.full(len(originals), np.nan, np.float32)
        results.append(TileResult(t.index, kept, len(originals), np.full((len(originals), 4), np.nan, np.float32),
                                  nan, nan, cut, 0, inside, depth, band))
    resolve_band(results)
    labels, _ = _compact(*paint_results(grid, results))
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


def _compact(labels: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Renumber uint32 labels consecutively if ids lost all pixels; cast to the output dtype."""
    present = np.zeros(total + 1, dtype=bool)
    present[labels.ravel()] = True
    lut = compaction_table(np.flatnonzero(present), total)
    if lut is not None:
        labels = lut[labels]
    dtype = label_dtype(total)
    # values < 2**31: the bit pattern is the same int32
    return (labels.view(np.int32) if dtype == np.int32 else labels), lut


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
                       tile_boxes: dict[int, np.ndarray] | None = None, **segment_options: Any) -> list[TileResult]:
    """Segment a batch of tiles with one batched encoder / CellFinder call and keep their core cells.

    Args:
        session: a ``CellSAM``.
        grid: the tiling; indices: tiles of this batch.
        read_tile: tile -> normalised (h, w, 3) float image in [0, 1].
        tile_boxes: user boxes per tile in tile pixels (then every decoded cell is kept).
        **segment_options: bbox_threshold, chunk_size, postprocess for ``segment_batch``.
    """
    tiles = [grid.tile(i) for i in indices]
    images = [read_tile(t) for t in tiles]
    boxes = None if tile_boxes is None else [tile_boxes.get(t.index, np.zeros((0, 4), np.float32)) for t in tiles]
    outputs = session.segment_batch(images, boxes=boxes, normalize=False, channel_axis=-1, return_details=True,
                                    warn_empty=False, **segment_options)
    results = []
    for t, (labels, details) in zip(tiles, outputs):
        kept, originals, cut, inside, depth, band = tile_candidates(
            labels, t, grid.height, grid.width, tile_boxes is not None, band_width(grid))
        boxes_of, scores_of, iou_of = _cell_table(details, originals)
        boxes_of = boxes_of + np.array([t.x0, t.y0, t.x0, t.y0], dtype=np.float32)
        # the smallest integer type keeps the tiles that wait for resolve_band small
        kept = kept.astype(np.uint16) if len(originals) <= np.iinfo(np.uint16).max else kept
        results.append(TileResult(t.index, kept, len(originals), boxes_of, scores_of, iou_of, cut,
                                  details.num_candidates, inside, depth, band))
    return results


def _cell_table(details: Any, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    boxes, scores, iou = _cell_table(details, ids)
    return TiledDetails(boxes, scores, iou, np.full(len(ids), -1, np.int32), None, details.num_candidates,
                        0, dict(details.timings))


def _tile_reader(source: ImageSource, clahe: np.ndarray | None, norm: Sequence[ChannelNorm] | None):
    if clahe is None:
        return lambda t: source.read(t.y0, t.y1, t.x0, t.x1)
    return lambda t: scale_clahe(clahe[t.y0:t.y1, t.x0:t.x1], norm)


def segment_large(
    session: Any,
    image: Any,
    *,
    tile_size: int = 1024,
    overlap: int = 128,
    batch_size: int = 4,
    boxes: Any = None,
    bbox_threshold: float | None = None,
    normalize: bool | str = True,
    postprocess: bool = False,
    remove_boundaries: bool = False,
    chunk_size: int | None = None,
    channel_axis: int | None = None,
    return_details: bool = False,
    progress: bool = False,
    block: int = 2048,
    output: str | os.PathLike | None = None,
    stream: bool | None = None,
) -> np.ndarray | tuple[np.ndarray, TiledDetails]:
    """Segment an image of any size: tiles, batched graph calls, stitching (module docstring).

    Args:
        session: a ``CellSAM``.
        image: (H, W) or 3-D with <= 3 channels; a numpy array or a lazily read array-like
            (zarr, memmap, ``open_image``), read region by region.
        tile_size: tile side T (default 1024, the model input: tiles run at native scale).
            Images with both sides <= T go to ``session.segment`` unchanged.
        overlap: minimum overlap O of neighbouring tiles (default 128): cells up to about O
            pixels across are never cut.
        batch_size: tiles per encoder / CellFinder call.
        boxes: optional (N, 4) x1, y1, x2, y2 in image pixels (skips CellFinder; each box is
            decoded in the tile whose core holds its centre; tiles without boxes are skipped).
        normalize: whole-image percentile + CLAHE (True or "opencv", as ``segment``); False: image in [0, 1].
        bbox_threshold, postprocess, chunk_size: as ``CellSAM.segment``, applied per tile.
        remove_boundaries: zero a one-pixel outline around each cell (after stitching).
        channel_axis: channel axis of a 3-D image (default: the smallest axis).
        return_details: also return ``TiledDetails``.
        progress: a progress bar over tiles.
        block: side of the regions the normalisation works on (memory bound).
        output: a zarr group to write the labels to (``scale.segment_dask``'s layout), tile by
            tile: memory stays bounded by a few tiles plus the model whatever the image size,
            and the zarr ``labels`` array is returned instead of a numpy array.
        stream: run through scratch zarr stores on disk (``memory.tiled_host_bytes``) even
            without ``output``; None (default): when the in-memory run would need more than
            ``memory.STREAM_ABOVE_BYTES``. The labels are the same either way.

    Returns:
        labels (H, W): 0 background, 1..K unique over the image; int32, uint32 above 65535
        cells. With ``return_details``, (labels, details).

    Raises:
        MemoryError: before any work, when the estimated host memory exceeds what is
            available (the message gives both and what to do).
    """
    from .pipeline import NoCellsWarning, validate_boxes

    source = ImageSource(image, channel_axis)
    check_tiling(tile_size, overlap)
    method = pre.clahe_method(normalize)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 2 * CLAHE_KERNEL:
        raise ValueError(f"block: expected an integer >= {2 * CLAHE_KERNEL}, got {block!r}")
    options = dict(bbox_threshold=bbox_threshold, chunk_size=chunk_size, postprocess=postprocess)
    if max(source.shape) <= tile_size:
        # one tile: exactly segment()
        arr = image if isinstance(image, np.ndarray) else source.read(0, source.height, 0, source.width)
        axis = channel_axis if isinstance(image, np.ndarray) else -1
        out = session.segment(arr, boxes=boxes, normalize=normalize, remove_boundaries=remove_boundaries,
                              channel_axis=axis, return_details=return_details, progress=progress,
                              tile_size=None, **options)
        if not return_details:
            return out
        labels, details = out
        return labels, details_from_segmentation(labels, details)

    grid = TileGrid.plan(source.height, source.width, tile_size, overlap)
    estimate = memory.tiled_host_bytes(source.height, source.width, grid, batch_size, normalized=method is not None)
    if stream is None:
        stream = streams_by_default(source.height, source.width, tile_size, overlap, batch_size, normalize)
    if output is not None or stream:
        if output is None:
            memory.check_host_memory(estimate["streamed"], f"segment_large of a {source.height}x{source.width} image",
                              "pass output='labels.zarr' to write the labels to disk instead of returning them")
        return _segment_streamed(session, image, output, return_details=return_details, tile_size=tile_size,
                                 overlap=overlap, batch_size=batch_size, block=block, boxes=boxes,
                                 normalize=normalize, remove_boundaries=remove_boundaries, channel_axis=channel_axis,
                                 progress=progress, **options)
    memory.check_host_memory(estimate["in_memory"], f"segment_large of a {source.height}x{source.width} image",
                      "pass output='labels.zarr' to write the labels to disk tile by tile")
    timings: dict[str, float] = {}
    user_boxes = None if boxes is None else validate_boxes(boxes, source.height, source.width)
    t0 = time.perf_counter()
    clahe, norm = normalize_large(source, block, method) if method is not None else (None, None)
    timings["normalize"] = time.perf_counter() - t0
    read_tile = _tile_reader(source, clahe, norm)
    tile_boxes = None if user_boxes is None else assign_boxes(grid, user_boxes)
    active = range(len(grid)) if tile_boxes is None else sorted(tile_boxes)

    t0 = time.perf_counter()
    tables: list[TileResult] = []
    bar = _bar(len(active), progress)
    for batch in tile_batches(active, batch_size):
        tables += segment_tile_batch(session, grid, batch, read_tile, tile_boxes, **options)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    timings["tiles"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    resolve_band(tables)
    out, offset = paint_results(grid, tables)
    for result in tables:
        result.labels = None
    if remove_boundaries:
        from .postprocess import remove_boundaries as outline

        out = outline(out)
    labels, lut = _compact(out, offset)
    details = _combine_tables(tables, lut, grid, offset, timings)
    timings["stitch"] = time.perf_counter() - t0
    if details.cut_cells:
        log.warning("%d cells touch an inner tile edge in the tile they were taken from and may be cut; "
                    "raise overlap (now %d) above the largest cell diameter", details.cut_cells, overlap)
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


def _segment_streamed(session: Any, image: Any, output: Any, *, return_details: bool, **settings: Any) -> Any:
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
    from .pipeline import NoCellsWarning
    from .scale import InProcessClient, segment_dask

    with InProcessClient(session) as client:
        if output is not None:
            labels, details = segment_dask(image, client, output=output, return_details=True, **settings)
        else:
            with tempfile.TemporaryDirectory(prefix="cellsam-trt-tiles-") as scratch:
                labels, details = segment_dask(image, client, output=os.path.join(scratch, "run.zarr"),
                                               return_details=True, **settings)
                labels = np.asarray(labels[...])
    if details.num_cells == 0:  # as the in-memory run warns
        warnings.warn("No cells detected in the image; returning all-zero labels.", NoCellsWarning, stacklevel=3)
    return (labels, details) if return_details else labels


def _combine_tables(tables: Sequence[TileResult], lut: np.ndarray | None, grid: TileGrid, total: int,
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
    return TiledDetails(boxes, scores, iou, tile_of, grid, sum(t.num_candidates for t in tables),
                        int(cut.sum()), timings)


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="tiles", unit="tile")

