"""SAM's image-encoder attention as one Triton flash kernel with the relative-position term
added inside (``FlashRelPosAttention``).

``attention.SDPAttention`` hands PyTorch's fused kernel the decomposed relative-position term
as an additive mask, which it has to materialise first: (B, heads, L, L), 0.8 GB in float32
for one global block of ViT-B (L = 64 x 64, 12 heads), written once and read once per block.
The term is a sum of two small tables, though: entry (i, j) is rel_h[i, row(j)] +
rel_w[i, col(j)], with rel_h (B, heads, L, h) and rel_w (B, heads, L, w) (``decomposed_rel_pos``).
The kernel here reads those tables inside the key loop of a flash-attention pass (online
softmax over key blocks, the scores never stored), so nothing (L, L) reaches memory.

- When the key block divides the grid's width (``w % BLOCK_N == 0``: the global blocks of
  ViT-B, 64 columns), a key block lies in one grid row: rel_h contributes one value per query
  and rel_w one contiguous slice. Otherwise (the 14 x 14 windows) both are gathered per
  score.
- q, k and v are read in place from the qkv projection's (B, L, 3, heads, d) output and the
  result is written as (B, L, heads * d), the layout the output projection reads: no copies.
- Storage follows the inputs: float32 (``tl.dot`` in IEEE float32, no TF32), or bfloat16 /
  float16 operands on the tensor cores; scores, softmax and accumulator are float32.

``use_fused_attention`` puts either fused formulation in place of SAM's ``Attention`` in a
module tree. ``attention.SDPAttention`` and SAM's ``Attention`` stay the references; without triton, or
without a CUDA device (unless Triton's interpreter is on, ``TRITON_INTERPRET=1`` before this
module is imported), ``flash_attention_unavailable`` says why this cannot run.
"""
from __future__ import annotations

import torch
from segment_anything.modeling.image_encoder import Attention
from torch import Tensor, nn

from .attention import SDPAttention, decomposed_rel_pos
from .triton_kernels import STORAGE, tl, triton, triton_unavailable

if triton is not None:
    from .triton_kernels import online_softmax_step, storage_dot

# what the start-up check allows between this kernel and SDPAttention, max abs difference of
# the block's output on a probe input, per storage type
SELF_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.05, torch.float16: 0.01}


def flash_attention_unavailable(device: torch.device | str) -> str | None:
    """Why the kernel cannot run on ``device`` (a sentence), or None when it can."""
    return triton_unavailable(device, "the flash attention (a Triton kernel)")


if triton is not None:
    @triton.jit
    def rel_pos_flash_attention(
        qkv_ptr, rel_h_ptr, rel_w_ptr, out_ptr, L, scale,
        HEADS: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, GRID_H: tl.constexpr, GRID_W: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr, STORE: tl.constexpr,
    ):
        """One block of BLOCK_M queries of one (image, head):
        out[i] = sum_j softmax_j(scale q_i . k_j + rel_h[i, row(j)] + rel_w[i, col(j)]) v_j."""
        C: tl.constexpr = HEADS * D
        bh = tl.program_id(1)
        b = bh // HEADS
        head = bh % HEADS
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_in = rows < L
        d = tl.arange(0, DP)
        d_in = d < D
        # qkv (B, L, 3, heads, d): q at 0, k at C, v at 2 C along the last two axes
        base = qkv_ptr + b * L * 3 * C + head * D
        q = tl.load(base + rows[:, None] * 3 * C + d[None, :], mask=row_in[:, None] & d_in[None, :], other=0.0)
        q = q.to(tl.float32) * scale
        rel_h = rel_h_ptr + (bh * L + rows) * GRID_H  # (BLOCK_M,) row starts of the tables
        rel_w = rel_w_ptr + (bh * L + rows) * GRID_W
        best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        total = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, DP), tl.float32)
        for start in range(0, L, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_in = cols < L
            kv_mask = col_in[:, None] & d_in[None, :]
            k = tl.load(base + C + cols[:, None] * 3 * C + d[None, :], mask=kv_mask, other=0.0)
            s = storage_dot(q, tl.trans(k), STORE)
            if ALIGNED:  # the block is one grid row: one rel_h value per query, a slice of rel_w
                s += tl.load(rel_h + start // GRID_W, mask=row_in, other=0.0).to(tl.float32)[:, None]
                s += tl.load(rel_w[:, None] + (start % GRID_W) + tl.arange(0, BLOCK_N)[None, :],
                             mask=row_in[:, None], other=0.0).to(tl.float32)
            else:
                both = row_in[:, None] & col_in[None, :]
                s += tl.load(rel_h[:, None] + (cols // GRID_W)[None, :], mask=both, other=0.0).to(tl.float32)
                s += tl.load(rel_w[:, None] + (cols % GRID_W)[None, :], mask=both, other=0.0).to(tl.float32)
            s = tl.where(col_in[None, :], s, float("-inf"))
            v = tl.load(base + 2 * C + cols[:, None] * 3 * C + d[None, :], mask=kv_mask, other=0.0)
            best, total, acc = online_softmax_step(s, v, best, total, acc, STORE)
        out = acc / total[:, None]
        tl.store(out_ptr + b * L * C + rows[:, None] * C + head * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_in[:, None] & d_in[None, :])


def flash_rel_pos_attention(qkv: Tensor, rel_h: Tensor, rel_w: Tensor, size: tuple[int, int], heads: int,
                            scale: float, block_m: int = 64) -> Tensor:
    """Attention with SAM's decomposed relative-position term, on the Triton kernel.

    qkv: (B, L, 3, heads, d) contiguous, the qkv projection's output reshaped; rel_h
    (B * heads, L, h) and rel_w (B * heads, L, w) the terms of ``decomposed_rel_pos`` (any
    float type; read as float32); size (h, w) with h * w = L. Returns (B, L, heads * d) in
    qkv's dtype.
    """
    if triton is None:
        raise RuntimeError("the flash attention kernel needs triton: pip install triton")
    b, length, three, heads_, d = qkv.shape
    h, w = size
    if three != 3 or heads_ != heads or h * w != length:
        raise ValueError(f"qkv {tuple(qkv.shape)} does not match {heads} heads on a {h} x {w} grid")
    qkv, rel_h, rel_w = qkv.contiguous(), rel_h.contiguous(), rel_w.contiguous()
    out = torch.empty((b, length, heads * d), dtype=qkv.dtype, device=qkv.device)
    # key blocks of whole grid rows where the width allows (ViT-B's global grid: 64), else
    # 32 keys with gathered terms (the 14 x 14 windows); tl.dot needs 16 on every side
    block_n = next((n for n in (64, 32, 16) if w % n == 0), 32)
    grid = (triton.cdiv(length, block_m), b * heads)
    rel_pos_flash_attention[grid](
        qkv, rel_h, rel_w, out, length, scale,
        HEADS=heads, D=d, DP=max(16, triton.next_power_of_2(d)), GRID_H=h, GRID_W=w,
        BLOCK_M=block_m, BLOCK_N=block_n, ALIGNED=w % block_n == 0, STORE=STORAGE[qkv.dtype],
    )
    return out


class FlashRelPosAttention(nn.Module):
    """SAM image-encoder attention, x (B, H, W, C) -> (B, H, W, C), on the Triton flash kernel.

    Built from a SAM ``Attention`` whose parameters it shares (same names, so state dicts
    are unchanged). Storage is x's dtype (float32, bfloat16 or float16).
    """

    def __init__(self, attention: Attention) -> None:
        super().__init__()
        if not attention.use_rel_pos:
            raise ValueError("FlashRelPosAttention is for SAM's attention with relative positions (use_rel_pos)")
        self.num_heads = attention.num_heads
        self.scale = attention.scale
        self.qkv = attention.qkv
        self.proj = attention.proj
        self.rel_pos_h = attention.rel_pos_h
        self.rel_pos_w = attention.rel_pos_w

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(b, h * w, 3, heads, -1)
        q = qkv[:, :, 0].transpose(1, 2)  # (B, heads, L, d), a view for the tables
        rel_h, rel_w = decomposed_rel_pos(q, self.rel_pos_h, self.rel_pos_w, (h, w))
        out = flash_rel_pos_attention(qkv, rel_h.flatten(0, 1), rel_w.flatten(0, 1), (h, w), heads, self.scale)
        return self.proj(out.reshape(b, h, w, -1))


def self_check(device: torch.device, dtype: torch.dtype, dim: int, heads: int) -> str | None:
    """None when the kernel matches ``SDPAttention`` on a probe block (one 16 x 16 global
    grid and one 14 x 14 window, random relative positions) within ``SELF_CHECK_TOLERANCE``,
    else a sentence saying by how much it did not (or what failed)."""
    probe = torch.Generator().manual_seed(0)
    worst = 0.0
    try:
        for size in ((16, 16), (14, 14)):
            sam = Attention(dim, num_heads=heads, use_rel_pos=True, input_size=size)
            with torch.no_grad():
                for p in sam.parameters():
                    p.copy_(torch.randn(p.shape, generator=probe) * 0.2)
            sam = sam.to(device, dtype).eval()
            x = torch.randn((2, *size, dim), generator=probe).to(device, dtype)
            with torch.inference_mode():
                expected = SDPAttention(sam)(x).float()
                worst = max(worst, (FlashRelPosAttention(sam)(x).float() - expected).abs().max().item())
    except Exception as err:  # a compile or launch failure on this GPU is a reason, not a crash
        return f"the flash attention kernel failed its start-up check ({type(err).__name__}: {err})"
    if not worst <= SELF_CHECK_TOLERANCE[dtype]:
        return (f"the flash attention kernel differs from SDPA by {worst:.3g} on a probe block "
                f"(allowed {SELF_CHECK_TOLERANCE[dtype]:g} in {dtype})")
    return None


ATTENTION_KINDS = ("sdpa", "flash")


def use_fused_attention(module: nn.Module, kind: str = "sdpa") -> int:
    """Replace every SAM image-encoder ``Attention`` inside ``module`` (in place) by one
    sharing its parameters: ``SDPAttention`` ("sdpa") or the Triton kernel's
    ``FlashRelPosAttention`` ("flash"; attention without relative positions
    goes to SDPA). Returns how many were replaced.

    Only for module trees the caller owns (the torch backend's inference copy).
    """
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"kind: expected one of {ATTENTION_KINDS}, got {kind!r}")
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Attention):
                flash = kind == "flash" and child.use_rel_pos
                setattr(parent, name, FlashRelPosAttention(child) if flash else SDPAttention(child))
                replaced += 1
    return replaced
