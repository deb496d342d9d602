"""The released CellSAM inference algorithm, one box at a time (the slow baseline).

What the released ``CellSAM.predict`` does per box: one prompt-encoder + mask-decoder call,
IoU filter, bilinear upsampling of the 256x256 logits to 1024x1024 and then to (H, W),
sigmoid > threshold on the CPU, and painting ``max(k * mask_k)``. Used as the parity
oracle in tests and as the baseline in benchmarks; ``pipeline.CellSAM`` must give the same
labels.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..engine import postprocess as post
from ..engine import preprocess as pre
from ..modeling import CellSAMNetwork
from ..modeling.config import InferenceConfig
from ..runtime.torch_backend import inference_copy


@torch.inference_mode()
def per_box_labels(
    network: CellSAMNetwork, embedding: torch.Tensor, boxes: torch.Tensor, out_shape: tuple[int, int],
    iou_threshold: float = 0.5, mask_threshold: float = 0.4,
) -> np.ndarray:
    """Decode and paint boxes one at a time.

    Args:
        embedding: (1, C, 64, 64) on the network's device.
        boxes: (N, 4) float32 xyxy in model-input (1024) pixels.
        out_shape: (H, W) of the image.

    Returns:
        (H, W) int64 labels before hole filling: mask k (k-th box passing the IoU filter)
        has label k+1, later masks over earlier ones.
    """
    sam = network.sam
    device = embedding.device
    size = network.config.image_size
    masks = []
    for box in boxes:
        sparse, dense = sam.prompt_encoder(points=None, boxes=box.reshape(1, 1, 4).to(device), masks=None)
        low_res, iou = sam.mask_decoder(
            image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
        )
        if iou[0, 0] < iou_threshold:
            continue
        masks.append(upsample_mask(low_res[0, 0], size, out_shape, mask_threshold))
    return paint_masks(masks, out_shape)


def upsample_mask(logits: torch.Tensor, model_size: int, out_shape: tuple[int, int], mask_threshold: float = 0.4
                  ) -> np.ndarray:
    """One (L, L) mask logit map -> (H, W) uint8 foreground, on the CPU: bilinear L ->
    model_size -> out_shape, then sigmoid > threshold (the released post-processing)."""
    up = F.interpolate(logits.cpu()[None, None], (model_size, model_size), mode="bilinear", align_corners=False)
    up = F.interpolate(up, out_shape, mode="bilinear", align_corners=False)
    return (torch.sigmoid(up[0, 0]) > mask_threshold).numpy().astype(np.uint8)


def paint_masks(masks: list[np.ndarray], out_shape: tuple[int, int]) -> np.ndarray:
    """The released painting: (H, W) int64 ``max(k * mask_k)``, masks numbered from 1."""
    if not masks:
        return np.zeros(out_shape, dtype=np.int64)
    stack = np.stack(masks)
    return np.max(stack * np.arange(1, len(masks) + 1)[:, None, None], axis=0)


@torch.inference_mode()
def reference_segment(
    network: CellSAMNetwork, image: np.ndarray, boxes: np.ndarray | None = None,
    options: InferenceConfig | None = None, device: str | torch.device = "cpu",
) -> np.ndarray:
    """Whole released algorithm on one image (normalize=True): -> (H, W) int64 labels."""
    opts = options or InferenceConfig()
    network = inference_copy(network, device)  # the caller's network stays where it is
    size = network.config.image_size
    image3 = pre.normalize_image(pre.format_image(image))
    height, width = image3.shape[:2]
    tensor = pre.to_tensor(image3)
    embedding = network.sam.image_encoder(pre.embedding_input(tensor, size, network.uses_model_cp).to(device))
    if boxes is None:
        logits, raw = network.cellfinder.decode_head(pre.cellfinder_input(tensor, size, network.uses_model_cp).to(device))
        scores, model_boxes = post.score_boxes(logits[0], raw[0], size)
        _, model_boxes = post.select_boxes(scores, model_boxes, opts.bbox_threshold)
    else:
        model_boxes = torch.from_numpy(pre.boxes_to_model(boxes, height, width, size))
    labels = per_box_labels(network, embedding, model_boxes, (height, width), opts.iou_threshold, opts.mask_threshold)
    return post.fill_holes_and_remove_small(labels, opts.min_size)
