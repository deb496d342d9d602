"""The box decoder's per-box image side as fused Triton kernels (``FusedBoxDecoder``).

``decoder.BoxDecoder`` stays the reference (and the CPU path): this module computes the same
``decode_tokens`` / ``mask_head`` with the work that touches a box's (L, C) image tokens
(L = 64 x 64) in three kernels that read and write those tokens as few times as they can.
Everything on the seven prompt tokens per box (self-attention, MLPs, projections) stays in
torch: it is small. Both decoders run one block driver, ``BoxDecoder.two_way``; this module
gives it ``FusedImageSide`` where the eager decoder gives ``EagerImageSide``.

- ``_image_to_tokens_kernel``: image-to-token attention, its residual add and the layer norm
  after it (norm4), for one tile of image tokens of one box: the queries (the tokens plus
  their positional encoding, added in registers), the scores against the box's H x T
  projected prompt keys (reassociated as in ``decoder._image_to_tokens``), a softmax over the
  T tokens of each head, the mixed values projected through the output weights, the
  residual, the norm. Image tokens in, image tokens out: one read, one write.
- ``_tokens_to_image_kernel``: token-to-image attention as a flash-style kernel: the H x T
  query rows of a box (already multiplied by the key projection, as in
  ``decoder._tokens_to_image``) over the L image tokens with an online softmax; the keys
  are the image tokens plus their positional encoding, summed in registers, and the values
  are the image tokens themselves. Neither the sum nor the (H T, L) scores are stored.
- ``_mask_head_kernel``: the output upscaling and hypernetwork product: the first transposed
  convolution as a matrix product per 2 x 2 sub-pixel, LayerNorm2d, GELU, the second
  transposed convolution, GELU, the dot with the box's hypernetwork vector, each logit
  written straight to its place in the (4h, 4w) mask. The (16 L, C / 4) and (16 L, C / 8)
  activations never reach memory.

Heads are laid out with their T = 7 tokens padded to 8 rows (``TOKEN_ROWS``), so a tile of
scores reshapes to (tokens, heads, 8) for the per-head softmax, and the H x 8 rows are a
power of two for ``tl.dot``. Storage: float32 by default (``tl.dot`` in IEEE float32, so a
GPU does not drop to TF32); bfloat16 or float16 image tokens with float32 accumulation,
norms and softmaxes when asked (``dtype``). Outputs of ``decode_tokens``' IoU and the masks
are float32.

Without triton the module still imports, and ``fused_decoder_unavailable`` says why nothing
here can run (also without a CUDA device, unless Triton's interpreter is on:
``TRITON_INTERPRET=1`` set before this module is imported).
"""
from __future__ import annotations

import math

import torch
from segment_anything.modeling.transformer import Attention
from torch import Tensor, nn

from .decoder import BoxDecoder, head_weights
from .triton_kernels import STORAGE, tl, triton, triton_unavailable

if triton is not None:
    from .triton_kernels import online_softmax_step, storage_dot

TOKEN_ROWS = 8  # rows per head: T = 7 prompt tokens, padded to a power of two
# what the self-check allows between the fused and the eager decoder, per storage type:
# (mask logits, IoU) max abs difference on a few steered boxes
SELF_CHECK_TOLERANCE = {torch.float32: (1e-3, 1e-4), torch.bfloat16: (0.5, 0.05), torch.float16: (0.1, 0.01)}


def fused_decoder_unavailable(device: torch.device | str) -> str | None:
    """Why the fused decoder cannot run on ``device`` (a sentence), or None when it can:
    triton must import, and the device be CUDA (or the interpreter be on: TRITON_INTERPRET=1)."""
    return triton_unavailable(device, "the fused decoder (Triton kernels)")


def _kernels() -> dict:
    """The Triton kernels by name (``fused_decoder_unavailable`` is asked first)."""
    if triton is None:
        raise RuntimeError("the fused decoder needs triton: pip install triton")
    return KERNELS


if triton is not None:
    @triton.jit
    def _small_mm(a, b, DOT: tl.constexpr, STORE: tl.constexpr):
        # tl.dot needs every side >= 16; the tiny test architecture has narrower matrices
        if DOT:
            return storage_dot(a, b, STORE)
        else:
            return tl.sum(a[:, :, None] * b[None, :, :], axis=1)

    @triton.jit
    def _gelu(x):
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))

    @triton.jit
    def image_to_tokens(
        q_ptr, q_box_stride, pe_ptr, res_ptr, res_box_stride, m_ptr, bias_ptr, pv_ptr, bo_ptr, w_ptr, b_ptr,
        out_ptr, L, eps,
        CQ: tl.constexpr, C: tl.constexpr, HEADS: tl.constexpr, T: tl.constexpr, ADD_PE: tl.constexpr,
        BL: tl.constexpr, STORE: tl.constexpr,
    ):
        """out[n, l] = LayerNorm(res[n, l] + softmax_heads((q[n, l] (+ pe[l])) @ M[n]^T + bias[n]) @ PV[n] + bo)."""
        R: tl.constexpr = HEADS * 8
        n = tl.program_id(0)
        rows = tl.program_id(1) * BL + tl.arange(0, BL)
        inside = rows < L
        cq = tl.arange(0, CQ)
        c = tl.arange(0, C)
        r = tl.arange(0, R)
        q = tl.load(q_ptr + n * q_box_stride + rows[:, None] * CQ + cq[None, :], mask=inside[:, None], other=0.0)
        q = q.to(tl.float32)
        if ADD_PE:
            q += tl.load(pe_ptr + rows[:, None] * CQ + cq[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
        m = tl.load(m_ptr + n * R * CQ + r[:, None] * CQ + cq[None, :])  # (R, CQ)
        scores = storage_dot(q, tl.trans(m), STORE) + tl.load(bias_ptr + n * R + r)[None, :]  # (BL, R)
        token = r % 8
        scores = tl.where((token < T)[None, :], scores, float("-inf"))
        grouped = tl.reshape(scores, (BL, HEADS, 8))
        grouped = tl.exp(grouped - tl.max(grouped, axis=2)[:, :, None])
        grouped = grouped / tl.sum(grouped, axis=2)[:, :, None]
        attn = tl.reshape(grouped, (BL, R))
        pv = tl.load(pv_ptr + n * R * C + r[:, None] * C + c[None, :])  # (R, C), zero rows for the padding
        x = storage_dot(attn, pv, STORE) + tl.load(bo_ptr + c)[None, :]
        x += tl.load(res_ptr + n * res_box_stride + rows[:, None] * C + c[None, :], mask=inside[:, None],
                     other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / C
        centred = x - mean[:, None]
        inv = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / C + eps)
        y = centred * inv[:, None] * tl.load(w_ptr + c)[None, :] + tl.load(b_ptr + c)[None, :]
        tl.store(out_ptr + n * L * C + rows[:, None] * C + c[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=inside[:, None])

    @triton.jit
    def tokens_to_image(
        g_ptr, x_ptr, pe_ptr, out_ptr, L,
        C: tl.constexpr, R: tl.constexpr, BL: tl.constexpr, STORE: tl.constexpr,
    ):
        """out[n] = softmax(G[n] @ (X[n] + PE)^T) @ X[n]: (R, C), online over L in tiles of BL."""
        n = tl.program_id(0)
        c = tl.arange(0, C)
        r = tl.arange(0, R)
        g = tl.load(g_ptr + n * R * C + r[:, None] * C + c[None, :])  # (R, C) float32
        best = tl.full((R,), float("-inf"), tl.float32)
        total = tl.zeros((R,), tl.float32)
        acc = tl.zeros((R, C), tl.float32)
        for start in range(0, L, BL):
            rows = start + tl.arange(0, BL)
            inside = rows < L
            x = tl.load(x_ptr + n * L * C + rows[:, None] * C + c[None, :], mask=inside[:, None], other=0.0)
            x = x.to(tl.float32)
            k = x + tl.load(pe_ptr + rows[:, None] * C + c[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
            s = storage_dot(g, tl.trans(k), STORE)  # (R, BL)
            s = tl.where(inside[None, :], s, float("-inf"))
            best, total, acc = online_softmax_step(s, x, best, total, acc, STORE)
        tl.store(out_ptr + n * R * C + r[:, None] * C + c[None, :], acc / total[:, None])

    @triton.jit
    def mask_head(
        x_ptr, hyper_ptr, w1_ptr, b1_ptr, nw_ptr, nb_ptr, w2_ptr, b2_ptr, out_ptr, L, GRID_W, eps,
        C: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, BL: tl.constexpr, DOT1: tl.constexpr,
        DOT2: tl.constexpr, STORE: tl.constexpr,
    ):
        """Mask logits of one tile of image tokens of one box, written to their 4 x 4 pixels."""
        n = tl.program_id(0)
        rows = tl.program_id(1) * BL + tl.arange(0, BL)
        inside = rows < L
        c = tl.arange(0, C)
        c1 = tl.arange(0, C1)
        c2 = tl.arange(0, C2)
        x = tl.load(x_ptr + n * L * C + rows[:, None] * C + c[None, :], mask=inside[:, None], other=0.0)
        x = x.to(tl.float32)
        hyper = tl.load(hyper_ptr + n * C2 + c2)
        norm_w, norm_b = tl.load(nw_ptr + c1), tl.load(nb_ptr + c1)
        out_w = 4 * GRID_W
        top = 4 * (rows // GRID_W)
        left = 4 * (rows % GRID_W)
        # the first convolution's 2 x 2 sub-pixel (i, j), then the second's (k, l): pixel
        # (4 row + 2 i + k, 4 col + 2 j + l) of the mask (nested loops, no constexpr division:
        # the interpreter and the compiler agree on products)
        for i in tl.static_range(2):
            for j in tl.static_range(2):
                s1 = i * 2 + j
                w1 = tl.load(w1_ptr + c[:, None] * (4 * C1) + s1 * C1 + c1[None, :])  # (C, C1)
                z = _small_mm(x, w1, DOT1, STORE) + tl.load(b1_ptr + c1)[None, :]
                mean = tl.sum(z, axis=1) / C1
                centred = z - mean[:, None]
                inv = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / C1 + eps)
                z = _gelu(centred * inv[:, None] * norm_w[None, :] + norm_b[None, :])
                for k in tl.static_range(2):
                    for l in tl.static_range(2):  # noqa: E741
                        s2 = k * 2 + l
                        w2 = tl.load(w2_ptr + c1[:, None] * (4 * C2) + s2 * C2 + c2[None, :])  # (C1, C2)
                        u = _gelu(_small_mm(z, w2, DOT2, STORE) + tl.load(b2_ptr + c2)[None, :])
                        logit = tl.sum(u * hyper[None, :], axis=1)
                        tl.store(out_ptr + n * (16 * L) + (top + 2 * i + k) * out_w + left + 2 * j + l, logit,
                                 mask=inside)

    KERNELS = {"image_to_tokens": image_to_tokens, "tokens_to_image": tokens_to_image, "mask_head": mask_head}


def _pad_heads(x: Tensor, heads: int) -> Tensor:
    """(N, H, T, ...) -> (N, H * TOKEN_ROWS, ...): each head's T rows padded with zeros to 8."""
    n, h, t = x.shape[:3]
    out = x.new_zeros((n, h, TOKEN_ROWS) + tuple(x.shape[3:]))
    out[:, :, :t] = x
    return out.reshape((n, h * TOKEN_ROWS) + tuple(x.shape[3:]))


class FusedBoxDecoder(nn.Module):
    """``BoxDecoder``'s ``decode_tokens`` / ``mask_head`` / ``forward`` with the per-box image
    side on Triton kernels (module docstring); the same shapes, float32 outputs.

    Args:
        eager: the ``BoxDecoder`` whose modules (weights) this runs; left as it is.
        dtype: storage of the per-box image tokens: torch.float32 (default), torch.bfloat16
            or torch.float16 (accumulation, norms and softmaxes stay float32).
        block: image tokens per program of the tiled kernels.
    """

    def __init__(self, eager: BoxDecoder, dtype: torch.dtype = torch.float32, block: int = 64) -> None:
        super().__init__()
        if dtype not in STORAGE:
            raise ValueError(f"dtype: expected one of {list(STORAGE)}, got {dtype}")
        self.eager = eager
        self.dtype = dtype
        self.block = block
        c = eager.mask_decoder.transformer_dim
        if c & (c - 1) or c < 16:
            raise ValueError(f"the fused decoder needs a power-of-two decoder width >= 16, got {c}")

    @property
    def prompt_encoder(self) -> nn.Module:
        return self.eager.prompt_encoder

    @property
    def mask_decoder(self) -> nn.Module:
        return self.eager.mask_decoder

    def forward(self, embedding: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        keys, hyper, iou = self.decode_tokens(embedding, boxes)
        return self.mask_head(keys, hyper), iou

    def decode_tokens(self, embedding: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """As ``BoxDecoder.decode_tokens``: keys (N, L, C) in ``dtype``, hyper (N, C / 8) and
        iou (N, 1) float32."""
        tokens, keys, key_pe = self.eager.prompt_side(embedding, boxes)  # keys (1, L, C): shared by every box
        side = FusedImageSide(key_pe.to(self.dtype).contiguous(), self.dtype, self.block)
        keys, hyper, iou = self.eager.two_way(tokens, keys.contiguous(), key_pe.contiguous(), side)
        return keys, hyper.float().contiguous(), iou.float()

    def mask_head(self, keys: Tensor, hyper: Tensor) -> Tensor:
        """As ``BoxDecoder.mask_head``: keys (K, L, C), hyper (K, C / 8) -> (K, 1, 4h, 4w) float32."""
        conv1, norm, _, conv2, _ = self.eager.mask_decoder.output_upscaling
        h, w = self.eager.prompt_encoder.image_embedding_size
        k, length, c = keys.shape
        c1, c2 = conv1.out_channels, conv2.out_channels
        out = torch.empty((k, 1, 4 * h, 4 * w), device=keys.device, dtype=torch.float32)
        if k == 0:
            return out
        w1 = conv1.weight.permute(0, 2, 3, 1).reshape(c, 4 * c1).float().contiguous()
        w2 = conv2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2).float().contiguous()
        grid = (k, (length + self.block - 1) // self.block)
        _kernels()["mask_head"][grid](
            keys.to(self.dtype).contiguous(), hyper.float().contiguous(), w1, conv1.bias.float().contiguous(),
            norm.weight.float().contiguous(), norm.bias.float().contiguous(), w2, conv2.bias.float().contiguous(),
            out, length, w, norm.eps, C=c, C1=c1, C2=c2, BL=self.block, DOT1=min(c, c1) >= 16,
            DOT2=min(c1, c2) >= 16, STORE=STORAGE[self.dtype],
        )
        return out


class FusedImageSide:
    """``decoder.ImageSide`` on the Triton kernels: the boxes' image tokens stored in ``dtype``,
    the positional encoding pe (1, L, C) in ``dtype`` added inside the kernels, ``block``
    image tokens per program."""

    def __init__(self, pe: Tensor, dtype: torch.dtype, block: int) -> None:
        self.pe = pe
        self.dtype = dtype
        self.block = block

    def first_image_update(self, attention: Attention, norm: nn.LayerNorm, image_q: Tensor, keys: Tensor,
                           tokens_k: Tensor, tokens_v: Tensor) -> Tensor:
        """image_q (1, L, D) and keys (1, L, C) shared by every box -> (N, L, C) in ``dtype``."""
        return self._image_to_tokens(attention, norm, image_q.contiguous(), keys, tokens_k, tokens_v, first=True)

    def image_update(self, attention: Attention, norm: nn.LayerNorm, keys: Tensor, tokens_k: Tensor,
                     tokens_v: Tensor) -> Tensor:
        """keys (N, L, C) in ``dtype`` -> the same."""
        return self._image_to_tokens(attention, norm, keys, keys, tokens_k, tokens_v, first=False)

    def tokens_to_image(self, attention: Attention, queries: Tensor, keys: Tensor) -> Tensor:
        """queries (N, T, C), keys (N, L, C) in ``dtype`` -> (N, T, C)."""
        return self._tokens_to_image(attention, queries, keys)

    def _image_to_tokens(self, attention, norm: nn.LayerNorm, image_q: Tensor, residual: Tensor,
                         tokens_k: Tensor, tokens_v: Tensor, *, first: bool) -> Tensor:
        """norm(residual + attention(q=image (+ pe), k=tokens_k, v=tokens_v)) -> (N, L, C) in ``dtype``.

        ``first``: ``image_q`` is the shared (1, L, D) query projection of the first block and
        ``residual`` the shared (1, L, C) keys; otherwise both are the boxes' (N, L, C) tokens
        and the query side is reassociated onto the prompt tokens (``decoder._image_to_tokens``).
        """
        heads = attention.num_heads
        n, t, c = tokens_k.shape
        d = attention.internal_dim // heads
        k = attention.k_proj(tokens_k).reshape(n, t, heads, d).transpose(1, 2)  # (N, H, T, d)
        v = attention.v_proj(tokens_v).reshape(n, t, heads, d).transpose(1, 2)
        wo = attention.out_proj.weight.reshape(c, heads, d).permute(1, 2, 0)  # (H, d, C)
        projected_v = _pad_heads(v @ wo, heads).contiguous()  # (N, 8H, C)
        if first:
            # scores_h = q_h k_h^T / sqrt(d): the rows of head h see only its d columns of q
            m = torch.zeros(n, heads, t, heads, d, device=k.device, dtype=k.dtype)
            # block diagonal: head h's rows hold its keys in its own d columns, zeros elsewhere
            m.diagonal(dim1=1, dim2=3).copy_((k / math.sqrt(d)).permute(0, 2, 3, 1))
            m = m.reshape(n, heads, t, heads * d)
            bias = torch.zeros(n, heads, t, device=k.device, dtype=k.dtype)
        else:
            m = (k @ head_weights(attention.q_proj, heads)) / math.sqrt(d)  # (N, H, T, C)
            bias = ((k @ attention.q_proj.bias.reshape(heads, d, 1)) / math.sqrt(d))[..., 0]  # (N, H, T)
        m, bias = _pad_heads(m, heads).contiguous(), _pad_heads(bias, heads).contiguous()
        length, cq = image_q.shape[1], image_q.shape[2]
        out = torch.empty((n, length, c), device=k.device, dtype=self.dtype)
        kernel = _kernels()["image_to_tokens"]
        image_q, residual = image_q.to(self.dtype).contiguous(), residual.to(self.dtype).contiguous()
        grid = (n, (length + self.block - 1) // self.block)
        kernel[grid](
            image_q, 0 if image_q.shape[0] == 1 else length * cq, image_q if first else self.pe,
            residual, 0 if residual.shape[0] == 1 else length * c, m.float(), bias.float(), projected_v.float(),
            attention.out_proj.bias.float().contiguous(), norm.weight.float().contiguous(),
            norm.bias.float().contiguous(), out, length, norm.eps,
            CQ=cq, C=c, HEADS=heads, T=t, ADD_PE=not first, BL=self.block, STORE=STORAGE[self.dtype],
        )
        return out

    def _tokens_to_image(self, attention, queries: Tensor, keys: Tensor) -> Tensor:
        """attention(q=queries, k=keys + self.pe, v=keys) for the prompt tokens: (N, T, C)."""
        heads = attention.num_heads
        n, t, c = queries.shape
        d = attention.internal_dim // heads
        q = attention.q_proj(queries).reshape(n, t, heads, d).transpose(1, 2)  # (N, H, T, d)
        g = _pad_heads((q @ head_weights(attention.k_proj, heads)) / math.sqrt(d), heads).float().contiguous()
        rows = heads * TOKEN_ROWS
        mixed = torch.empty((n, rows, c), device=queries.device, dtype=torch.float32)
        length = keys.shape[1]
        _kernels()["tokens_to_image"][(n,)](g, keys, self.pe, mixed, length, C=c, R=rows, BL=self.block,
                                            STORE=STORAGE[self.dtype])
        mixed = mixed.reshape(n, heads, TOKEN_ROWS, c)[:, :, :t].to(queries.dtype)  # (N, H, T, C)
        wv = head_weights(attention.v_proj, heads).transpose(1, 2)  # (H, C, d)
        out = mixed @ wv + attention.v_proj.bias.reshape(heads, 1, d)
        return attention.out_proj(out.transpose(1, 2).reshape(n, t, heads * d))


def work_per_box(eager: BoxDecoder, storage_bytes: int = 4) -> dict[str, float]:
    """What one box costs the fused decoder, counted from the kernels' tiles: the floating-point
    operations of the per-box image side (2 per multiply-add: the products that meet the L
    image tokens, the 7-token side left out) and the bytes of image-side tensors it loads and
    stores (``storage_bytes`` per image-token value; weights and the token side left out).

    Per box with L image tokens of C channels, H heads, T = 7 prompt tokens padded to 8:
    each later block's token-to-image kernel reads the tokens and their positional encoding
    (2 L C values), its image-to-token kernel reads the tokens twice (queries and residual)
    and the encoding once and writes the tokens (4 L C); the first block's image-to-token
    kernel reads the shared query projection and keys (L D + L C) and writes the box's
    tokens (L C); the final attention reads 2 L C; the mask head reads L C and writes 16 L
    float32 logits.
    """
    decoder = eager.mask_decoder
    c = decoder.transformer_dim
    h, w = eager.prompt_encoder.image_embedding_size
    length = h * w
    layers = decoder.transformer.layers
    heads = layers[0].cross_attn_image_to_token.num_heads
    rows = heads * TOKEN_ROWS
    d_first = layers[0].cross_attn_image_to_token.internal_dim
    conv1, _, _, conv2, _ = decoder.output_upscaling
    c1, c2 = conv1.out_channels, conv2.out_channels
    later = len(layers) - 1
    macs = (length * d_first * rows + length * rows * c  # first block, image to token
            + later * 2 * (2 * length * c * rows)  # later blocks: both attentions
            + 2 * length * c * rows  # final token-to-image attention
            + length * c * 4 * c1 + 4 * length * c1 * 4 * c2 + 16 * length * c2)  # mask head
    values = ((length * d_first + 2 * length * c) + later * 6 * length * c + 2 * length * c + length * c)
    return {"flop": 2.0 * macs, "bytes": float(values * storage_bytes + 16 * length * 4)}


def self_check(fused: FusedBoxDecoder, embedding: Tensor, boxes: Tensor) -> str | None:
    """Run a few boxes through ``fused`` and its eager decoder; None when the mask logits and
    IoU agree within ``SELF_CHECK_TOLERANCE`` for the storage type, else why not."""
    with torch.inference_mode():
        try:
            masks, iou = fused(embedding, boxes)
        except Exception as err:  # a kernel that does not compile or launch on this GPU
            return f"the fused decoder failed to run ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        want_masks, want_iou = fused.eager(embedding, boxes)
    mask_tol, iou_tol = SELF_CHECK_TOLERANCE[fused.dtype]
    mask_err = float((masks - want_masks.float()).abs().max())
    iou_err = float((iou - want_iou.float()).abs().max())
    if not (mask_err <= mask_tol and iou_err <= iou_tol):  # also catches NaN
        return (f"the fused decoder differs from the eager one by {mask_err:.3g} on mask logits and {iou_err:.3g} "
                f"on IoU (allowed {mask_tol:g} / {iou_tol:g} in {fused.dtype})")
    return None
