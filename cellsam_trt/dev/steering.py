"""Random weights that behave like a trained CellSAM, for tests, demos and benchmarks.

Untrained CellSAM weights are degenerate: CellFinder scores of all queries agree to ~1e-4
(the k-means threshold then keeps nothing or is decided by rounding), predicted IoUs sit
at one value, and mask logits are near 0 everywhere (every mask covers the image). A
parity test on such weights compares nothing. ``steer_random_network`` rescales the
output heads, measured on a probe image, so that

- CellFinder scores spread over (0, 1) and some detections pass the dynamic threshold,
  with boxes of a few dozen pixels (scores depend on the image: steer on the image you
  will segment for a predictable count);
- predicted IoUs spread around 0.5 + ``iou_margin`` so the IoU filter drops some masks;
- each mask covers about ``mask_coverage`` of the image and masks differ between boxes.

Only biases and last-layer weights of the heads change; the checkpoint layout does not.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from ..engine import postprocess as post
from ..engine import preprocess as pre
from ..modeling import BoxDecoder, CellSAMNetwork
from .synthetic import synthetic_cells


def _capture_input(module: nn.Module, run) -> Tensor:
    captured = {}

    def hook(_, args):
        captured["x"] = args[0].detach()

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return captured["x"].reshape(-1, captured["x"].shape[-1])


def _standardise(linear: nn.Linear, x: Tensor, rows: slice, spread: float, centre: Tensor | float) -> None:
    """Rescale output rows of ``linear`` so that, on inputs x, they have mean ``centre`` and std ``spread``."""
    with torch.no_grad():
        z = x @ linear.weight[rows].T + linear.bias[rows]
        mean, std = z.mean(0), z.std(0).clamp_min(1e-12)
        gain = spread / std
        linear.weight[rows] *= gain[:, None]
        linear.bias[rows] = (linear.bias[rows] - mean) * gain + centre


@torch.no_grad()
def steer_random_network(
    network: CellSAMNetwork,
    probe: np.ndarray | None = None,
    *,
    score_spread: float = 3.0,
    score_shift: float = -2.0,
    box_size: float = 0.05,
    iou_margin: float = 0.3,
    iou_spread: float = 0.3,
    mask_coverage: float = 0.05,
    probe_boxes: int = 16,
    position_gain: float = 30.0,
) -> CellSAMNetwork:
    """Steer a random network in place (see module docstring) and return it."""
    network.eval()
    size = network.config.image_size
    image = pre.normalize_image(pre.format_image(synthetic_cells() if probe is None else probe))
    tensor = pre.to_tensor(image)
    finder = network.cellfinder.decode_head
    head = finder.transformer
    finder_input = pre.cellfinder_input(tensor, size, network.uses_model_cp)

    # Sharper position embeddings make query features differ by anchor position far above
    # float rounding (random attention is otherwise near-uniform).
    for layer in (head.adapt_pos1d[2], head.adapt_pos2d[2]):
        layer.weight.mul_(position_gain)
        layer.bias.mul_(position_gain)
    hidden = _capture_input(head.class_embed[-1], lambda: finder(finder_input))
    _standardise(head.class_embed[-1], hidden, slice(None), score_spread, score_shift)
    last = head.bbox_embed[-1].layers[-1]
    last.bias[2:] = math.log(box_size / (1 - box_size))
    last.weight.mul_(0.1)

    logits, boxes = finder(finder_input)
    scores, boxes = post.score_boxes(logits[0], boxes[0], size)
    scores, boxes = post.select_boxes(scores, boxes, 0.4)
    if len(boxes) == 0:
        boxes = post.score_boxes(logits[0], finder(finder_input)[1][0], size)[1]
    boxes = boxes[:probe_boxes]

    sam = network.sam
    decoder = BoxDecoder(sam.prompt_encoder, sam.mask_decoder)
    embedding = sam.image_encoder(pre.embedding_input(tensor, size, network.uses_model_cp))
    iou_head = sam.mask_decoder.iou_prediction_head.layers[-1]
    hidden = _capture_input(iou_head, lambda: decoder(embedding, boxes))
    _standardise(iou_head, hidden, slice(0, 1), iou_spread, 0.5 + iou_margin)

    hyper = sam.mask_decoder.output_hypernetworks_mlps[0].layers[-1]
    hidden = _capture_input(hyper, lambda: decoder(embedding, boxes))
    _standardise(hyper, hidden, slice(None), 1.0, 0.0)
    base_bias = hyper.bias.clone()
    cut = math.log(0.4 / 0.6)

    def coverage(shift: float) -> float:
        hyper.bias.copy_(base_bias - shift)
        masks, _ = decoder(embedding, boxes)
        return float((masks > cut).float().mean())

    lo, hi = -50.0, 50.0  # coverage falls as the shift grows
    for _ in range(24):
        mid = (lo + hi) / 2
        if coverage(mid) > mask_coverage:
            lo = mid
        else:
            hi = mid
    hyper.bias.copy_(base_bias - hi)
    return network
