"""The decoder graph: prompt encoder + mask decoder for N boxes on one image embedding."""
from __future__ import annotations

import math
from typing import Protocol

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder
from segment_anything.modeling.transformer import Attention
from torch import Tensor, nn
from torch.nn import functional as F


class BoxDecoder(nn.Module):
    """(embedding (1,C,64,64), boxes (N,4) xyxy in 1024 space) -> (mask_logits (N,1,256,256), iou (N,1)).

    Computes what SAM's ``prompt_encoder(boxes=...)`` followed by
    ``mask_decoder(..., multimask_output=False)`` computes for each box, batched over N,
    with less work per box (``forward_per_box_repeat`` is SAM's own formulation, kept for
    comparison):

    - SAM copies the image embedding, its positional encoding and the no-mask embedding N
      times; here they stay (1, C, 64, 64) and broadcast.
    - In the first transformer block the image tokens have not yet seen any prompt, so
      their key/value projections (token-to-image attention) and query projection
      (image-to-token attention) are the same for every box: computed once.
    - From the second block on the image side differs per box, and SAM projects all
      L = 64 x 64 image tokens to keys, values or queries although they meet only T = 7
      prompt tokens. The cross attentions are reassociated so that the products with the
      projection weights happen on the token side (``_tokens_to_image``,
      ``_image_to_tokens``): per box and attention about 2 x L x C x H x T instead of
      2 x L x C x D multiply-adds (ViT-B: 59 M + 59 M instead of 2 x 134 M), exact in real
      arithmetic, equal to SAM's outputs up to float32 rounding.
    - Only the first mask token's mask is used (``multimask_output=False``), so only its
      hypernetwork runs.
    - The output upscaling runs channels-last as matrix products (``_upscaled_masks``):
      its transposed convolutions have kernel 2 and stride 2, so they do not overlap.
    """

    def __init__(self, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder) -> None:
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    def forward(self, embedding: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        keys, hyper, iou = self.decode_tokens(embedding, boxes)
        return self.mask_head(keys, hyper), iou

    def decode_tokens(self, embedding: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Everything but the mask head, for all N boxes: embedding (1, C, G, G), boxes (N, 4) ->

        - keys (N, G*G, C): the image tokens after the two-way transformer,
        - hyper (N, C / 8): the first mask token's hypernetwork output,
        - iou (N, 1): the predicted IoU of that mask.

        ``mask_head(keys, hyper)`` then makes the masks, for all rows or only those worth
        keeping (say, boxes whose IoU passes a threshold): the mask head is most of the
        decoder's arithmetic per box.
        """
        tokens, keys, key_pe = self.prompt_side(embedding, boxes)
        return self.two_way(tokens, keys, key_pe, EagerImageSide(key_pe))

    def two_way(self, tokens: Tensor, keys: Tensor, key_pe: Tensor, side: ImageSide) -> tuple[Tensor, Tensor, Tensor]:
        """SAM's two-way transformer and output heads, with the per-box image side delegated.

        tokens (N, T, C), keys and key_pe (1, L, C) from ``prompt_side``. The token side (self
        attention, MLPs, norms) runs here; ``side`` computes the cross attentions whose cost
        grows with the L image tokens, and decides how the boxes' image tokens are stored.
        Returns ``decode_tokens``' keys (as ``side`` stores them), hyper and iou.
        """
        decoder = self.mask_decoder
        transformer = decoder.transformer

        # the first block: no PE on the self-attention, and the image side is still the
        # same for every box, so its projections are computed once
        block = transformer.layers[0]
        queries = block.norm1(block.self_attn(q=tokens, k=tokens, v=tokens))
        image_k = keys + key_pe
        t2i = block.cross_attn_token_to_image
        attn_out = attend(t2i, t2i.q_proj(queries + tokens), t2i.k_proj(image_k), t2i.v_proj(keys))
        queries = block.norm2(queries + attn_out)
        queries = block.norm3(queries + block.mlp(queries))
        i2t = block.cross_attn_image_to_token
        keys = side.first_image_update(i2t, block.norm4, i2t.q_proj(image_k), keys, queries + tokens, queries)

        for layer in transformer.layers[1:]:
            q = queries + tokens
            queries = layer.norm1(queries + layer.self_attn(q=q, k=q, v=queries))
            attn_out = side.tokens_to_image(layer.cross_attn_token_to_image, queries + tokens, keys)
            queries = layer.norm2(queries + attn_out)
            queries = layer.norm3(queries + layer.mlp(queries))
            keys = side.image_update(layer.cross_attn_image_to_token, layer.norm4, keys, queries + tokens, queries)
        attn_out = side.tokens_to_image(transformer.final_attn_token_to_image, queries + tokens, keys)
        hs = transformer.norm_final_attn(queries + attn_out)

        hyper = decoder.output_hypernetworks_mlps[0](hs[:, 1, :])  # (N, C / 8)
        iou = decoder.iou_prediction_head(hs[:, 0, :])[:, :1]
        return keys, hyper, iou

    def prompt_side(self, embedding: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The transformer's inputs: tokens (N, T, C) (IoU token, mask tokens, the box's two
        corner embeddings), and the image side shared by every box: keys (1, HW, C) (the
        embedding plus the no-mask embedding) and their positional encoding key_pe (1, HW, C)."""
        decoder = self.mask_decoder
        sparse, _ = self.prompt_encoder(points=None, boxes=boxes, masks=None)
        n = sparse.shape[0]
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(n, -1, -1), sparse), dim=1)
        # without a mask prompt the dense embedding is the no-mask embedding, for every box
        src = embedding + self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        keys = src.flatten(2).permute(0, 2, 1)
        key_pe = self.prompt_encoder.get_dense_pe().flatten(2).permute(0, 2, 1)
        return tokens, keys, key_pe

    def mask_head(self, keys: Tensor, hyper: Tensor) -> Tensor:
        """Mask logits (N, 1, 4G, 4G) from ``decode_tokens``' keys (N, G*G, C) and hyper (N, C / 8),
        for whichever rows are passed (``keys[kept], hyper[kept]``)."""
        h, w = self.prompt_encoder.image_embedding_size
        return _upscaled_masks(self.mask_decoder.output_upscaling, keys, hyper, h, w)

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


class ImageSide(Protocol):
    """The per-box image side of ``BoxDecoder.two_way``: the cross attentions that meet the
    L image tokens. ``EagerImageSide`` is the torch formulation; the fused decoder's runs on
    Triton kernels. ``keys`` are the boxes' image tokens (N, L, C), stored as the side likes."""

    def first_image_update(self, attention: Attention, norm: nn.LayerNorm, image_q: Tensor, keys: Tensor,
                           tokens_k: Tensor, tokens_v: Tensor) -> Tensor:
        """First block: norm(keys + attention(q=image, k=tokens_k, v=tokens_v)), with image_q the
        shared query projection (1, L, D) and keys the shared (1, L, C) -> (N, L, C)."""

    def image_update(self, attention: Attention, norm: nn.LayerNorm, keys: Tensor,
                     tokens_k: Tensor, tokens_v: Tensor) -> Tensor:
        """Later blocks: norm(keys + attention(q=keys + key_pe, k=tokens_k, v=tokens_v)) -> (N, L, C)."""

    def tokens_to_image(self, attention: Attention, queries: Tensor, keys: Tensor) -> Tensor:
        """attention(q=queries, k=keys + key_pe, v=keys) for the prompt tokens -> (N, T, C)."""


class EagerImageSide:
    """``ImageSide`` in torch, with the reassociated cross attentions (``_tokens_to_image``,
    ``_image_to_tokens``); key_pe (1, L, C) is the image's positional encoding."""

    def __init__(self, key_pe: Tensor) -> None:
        self.key_pe = key_pe

    def first_image_update(self, attention: Attention, norm: nn.LayerNorm, image_q: Tensor, keys: Tensor,
                           tokens_k: Tensor, tokens_v: Tensor) -> Tensor:
        return norm(keys + _image_to_tokens(attention, image_q, tokens_k, tokens_v, image_projected=True))

    def image_update(self, attention: Attention, norm: nn.LayerNorm, keys: Tensor, tokens_k: Tensor,
                     tokens_v: Tensor) -> Tensor:
        image = keys + self.key_pe
        return norm(keys + _image_to_tokens(attention, image, tokens_k, tokens_v, image_projected=False))

    def tokens_to_image(self, attention: Attention, queries: Tensor, keys: Tensor) -> Tensor:
        return _tokens_to_image(attention, queries, keys + self.key_pe, keys)


def head_weights(linear: nn.Linear, heads: int) -> Tensor:
    """An input projection's weight (D, C) as (heads, D / heads, C): head h's rows."""
    d_model, c = linear.weight.shape
    return linear.weight.reshape(heads, d_model // heads, c)


def _tokens_to_image(attention: Attention, queries: Tensor, image_k: Tensor, image_v: Tensor) -> Tensor:
    """``attention(q=queries, k=image_k, v=image_v)`` for a few tokens attending to a large image.

    queries (N, T, C); image_k, image_v (N, L, C) with L >> T -> (N, T, C). Per head h, with
    the token queries q_h = queries Wq_h^T + bq_h (N, T, d):

        scores_h = q_h (image_k Wk_h^T + bk_h)^T / sqrt(d) = (q_h Wk_h) image_k^T / sqrt(d) + q_h bk_h^T

    and the last term is constant along the softmax axis, so it drops out. With A_h =
    softmax(scores_h), whose rows sum to one:

        A_h (image_v Wv_h^T + bv_h) = (A_h image_v) Wv_h^T + bv_h

    so the image is never projected: two (H T, C) x (C, L) products instead of two (L, C) x (C, D).
    """
    heads = attention.num_heads
    n, t, c = queries.shape
    d = attention.internal_dim // heads
    q = attention.q_proj(queries).reshape(n, t, heads, d).transpose(1, 2)  # (N, H, T, d)
    g = (q @ head_weights(attention.k_proj, heads)) / math.sqrt(d)  # (N, H, T, C)
    scores = g.reshape(n, heads * t, c) @ image_k.transpose(1, 2)  # (N, H*T, L)
    mixed = torch.softmax(scores, dim=-1) @ image_v  # (N, H*T, C)
    wv = head_weights(attention.v_proj, heads).transpose(1, 2)  # (H, C, d)
    out = mixed.reshape(n, heads, t, c) @ wv + attention.v_proj.bias.reshape(heads, 1, d)  # (N, H, T, d)
    return attention.out_proj(out.transpose(1, 2).reshape(n, t, heads * d))


def _image_to_tokens(attention: Attention, image: Tensor, tokens_k: Tensor, tokens_v: Tensor, *,
                     image_projected: bool) -> Tensor:
    """``attention(q=image, k=tokens_k, v=tokens_v)`` for a large image attending to a few tokens.

    image: (N or 1, L, C) image queries, or with ``image_projected`` already ``q_proj(image)``
    (1, L, D) (the first block, where it is shared by every box); tokens_k, tokens_v
    (N, T, C) -> (N, L, C). Per head h, with k_h, v_h the projected tokens (N, T, d):

        scores_h = (image Wq_h^T + bq_h) k_h^T / sqrt(d) = image (Wq_h^T k_h^T) / sqrt(d) + bq_h k_h^T / sqrt(d)
        out = sum_h A_h (v_h Wo_h^T) + bo,   Wo_h the out projection's columns of head h

    so the L image tokens meet (C, H T) and (H T, C) matrices instead of being projected in
    and out through D.
    """
    heads = attention.num_heads
    n, t, c = tokens_k.shape
    d = attention.internal_dim // heads
    k = attention.k_proj(tokens_k).reshape(n, t, heads, d).transpose(1, 2)  # (N, H, T, d)
    v = attention.v_proj(tokens_v).reshape(n, t, heads, d).transpose(1, 2)
    length = image.shape[1]
    if image_projected:
        q = image.reshape(image.shape[0], length, heads, d).transpose(1, 2)  # (1, H, L, d)
        scores = ((q @ k.transpose(-2, -1)) / math.sqrt(d)).permute(0, 2, 1, 3)  # (N, L, H, T)
    else:
        m = (k @ head_weights(attention.q_proj, heads)) / math.sqrt(d)  # (N, H, T, C)
        bias = (k @ attention.q_proj.bias.reshape(heads, d, 1)) / math.sqrt(d)  # (N, H, T, 1)
        scores = image @ m.reshape(n, heads * t, c).transpose(1, 2) + bias.reshape(n, 1, heads * t)
        scores = scores.reshape(n, length, heads, t)
    attn = torch.softmax(scores, dim=-1).reshape(n, length, heads * t)
    wo = attention.out_proj.weight.reshape(c, heads, d).permute(1, 2, 0)  # (H, d, C)
    projected_v = (v @ wo).reshape(n, heads * t, c)  # (N, H*T, C)
    return attn @ projected_v + attention.out_proj.bias


def attend(attention: Attention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SAM's ``Attention.forward`` after the input projections; batch dims of size 1 broadcast."""
    heads = attention.num_heads

    def split(x: Tensor) -> Tensor:  # (B, L, D) -> (B, heads, L, D / heads)
        return x.reshape(x.shape[0], x.shape[1], heads, x.shape[2] // heads).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    out = attn @ v
    b, _, length, d = out.shape
    return attention.out_proj(out.transpose(1, 2).reshape(b, length, heads * d))


def _upscaled_masks(upscaling: nn.Sequential, keys: Tensor, hyper: Tensor, h: int, w: int) -> Tensor:
    """SAM's output upscaling and hypernetwork product: keys (N, h*w, C) image tokens,
    hyper (N, C2) -> mask logits (N, 1, 4h, 4w).

    ``upscaling`` is SAM's ``Sequential(ConvTranspose2d(C, C1, 2, 2), LayerNorm2d(C1), act,
    ConvTranspose2d(C1, C2, 2, 2), act)``. A kernel-2 stride-2 transposed convolution maps
    each input pixel to its own 2 x 2 output block, so on channels-last tokens it is one
    matrix product with the weight laid out (C_in, 2 * 2 * C_out); LayerNorm2d normalises
    over the channels, which channels-last is ``layer_norm`` over the last axis. The 2 x 2
    blocks stay in the token order (h, w, i, j, k, l) until the single-channel mask, where
    one permutation puts pixel (4h + 2i + k, 4w + 2j + l) in place: the C1- and C2-channel
    activations are never transposed (SAM's NCHW layout copies them twice).
    """
    conv1, norm, act1, conv2, act2 = upscaling
    n, hw, c = keys.shape
    c1, c2 = conv1.out_channels, conv2.out_channels
    x = (keys @ conv1.weight.permute(0, 2, 3, 1).reshape(c, 4 * c1)).reshape(n, hw * 4, c1) + conv1.bias
    x = act1(F.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))
    x = act2((x @ conv2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)).reshape(n, hw * 16, c2) + conv2.bias)
    masks = (x @ hyper.unsqueeze(2)).reshape(n, h, w, 2, 2, 2, 2)  # (N, h, w, i, j, k, l)
    return masks.permute(0, 1, 3, 5, 2, 4, 6).reshape(n, 1, 4 * h, 4 * w)
