import pytest
import torch

from cellsam_trt import memory
from cellsam_trt.config import ModelConfig


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
