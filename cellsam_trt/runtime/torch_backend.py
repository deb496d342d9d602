"""PyTorch backend: the reference modules, eager."""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ..modeling import BoxDecoder, CellSAMNetwork
from .base import Backend, BackendError, OutOfDeviceMemory


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> CUDA when available, else CPU; validates explicit choices."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: {device!r} is not a torch device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendError("device: CUDA was requested but torch sees no CUDA GPU; use device='cpu'")
    return device


class TorchBackend(Backend):
    """Runs the PyTorch modules of a ``CellSAMNetwork``.

    Args:
        network: loaded weights.
        device: torch device (default: CUDA if available).
        precision: "fp32", or "fp16" (CUDA autocast) for speed at a small accuracy cost.
    """

    name = "torch"

    def __init__(self, network: CellSAMNetwork, device: str | torch.device | None = None, precision: str = "fp32") -> None:
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"precision: expected 'fp32' or 'fp16', got {precision!r}")
        self.device = resolve_device(device)
        if precision == "fp16" and self.device.type != "cuda":
            raise BackendError("precision='fp16' needs a CUDA device; the CPU runs fp32")
        self.precision = precision
        self.network = network.eval().to(self.device)
        self.config = network.config
        self.adapted_inputs = network.uses_model_cp
        sam = network.sam
        self.image_encoder = sam.image_encoder
        self.cellfinder_module = network.cellfinder.decode_head
        self.box_decoder = BoxDecoder(sam.prompt_encoder, sam.mask_decoder)
        # Measured, ViT-B decoder in torch on 2 CPU cores: 31-34 ms per box in calls of 2-4
        # boxes, 51-55 ms in calls of 16-64 (the activations of a large call leave the
        # caches). Accelerators want large calls.
        self.default_chunk_size = 4 if self.device.type == "cpu" else 256

    def _context(self):
        if self.precision == "fp16":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def encoder(self, images: Tensor) -> Tensor:
        with self._context():
            return self.image_encoder(images.to(self.device)).float()

    @torch.inference_mode()
    def cellfinder(self, images: Tensor) -> tuple[Tensor, Tensor]:
        with self._context():
            logits, boxes = self.cellfinder_module(images.to(self.device))
        return logits.float(), boxes.float()

    @torch.inference_mode()
    def decoder(self, embedding: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        try:
            with self._context():
                masks, iou = self.box_decoder(embedding.to(self.device), boxes.to(self.device, torch.float32))
        except torch.cuda.OutOfMemoryError as err:
            torch.cuda.empty_cache()
            raise OutOfDeviceMemory(f"decoder with {len(boxes)} boxes: {err}") from None
        return masks.float(), iou.float()

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device), "precision": self.precision}
