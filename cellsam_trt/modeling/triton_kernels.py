"""What the Triton kernels beside the modules (``fused_decoder``, ``fused_attention``) share:
the optional import, where they can run, the product in a storage type and the online
softmax step of a flash-style loop.

Without triton this module still imports; ``triton`` and ``tl`` are then None and
``triton_unavailable`` says so.
"""
from __future__ import annotations

import os

import torch

try:  # optional: without triton the modules import and say why their kernels cannot run
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

# the kernels' STORE constant per storage type
STORAGE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def triton_unavailable(device: torch.device | str, what: str) -> str | None:
    """Why ``what`` (kernels named in the sentence) cannot run on ``device``, or None when it
    can: triton must import, and the device be CUDA (or Triton's interpreter be on,
    ``TRITON_INTERPRET=1`` set before triton is imported)."""
    device = torch.device(device)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"{what} needs a CUDA device, not {device}"
    if triton is None:
        return "triton is not installed (pip install triton)"
    return None


if triton is not None:
    @triton.jit
    def storage_dot(a, b, STORE: tl.constexpr):
        # float32 storage: IEEE products (a GPU would use TF32 otherwise); 16-bit storage:
        # products in that type on the tensor cores, accumulated in float32
        if STORE == 0:
            return tl.dot(a, b, input_precision="ieee")
        elif STORE == 1:
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
        else:
            return tl.dot(a.to(tl.float16), b.to(tl.float16), out_dtype=tl.float32)

    @triton.jit
    def online_softmax_step(s, values, best, total, acc, STORE: tl.constexpr):
        """One key block of a flash-style pass: s (M, N) float32 scores (-inf where masked),
        values (N, D); best (M,) the running row maximum, total (M,) the running sum of
        exponentials, acc (M, D) the running unnormalised mix. Returns the updated three;
        the result is acc / total once every block is in."""
        new_best = tl.maximum(best, tl.max(s, axis=1))
        rescale = tl.exp(best - new_best)
        p = tl.exp(s - new_best[:, None])
        total = total * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + storage_dot(p, values, STORE)
        return new_best, total, acc
