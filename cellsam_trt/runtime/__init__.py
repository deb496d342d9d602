"""Engine backends behind one interface (``Backend``)."""
from __future__ import annotations

from typing import Any

import torch

from .base import Backend, BackendError, OutOfDeviceMemory
from .torch_backend import TorchBackend, resolve_device

BACKENDS = ("torch",)


def create_backend(
    kind: str = "torch", *, checkpoint: Any = None, device: str | torch.device | None = None,
    download: bool = False, **options: Any,
) -> Backend:
    """Build a backend by name.

    Args:
        kind: one of ``BACKENDS``.
        checkpoint: weights file in the released format (None: the default location).
        device: torch device for inputs/outputs and post-processing.
        download: fetch the released weights if absent.
        **options: backend-specific (torch: precision).
    """
    from ..checkpoint import load_checkpoint

    if kind not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {kind!r}")
    return TorchBackend(load_checkpoint(checkpoint, download=download), device=device, **options)


__all__ = ["BACKENDS", "Backend", "BackendError", "OutOfDeviceMemory", "TorchBackend", "create_backend", "resolve_device"]
