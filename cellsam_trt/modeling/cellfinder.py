"""CellFinder: a ViT trunk (no neck) feeding an Anchor DETR head with row-column
decoupled attention (RCDA), 3500 anchor queries and 2 classes.

Module and parameter names follow the released CellSAM model so that its
``cellfinder.decode_head.*`` weights load with ``strict=True``; the forward pass is the
inference path only (eval, no dropout, no padding: both inputs are full 1024x1024
squares, so the padding mask of the released code is all False and drops out).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import CellFinderConfig, ViTConfig
from .sam import build_image_encoder


class ViTTrunk(nn.Module):
    """SAM ViT without its neck: image (B,3,S,S) -> features (B, embed_dim, S/16, S/16)."""

    def __init__(self, vit: ViTConfig) -> None:
        super().__init__()
        encoder = build_image_encoder(vit)
        self.patch_embed = encoder.patch_embed
        self.blocks = encoder.blocks
        self.pos_embed = encoder.pos_embed

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x.permute(0, 3, 1, 2)


class Backbone(nn.Module):
    """Holds the trunk under the name ``body`` (the released key layout)."""

    def __init__(self, vit: ViTConfig) -> None:
        super().__init__()
        self.body = ViTTrunk(vit)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def sine_embed_1d(pos: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """Sine/cosine embedding of positions in [0, 1]: (...,) -> (..., num_feats), sin/cos interleaved."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=pos.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    angles = (pos * (2 * math.pi))[..., None] / dim_t
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_embed_2d(pos: Tensor, num_feats: int) -> Tensor:
    """(..., 2) xy positions -> (..., 2*num_feats) as [embed(y), embed(x)]."""
    return torch.cat((sine_embed_1d(pos[..., 1], num_feats), sine_embed_1d(pos[..., 0], num_feats)), dim=-1)


def _as(x: Tensor, dtype: torch.dtype) -> Tensor:
    # no cast at all when the type is already right: float32 graphs trace as before
    return x if x.dtype == dtype else x.to(dtype)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class RowColumnAttention(nn.Module):
    """Multi-head row-column decoupled attention.

    Keys are averaged over columns (row keys) and over rows (column keys); each query
    gets one softmax over the W columns and one over the H rows, and reads the value
    map through both.  Parameters: ``in_proj_weight`` (5E, E) stacks the q_row, q_col,
    k_row, k_col and v projections; ``out_proj`` is a Linear(E, E).
    """

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(5 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(5 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _project(self, x: Tensor, index: int) -> Tensor:
        e = self.embed_dim
        return F.linear(x, self.in_proj_weight[index * e:(index + 1) * e], self.in_proj_bias[index * e:(index + 1) * e])

    def forward(self, query_row: Tensor, query_col: Tensor, key_row: Tensor, key_col: Tensor, value: Tensor) -> Tensor:
        """query_*: (B, L, E); key_*, value: (B, H, W, E). Returns (L, B, E)."""
        bsz, tgt_len, e = query_row.shape
        _, h, w, _ = value.shape
        nh = self.num_heads
        hd = e // nh
        scale = float(hd) ** -0.5

        q_row = self._project(query_row, 0).transpose(0, 1) * scale
        q_col = self._project(query_col, 1).transpose(0, 1) * scale
        k_row = self._project(key_row, 2).mean(1).transpose(0, 1)  # (W, B, E)
        k_col = self._project(key_col, 3).mean(2).transpose(0, 1)  # (H, B, E)
        v = self._project(value, 4)

        q_row = q_row.contiguous().view(tgt_len, bsz * nh, hd).transpose(0, 1)
        q_col = q_col.contiguous().view(tgt_len, bsz * nh, hd).transpose(0, 1)
        k_row = k_row.contiguous().view(w, bsz * nh, hd).transpose(0, 1)
        k_col = k_col.contiguous().view(h, bsz * nh, hd).transpose(0, 1)
        v = v.contiguous().permute(1, 2, 0, 3).reshape(h, w, bsz * nh, hd).permute(2, 0, 1, 3)

        attn_row = torch.softmax(torch.bmm(q_row, k_row.transpose(1, 2)), dim=-1)  # (B*nh, L, W)
        attn_col = torch.softmax(torch.bmm(q_col, k_col.transpose(1, 2)), dim=-1)  # (B*nh, L, H)

        b = bsz * nh
        # Contract the shorter edge first (fewer flops; same sum either way).
        if h < w:
            per_row = torch.matmul(attn_row, v.permute(0, 2, 1, 3).reshape(b, w, h * hd))
            per_row = per_row.reshape(b, tgt_len, h, hd).permute(0, 2, 1, 3)  # (b, H, L, hd)
            out = torch.matmul(attn_col.permute(1, 0, 2)[:, :, None, :], per_row.permute(2, 0, 1, 3))
            out = out.squeeze(-2).reshape(tgt_len, bsz, e)
        else:
            per_col = torch.matmul(attn_col, v.reshape(b, h, w * hd)).reshape(b, tgt_len, w, hd)
            out = torch.matmul(attn_row[:, :, None, :], per_col).squeeze(-2)
            out = out.permute(1, 0, 2).reshape(tgt_len, bsz, e)
        return self.out_proj(out)


class FFN(nn.Module):
    """Residual two-layer ReLU MLP followed by LayerNorm."""

    def __init__(self, d_model: int, d_ffn: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class EncoderLayer(nn.Module):
    """RCDA self-attention over the feature map + FFN."""

    def __init__(self, d_model: int, d_ffn: int, nhead: int) -> None:
        super().__init__()
        self.self_attn = RowColumnAttention(d_model, nhead)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, d_ffn)

    def forward(self, src: Tensor, posemb_row: Tensor, posemb_col: Tensor) -> Tensor:
        """src (B, C, H, W); posemb_row (B, W, C); posemb_col (B, H, C) -> (B, C, H, W)."""
        bz, c, h, w = src.shape
        src = src.permute(0, 2, 3, 1)
        pos_row = posemb_row.unsqueeze(1).repeat(1, h, 1, 1)
        pos_col = posemb_col.unsqueeze(2).repeat(1, 1, w, 1)
        key_row = src + pos_row
        key_col = src + pos_col
        attended = self.self_attn(
            key_row.reshape(bz, h * w, c), key_col.reshape(bz, h * w, c), key_row, key_col, src
        )
        src = self.norm1(src + attended.transpose(0, 1).reshape(bz, h, w, c))
        return self.ffn(src).permute(0, 3, 1, 2)


class DecoderLayer(nn.Module):
    """Query self-attention, RCDA cross-attention to the feature map, FFN."""

    def __init__(self, d_model: int, d_ffn: int, nhead: int) -> None:
        super().__init__()
        self.cross_attn = RowColumnAttention(d_model, nhead)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, d_ffn)

    def forward(
        self, tgt: Tensor, query_pos: Tensor, query_pos_x: Tensor, query_pos_y: Tensor,
        key_row: Tensor, key_col: Tensor, memory: Tensor,
    ) -> Tensor:
        """tgt, query_pos*: (B, Q, C); key_*, memory: (B, H, W, C) -> (B, Q, C)."""
        q = (tgt + query_pos).transpose(0, 1)
        # need_weights=True keeps torch on the explicit softmax path the released model runs.
        attended = self.self_attn(q, q, tgt.transpose(0, 1), need_weights=True)[0].transpose(0, 1)
        tgt = self.norm2(tgt + attended)
        attended = self.cross_attn(tgt + query_pos_x, tgt + query_pos_y, key_row, key_col, memory).transpose(0, 1)
        tgt = self.norm1(tgt + attended)
        return self.ffn(tgt)


class MLP(nn.Module):
    """ReLU MLP whose last layer is linear; parameters under ``layers.{i}``."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class AnchorTransformer(nn.Module):
    """Anchor DETR transformer: RCDA encoder over the feature map, anchor-query decoder."""

    def __init__(self, cfg: CellFinderConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.d_model = d
        self.num_patterns = cfg.num_patterns
        self.num_queries = cfg.num_queries
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(d, cfg.dim_feedforward, cfg.nhead) for _ in range(cfg.enc_layers)
        )
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(d, cfg.dim_feedforward, cfg.nhead) for _ in range(cfg.dec_layers)
        )
        self.pattern = nn.Embedding(cfg.num_patterns, d)
        self.position = nn.Embedding(cfg.num_queries, 2)
        nn.init.uniform_(self.position.weight, 0, 1)
        self.adapt_pos2d = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.adapt_pos1d = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        # The released model shares one head across decoder layers; the ModuleList of the
        # same module reproduces its state_dict keys (class_embed.0 ... class_embed.5).
        class_embed = nn.Linear(d, cfg.num_classes)
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))
        bbox_embed = MLP(d, d, 4, 3)
        # untrained boxes sit on their anchors with width = height = sigmoid(-2)
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0.0)
        nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
        self.class_embed = nn.ModuleList([class_embed] * cfg.dec_layers)
        self.bbox_embed = nn.ModuleList([bbox_embed] * cfg.dec_layers)

    def forward(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src (B, C, H, W) -> logits (B, P*Q, classes), boxes (B, P*Q, 4) cxcywh in [0, 1]."""
        bs, c, h, w = src.shape
        dtype = src.dtype  # the weights' type; positions and boxes are computed in float32
        # Normalised centres of rows/columns: what the all-False padding mask gives.
        rows = (torch.arange(1, h + 1, dtype=torch.float32, device=src.device) - 0.5) / h
        cols = (torch.arange(1, w + 1, dtype=torch.float32, device=src.device) - 0.5) / w
        posemb_row = self.adapt_pos1d(_as(sine_embed_1d(cols, c), dtype)).expand(bs, w, c)
        posemb_col = self.adapt_pos1d(_as(sine_embed_1d(rows, c), dtype)).expand(bs, h, c)

        for layer in self.encoder_layers:
            src = layer(src, posemb_row, posemb_col)

        memory = src.permute(0, 2, 3, 1)
        key_row = memory + posemb_row.unsqueeze(1)
        key_col = memory + posemb_col.unsqueeze(2)

        reference = _as(self.position.weight, torch.float32).unsqueeze(0).repeat(bs, self.num_patterns, 1)
        tgt = (
            self.pattern.weight.reshape(1, self.num_patterns, 1, c)
            .repeat(bs, 1, self.num_queries, 1)
            .reshape(bs, self.num_patterns * self.num_queries, c)
        )
        query_pos = self.adapt_pos2d(_as(sine_embed_2d(reference, c // 2), dtype))
        query_pos_x = self.adapt_pos1d(_as(sine_embed_1d(reference[..., 0], c), dtype))
        query_pos_y = self.adapt_pos1d(_as(sine_embed_1d(reference[..., 1], c), dtype))
        for layer in self.decoder_layers:
            tgt = layer(tgt, query_pos, query_pos_x, query_pos_y, key_row, key_col, memory)

        # Only the last decoder layer's predictions are used at inference.
        logits = self.class_embed[-1](tgt)
        deltas = _as(self.bbox_embed[-1](tgt), torch.float32)
        centre = deltas[..., :2] + inverse_sigmoid(reference)
        boxes = torch.cat((centre, deltas[..., 2:]), dim=-1).sigmoid()
        return logits, boxes


class CellFinder(nn.Module):
    """The released ``decode_head``: image (B,3,S,S) -> (logits (B,Q,2), boxes (B,Q,4) cxcywh).

    Runs in its weights' floating type (the image is given in that type); the boxes come out
    in float32 whatever it is. ``FLOAT32_PARAMETERS`` stay float32 in a reduced-precision copy:
    the anchors, which a 16-bit type would move by up to 2 pixels of a 1024 image.
    """

    FLOAT32_PARAMETERS = ("transformer.position.weight",)

    def __init__(self, cfg: CellFinderConfig) -> None:
        super().__init__()
        self.backbone = Backbone(cfg.trunk)
        proj = nn.Sequential(nn.Conv2d(cfg.trunk.embed_dim, cfg.d_model, kernel_size=1), nn.GroupNorm(32, cfg.d_model))
        nn.init.xavier_uniform_(proj[0].weight, gain=1)
        nn.init.zeros_(proj[0].bias)
        self.input_proj = nn.ModuleList([proj])
        self.transformer = AnchorTransformer(cfg)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        return self.transformer(self.input_proj[0](self.backbone(image)))


class CellFinderWrapper(nn.Module):
    """Holds ``decode_head`` (the released ``cellfinder`` attribute layout)."""

    def __init__(self, cfg: CellFinderConfig) -> None:
        super().__init__()
        self.decode_head = CellFinder(cfg)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        return self.decode_head(image)
