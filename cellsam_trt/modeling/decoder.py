"""The decoder graph: prompt encoder + mask decoder for N boxes on one image embedding."""
from __future__ import annotations

import math

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder
from segment_anything.modeling.transformer import Attention
from torch import Tensor, nn


class BoxDecoder(nn.Module):
    """(embedding (1,C,64,64), boxes (N,4) xyxy in 1024 space) -> (mask_logits (N,1,256,256), iou (N,1)).

    Computes what SAM's ``prompt_encoder(boxes=...)`` followed by
    ``mask_decoder(..., multimask_output=False)`` computes for each box, batched over N,
    without repeating the work that does not depend on the box (``forward_per_box_repeat``
    is SAM's own formulation, kept for comparison):

    - SAM copies the image embedding, its positional encoding and the no-mask embedding N
      times; here they stay (1, C, 64, 64) and broadcast.
    - In the first transformer block the image tokens have not yet seen any prompt, so
      their key/value projections (token-to-image attention) and query projection
      (image-to-token attention) are the same for every box: computed once.
    - Only the first mask token's mask is used (``multimask_output=False``), so only its
      hypernetwork runs.
    """

    def __init__(self, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder) -> None:
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    def forward(self, embedding: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        decoder = self.mask_decoder
        transformer = decoder.transformer
        sparse, _ = self.prompt_encoder(points=None, boxes=boxes, masks=None)
        n = sparse.shape[0]
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(n, -1, -1), sparse), dim=1)  # (N, T, C)

        # without a mask prompt the dense embedding is the no-mask embedding, for every box
        src = embedding + self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        _, c, h, w = src.shape
        keys = src.flatten(2).permute(0, 2, 1)  # (1, HW, C)
        key_pe = self.prompt_encoder.get_dense_pe().flatten(2).permute(0, 2, 1)  # (1, HW, C)

        queries, keys = _first_block(transformer.layers[0], tokens, keys, key_pe)
        for layer in transformer.layers[1:]:
            queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=key_pe)
        attn_out = transformer.final_attn_token_to_image(q=queries + tokens, k=keys + key_pe, v=keys)
        hs = transformer.norm_final_attn(queries + attn_out)

        upscaled = decoder.output_upscaling(keys.transpose(1, 2).reshape(n, c, h, w))
        hyper = decoder.output_hypernetworks_mlps[0](hs[:, 1, :])  # (N, C')
        nb, cu, hu, wu = upscaled.shape
        masks = (hyper.unsqueeze(1) @ upscaled.view(nb, cu, hu * wu)).view(nb, 1, hu, wu)
        iou = decoder.iou_prediction_head(hs[:, 0, :])[:, :1]
        return masks, iou

    def forward_per_box_repeat(self, embedding: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """SAM's own batched call (the image side repeated N times); same outputs as ``forward``."""
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes, masks=None)
        return self.mask_decoder(
            image_embeddings=embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )


def _first_block(block: nn.Module, tokens: Tensor, keys: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
    """SAM's first ``TwoWayAttentionBlock`` (no PE on the self-attention) with the image side
    shared: tokens (N, T, C), keys and key_pe (1, HW, C) -> queries (N, T, C), keys (N, HW, C)."""
    queries = block.norm1(block.self_attn(q=tokens, k=tokens, v=tokens))
    image_k = keys + key_pe  # the same for every box in this block

    t2i = block.cross_attn_token_to_image
    attn_out = _attend(t2i, t2i.q_proj(queries + tokens), t2i.k_proj(image_k), t2i.v_proj(keys))
    queries = block.norm2(queries + attn_out)
    queries = block.norm3(queries + block.mlp(queries))

    i2t = block.cross_attn_image_to_token
    q = queries + tokens
    attn_out = _attend(i2t, i2t.q_proj(image_k), i2t.k_proj(q), i2t.v_proj(queries))
    return queries, block.norm4(keys + attn_out)


def _attend(attention: Attention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SAM's ``Attention.forward`` after the input projections; batch dims of size 1 broadcast."""
    heads = attention.num_heads

    def split(x: Tensor) -> Tensor:  # (B, L, D) -> (B, heads, L, D / heads)
        return x.reshape(x.shape[0], x.shape[1], heads, x.shape[2] // heads).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    out = attn @ v
    b, _, length, d = out.shape
    return attention.out_proj(out.transpose(1, 2).reshape(b, length, heads * d))
