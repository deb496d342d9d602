"""The released normalisation and both model inputs in torch, on the model's device.

``preprocess`` makes the model inputs with numpy and scikit-image on the host, as the
released code does; on a GPU that is most of a call (CLAHE alone is about 120 ms for a
1024 x 1024 image). This module runs the same algorithm as torch tensor operations, so it
runs wherever the model runs (CPU or CUDA) and the image crosses to the device once, in
its own dtype (checked on the host by ``preprocess.checked_channels``):

    (H,W,C) any dtype -> upload (3,H,W) float64 -> percentile clip -> per-channel rescale
      -> CLAHE -> (1,3,H,W) float32 -> preprocess.embedding_input / cellfinder_input

Each step follows the host code's arithmetic (same dtypes, same operation order), so on
the CPU the results equal scikit-image's: ``percentiles_of_nonzero`` is numpy's "linear"
percentile, ``equalize_levels`` is scikit-image's ``_clahe`` (histograms per 128 x 128
tile, clipping with its redistribution loop, the cumulative mapping, the bilinear blend
of the four neighbouring tile mappings accumulated in float32). On a GPU the float64
steps are IEEE operations too; the resizes' accumulation order differs from the CPU
kernels', so the model inputs agree to float32 rounding, and a value that lands within
rounding of an 8-bit level in CellFinder's input can move to the next level
(``agreement`` measures both; ``DEVICE_TOLERANCE`` is the bar).
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable

import numpy as np
import torch
from skimage.exposure._adapthist import NR_OF_GRAY
from torch import Tensor

from . import preprocess as pre

log = logging.getLogger(__name__)

# the host path's largest differences the device path may show (README, "Preprocessing on
# the GPU"): max abs difference of the embedding input (SAM's pixel-normalised units) and
# of CellFinder's input (min-max units) outside pixels that moved by one 8-bit level, and
# the share of CellFinder's pixels that may move by one level
DEVICE_TOLERANCE = {"embedding_input": 1e-4, "cellfinder_input": 1e-4, "cellfinder_level_moves": 1e-3}

_BIN_SIZE = 1 + NR_OF_GRAY // pre.CLAHE_NBINS  # scikit-image's grey levels per histogram bin


def percentiles_of_nonzero(values: Tensor, q: float | list[float]) -> Tensor:
    """numpy's ``np.percentile(row[row != 0], q)`` (method "linear") of each row.

    Args:
        values: (B, N) float tensor.
        q: one percentile or a list, in [0, 100].

    Returns:
        (B,) for one percentile, (B, len(q)) for a list; float64. A row without non-zero
        values gives NaN (callers leave such rows as they are).

    Without a host synchronisation: the zeros are sorted to the end as +inf and the
    interpolation indices come from the per-row count of non-zero values.
    """
    one = not isinstance(q, (list, tuple))
    qs = torch.tensor([q] if one else list(q), dtype=torch.float64, device=values.device) / 100
    nonzero = values != 0
    count = nonzero.sum(-1, keepdim=True)  # (B, 1)
    ordered = torch.where(nonzero, values, torch.full_like(values, math.inf)).sort(-1).values
    # numpy: virtual index (n - 1) * q, its floor and the next index (both clipped to the
    # row), gamma the fraction; the lerp from the nearer end (numpy's _lerp)
    virtual = (count - 1).to(torch.float64) * qs  # (B, Q)
    last = (count - 1).clamp(min=0)
    below = virtual.floor().to(torch.int64).clamp(min=0)
    below = torch.minimum(below, last)
    above = torch.minimum(below + 1, last)
    gamma = virtual - below.to(torch.float64)
    a = ordered.gather(-1, below)
    b = ordered.gather(-1, above)
    diff = (b - a).to(torch.float64)  # numpy subtracts in the values' dtype, interpolates in float64
    a, b = a.to(torch.float64), b.to(torch.float64)
    result = torch.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)
    result = torch.where(count > 0, result, torch.full_like(result, math.nan))
    return result[:, 0] if one else result


def percentile_clip(image: Tensor, percentile: float = 99.9) -> Tensor:
    """``preprocess.percentile_clip`` on a (3, H, W) float64 tensor -> (3, H, W) float64."""
    limit = percentiles_of_nonzero(image.flatten(1), percentile)  # (3,)
    clipped = torch.minimum(image, limit.view(-1, 1, 1))
    # an all-zero channel has no percentile (NaN): it stays zero
    return torch.where(torch.isnan(limit).view(-1, 1, 1), image, clipped)


def _rescale_to_unit(planes: Tensor) -> tuple[Tensor, Tensor]:
    """scikit-image's ``rescale_intensity(plane)`` of float planes (C, H, W) over each
    plane's own range -> (rescaled, constant): a constant plane is clipped to [0, 1]."""
    flat = planes.flatten(1)
    low = flat.min(-1).values.view(-1, 1, 1)
    high = flat.max(-1).values.view(-1, 1, 1)
    constant = (low == high).view(-1)
    spread = torch.where(low == high, torch.ones_like(high), high - low)
    return torch.where(constant.view(-1, 1, 1), planes.clamp(0, 1), (planes - low) / spread), constant


def quantize_for_clahe(planes: Tensor) -> Tensor:
    """``preprocess.quantize_for_clahe`` of (C, H, W) float64 planes in [0, 1] -> (C, H, W)
    int64 grey levels 0..NR_OF_GRAY-1: ``img_as_uint`` (x 65535, round half to even), then
    each plane's min-max stretched onto the 14-bit levels and rounded."""
    u16 = (planes * 65535).round().clamp(0, 65535)
    flat = u16.flatten(1)
    low = flat.min(-1).values.view(-1, 1, 1)
    high = flat.max(-1).values.view(-1, 1, 1)
    spread = torch.where(low == high, torch.ones_like(high), high - low)
    stretched = torch.where(low == high, u16.clamp(0, NR_OF_GRAY - 1), (u16 - low) / spread * (NR_OF_GRAY - 1))
    return stretched.round().to(torch.int64)


def _reflect_indices(n: int, before: int, after: int, device: torch.device) -> Tensor:
    """Indices of numpy's ``np.pad(mode="reflect")`` along an axis of length n >= 2 (any
    pad width: the reflection repeats with period 2 (n - 1))."""
    index = torch.arange(-before, n + after, device=device).abs() % (2 * (n - 1))
    return torch.where(index >= n, 2 * (n - 1) - index, index)


def clip_histograms(hist: Tensor, clip_limit: int) -> Tensor:
    """scikit-image's ``clip_histogram`` of each row of (T, nbins) int64 histograms, in place.

    Counts above ``clip_limit`` are cut off and their excess spread over the bins: first
    evenly, then one count at a time over every k-th bin below the limit, k from the bins
    left and the excess, as scikit-image's loop does (its state per row here: the bin the
    loop is at and the excess at the start of each pass).
    """
    rows, bins = hist.shape
    above = hist > clip_limit
    excess = torch.where(above, hist - clip_limit, torch.zeros_like(hist)).sum(-1)
    hist.clamp_(max=clip_limit)
    increment = excess // bins
    upper = (clip_limit - increment).unsqueeze(-1)
    low = hist < upper
    excess -= low.sum(-1) * increment
    hist += low * increment.unsqueeze(-1)
    mid = (hist >= upper) & (hist < clip_limit)
    excess += torch.where(mid, hist - clip_limit, torch.zeros_like(hist)).sum(-1)
    hist[mid] = clip_limit

    # the redistribution loop: ``for index in range(bins)`` inside ``while excess > 0``
    # (a pass that moved nothing ends it); every row at its own index, one step per turn
    position = torch.arange(bins, device=hist.device)
    index = torch.zeros(rows, dtype=torch.int64, device=hist.device)
    pass_start = excess.clone()
    active = excess > 0
    while bool(active.any()):  # one synchronisation per step; a step or two for most tiles
        under = hist < clip_limit
        step = torch.clamp(under.sum(-1) // excess.clamp(min=1), min=1)
        offset = position - index.unsqueeze(-1)
        chosen = under & (offset >= 0) & (offset % step.unsqueeze(-1) == 0) & active.unsqueeze(-1)
        hist += chosen
        excess -= chosen.sum(-1)
        index = torch.where(active, index + 1, index)
        finished_pass = active & (excess > 0) & (index == bins)
        stalled = finished_pass & (excess == pass_start)
        pass_start = torch.where(finished_pass, excess, pass_start)
        index = torch.where(finished_pass, torch.zeros_like(index), index)
        active = active & (excess > 0) & ~stalled
    return hist


def equalize_levels(levels: Tensor, kernel_size: int = pre.CLAHE_KERNEL, clip_limit: float = pre.CLAHE_CLIP_LIMIT,
                    nbins: int = pre.CLAHE_NBINS) -> Tensor:
    """scikit-image's ``_clahe`` on (C, H, W) int64 grey levels (``quantize_for_clahe``) ->
    (C, H, W) int64 levels 0..NR_OF_GRAY-1, before the final min-max.

    The image is reflected to a grid of ``kernel_size`` tiles with half a tile before it;
    each tile's 256-bin histogram is clipped (``clip_histograms``) and cumulated into a
    mapping; each pixel blends the mappings of the four tiles around it bilinearly.
    """
    channels, height, width = levels.shape
    k = kernel_size
    device = levels.device
    before = k // 2
    after_y = (k - height % k) % k + math.ceil(k / 2)
    after_x = (k - width % k) % k + math.ceil(k / 2)
    rows = _reflect_indices(height, before, after_y, device)
    cols = _reflect_indices(width, before, after_x, device)
    bins = levels // _BIN_SIZE
    padded = bins[:, rows][:, :, cols]  # (C, Hp, Wp)
    tiles_y, tiles_x = padded.shape[1] // k, padded.shape[2] // k  # the pixel blocks

    # histograms of the (tiles_y - 1) x (tiles_x - 1) contextual regions, offset by half a tile
    regions = padded[:, before:before + (tiles_y - 1) * k, before:before + (tiles_x - 1) * k]
    regions = regions.reshape(channels, tiles_y - 1, k, tiles_x - 1, k).permute(0, 1, 3, 2, 4)
    regions = regions.reshape(-1, k * k)
    count = regions.shape[0]
    flat = (torch.arange(count, device=device).unsqueeze(-1) * nbins + regions).flatten()
    hist = torch.bincount(flat, minlength=count * nbins).view(count, nbins)
    limit = int(np.clip(clip_limit * k * k, 1, None)) if clip_limit > 0 else k * k
    hist = clip_histograms(hist, limit)
    # map_histogram: cumulative counts scaled onto the grey levels, truncated
    mapping = (hist.cumsum(-1).to(torch.float64) * ((NR_OF_GRAY - 1) / (k * k))).clamp(max=NR_OF_GRAY - 1)
    mapping = mapping.to(torch.int64).view(channels, tiles_y - 1, tiles_x - 1, nbins)
    # the edge tiles' mappings repeated outwards (np.pad mode="edge"), one on each side
    mapping = torch.cat([mapping[:, :1], mapping, mapping[:, -1:]], 1)
    mapping = torch.cat([mapping[:, :, :1], mapping, mapping[:, :, -1:]], 2)  # (C, tiles_y + 1, tiles_x + 1, nbins)

    # the blend, for the image's own pixels only (the padding is cut away afterwards)
    y = torch.arange(height, device=device) + before
    x = torch.arange(width, device=device) + before
    block_y, block_x = y // k, x // k
    # scikit-image's weights: the in-block offset over k, in float64, product column x row
    frac_y = ((y % k).to(torch.float64) / k).view(-1, 1)
    frac_x = ((x % k).to(torch.float64) / k).view(1, -1)
    pixel_bins = padded[:, before:before + height, before:before + width]
    plane_offset = torch.arange(channels, device=device).view(-1, 1, 1) * mapping[0].numel()
    result = torch.zeros((channels, height, width), dtype=torch.float32, device=device)
    grid_x = mapping.shape[2]
    for edge_y, edge_x in ((0, 0), (0, 1), (1, 0), (1, 1)):  # np.ndindex(2, 2)
        tile = (block_y + edge_y).view(-1, 1) * grid_x + (block_x + edge_x).view(1, -1)
        mapped = mapping.flatten().take(plane_offset + tile * nbins + pixel_bins)
        weight = (frac_x if edge_x else 1 - frac_x) * (frac_y if edge_y else 1 - frac_y)
        result += (mapped * weight).to(torch.float32)
    return result.to(torch.int64)  # truncation, as numpy's astype(uint16)


def clahe(image: Tensor, kernel_size: int = pre.CLAHE_KERNEL) -> Tensor:
    """``preprocess.clahe`` (method "skimage") on a (3, H, W) float64 tensor -> (3, H, W)
    float64 in [0, 1]: per channel a constant plane -> 0, else rescale to [0, 1],
    ``equalize_adapthist`` (quantize, ``equalize_levels``, min-max)."""
    unit, constant = _rescale_to_unit(image)
    equalized, _ = _rescale_to_unit(equalize_levels(quantize_for_clahe(unit), kernel_size).to(torch.float64))
    return torch.where(constant.view(-1, 1, 1), torch.zeros_like(equalized), equalized)


def normalize_image(image: Tensor) -> Tensor:
    """``preprocess.normalize_image`` on a (3, H, W) float64 tensor -> (3, H, W) float64."""
    return clahe(percentile_clip(image))


def rescale_by_percentiles(image: Tensor, lower: float = 0.0, upper: float = 99.5) -> Tensor:
    """``preprocess._percentile_rescale`` in torch: the whole (3, S, S) float32 tensor from
    its [lower, upper] percentiles of non-zero values onto [0, 1], float32 arithmetic with
    float64 bounds cast to float32 as scikit-image's ``rescale_intensity`` does."""
    bounds = percentiles_of_nonzero(image.reshape(1, -1), [lower, upper])[0]  # (2,) float64
    low, high = bounds[0], bounds[1]
    # numpy with Python-float bounds on a float32 array: clip, subtract and divide in float32
    spread = torch.where(low == high, torch.ones_like(high), high - low).to(torch.float32)
    low32, high32 = low.to(torch.float32), high.to(torch.float32)
    clipped = torch.minimum(torch.maximum(image, low32), high32)
    scaled = torch.where(low == high, clipped.clamp(0, 1), (clipped - low32) / spread)
    return torch.where(torch.isnan(low), image, scaled)


def upload(channels: np.ndarray, device: torch.device | str) -> Tensor:
    """(H, W, C) from ``preprocess.checked_channels`` (any dtype) -> (3, H, W) float64 on
    ``device``, the C channels in the last C slots (``preprocess.place_channels``).

    The array crosses in its own dtype and is converted there; unsigned types torch cannot
    convert everywhere cross as the signed type of their size, the bits restored on arrival.
    """
    array = np.ascontiguousarray(np.moveaxis(channels, -1, 0))
    if array.dtype == np.bool_:
        array = array.view(np.uint8)
    if array.dtype in (np.uint16, np.uint32):
        signed = np.dtype(f"int{array.dtype.itemsize * 8}")
        wide = torch.int32 if array.dtype == np.uint16 else torch.int64
        mask = (1 << (array.dtype.itemsize * 8)) - 1
        values = torch.from_numpy(array.view(signed)).to(device).to(wide).bitwise_and(mask).to(torch.float64)
    elif array.dtype == np.uint64 or array.dtype.kind not in "iuf":
        values = torch.from_numpy(array.astype(np.float64)).to(device)
    else:
        values = torch.from_numpy(array).to(device).to(torch.float64)
    placed = torch.zeros((3,) + values.shape[1:], dtype=torch.float64, device=values.device)
    placed[3 - values.shape[0]:] = values
    return placed


def model_inputs(channels: np.ndarray, device: torch.device | str, size: int, adapted: bool, *,
                 normalize: bool = True, finder: bool = True,
                 stage: Callable[[str], object] | None = None) -> tuple[Tensor, Tensor | None]:
    """A checked image -> (embedding input, CellFinder input or None), made on ``device``.

    Args:
        channels: (H, W, C) from ``preprocess.checked_channels``, any dtype (or the (H, W, 3)
            float64 of ``preprocess.format_image``: the same thing).
        device: where to compute (the model's device).
        size, adapted: as ``preprocess.embedding_input``.
        normalize: the released percentile clip and CLAHE first (False: the image already
            lies in [0, 1]).
        finder: also make CellFinder's input.
        stage: a context-manager factory timing each named step (``engine.core.Timer.stage``):
            "upload", "clip", "clahe", "inputs".

    Returns:
        (1, 3, size, size) float32 tensors on ``device``.
    """
    timed = stage if stage is not None else (lambda name: contextlib.nullcontext())
    with timed("upload"):
        image = upload(channels, device)
    if normalize:
        with timed("clip"):
            image = percentile_clip(image)
        with timed("clahe"):
            image = clahe(image)
    with timed("inputs"):
        tensor = image.to(torch.float32).unsqueeze(0)
        embedding = pre.embedding_input(tensor, size, adapted, rescale=rescale_by_percentiles)
        finder_input = pre.cellfinder_input(tensor, size, adapted) if finder else None
    return embedding, finder_input


def agreement(formatted: np.ndarray, device: torch.device | str, size: int, adapted: bool) -> dict[str, float]:
    """How far the device path's model inputs are from the host path's for one image.

    Args:
        formatted: (H, W, 3) float64 from ``preprocess.format_image``.

    Returns:
        "embedding_input": max abs difference; "cellfinder_input": max abs difference
        outside the pixels that moved by one 8-bit level; "cellfinder_level_moves": the
        share of CellFinder's input values that moved (the 8-bit round trip can move a value
        within rounding of a level by one level).
    """
    host = pre.to_tensor(pre.normalize_image(formatted.copy()))
    want_embedding = pre.embedding_input(host, size, adapted)
    want_finder = pre.cellfinder_input(host, size, adapted)
    embedding, finder = model_inputs(formatted, device, size, adapted)
    finder = finder.cpu()
    difference = (finder - want_finder).abs()
    # one 8-bit level, in CellFinder's min-max units: at least one level of the channel's range
    step = _one_level(want_finder)
    moved = difference > step / 2
    return {
        "embedding_input": float((embedding.cpu() - want_embedding).abs().max()),
        "cellfinder_input": float(difference[~moved].max()) if bool((~moved).any()) else 0.0,
        "cellfinder_level_moves": float(moved.float().mean()),
    }


def _one_level(finder_input: Tensor) -> Tensor:
    """(1, 3, 1, 1): the smallest non-zero step between values of each channel of
    CellFinder's input (one 8-bit level after its normalisations)."""
    steps = []
    for plane in finder_input[0]:
        values = plane.flatten().unique()
        gaps = values[1:] - values[:-1]
        steps.append(float(gaps.min()) if len(gaps) else 1.0)
    return torch.tensor(steps).view(1, 3, 1, 1)


def check_image(height: int = 300, width: int = 260, seed: int = 0) -> np.ndarray:
    """A formatted (H, W, 3) float64 test image with a blank, a nuclear and a whole-cell
    channel: bright blobs on a dim, noisy background (zeros included), a few saturated."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    image = np.zeros((height, width, 3))
    for channel in (1, 2):
        plane = rng.gamma(2.0, 20.0, (height, width))
        for _ in range(25):
            cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(4, 14)
            plane += rng.uniform(200, 3000) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        plane[rng.random((height, width)) < 0.02] = 0
        plane[rng.random((height, width)) < 0.001] = 65535
        image[..., channel] = np.round(plane)
    return image


def self_check(device: torch.device | str, size: int, adapted: bool) -> bool:
    """Whether the device path meets ``DEVICE_TOLERANCE`` on ``check_image`` (logged either way)."""
    try:
        measured = agreement(check_image(), device, size, adapted)
    except Exception as err:  # a device without some operation: the host path stays
        log.warning("preprocessing on %s failed its start-up check (%s: %s); the host path (scikit-image) runs",
                    device, type(err).__name__, err)
        return False
    failed = {k: v for k, v in measured.items() if not v <= DEVICE_TOLERANCE[k]}
    if failed:
        log.warning("preprocessing on %s differs from the host path beyond the tolerance (%s, tolerance %s); "
                    "the host path (scikit-image) runs", device, failed, DEVICE_TOLERANCE)
        return False
    log.info("preprocessing runs on %s (start-up check within tolerance: %s)", device, measured)
    return True
