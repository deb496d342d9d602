"""Where one decoder call's time goes: torch.profiler over ``BoxDecoder`` on N boxes.

    python bench/profile_decoder.py --config cellsam-vit-b --n 256 --device cuda           # fp32
    python bench/profile_decoder.py --config cellsam-vit-b --n 256 --device cuda --fp16
    python bench/profile_decoder.py --config tiny --n 16 --device cpu                      # a check of the script

Prints the operators and kernels that take the most device time (CUDA) or CPU time, with
their share of the call, as a markdown table; with ``--out`` it also writes the table and
the profiler's trace (Chrome trace format) beside it. Random weights: the decoder's cost
does not depend on the values. bench/NOTES.md, section 7, has the arithmetic floor the
profile is read against.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

from cellsam_trt.dev.synthetic import cell_boxes
from cellsam_trt.modeling import BoxDecoder
from cellsam_trt.modeling.checkpoint import random_network
from cellsam_trt.modeling.config import ModelConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["tiny", "cellsam-vit-b"], default="cellsam-vit-b")
    parser.add_argument("--n", type=int, default=256, help="boxes in the call (default 256, the GPU chunk)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fp16", action="store_true", help="CUDA autocast fp16")
    parser.add_argument("--calls", type=int, default=5, help="profiled calls after two warm-ups")
    parser.add_argument("--rows", type=int, default=25, help="table rows")
    parser.add_argument("--out", help="markdown table here, trace beside it (.json)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.fp16 and device.type != "cuda":
        parser.error("--fp16: CUDA autocast only")

    config = ModelConfig.named(args.config)
    sam = random_network(config, seed=0).sam
    decoder = BoxDecoder(sam.prompt_encoder, sam.mask_decoder).to(device).eval()
    grid = config.sam.encoder.grid_size
    embedding = torch.randn(1, config.sam.prompt_embed_dim, grid, grid, device=device)
    boxes = torch.from_numpy(cell_boxes(args.n, config.image_size, config.image_size)).to(device)
    autocast = torch.autocast("cuda", dtype=torch.float16) if args.fp16 else contextlib.nullcontext()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    with torch.inference_mode(), autocast:
        for _ in range(2):
            decoder(embedding, boxes)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.calls):
                decoder(embedding, boxes)
            if device.type == "cuda":
                torch.cuda.synchronize(device)

    averages = list(prof.key_averages())
    sort = "self_cpu_time_total"
    if device.type == "cuda":  # torch >= 2.4 names it "device" time; older releases "cuda"
        sort = "self_device_time_total" if hasattr(averages[0], "self_device_time_total") else "self_cuda_time_total"
    events = sorted(averages, key=lambda e: getattr(e, sort), reverse=True)
    total = sum(getattr(e, sort) for e in events) or 1.0
    precision = "fp16 autocast" if args.fp16 else "fp32"
    lines = [f"# Decoder profile: {args.config}, {args.n} boxes, {precision}, {device}", "",
             f"{args.calls} calls; self time per call, sorted; total {total / args.calls / 1e3:.2f} ms per call "
             f"({'device' if device.type == 'cuda' else 'CPU'} time).", "",
             "| operator / kernel | calls per decoder call | ms per decoder call | share |", "|---|---|---|---|"]
    for event in events[:args.rows]:
        own = getattr(event, sort)
        lines.append(f"| `{event.key[:90]}` | {event.count / args.calls:g} | {own / args.calls / 1e3:.3f} | "
                     f"{own / total:.1%} |")
    text = "\n".join([*lines, ""])
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        prof.export_chrome_trace(str(out.with_suffix(".json")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
