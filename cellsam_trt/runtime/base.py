"""The one interface every engine kind implements."""
from __future__ import annotations

import abc
from typing import TYPE_CHECKING

from ..modeling.config import ModelConfig

if TYPE_CHECKING:  # torch is imported where it is used: the CLI's parsers read this module
    import torch
    from torch import Tensor

# the backends by name, "auto" choosing among them (``runtime.choice.create_backend``)
BACKENDS = ("torch", "onnxruntime", "tensorrt", "auto")


class BackendError(RuntimeError):
    """A backend cannot be created or cannot run (missing files, wrong GPU, ...)."""


class OutOfDeviceMemory(BackendError):
    """A graph call ran out of device memory; a smaller decoder batch may fit."""


# How allocation failures read when they do not arrive as torch.cuda.OutOfMemoryError /
# MemoryError: cuBLAS and cuDNN report theirs as RuntimeError ("CUBLAS_STATUS_ALLOC_FAILED",
# "CUDNN_STATUS_ALLOC_FAILED"), the CUDA runtime as "CUDA error: out of memory" /
# "cudaErrorMemoryAllocation", ONNX Runtime's arena as "Failed to allocate memory" or a
# C++ bad_alloc. Compared in lower case.
OUT_OF_MEMORY_MARKERS = (
    "out of memory", "out_of_memory", "alloc_failed", "failed to allocate", "memoryallocation",
    "bad_alloc", "bad allocation",
)


def is_out_of_memory(err: BaseException) -> bool:
    """True when ``err`` is a failed allocation (a smaller call may succeed), whatever the
    library that raised it."""
    import torch

    if isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    message = str(err).lower()
    return any(marker in message for marker in OUT_OF_MEMORY_MARKERS)


def release_cached_memory() -> None:
    """Give torch's cached, unused CUDA blocks back before a smaller retry (other libraries
    allocate outside torch's cache)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def in_batches(run, images: Tensor, max_batch: int | None) -> list[Tensor]:
    """``run(images)`` -> list of outputs, called on slices of at most ``max_batch`` images
    (None: all at once) and concatenated along the batch axis."""
    import torch

    step = max_batch or max(1, len(images))
    parts = [run(images[i:i + step]) for i in range(0, len(images), step)]
    return list(parts[0]) if len(parts) == 1 else [torch.cat(outs, dim=0) for outs in zip(*parts)]


def kept_rows(iou: Tensor, keep_iou: float | None) -> Tensor | None:
    """Indices (K,) int64 of the rows of ``iou`` (N, 1) at or above ``keep_iou``, in order;
    None for ``keep_iou=None`` (every row). The pipeline's IoU filter, in one place."""
    import torch

    if keep_iou is None:
        return None
    return torch.nonzero(iou[:, 0] >= keep_iou)[:, 0]


def kept_masks(mask_logits: Tensor, iou: Tensor, keep_iou: float | None) -> Tensor:
    """``Backend.decoder``'s mask selection for a backend that computed every box's mask:
    mask_logits (N, 1, L, L) -> the rows that ``kept_rows`` keeps."""
    rows = kept_rows(iou, keep_iou)
    return mask_logits if rows is None else mask_logits[rows]


def masks_of_kept(run_mask_head, image_tokens: Tensor, hyper: Tensor, iou: Tensor, keep_iou: float | None,
                  low_res: int) -> Tensor:
    """The mask head on the rows ``kept_rows`` keeps: ``run_mask_head(image_tokens, hyper)`` ->
    (K, 1, low_res, low_res) float32; with no row kept it is not run (an engine profile, and
    ONNX Runtime's kernels, start at one row)."""
    import torch

    rows = kept_rows(iou, keep_iou)
    if rows is not None:
        image_tokens, hyper = image_tokens[rows], hyper[rows]
    if len(image_tokens) == 0:
        return torch.zeros((0, 1, low_res, low_res), dtype=torch.float32, device=iou.device)
    return run_mask_head(image_tokens, hyper).float()


class Backend(abc.ABC):
    """Runs the three CellSAM graphs on tensors.

    Attributes:
        name: "torch", "onnxruntime" or "tensorrt".
        device: where outputs live and where post-processing should run.
        config: the architecture (sizes) of the weights behind the graphs.
        adapted_inputs: True when the weights include the ``model_cp`` copy; the released
            preprocessing differs then (see ``preprocess.embedding_input``).
        max_decoder_boxes: most boxes one ``decoder`` call accepts (None: no limit).
        default_chunk_size: boxes per decoder call when the caller does not choose.
    """

    name: str = "base"
    device: torch.device
    config: ModelConfig
    adapted_inputs: bool = True
    max_decoder_boxes: int | None = None
    default_chunk_size: int = 256

    @abc.abstractmethod
    def encoder(self, images: Tensor) -> Tensor:
        """images (B, 3, S, S) float32 -> embeddings (B, C, S/16, S/16) float32, on ``device``."""

    @abc.abstractmethod
    def cellfinder(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, 3, S, S) -> logits (B, Q, classes), boxes (B, Q, 4) cxcywh in [0, 1]."""

    @abc.abstractmethod
    def decoder(self, embedding: Tensor, boxes: Tensor, *, keep_iou: float | None = None,
                last_call: bool = False) -> tuple[Tensor, Tensor]:
        """embedding (1, C, S/16, S/16), boxes (N, 4) xyxy in S-space ->
        mask_logits (K, 1, S/4, S/4) float32, iou (N, 1) float32. N <= max_decoder_boxes.

        ``keep_iou``: None gives every box's mask (K = N); a threshold gives the masks of
        only the boxes whose predicted IoU is at least that, in box order (K = the number of
        ``iou[:, 0] >= keep_iou``): the mask head, about half of a box's work, runs only for
        them (``kept_masks`` does the selection for a backend that computes every mask).

        ``last_call``: the caller's last decoder call for this embedding. A backend that
        keeps buffers between decoder calls (ONNX Runtime's CPU arena) gives them back
        after it, so they do not add to the next image's encoder peak.

        Raises OutOfDeviceMemory when the batch does not fit."""

    def synchronize(self) -> None:
        """Wait for queued device work (for honest stage timings)."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device)}

    def weights_identity(self) -> str:
        """What an image embedding from this backend depends on besides the image, as a
        hex digest: the weights and how they run (precision). Saved embeddings are reused
        only under the same identity. Default: the description without the device (its
        graphs' provenance, e.g. the checkpoint's sha256)."""
        import hashlib
        import json

        described = {k: v for k, v in self.describe().items() if k not in ("device", "onnx_dir", "engine_dir")}
        return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()
