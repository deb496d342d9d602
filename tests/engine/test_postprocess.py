"""Post-processing: windowed batched mask painting equals full-resolution per-mask painting."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cellsam_trt.engine import postprocess as post


def blob_logits(n, low_res=256, seed=0, scale=1.0):
    """Localised random blobs: negative background, a few passing regions of varied size."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(low_res), torch.arange(low_res), indexing="ij")
    out = torch.empty(n, low_res, low_res)
    for i in range(n):
        cy, cx = torch.randint(0, low_res, (2,), generator=g).tolist()
        r = float(torch.randint(1, low_res // 6, (1,), generator=g))
        d2 = ((yy - cy) ** 2 + (xx - cx) ** 2).float() / (r * r)
        noise = torch.randn(low_res, low_res, generator=g) * 0.3
        out[i] = scale * (4.0 * (1 - d2)).clamp(min=-8) + noise
    return out


def full_resolution_labels(logits, shape, threshold=0.4, model_size=1024):
    """The released way: each mask upsampled to 1024 then to (H, W), sigmoid > threshold, max(k * mask)."""
    labels = np.zeros(shape, dtype=np.int64)
    for k, mask in enumerate(logits, start=1):
        up = F.interpolate(mask[None, None], (model_size, model_size), mode="bilinear", align_corners=False)
        up = F.interpolate(up, shape, mode="bilinear", align_corners=False)
        fg = (torch.sigmoid(up[0, 0]) > threshold).numpy()
        labels = np.maximum(labels, fg * k)
    return labels


@pytest.mark.parametrize("shape", [(1024, 1024), (300, 400), (1500, 700), (64, 2000), (17, 23)])
def test_windowed_painting_equals_full_resolution(shape):
    logits = blob_logits(12, seed=sum(shape))
    painter = post.MaskPainter(shape)
    painter.paint(logits[:5], 1)
    painter.paint(logits[5:], 6)  # chunks continue the numbering
    ours = painter.result().numpy()
    expected = full_resolution_labels(logits, shape)
    assert ours.dtype == np.int32
    assert len(np.unique(expected)) > 5  # the comparison has content
    np.testing.assert_array_equal(ours, expected)


def test_small_budget_splits_into_groups_with_same_result():
    logits = blob_logits(9, seed=5)
    big = post.MaskPainter((400, 300))
    big.paint(logits, 1)
    small = post.MaskPainter((400, 300), budget=1 << 12)
    small.paint(logits, 1)
    assert torch.equal(big.result(), small.result())


def test_masks_that_never_pass_paint_nothing_and_all_pass_paints_everything():
    painter = post.MaskPainter((50, 60))
    painter.paint(torch.full((3, 256, 256), -5.0), 1)
    assert not painter.result().any()
    painter.paint(torch.full((1, 256, 256), 5.0), 4)
    assert (painter.result() == 4).all()


def test_threshold_is_on_sigmoid_like_released():
    cut = math.log(0.4 / 0.6)
    painter = post.MaskPainter((32, 32))
    painter.paint(torch.stack([torch.full((256, 256), cut + 1e-3), torch.full((256, 256), cut - 1e-3)]), 1)
    assert (painter.result() == 1).all()


def test_score_boxes_matches_detr_postprocess():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 2, generator=g)
    boxes = torch.rand(50, 4, generator=g) * 0.5 + 0.1
    scores, xyxy = post.score_boxes(logits, boxes, 1024)
    prob = logits.sigmoid().reshape(-1)
    expected_scores, idx = prob.topk(50)
    assert torch.equal(scores, expected_scores)
    q = idx // 2
    cx, cy, w, h = boxes[q].T
    expected = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1) * 1024
    torch.testing.assert_close(xyxy, expected)


def test_dynamic_threshold_uses_two_cluster_centres():
    scores = np.concatenate([np.full(30, 0.05), np.full(10, 0.9)]).astype(np.float32)
    t = post.dynamic_threshold(scores, 0.4)
    assert t == pytest.approx(0.66 * 0.4 + 0.33 * (0.05 + 0.9) / 2, rel=1e-6)
    kept, _ = post.select_boxes(torch.from_numpy(scores), torch.zeros(40, 4), 0.4)
    assert len(kept) == 10
    assert post.dynamic_threshold(np.array([0.7], np.float32), 0.4) == 0.4


def released_fill_holes(masks, min_size):
    """Per label in order: drop if small, else fill holes and renumber - re-stated for the test."""
    from scipy import ndimage

    masks = masks.copy()
    j = 0
    for i, slc in enumerate(ndimage.find_objects(masks)):
        if slc is None:
            continue
        region = masks[slc] == i + 1
        if region.sum() < min_size:
            masks[slc][region] = 0
        else:
            masks[slc][ndimage.binary_fill_holes(region)] = j + 1
            j += 1
    return masks


def test_fill_holes_renumbers_drops_small_and_overwrites_enclosed():
    labels = np.zeros((40, 40), dtype=np.int32)
    labels[2:12, 2:12] = 2           # ring with a hole containing label 5
    labels[5:9, 5:9] = 5
    labels[20:22, 20:22] = 3         # 4 px: dropped
    labels[25:35, 25:35] = 7
    labels[30, 30] = 0               # a hole
    out = post.fill_holes_and_remove_small(labels.copy(), 25)
    np.testing.assert_array_equal(out, released_fill_holes(labels, 25))
    assert set(np.unique(out)) == {0, 1, 2}
    assert (out[2:12, 2:12] == 1).all()  # label 5 inside the hole is overwritten by the filled ring
    assert out[30, 30] == 2


def test_remove_boundaries_zeroes_outlines():
    labels = np.zeros((10, 10), dtype=np.int32)
    labels[2:8, 2:5] = 1
    labels[2:8, 5:8] = 2
    out = post.remove_boundaries(labels)
    assert out[4, 3] == 1 and out[4, 6] == 2
    # the released outline marks the right pixel of a horizontal change and the upper of a vertical one
    assert out[4, 5] == 0 and out[4, 2] == 0 and out[7, 3] == 0
    assert out[4, 4] == 1 and out[2, 3] == 1
    assert (out[labels == 0] == 0).all()


def test_morphological_postprocess_smooths_each_label():
    labels = np.zeros((80, 80), dtype=np.int32)
    yy, xx = np.mgrid[:80, :80]
    labels[(yy - 40) ** 2 + (xx - 40) ** 2 < 20 ** 2] = 1
    labels[10, 10] = 2  # a speck: removed as an island below 20 px ... keeps its largest region
    out = post.morphological_postprocess(labels)
    assert out.shape == labels.shape and out.dtype == labels.dtype
    assert (out == 1).sum() > 1000
