"""Synthetic images, boxes and mask logits: deterministic by seed, the promised shapes and
dtypes, boxes inside the image and around what was drawn."""
import numpy as np
import pytest
import torch

from cellsam_trt.dev.synthetic import bench_image, cell_boxes, cell_logits, draw_cells, synthetic_cells
from cellsam_trt.engine.postprocess import MaskPainter


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_draw_cells_layout_dtype_and_determinism(channels):
    image, boxes = draw_cells(90, 130, 12, radius=6, channels=channels, seed=4)
    assert image.dtype == np.uint16 and boxes.dtype == np.float32
    assert image.shape == ((90, 130) if channels == 1 else (90, 130, channels))
    again, again_boxes = draw_cells(90, 130, 12, radius=6, channels=channels, seed=4)
    assert np.array_equal(image, again) and np.array_equal(boxes, again_boxes)
    other, _ = draw_cells(90, 130, 12, radius=6, channels=channels, seed=5)
    assert not np.array_equal(image, other)
    if channels == 3:
        assert not image[..., 0].any()  # the blank plane stays blank


def test_draw_cells_boxes_bound_the_drawn_cells_inside_the_image():
    height, width = 120, 200
    image, boxes = draw_cells(height, width, 25, radius=7, channels=2, seed=2)
    assert boxes.shape == (25, 4)  # every cell of this radius has pixels inside the image
    x1, y1, x2, y2 = boxes.T
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= width).all() and (y2 <= height).all()
    assert (x2 > x1).all() and (y2 > y1).all()
    # the whole-cell plane is bright inside the boxes and only noise outside all of them
    covered = np.zeros((height, width), bool)
    for a, b, c, d in boxes.astype(int):
        covered[b:d, a:c] = True
    whole = image[..., 1].astype(float)
    assert whole[~covered].max() < 0.2 * 4000 < np.median(whole[covered])


def test_float32_drawing_matches_float64_but_for_rounding():
    wide, boxes64 = draw_cells(200, 160, 30, radius=8, seed=1)
    narrow, boxes32 = draw_cells(200, 160, 30, radius=8, seed=1, work_dtype=np.float32)
    assert np.array_equal(boxes64, boxes32)
    assert np.abs(wide.astype(int) - narrow.astype(int)).max() <= 1


def test_the_large_slide_keeps_its_pixels():
    """The tiled and distributed tests compare runs on this slide: its pixels and boxes for a
    seed must not drift (digests of the generator's output when it moved into this module)."""
    import hashlib

    from cellsam_trt.dev.synthetic import synthetic_slide

    image, boxes = synthetic_slide(600, 384, cell_radius=20.0, density=0.25, seed=1)
    assert image.shape == (600, 384, 2) and image.dtype == np.uint16 and boxes.shape == (45, 4)
    assert hashlib.sha256(image.tobytes()).hexdigest()[:16] == "935077665dc09030"
    assert hashlib.sha256(boxes.tobytes()).hexdigest()[:16] == "5c57fcc2e708aeb5"


def test_synthetic_cells_and_bench_image_presets():
    cells = synthetic_cells(64, 80, n_cells=5, seed=3, channels=1)
    assert cells.shape == (64, 80) and cells.dtype == np.uint16 and cells.max() > 2000
    assert np.array_equal(synthetic_cells(64, 80, 5, 3), draw_cells(64, 80, 5, radius=4.0, size_jitter=(0.7, 1.4), seed=3)[0])
    image = bench_image(128, n_cells=20, seed=1)
    assert image.shape == (128, 128, 3) and image.dtype == np.uint16
    assert image[..., 0].max() == 0 and image[..., 1].max() > 0 and image[..., 2].max() > 0
    with pytest.raises(ValueError, match="size"):
        bench_image(8)
    with pytest.raises(ValueError, match="n_cells"):
        draw_cells(32, 32, -1, radius=4)


@pytest.mark.parametrize("n", [1, 7, 100, 3500])
def test_cell_boxes_are_exact_valid_and_spread(n):
    boxes = cell_boxes(n, 1024, 768, seed=3)
    assert boxes.shape == (n, 4) and boxes.dtype == np.float32
    x1, y1, x2, y2 = boxes.T
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= 768).all() and (y2 <= 1024).all()
    assert (x2 - x1 >= 3).all() and (y2 - y1 >= 3).all()
    if n >= 100:
        centres = np.stack([(x1 + x2) / 2, (y1 + y2) / 2], 1)
        # spread over the whole image, not clustered: every quadrant holds about a quarter
        quadrant = (centres[:, 0] > 384).astype(int) + 2 * (centres[:, 1] > 512)
        assert np.bincount(quadrant, minlength=4).min() > 0.15 * n
    assert np.array_equal(boxes, cell_boxes(n, 1024, 768, seed=3))


def test_cell_logits_paint_the_ellipse_inside_each_box():
    boxes = torch.tensor([[100.0, 200.0, 140.0, 260.0], [500.0, 500.0, 530.0, 520.0]])
    logits = cell_logits(boxes, 256, 1024)
    assert logits.shape == (2, 256, 256)
    painter = MaskPainter((1024, 1024), low_res=256, model_size=1024)
    painter.paint(logits, 1)
    labels = painter.result().numpy()
    for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist(), start=1):
        ys, xs = np.nonzero(labels == k)
        assert len(ys) > 0.5 * np.pi / 4 * (x2 - x1) * (y2 - y1)  # most of the inscribed ellipse
        assert xs.min() >= x1 - 4 and xs.max() <= x2 + 4 and ys.min() >= y1 - 4 and ys.max() <= y2 + 4


