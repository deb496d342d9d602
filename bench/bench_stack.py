"""Frames per second of a stack: ``CellSAM.segment_stack`` against a loop of ``CellSAM.segment``.

Both paths run on the same session (same weights, backend and device), side by side in one
process, alternating in each round; the labels of the two are compared frame by frame.
``segment_stack`` sends ``--batch-size`` frames through one encoder call and one CellFinder
call; the loop sends one frame per call. Everything after those two graphs (decoder per
box, clean-up) is per frame in both, so the gain is bounded by the graphs' share of a
frame's time, and by how much more a batched graph call gets out of the device.

Frames are ``synthetic_cells`` images (nuclear + whole-cell, ``--cells`` per frame), with
weights steered to detect them (tiny config, default) or random ViT-B weights
(``--config cellsam-vit-b``, also steered: the detections, and so the decoder's work,
are comparable to a real image's)::

    python bench/bench_stack.py --frames 8 --side 256                       # CPU, tiny
    python bench/bench_stack.py --device cuda --config cellsam-vit-b --backend torch

The JSON and a markdown table go to ``bench/results/<device>/stack-<date>.json|md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="model config: tiny (default) or cellsam-vit-b")
    parser.add_argument("--backend", default="auto", help="auto, torch, onnxruntime or tensorrt")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, default=8, help="frames in the stack (default 8)")
    parser.add_argument("--side", type=int, default=256, help="frame side in px (default 256)")
    parser.add_argument("--cells", type=int, default=6, help="cells per frame (default 6)")
    parser.add_argument("--batch-size", type=int, default=4, help="frames per graph call of segment_stack")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds of each path (median reported)")
    parser.add_argument("--out", help="JSON report (default: bench/results/<device>/stack-<date>.json)")
    args = parser.parse_args(argv)

    import torch
    from report import RESULTS, machine_record

    from cellsam_trt import CellSAM
    from cellsam_trt.bench.machine import device_name
    from cellsam_trt.dev.steering import steer_random_network
    from cellsam_trt.dev.synthetic import synthetic_cells
    from cellsam_trt.modeling.checkpoint import random_network, write_checkpoint
    from cellsam_trt.modeling.config import ModelConfig

    warnings.simplefilter("ignore")  # empty frames and the like: the comparison reports them
    device = torch.device(args.device)
    frames = [synthetic_cells(args.side, args.side, n_cells=args.cells, seed=100 + k) for k in range(args.frames)]
    stack = np.stack(frames)  # (T, Y, X, C)
    network = steer_random_network(random_network(ModelConfig.named(args.config), seed=0), frames[0])
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_checkpoint(network, Path(tmp) / "weights.pt")
        del network
        session = CellSAM.from_checkpoint(checkpoint, backend=args.backend, device=device, cache=Path(tmp) / "cache")
        # warm-up: graphs built / loaded, first-call allocations, both batch sizes seen
        session.segment_stack(stack[:args.batch_size], axes="TYXC", batch_size=args.batch_size)
        session.segment(frames[0])

        times: dict[str, list[float]] = {"stack": [], "loop": []}
        same = True
        for round_ in range(args.rounds):
            for path in (("stack", "loop") if round_ % 2 == 0 else ("loop", "stack")):
                session.backend.synchronize()
                t0 = time.perf_counter()
                if path == "stack":
                    stacked = session.segment_stack(stack, axes="TYXC", batch_size=args.batch_size)
                else:
                    looped = [session.segment(frame) for frame in frames]
                session.backend.synchronize()
                times[path].append(time.perf_counter() - t0)
            same = same and all(np.array_equal(a, b) for a, b in zip(stacked, looped))
        # how far apart the two paths are when they differ (batched graph calls can round otherwise)
        differing = [float((a != b).mean()) for a, b in zip(stacked, looped)]
        cells_loop = [int(labels.max()) for labels in looped]
        cells = [int(labels.max()) for labels in stacked]
        backend = session.backend.name

    seconds = {k: statistics.median(v) for k, v in times.items()}
    fps = {k: args.frames / s for k, s in seconds.items()}
    report = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_record(device),
        "command": " ".join(["python", "bench/bench_stack.py", *(argv if argv is not None else sys.argv[1:])]),
        "config": args.config, "backend": backend, "device": str(device), "frames": args.frames,
        "side": args.side, "batch_size": args.batch_size, "rounds": args.rounds,
        "cells_per_frame": cells, "seconds": times, "median_seconds": seconds, "frames_per_second": fps,
        "speedup": seconds["loop"] / seconds["stack"], "labels_identical": same,
        "differing_pixel_share": differing, "cells_per_frame_loop": cells_loop,
    }
    out = Path(args.out) if args.out else (RESULTS / device_name(device)
                                           / f"stack-{datetime.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    table = "\n".join([
        f"# Stack of {args.frames} frames {args.side} x {args.side} ({args.config}, {backend}, {device})",
        "",
        f"`{report['command']}`; cells per frame {cells}; median of {args.rounds} rounds, paths alternating.",
        "",
        "| path | seconds | frames / s |",
        "|---|---:|---:|",
        f"| loop of `segment` | {seconds['loop']:.2f} | {fps['loop']:.2f} |",
        f"| `segment_stack`, batch {args.batch_size} | {seconds['stack']:.2f} | {fps['stack']:.2f} |",
        "",
        f"speed-up {report['speedup']:.2f}x; labels identical frame by frame: {same}",
        "" if same else f"\nshare of pixels that differ per frame (last round): max {max(differing):.2e}, "
                        f"mean {np.mean(differing):.2e}; cells per frame in the loop {cells_loop}\n",
    ])
    out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
