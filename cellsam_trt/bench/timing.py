"""Timing for the benchmarks: device clocks, a backend that times its graph calls, median
and spread of samples, and the rows that may fail (out of memory) without ending a run."""
from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..dev.synthetic import cell_logits
from ..runtime.base import Backend, BackendError, OutOfDeviceMemory, is_out_of_memory, kept_rows

# Comma-separated row names ("torch-fp32/user/10", "baseline/user/10", "decoder/sam_repeat/16")
# whose measurement raises torch.cuda.OutOfMemoryError: how the per-row handling of a real
# out-of-memory row is exercised without a GPU (bench/gpu_session.sh with SMOKE=1).
SIMULATE_OOM_ENV = "CELLSAM_TRT_BENCH_SIMULATE_OOM"


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """Seconds -> {"median", "q1", "q3", "min", "max", "n", "samples"} (seconds)."""
    a = np.asarray(list(samples), dtype=np.float64)
    if a.size == 0:
        raise ValueError("samples: nothing was measured")
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "min": float(a.min()), "max": float(a.max()),
            "n": int(a.size), "samples": [float(x) for x in a]}


def simulate_oom(row: str) -> None:
    """Raise torch.cuda.OutOfMemoryError when ``row`` is listed in $CELLSAM_TRT_BENCH_SIMULATE_OOM."""
    if row in {r.strip() for r in os.environ.get(SIMULATE_OOM_ENV, "").split(",")}:
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated for {row} by ${SIMULATE_OOM_ENV})")


def row_failure(err: BaseException) -> str | None:
    """The reason a bench row failed, for the report, when it should not stop the bench:
    out of memory (the pipeline's MemoryError, or a device allocation failure from any
    library) or a backend that cannot run; None for anything else (a bug: raise)."""
    if isinstance(err, OutOfDeviceMemory) or is_out_of_memory(err):
        kind = "out of memory"
    elif isinstance(err, BackendError):
        kind = "backend error"
    else:
        return None
    return f"{kind}: {type(err).__name__}: {str(err).strip()[:500]}"


def release_device_memory(device: torch.device) -> None:
    """Give cached blocks back after a failed row (call it outside the ``except`` block:
    the exception's traceback keeps the failed call's tensors alive until then)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


class DeviceClock:
    """Times regions of device work: CUDA events on a GPU (summed per name), else the host clock.

    Events are only read in ``collect``, after a synchronisation, so timing adds no host
    sync inside the region's caller.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._pending: list[tuple[str, Any, Any]] = []

    @contextlib.contextmanager
    def region(self, name: str) -> Iterator[None]:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(self.device))
            try:
                yield
            finally:
                end.record(torch.cuda.current_stream(self.device))
                self._pending.append((name, start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._pending.append((name, t0, time.perf_counter()))

    def collect(self) -> dict[str, float]:
        """Seconds per region name since the last collect (sums over repeated regions)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        out: dict[str, float] = defaultdict(float)
        for name, start, end in self._pending:
            out[name] += start.elapsed_time(end) / 1000 if self.cuda else end - start
        self._pending.clear()
        return dict(out)


class TimedBackend(Backend):
    """Delegates to another backend, timing each graph call with a ``DeviceClock``.

    With ``cell_masks`` the decoder's mask logits are replaced by ``cell_logits`` of the
    boxes (the decoder still runs and is timed; making the replacement is timed as
    "synthetic_masks" so that it can be subtracted).
    """

    def __init__(self, inner: Backend, clock: DeviceClock, cell_masks: bool = False) -> None:
        self.inner = inner
        self.clock = clock
        self.cell_masks = cell_masks
        self.name = inner.name
        self.device = inner.device
        self.config = inner.config
        self.adapted_inputs = inner.adapted_inputs
        self.max_decoder_boxes = inner.max_decoder_boxes
        self.decoder_calls = 0

    def encoder(self, images: Tensor) -> Tensor:
        with self.clock.region("encoder"):
            return self.inner.encoder(images)

    def cellfinder(self, images: Tensor) -> tuple[Tensor, Tensor]:
        with self.clock.region("cellfinder"):
            return self.inner.cellfinder(images)

    def decoder(self, embedding: Tensor, boxes: Tensor, *, keep_iou: float | None = None,
                last_call: bool = False) -> tuple[Tensor, Tensor]:
        with self.clock.region("decoder"):
            masks, iou = self.inner.decoder(embedding, boxes, keep_iou=keep_iou, last_call=last_call)
        self.decoder_calls += 1
        if self.cell_masks:
            with self.clock.region("synthetic_masks"):
                rows = kept_rows(iou, keep_iou)
                kept = boxes if rows is None else boxes[rows.to(boxes.device)]
                masks = cell_logits(kept.to(masks.device), masks.shape[-1], self.config.image_size)[:, None]
        return masks, iou

    def synchronize(self) -> None:
        self.inner.synchronize()

    def describe(self) -> dict:
        return self.inner.describe()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def peak_memory(device: torch.device, record: dict[str, Any]) -> Iterator[None]:
    """Record torch's CUDA memory of the block: allocated before, peak during (bytes)."""
    if device.type != "cuda":
        record["resident_bytes"] = None
        record["peak_memory_bytes"] = None
        yield
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    record["resident_bytes"] = int(torch.cuda.memory_allocated(device))
    yield
    torch.cuda.synchronize(device)
    record["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))


