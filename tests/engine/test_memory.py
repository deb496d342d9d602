import ctypes
import sys

import pytest
import torch

from cellsam_trt.engine import memory
from cellsam_trt.engine.memory import release_freed_host_memory
from cellsam_trt.modeling.config import ModelConfig


def test_estimate_matches_measured_scale():
    # measured on the CPU (ViT-B, fp32): 13 MB per box (BoxDecoder), 21 MB (SAM's own call);
    # the estimate must stay above both with a margin, and within 3x of them
    per_box = memory.decoder_bytes_per_box(ModelConfig.cellsam())
    assert 25e6 < per_box < 45e6


def test_chunk_shrinks_to_fit_and_refuses_when_nothing_fits(monkeypatch):
    cfg = ModelConfig.cellsam()
    per_box = memory.decoder_bytes_per_box(cfg)
    fixed = sum(memory.estimate_bytes(cfg, 1000, 1000, 0).values())
    monkeypatch.setattr(memory, "available_bytes", lambda device: int((fixed + 10.5 * per_box) / memory.USABLE_FRACTION))
    assert memory.fit_chunk_size(cfg, torch.device("cpu"), 1000, 1000, 256) == 10
    assert memory.fit_chunk_size(cfg, torch.device("cpu"), 1000, 1000, 4) == 4
    monkeypatch.setattr(memory, "available_bytes", lambda device: fixed)
    with pytest.raises(MemoryError, match="GiB"):
        memory.fit_chunk_size(cfg, torch.device("cpu"), 1000, 1000, 256)


def test_available_bytes_on_cpu_is_positive():
    assert memory.available_bytes(torch.device("cpu")) > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's (Linux)")
def test_freed_heap_pages_go_back_to_the_system():
    # 64 MiB in 4 KiB blocks: below glibc's mmap threshold, so they live on the heap; with
    # every 64th block kept, the freed runs between them cannot return to the system by
    # shrinking the heap's top, and stay resident until the heap is trimmed
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(4096) for _ in range(16384)]
    for block in blocks:
        ctypes.memset(block, 1, 4096)
    for i, block in enumerate(blocks):
        if i % 64:
            libc.free(block)
    before = _rss_bytes()
    try:
        assert release_freed_host_memory() is True
        assert before - _rss_bytes() > 32 * 2**20
    finally:
        for block in blocks[::64]:
            libc.free(block)


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))
