"""Decoder alone: SAM's batched call (image side repeated per box), BoxDecoder.forward
(box-independent work computed once, eager) and the fused Triton decoder, side by side on
one device, in each precision asked for.

    python bench/bench_decoder.py --config cellsam-vit-b --n 16,64 --device cpu
    python bench/bench_decoder.py --config cellsam-vit-b --n 1,16,256,1024,3500 --device cuda \
        --formulations sam_repeat,shared,fused --precisions fp32,bf16,fp16

Prints one JSON line per (formulation, precision, N): median ms per call and per box, peak
GPU memory, and for the fused decoder the counted work per box (``fused_decoder.work_per_box``:
GFLOP and MB of image-side traffic) with the TFLOP/s and GB/s that the time gives.
Eager and SAM's call run under autocast in bf16/fp16; the fused one stores its image
tokens in that type. ``--fp16`` is the old spelling of ``--precisions fp16``.
A row that runs out of device memory (SAM's call at N = 3500 needs more than an 80 GB GPU
holds) prints {"error": "out of memory: ..."} instead, and the next row runs; the exit
status is 3 when some row failed so. Random weights: the decoder's cost does not depend
on the values.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from cellsam_trt.bench.timing import row_failure, simulate_oom
from cellsam_trt.modeling import BoxDecoder
from cellsam_trt.modeling.checkpoint import random_network
from cellsam_trt.modeling.config import ModelConfig
from cellsam_trt.modeling.fused_decoder import FusedBoxDecoder, fused_decoder_unavailable, work_per_box


def time_call(fn, device: torch.device, repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - t0)
    return samples


def measure(fn, embedding, boxes, device: torch.device, autocast, repeats: int) -> dict:
    """Warm-up call, then ``repeats`` timed calls: median ms per call and per box, peak bytes."""
    with torch.inference_mode(), autocast:
        fn(embedding, boxes)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        samples = time_call(lambda: fn(embedding, boxes), device, repeats)
    median = statistics.median(samples)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"ms_per_call": round(median * 1e3, 2), "ms_per_box": round(median * 1e3 / len(boxes), 3),
            "peak_gpu_bytes": peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["tiny", "cellsam-vit-b"], default="cellsam-vit-b")
    parser.add_argument("--n", default="16,64", help="box counts, comma-separated")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fp16", action="store_true", help="CUDA autocast fp16 (same as --precisions fp16)")
    parser.add_argument("--formulations", default="sam_repeat,shared",
                        help="sam_repeat (SAM's own call), shared (BoxDecoder, eager), fused (Triton); comma-separated")
    parser.add_argument("--precisions", default="fp32", help="fp32, bf16, fp16 (the last two CUDA only); comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    precisions = ["fp16"] if args.fp16 else args.precisions.split(",")
    formulations = args.formulations.split(",")
    if any(p != "fp32" for p in precisions) and device.type != "cuda":
        parser.error("--precisions bf16/fp16 run on CUDA; use --device cuda")
    sam = random_network(ModelConfig.named(args.config), seed=0).eval().sam.to(device)
    decoder = BoxDecoder(sam.prompt_encoder, sam.mask_decoder)
    g = torch.Generator().manual_seed(0)
    embedding = torch.randn(1, sam.prompt_encoder.embed_dim, 64, 64, generator=g).to(device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    unavailable = fused_decoder_unavailable(device) if "fused" in formulations else None
    failed = 0
    for n in (int(v) for v in args.n.split(",")):
        corner = torch.rand(n, 2, generator=g) * 900
        boxes = torch.cat([corner, corner + 8 + torch.rand(n, 2, generator=g) * 100], 1).to(device)
        for precision in precisions:
            for name in formulations:
                row = {"formulation": name, "precision": precision, "n": n, "device": str(device),
                       "fp16": precision == "fp16", "config": args.config, "threads": torch.get_num_threads()}
                failure = None
                try:
                    if name == "fused":
                        if unavailable:
                            raise RuntimeError(f"fused decoder unavailable: {unavailable}")
                        fused = FusedBoxDecoder(decoder, dtype=dtypes[precision])
                        fn, autocast = fused.forward, contextlib.nullcontext()
                        work = work_per_box(decoder, torch.finfo(dtypes[precision]).bits // 8)
                    else:
                        fn = decoder.forward_per_box_repeat if name == "sam_repeat" else decoder.forward
                        autocast = (contextlib.nullcontext() if precision == "fp32"
                                    else torch.autocast("cuda", dtype=dtypes[precision]))
                        work = None
                    simulate_oom(f"decoder/{name}/{n}")
                    row.update(measure(fn, embedding, boxes, device, autocast, args.repeats))
                    if work is not None:
                        seconds = row["ms_per_box"] / 1e3
                        row.update(gflop_per_box=round(work["flop"] / 1e9, 3), mb_per_box=round(work["bytes"] / 1e6, 2),
                                   tflops=round(work["flop"] / seconds / 1e12, 2),
                                   gb_per_s=round(work["bytes"] / seconds / 1e9, 1))
                except Exception as err:  # out of memory, or no fused decoder here: report the row, go on
                    failure = row_failure(err) or (str(err) if name == "fused" else None)
                    if failure is None:
                        raise
                if failure is not None:
                    # outside the except block: the traceback no longer holds the failed call's tensors
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    row["error"] = failure
                    failed += 1
                print(json.dumps(row), flush=True)
    return 3 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
