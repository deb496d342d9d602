"""Synthetic cell images, boxes and mask logits for tests, the demo and the benchmarks.

One drawing routine (``draw_cells``) makes every image: fluorescence-like elliptic cells,
a nuclear channel (the cell's inner part) and a whole-cell channel, with Gaussian noise.
Each cell is drawn in its own window, so a large image with thousands of cells takes a
fraction of a second. The presets below are that routine with fixed parameters:

- ``synthetic_cells``: the test and demo image (a few dozen cells, 1-3 channels);
- ``bench_image``: the latency bench's square 3-channel image (blank first channel);
- a large slide with a given cell density is ``draw_cells`` with ``n_cells`` from the
  density and ``work_dtype=np.float32`` (half the memory of float64).

Boxes: ``cell_boxes`` places N boxes as cells would lie (a jittered grid), N exact.
Masks: ``cell_logits`` gives the decoder-like logits of the ellipse inscribed in each box.

Everything is deterministic given ``seed``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

# intensity scale of the uint16 images: a cell's whole-cell plane is 2000-4000 + noise
INTENSITY = 4000


def draw_cells(height: int, width: int, n_cells: int, *, radius: float, size_jitter: tuple[float, float] = (0.7, 1.3),
               channels: int = 2, seed: int = 0, work_dtype: type = np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n_cells`` random elliptic cells on a noisy background.

    Per cell, in this order, from ``numpy.random.default_rng(seed)``: centre y, centre x
    (uniform over the image), the two semi-axes (``radius`` times uniform in
    ``size_jitter``), the angle, the whole-cell and the nuclear brightness. A cell with no
    pixel inside the image is not drawn and draws no brightness. Then the noise, N(0, 0.03)
    per plane and pixel.

    Args:
        height, width: image size in pixels (>= 2).
        n_cells: cells to draw (>= 0).
        radius: mean semi-axis in pixels (> 0).
        size_jitter: (low, high) factors of ``radius`` for each semi-axis.
        channels: 1 (whole-cell only), 2 (nuclear, whole-cell) or 3 (a blank plane, nuclear,
            whole-cell: the layout CellSAM takes).
        seed: random seed.
        work_dtype: float type the planes are drawn in (np.float32 for large images).

    Returns:
        image: (H, W) uint16 for one channel, else (H, W, channels) uint16.
        boxes: (K, 4) float32 x1, y1, x2, y2 in pixels, the bounding box of each drawn
            cell's pixels (K <= n_cells), in drawing order.
    """
    if height < 2 or width < 2 or n_cells < 0 or radius <= 0 or channels not in (1, 2, 3):
        raise ValueError(f"draw_cells: expected height, width >= 2, n_cells >= 0, radius > 0 and channels in 1-3, "
                         f"got {height}, {width}, {n_cells}, {radius}, {channels}")
    rng = np.random.default_rng(seed)
    whole = np.zeros((height, width), dtype=work_dtype)
    nuclear = np.zeros((height, width), dtype=work_dtype)
    boxes = []
    for _ in range(n_cells):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = radius * rng.uniform(*size_jitter, size=2)
        angle = rng.uniform(0, np.pi)
        # the window holds every pixel within max(ry, rx) of the centre, hence the ellipse
        reach = max(ry, rx)
        y0, y1 = max(0, int(cy - reach)), min(height, int(cy + reach) + 2)
        x0, x1 = max(0, int(cx - reach)), min(width, int(cx + reach) + 2)
        dy, dx = np.mgrid[y0:y1, x0:x1] - np.array([cy, cx])[:, None, None]
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
        r2 = u * u + v * v
        inside = r2 < 1
        if not inside.any():
            continue
        whole[y0:y1, x0:x1] = np.maximum(whole[y0:y1, x0:x1], rng.uniform(0.5, 1.0) * inside)
        nuclear[y0:y1, x0:x1] = np.maximum(nuclear[y0:y1, x0:x1], rng.uniform(0.6, 1.0) * (r2 < 0.3))
        ys, xs = np.nonzero(inside)
        boxes.append([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1])
    noise = rng.normal(0, 0.03, size=(2, height, width)).astype(work_dtype, copy=False)
    planes = [np.clip(p + n, 0, None) for p, n in zip((nuclear, whole), noise)]
    if channels == 3:
        planes.insert(0, np.zeros_like(whole))
    image = (np.stack(planes[-channels:], axis=-1) * INTENSITY).astype(np.uint16)
    return (image[..., 0] if channels == 1 else image), np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def synthetic_cells(height: int = 512, width: int = 512, n_cells: int = 40, seed: int = 0, channels: int = 2) -> np.ndarray:
    """The test and demo image: ``n_cells`` cells of radius about min(H, W) / 30 (at least 4).

    Returns:
        (H, W) uint16 for ``channels == 1``, else (H, W, channels) uint16 (nuclear and
        whole-cell channels in the last slots, a blank first one for 3).
    """
    radius = max(4.0, min(height, width) / 30)
    return draw_cells(height, width, n_cells, radius=radius, size_jitter=(0.7, 1.4), channels=channels, seed=seed)[0]


def bench_image(size: int = 1024, n_cells: int = 800, seed: int = 0) -> np.ndarray:
    """The latency bench's image: (size, size, 3) uint16, blank, nuclear and whole-cell
    channels, cells of radius about size / 64 (at least 4)."""
    if size < 16:
        raise ValueError(f"size: expected >= 16, got {size}")
    return draw_cells(size, size, n_cells, radius=max(4.0, size / 64), channels=3, seed=seed)[0]


def cell_boxes(n: int, height: int, width: int, *, seed: int = 0, min_side: float = 6.0,
               max_side: float = 64.0) -> np.ndarray:
    """``n`` valid boxes spread over an image, as cells would be: (n, 4) float32 x1, y1, x2, y2.

    Box centres sit on a jittered grid of at least ``n`` cells (a random subset of cells,
    in random order, as detections come); sides are about the grid pitch, clipped to
    [min_side, max_side], and every box lies inside the image.
    """
    if n < 0:
        raise ValueError(f"n: expected a non-negative box count, got {n}")
    rng = np.random.default_rng(seed)
    cols = max(1, math.ceil(math.sqrt(n * width / height)))
    rows = max(1, math.ceil(n / cols))
    pitch_x, pitch_y = width / cols, height / rows
    cells = rng.permutation(rows * cols)[:n]
    cy = (cells // cols + 0.5 + rng.uniform(-0.25, 0.25, n)) * pitch_y
    cx = (cells % cols + 0.5 + rng.uniform(-0.25, 0.25, n)) * pitch_x
    side_x = np.clip(pitch_x * rng.uniform(0.7, 1.3, n), min_side, max_side)
    side_y = np.clip(pitch_y * rng.uniform(0.7, 1.3, n), min_side, max_side)
    boxes = np.stack([cx - side_x / 2, cy - side_y / 2, cx + side_x / 2, cy + side_y / 2], axis=1)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    return boxes.astype(np.float32)


def cell_logits(boxes: Tensor, low_res: int = 256, model_size: int = 1024, sharpness: float = 8.0) -> Tensor:
    """Mask logits of the ellipse inscribed in each box, as a trained decoder roughly gives.

    Args:
        boxes: (N, 4) xyxy in model-input pixels (any float dtype and device).
        low_res, model_size: decoder output side and model input side.
        sharpness: logit at the ellipse centre; outside the ellipse logits fall to -sharpness.

    Returns:
        (N, low_res, low_res) float32 on the boxes' device, positive inside the ellipse.
    """
    b = boxes.float()
    scale = model_size / low_res
    centres = (torch.arange(low_res, device=b.device, dtype=torch.float32) + 0.5) * scale
    half_x = ((b[:, 2] - b[:, 0]) / 2).clamp_min(scale)
    half_y = ((b[:, 3] - b[:, 1]) / 2).clamp_min(scale)
    u = (centres[None, :] - (b[:, 0] + b[:, 2])[:, None] / 2) / half_x[:, None]
    v = (centres[None, :] - (b[:, 1] + b[:, 3])[:, None] / 2) / half_y[:, None]
    r2 = v[:, :, None] ** 2 + u[:, None, :] ** 2
    return (sharpness * (1 - r2)).clamp_min(-sharpness)


def synthetic_slide(height: int, width: int, *, cell_radius: float = 9.0, density: float = 0.25,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A large fluorescence-like slide for the tiled and distributed paths (``draw_cells``
    in float32, so that tens of thousands of pixels per side stay cheap).

    Args:
        cell_radius: mean cell radius in pixels.
        density: fraction of the area covered by cells (before overlaps).

    Returns:
        image (H, W, 2) uint16 (nuclear, whole-cell), and the cells' boxes (N, 4) float32
        x1, y1, x2, y2 in image pixels.
    """
    n = max(1, int(density * height * width / (np.pi * cell_radius ** 2)))
    return draw_cells(height, width, n, radius=cell_radius, channels=2, seed=seed, work_dtype=np.float32)
