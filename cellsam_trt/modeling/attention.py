"""SAM's image-encoder attention on ``torch.nn.functional.scaled_dot_product_attention``.

SAM's ``Attention`` (segment_anything.modeling.image_encoder) writes attention out:
``softmax((q * scale) @ k^T + relative-position bias) @ v``, which materialises the
scores, the biased scores and their softmax, each (B * heads, L, L); in a global block of
ViT-B (L = 64 x 64) that is 0.8 GB per tensor in float32. ``SDPAttention`` hands the same
computation to PyTorch's fused kernel, with the decomposed relative-position bias as its
additive mask, so only the bias is materialised.

The torch backend swaps it in on its own copy of the modules (``fused_attention.use_fused_attention``;
``fused_attention.FlashRelPosAttention`` is the Triton kernel that adds the term inside
instead); the parameter
names stay ``qkv``, ``proj``, ``rel_pos_h``, ``rel_pos_w``, so state dicts are unchanged.
The ONNX export keeps SAM's formulation: its graphs (and the engines built from them) are
not affected.
"""
from __future__ import annotations

import torch
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import Tensor, nn
from torch.nn import functional as F


class SDPAttention(nn.Module):
    """SAM image-encoder attention, x (B, H, W, C) -> (B, H, W, C), on a fused kernel.

    Built from a SAM ``Attention`` whose parameters it shares.
    """

    def __init__(self, attention: Attention) -> None:
        super().__init__()
        self.num_heads = attention.num_heads
        self.scale = attention.scale
        self.qkv = attention.qkv
        self.proj = attention.proj
        self.use_rel_pos = attention.use_rel_pos
        if self.use_rel_pos:
            self.rel_pos_h = attention.rel_pos_h
            self.rel_pos_w = attention.rel_pos_w

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, heads, L, d)
        q, k, v = qkv.unbind(0)
        bias = None
        if self.use_rel_pos:
            bias = relative_position_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w))
        # SAM scales by head_dim ** -0.5, which is also the kernel's default scale
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))


def decomposed_rel_pos(q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """SAM's decomposed relative-position term as its two tables.

    q: (B, heads, L, d) unscaled queries, L = h * w -> rel_h (B, heads, L, h), rel_w
    (B, heads, L, w) in q's dtype: rel_h[.., i, r] = q_i . Rh[row(i) - r] and rel_w[.., i, c]
    = q_i . Rw[col(i) - c], so the term added to score (i, j) is rel_h[i, row(j)] +
    rel_w[i, col(j)] (what SAM's ``add_decomposed_rel_pos`` adds).
    """
    h, w = size
    b, heads, length, d = q.shape
    rh = get_rel_pos(h, h, rel_pos_h).to(q.dtype)  # (h, h, d)
    rw = get_rel_pos(w, w, rel_pos_w).to(q.dtype)  # (w, w, d)
    r_q = q.reshape(b, heads, h, w, d)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh).reshape(b, heads, length, h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw).reshape(b, heads, length, w)
    return rel_h, rel_w


def relative_position_bias(q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, size: tuple[int, int]) -> Tensor:
    """SAM's decomposed relative-position term as an additive mask: q (B, heads, L, d) ->
    (B, heads, L, L), entry (i, j) = rel_h[i, row(j)] + rel_w[i, col(j)] (``decomposed_rel_pos``)."""
    h, w = size
    b, heads, length, _ = q.shape
    rel_h, rel_w = decomposed_rel_pos(q, rel_pos_h, rel_pos_w, size)
    bias = rel_h.reshape(b, heads, length, h, 1) + rel_w.reshape(b, heads, length, 1, w)
    return bias.reshape(b, heads, length, length)
