"""How close two segmentations of the same image are (fp16 vs fp32, engine vs torch).

The bar for reduced precision (docs/ARCHITECTURE.md): per-cell IoU >= 0.97 and matched-cell F1 >= 0.99
against the fp32 result on the same weights. A cell of one label image matches a cell of
the other when their IoU exceeds 0.5; such a match is unique (two cells of one image cannot
both overlap a third by more than half of their union).
"""
from __future__ import annotations

from typing import Any

import numpy as np


def _as_labels(name: str, labels: Any) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: expected an (H, W) integer label image, got {arr.dtype} {arr.shape}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name}: labels must be >= 0 (0 is background)")
    return arr


def label_agreement(reference: Any, test: Any, match_iou: float = 0.5) -> dict[str, Any]:
    """Match the cells of two label images by IoU.

    Args:
        reference, test: (H, W) integer labels, 0 = background.
        match_iou: cells match when their IoU exceeds this (>= 0.5 keeps matches unique).

    Returns:
        reference_cells, test_cells, matched, f1 (2 * matched / (reference_cells +
        test_cells); 1.0 when both are empty), and over the matched cells iou_mean,
        iou_min, iou_p5 (None when nothing matched), plus differing_pixels and
        foreground_agreement (fraction of pixels both call foreground or both background).
    """
    ref = _as_labels("reference", reference)
    out = _as_labels("test", test)
    if ref.shape != out.shape:
        raise ValueError(f"test: shape {out.shape} differs from the reference's {ref.shape}")
    if not 0.5 <= match_iou < 1:
        raise ValueError(f"match_iou: expected a value in [0.5, 1), got {match_iou}")
    ref_ids, ref_flat = np.unique(ref, return_inverse=True)
    out_ids, out_flat = np.unique(out, return_inverse=True)
    ref_area = np.bincount(ref_flat.ravel(), minlength=len(ref_ids))
    out_area = np.bincount(out_flat.ravel(), minlength=len(out_ids))
    both = (ref.ravel() > 0) & (out.ravel() > 0)
    pairs, inter = np.unique(np.stack([ref_flat.ravel()[both], out_flat.ravel()[both]]), axis=1, return_counts=True)
    union = ref_area[pairs[0]] + out_area[pairs[1]] - inter
    iou = inter / union
    matched = iou[iou > match_iou]
    n_ref, n_out = int((ref_ids > 0).sum()), int((out_ids > 0).sum())
    f1 = 1.0 if n_ref + n_out == 0 else 2 * len(matched) / (n_ref + n_out)
    stats = (
        {"iou_mean": float(matched.mean()), "iou_min": float(matched.min()), "iou_p5": float(np.percentile(matched, 5))}
        if len(matched) else {"iou_mean": None, "iou_min": None, "iou_p5": None}
    )
    return {"reference_cells": n_ref, "test_cells": n_out, "matched": int(len(matched)), "f1": float(f1), **stats,
            "differing_pixels": int((ref != out).sum()),
            "foreground_agreement": float(((ref > 0) == (out > 0)).mean())}


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) and (M, 4) x1, y1, x2, y2 -> (N, M) IoU."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def box_agreement(reference: np.ndarray, test: np.ndarray, match_iou: float = 0.9) -> dict[str, Any]:
    """How many boxes of ``reference`` have a box in ``test`` with IoU >= ``match_iou``.

    Returns reference_boxes, test_boxes, matched (reference boxes with a partner), recall
    (matched / reference_boxes), precision (test boxes with a partner / test_boxes) and
    best_iou_mean (mean over reference boxes of the best IoU they find).
    """
    reference = np.asarray(reference, np.float64).reshape(-1, 4)
    test = np.asarray(test, np.float64).reshape(-1, 4)
    if len(reference) == 0 or len(test) == 0:
        same = len(reference) == len(test)
        return {"reference_boxes": len(reference), "test_boxes": len(test), "matched": 0,
                "recall": 1.0 if same else 0.0, "precision": 1.0 if same else 0.0,
                "best_iou_mean": 1.0 if same else 0.0}
    iou = box_iou(reference, test)
    found = iou.max(1) >= match_iou
    return {
        "reference_boxes": len(reference), "test_boxes": len(test),
        "matched": int(found.sum()),
        "recall": float(found.mean()),
        "precision": float((iou.max(0) >= match_iou).mean()),
        "best_iou_mean": float(iou.max(1).mean()),
    }


def precision_agreement(reference_session: Any, test_session: Any, image: np.ndarray,
                        boxes: np.ndarray | None = None) -> dict[str, Any]:
    """Segment ``image`` with both sessions (e.g. torch fp32 and fp16) and compare.

    Returns {"labels": label_agreement, "boxes": box_agreement of the prompt boxes whose
    masks passed the IoU filter (CellFinder's when ``boxes`` is None), "kept": how many
    masks passed it in each}.
    """
    ref_labels, ref = reference_session.segment(image, boxes=boxes, return_details=True)
    out_labels, out = test_session.segment(image, boxes=boxes, return_details=True)
    return {"labels": label_agreement(ref_labels, out_labels), "boxes": box_agreement(ref.boxes, out.boxes),
            "kept": {"reference": int(len(ref.iou)), "test": int(len(out.iou))}}
