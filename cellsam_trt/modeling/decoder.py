"""The decoder graph: prompt encoder + mask decoder for N boxes on one image embedding."""
from __future__ import annotations

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder
from torch import Tensor, nn


class BoxDecoder(nn.Module):
    """(embedding (1,C,64,64), boxes (N,4) xyxy in 1024 space) -> (mask_logits (N,1,256,256), iou (N,1)).

    Exactly SAM's ``prompt_encoder(boxes=...)`` followed by
    ``mask_decoder(..., multimask_output=False)``, batched over N.
    """

    def __init__(self, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder) -> None:
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    def forward(self, embedding: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes, masks=None)
        return self.mask_decoder(
            image_embeddings=embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
