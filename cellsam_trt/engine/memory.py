"""How much memory a segment() call needs, and how much the device has.

The decoder dominates: per box it holds the updated image tokens and the output
upscaling's (32, 256, 256) activations. Measured on the CPU (ViT-B, fp32, growth of the
peak resident memory from 32 to 64 boxes): about 13 MB per box for ``BoxDecoder``, about
21 MB for SAM's own batched call, which copies the image side per box. The estimate below
(nine embedding-sized tensors, 38 MB per box) keeps a margin over both for allocator
fragmentation. The chunk size is the knob; the pipeline shrinks it to fit and refuses when
even one box cannot fit.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys

import torch

from ..modeling.config import ModelConfig

log = logging.getLogger(__name__)

# peak decoder bytes per box, in units of one embedding (C x G x G values)
DECODER_EMBEDDINGS_PER_BOX = 9
# headroom left for the allocator, other processes and the painter
USABLE_FRACTION = 0.8


def decoder_bytes_per_box(config: ModelConfig, bytes_per_value: int = 4) -> int:
    grid = config.sam.encoder.grid_size
    return DECODER_EMBEDDINGS_PER_BOX * config.sam.prompt_embed_dim * grid * grid * bytes_per_value


def estimate_bytes(config: ModelConfig, height: int, width: int, chunk_size: int, bytes_per_value: int = 4) -> dict[str, int]:
    """Rough peak bytes of one call, by part (decoder chunk, label image + resize matrices, inputs)."""
    size = config.image_size
    low = config.sam.low_res_size
    return {
        "decoder_chunk": chunk_size * decoder_bytes_per_box(config, bytes_per_value),
        "labels": height * width * 4 + (height + width) * low * 8,
        "model_inputs": 2 * 3 * size * size * 4,
    }


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device`` (CUDA: driver's free memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # memory torch has cached but not in use is free for us too
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def fit_chunk_size(config: ModelConfig, device: torch.device, height: int, width: int, chunk_size: int,
                   bytes_per_value: int = 4) -> int:
    """Largest chunk <= ``chunk_size`` whose estimate fits the device.

    Raises:
        MemoryError: not even one box fits (the message gives the numbers).
    """
    budget = int(available_bytes(device) * USABLE_FRACTION)
    fixed = sum(v for k, v in estimate_bytes(config, height, width, 0, bytes_per_value).items())
    per_box = decoder_bytes_per_box(config, bytes_per_value)
    fitting = (budget - fixed) // per_box
    if fitting < 1:
        raise MemoryError(
            f"segment() needs about {(fixed + per_box) / 2**30:.2f} GiB on {device} for a {height}x{width} image "
            f"with one box per decoder call, but only {budget / 2**30:.2f} GiB is usable; free memory or tile the image"
        )
    if fitting < chunk_size:
        log.warning("chunk_size %d would need %.1f GiB on %s; using %d boxes per decoder call",
                    chunk_size, (fixed + chunk_size * per_box) / 2**30, device, fitting)
        return int(fitting)
    return chunk_size


# Host bytes per image pixel of a whole-image call beyond the model and the caller's image,
# measured on the CPU (3000 x 3000 uint8, tiny config: 96 B): the formatted image and its
# normalisation in float64, three channels, CLAHE's temporaries, the label image and the
# clean-up's masks. Large images take the tiled path by default; this guards the forced one.
WHOLE_IMAGE_BYTES_PER_PIXEL = 100

# host memory: a tiled run keeps everything in memory up to this estimate, above it it goes
# through scratch zarr stores on disk (tiling.segment_large)
STREAM_ABOVE_BYTES = 2 << 30


def tiled_host_bytes(height: int, width: int, grid, batch_size: int, normalized: bool = True) -> dict[str, int]:
    """Host bytes a tiled run needs beyond the loaded model and the caller's image.

    In memory (``tiling.segment_large`` as it paints): the CLAHE image (uint16, 3 channels),
    every tile's kept labels until the overlap bands are resolved (uint16), the painted
    uint32 label image and its renumbered copy. Streamed (through zarr on disk): the
    returned label image, one batch of tiles in float64 with its model inputs, and one
    normalisation block's working set (what the largest step holds at once).

    Returns:
        {"in_memory": bytes, "streamed": bytes}
    """
    pixels = height * width
    tile = grid.tile_height * grid.tile_width
    working = batch_size * tile * (3 * 8 * 3) + 4 * 2048 * 2048 * 3 * 8
    return {
        "in_memory": pixels * ((6 if normalized else 0) + 4 + 4) + len(grid) * tile * 2 + working,
        "streamed": pixels * 4 + working,
    }


def check_host_memory(needed: int, what: str, remedy: str) -> None:
    """Refuse, before any work, a step that would need more host memory than is available.

    Raises:
        MemoryError: naming what was estimated, what is available and ``remedy``.
    """
    available = available_bytes(torch.device("cpu"))
    if needed > available * USABLE_FRACTION:
        raise MemoryError(
            f"{what} needs about {_gib(needed)} GiB of host memory beyond the model, but only "
            f"{_gib(available)} GiB is available ({USABLE_FRACTION:.0%} of it usable); {remedy}"
        )


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f}" if nbytes >= 2**30 else f"{nbytes / 2**30:.2f}"


def process_status_gib(field: str) -> float:
    """A memory line of this process's /proc/self/status in GiB ("VmRSS": resident now;
    "VmHWM": peak resident, which, unlike getrusage's ru_maxrss, does not start at a parent
    process's peak); NaN where there is no such file."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _load_malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library, or not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def release_freed_host_memory() -> bool:
    """Give the pages of freed heap memory back to the system (glibc's ``malloc_trim``).

    glibc keeps freed heap memory for reuse: after a whole-image call on the CPU a process
    holds about half a gigabyte (ViT-B) that no array uses, and the next call's encoder
    peak comes on top of part of it (bench/NOTES.md, section 5). The pipeline calls this
    once per call on CPU backends. Returns False where there is nothing to call.
    """
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True
