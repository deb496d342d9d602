"""Pictures the command line writes: a label overlay on the image, as PNG."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..engine.preprocess import format_image
from ..io import atomic_write


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(H, W[, C]) image + (H, W) labels -> (H, W, 3) uint8 RGB with cells tinted and outlined."""
    from skimage.color import label2rgb
    from skimage.segmentation import find_boundaries

    planes = format_image(image)
    shown = planes[..., 1:].max(axis=-1) if planes[..., 1].any() else planes[..., 2]
    lo, hi = np.percentile(shown, [1, 99.5])
    gray = np.clip((shown - lo) / max(hi - lo, 1e-12), 0, 1)
    rgb = label2rgb(labels, image=gray, alpha=0.3, bg_label=0, image_alpha=1.0)
    rgb[find_boundaries(labels, mode="inner")] = (1.0, 1.0, 0.0)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """(H, W, 3) uint8 RGB -> PNG file, atomically (``io.atomic_write``)."""
    import cv2

    # encoded in memory and written by Python: cv2.imwrite says only "False" when the disk
    # is full, where a file write raises the system's error (no space left on device)
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise ValueError(f"cannot encode the overlay {path} as PNG (shape {rgb.shape}, dtype {rgb.dtype})")
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(encoded.tobytes()))
