"""From graph outputs to a label image, reproducing the released CellSAM inference.

- ``score_boxes``: CellFinder logits/boxes -> per-detection score and xyxy box (top-k over
  (query, class) pairs, like DETR's post-processor).
- ``dynamic_threshold`` / ``select_boxes``: 2-cluster k-means on the scores decides the cut.
- ``MaskPainter``: low-res mask logits (N, 256, 256) -> labels (H, W). The released code
  upsamples each mask 256 -> 1024 -> (H, W) (bilinear) and paints ``max(k * mask_k)``. We
  use that bilinear resizing is linear and separable: upsampled = R_y @ logits @ R_x^T, where
  R_y (H, 256) and R_x (W, 256) are the two resizes composed, with non-negative weights that
  sum to 1 per row. An output pixel is therefore at most the largest logit it reads, so it
  can only pass the threshold inside the window that reads a passing low-res pixel; we
  compute only those windows, batched, on the model's device.
- ``fill_holes_and_remove_small``, ``remove_boundaries``, ``morphological_postprocess``:
  the released CPU clean-up steps.
"""
from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import binary_fill_holes, find_objects, gaussian_filter
from torch import Tensor

log = logging.getLogger(__name__)


def score_boxes(logits: Tensor, boxes: Tensor, image_size: int) -> tuple[Tensor, Tensor]:
    """Rank all (query, class) pairs of one image.

    Args:
        logits: (Q, C) class logits.
        boxes: (Q, 4) cxcywh in [0, 1].
        image_size: side of the model input; boxes are scaled to it.

    Returns:
        scores (Q,) float32, descending; boxes (Q, 4) float32 xyxy in model-input pixels.
        Top-Q of Q*C pairs: a query can appear once per class.
    """
    num_queries, num_classes = logits.shape
    scores, flat_index = torch.topk(logits.sigmoid().reshape(-1), num_queries)
    cx, cy, w, h = boxes.unbind(-1)
    xyxy = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
    return scores, xyxy[flat_index // num_classes] * image_size


def dynamic_threshold(scores: np.ndarray, bbox_threshold: float) -> float:
    """0.66 * bbox_threshold + 0.33 * mean of the two k-means centres of the scores.

    Falls back to ``bbox_threshold`` for fewer than two scores or when k-means fails.
    """
    from sklearn.cluster import KMeans

    threshold = bbox_threshold
    data = scores.reshape(-1, 1)
    if len(data) > 1:
        try:
            with warnings.catch_warnings():
                # identical scores: k-means finds one distinct cluster and says so
                warnings.simplefilter("ignore")
                centres = KMeans(n_clusters=2, random_state=42).fit(data).cluster_centers_
            threshold = 0.66 * bbox_threshold + 0.33 * np.mean(centres)
        except ValueError as err:
            log.warning("k-means on box scores failed (%s); using bbox_threshold=%s", err, bbox_threshold)
    return threshold


def select_boxes(scores: Tensor, boxes: Tensor, bbox_threshold: float) -> tuple[Tensor, Tensor]:
    """Keep detections scoring above the dynamic threshold, in score order.

    Args:
        scores: (Q,) descending; boxes: (Q, 4).

    Returns:
        kept scores (K,), kept boxes (K, 4), on the input device.
    """
    data = scores.detach().cpu().numpy()
    threshold = dynamic_threshold(data, bbox_threshold)
    if threshold > 0.0 and len(data) > 0:
        keep = torch.from_numpy(data > threshold).to(scores.device)
        return scores[keep], boxes[keep]
    return scores, boxes


def cellfinder_boxes(logits: Tensor, boxes: Tensor, image_size: int, bbox_threshold: float) -> tuple[Tensor, Tensor]:
    """CellFinder's boxes for one image as segmentation uses them: ``score_boxes`` then
    ``select_boxes``. Returns scores (K,) and boxes (K, 4) xyxy in model-input pixels."""
    scores, boxes_model = score_boxes(logits, boxes, image_size)
    return select_boxes(scores, boxes_model, bbox_threshold)


def resize_matrix(low_res: int, model_size: int, out_size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(out_size, low_res) matrix of bilinear (align_corners=False) low_res -> model_size -> out_size.

    Built by resizing an identity with ``F.interpolate`` itself, so the weights are torch's.
    """
    eye = torch.eye(low_res, dtype=dtype, device=device)[None, None]
    up = F.interpolate(eye, size=(model_size, low_res), mode="bilinear", align_corners=False)
    return F.interpolate(up, size=(out_size, low_res), mode="bilinear", align_corners=False)[0, 0]


class MaskPainter:
    """Paint thresholded, upsampled masks into a label image, higher label winning.

    Args:
        out_shape: (H, W) of the label image.
        low_res: side of the mask logits (256).
        model_size: side of the model input (1024).
        mask_threshold: foreground where sigmoid(logit) > this.
        device: where labels and the work live.
        budget: max elements of one batched window product (memory bound).
    """

    def __init__(
        self, out_shape: tuple[int, int], low_res: int = 256, model_size: int = 1024,
        mask_threshold: float = 0.4, device: torch.device | str = "cpu", budget: int = 1 << 24,
    ) -> None:
        self.device = torch.device(device)
        self.height, self.width = out_shape
        self.low_res = low_res
        self.mask_threshold = mask_threshold
        self.budget = budget
        # float64 where it is cheap; float32 on accelerators
        self.dtype = torch.float64 if self.device.type == "cpu" else torch.float32
        self.rows = resize_matrix(low_res, model_size, self.height, self.dtype, self.device)
        self.cols = resize_matrix(low_res, model_size, self.width, self.dtype, self.device)
        self.row_reads = _reads(self.rows)
        self.col_reads = _reads(self.cols)
        # Low-res pixels below this cannot produce a foreground pixel (with a margin for rounding).
        p = min(max(mask_threshold, 1e-7), 1 - 1e-7)
        self.low_res_cut = math.log(p / (1 - p)) - 1e-3
        self.labels = torch.zeros(self.height * self.width, dtype=torch.int32, device=self.device)

    def paint(self, logits: Tensor, first_label: int) -> np.ndarray:
        """Paint masks numbered first_label, first_label+1, ... .

        Args:
            logits: (n, low_res, low_res) mask logits (any float dtype, any device).
            first_label: label of logits[0]; must exceed every label painted before.

        Returns:
            (n, 8) int64, end exclusive: columns 0-3 the window (y0, y1, x0, x1) outside which
            a mask painted nothing, columns 4-7 the low-res logits (k0, k1, j0, j1) that window
            read (any value outside them, below the threshold, paints the same); zeros for a
            mask that cannot paint a pixel.
        """
        n = logits.shape[0]
        if n == 0:
            return np.zeros((0, 8), np.int64)
        logits = logits.to(device=self.device, dtype=self.dtype)
        passing = logits > self.low_res_cut
        any_row = passing.any(dim=2)  # (n, L)
        any_col = passing.any(dim=1)
        nonempty = any_row.any(dim=1)
        r0, r1 = _first_last(any_row)
        c0, c1 = _first_last(any_col)
        y0, y1, k0, k1 = _window(self.row_reads, r0, r1)
        x0, x1, j0, j1 = _window(self.col_reads, c0, c1)
        labels = torch.arange(first_label, first_label + n, device=self.device, dtype=torch.int32)

        sizes = torch.stack([y1 - y0 + 1, x1 - x0 + 1, k1 - k0 + 1, j1 - j0 + 1], dim=1)
        sizes = torch.where(nonempty[:, None] & (y1 >= y0)[:, None] & (x1 >= x0)[:, None], sizes, 0)
        # one download per call: the windows' sizes decide the groups, their origins the result
        host = torch.cat([sizes, torch.stack([y0, x0, k0, j0], dim=1)], dim=1).cpu().numpy()
        sizes_host, origin = host[:, :4], host[:, 4:]
        order = np.argsort(sizes_host[:, 0] * sizes_host[:, 1], kind="stable")
        order = order[(sizes_host[order, 0] > 0) & (sizes_host[order, 1] > 0)]
        windows = (y0, x0, k0, j0)
        for group in _groups(order, sizes_host, self.budget):
            self._paint_group(logits, labels, windows, sizes_host, group)
        painted = np.zeros((n, 8), np.int64)
        painted[order] = np.stack([origin[order, 0], origin[order, 0] + sizes_host[order, 0],
                                   origin[order, 1], origin[order, 1] + sizes_host[order, 1],
                                   origin[order, 2], origin[order, 2] + sizes_host[order, 2],
                                   origin[order, 3], origin[order, 3] + sizes_host[order, 3]], axis=1)
        return painted

    def _paint_group(self, logits, labels, windows, sizes_host, group: np.ndarray) -> None:
        idx = torch.from_numpy(group).to(self.device)
        hy, wx, ky, kx = sizes_host[group].max(axis=0).tolist()
        y0, x0, k0, j0 = (w[idx] for w in windows)
        sz = torch.from_numpy(sizes_host[group]).to(self.device)
        ar_hy = torch.arange(hy, device=self.device)
        ar_wx = torch.arange(wx, device=self.device)
        ar_ky = torch.arange(ky, device=self.device)
        ar_kx = torch.arange(kx, device=self.device)
        ys = (y0[:, None] + ar_hy).clamp(max=self.height - 1)  # (g, hy)
        xs = (x0[:, None] + ar_wx).clamp(max=self.width - 1)
        ks = (k0[:, None] + ar_ky).clamp(max=self.low_res - 1)  # (g, ky)
        js = (j0[:, None] + ar_kx).clamp(max=self.low_res - 1)
        # zero weights on padding so clamped duplicate indices add nothing
        row_w = self.rows[ys[:, :, None], ks[:, None, :]] * (ar_ky < sz[:, 2:3])[:, None, :]
        col_w = self.cols[xs[:, :, None], js[:, None, :]] * (ar_kx < sz[:, 3:4])[:, None, :]
        crop = logits[idx[:, None, None], ks[:, :, None], js[:, None, :]]  # (g, ky, kx)
        values = row_w @ crop @ col_w.transpose(1, 2)  # (g, hy, wx)
        inside = (ar_hy < sz[:, 0:1])[:, :, None] & (ar_wx < sz[:, 1:2])[:, None, :]
        fg = (values.float().sigmoid() > self.mask_threshold) & inside
        flat = ys[:, :, None] * self.width + xs[:, None, :]
        value = torch.where(fg, labels[idx][:, None, None], 0)
        self.labels.scatter_reduce_(0, flat.reshape(-1), value.reshape(-1), reduce="amax")

    def result(self) -> Tensor:
        """(H, W) int32 label image on the painter's device."""
        return self.labels.view(self.height, self.width)


def _reads(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """For each output index, the first and last low-res index it reads (non-decreasing)."""
    nz = matrix != 0
    first = nz.int().argmax(dim=1)
    last = matrix.shape[1] - 1 - nz.flip(1).int().argmax(dim=1)
    return first, last


def _first_last(flags: Tensor) -> tuple[Tensor, Tensor]:
    """(n, L) bool -> first and last True index per row (garbage for empty rows)."""
    length = flags.shape[1]
    first = flags.int().argmax(dim=1)
    last = length - 1 - flags.flip(1).int().argmax(dim=1)
    return first, last


def _window(reads: tuple[Tensor, Tensor], lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Output range [o0, o1] reading any low-res index in [lo, hi], and the low-res range it reads."""
    first, last = reads
    o0 = torch.searchsorted(last.contiguous(), lo.contiguous(), right=False)
    o1 = torch.searchsorted(first.contiguous(), hi.contiguous(), right=True) - 1
    n_out = first.shape[0]
    o0c = o0.clamp(max=n_out - 1)
    o1c = o1.clamp(min=0)
    return o0, o1, first[o0c], last[o1c]


def _groups(order: np.ndarray, sizes: np.ndarray, budget: int):
    """Split masks (sorted by window area) into groups whose padded product fits the budget."""
    start = 0
    while start < len(order):
        end = start + 1
        max_h, max_w, max_k = sizes[order[start], 0], sizes[order[start], 1], sizes[order[start], 2:].max()
        while end < len(order):
            h = max(max_h, sizes[order[end], 0])
            w = max(max_w, sizes[order[end], 1])
            k = max(max_k, sizes[order[end], 2:].max())
            if (end - start + 1) * max(h * w, h * k, k * k) > budget:
                break
            max_h, max_w, max_k = h, w, k
            end += 1
        yield order[start:end]
        start = end


def fill_holes_and_remove_small(labels: np.ndarray, min_size: int = 25) -> np.ndarray:
    """Per label in increasing order: drop it if under ``min_size`` px, else fill its holes
    and renumber it to the next free id (1, 2, ...). In place on ``labels``, returned.

    Filling a label's holes overwrites whatever lay inside them, as in the released code; a
    label kept (and numbered) when its turn came may lose every pixel to a later label's
    fill, so the ids can have gaps.
    """
    fill_holes_and_remove_small_kept(labels, min_size, renumber=True)
    return labels


def fill_holes_and_remove_small_kept(labels: np.ndarray, min_size: int = 25, renumber: bool = True) -> list[int]:
    """``fill_holes_and_remove_small`` in place; returns the original values of the labels kept.

    With ``renumber=False`` a kept label keeps its value: the result then differs from the
    renumbered one only by the increasing map of the returned values onto 1..K (a fill writes
    a value below every label still to come either way, so the same pixels are compared).
    """
    if labels.ndim != 2:
        raise ValueError(f"labels: expected 2 dimensions, got shape {labels.shape}")
    kept: list[int] = []
    for index, window in enumerate(find_objects(labels)):
        if window is None:
            continue
        region = labels[window] == index + 1
        size = region.sum()
        if min_size > 0 and size < min_size:
            labels[window][region] = 0
        elif size > 0:
            labels[window][binary_fill_holes(region)] = len(kept) + 1 if renumber else index + 1
            kept.append(index + 1)
    return kept


def remove_boundaries(labels: np.ndarray) -> np.ndarray:
    """Zero the one-pixel outline where a label meets another label or background."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, 1:] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return np.where(edge, 0, labels).astype(labels.dtype)


def morphological_postprocess(labels: np.ndarray) -> np.ndarray:
    """The released optional clean-up (``postprocess=True``), per label: remove holes and
    islands under 20 px, opening + closing, dilation + erosion with disk(10), Gaussian blur
    (sigma 3) > 0.5; labels are re-painted in increasing order (higher wins).

    The released loop builds disk(2) for the first label's opening/closing and then reuses
    the disk(10) it made for dilation for every later label; kept so results agree.
    """
    from skimage.morphology import disk

    out = np.zeros_like(labels)
    footprint = disk(2)
    with warnings.catch_warnings():
        # scikit-image 0.26 deprecates the binary_* operators the released code uses; the
        # replacements are not documented as equivalent, so we keep these (skimage < 0.28).
        warnings.simplefilter("ignore", FutureWarning)
        for value in np.unique(labels):
            if value == 0:
                continue
            out = np.maximum(out, _smooth_label(labels == value, footprint, value, labels.dtype))
            footprint = disk(10)
    return out


def _smooth_label(mask, footprint, value, dtype):
    from segment_anything.utils.amg import remove_small_regions
    from skimage.morphology import binary_closing, binary_dilation, binary_erosion, binary_opening, disk

    mask, _ = remove_small_regions(mask, 20, mode="holes")
    mask, _ = remove_small_regions(mask, 20, mode="islands")
    mask = binary_closing(binary_opening(mask, footprint), footprint)
    big = disk(10)
    mask = binary_erosion(binary_dilation(mask, big), big)
    mask = gaussian_filter(mask.astype(np.float32), sigma=3) > 0.5
    return mask.astype(dtype) * value
