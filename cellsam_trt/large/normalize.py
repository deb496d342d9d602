"""Whole-image normalisation of a large image, computed in chunks, bit-identical to
``preprocess.normalize_image`` on the whole image.

The released normalisation (99.9th percentile clip of the
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

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..engine import preprocess as pre
from ..engine.source import ImageSource
from .grid import regions

# the released normalisation (preprocess.percentile_clip / preprocess.clahe)
PERCENTILE = 99.9
CLAHE_KERNEL = pre.CLAHE_KERNEL
# context kept around a chunk for CLAHE: a pixel reads the two kernel rows/cols around it
CLAHE_MARGIN_KERNELS = 2


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
        levels = pre.quantize_for_clahe(plane, in_range=full_range)
        if method == "torch":  # the port of scikit-image's CLAHE: the same levels
            import torch

            from ..engine import device_preprocess as device_pre

            result = device_pre.equalize_levels(torch.from_numpy(levels.astype(np.int64))[None])[0].numpy()
        else:
            result = pre.equalize_levels(levels, method)
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
