"""Where one ``segment`` call's time goes: every stage of ``details.timings``, the call's wall
clock and what no stage measured, as a markdown table.

    python bench/bench_stages.py --config cellsam-vit-b --device cpu --user-boxes 100

Random weights in the official layout, steered on the image (``cellsam_trt.dev.steering``);
the second of two calls is reported (the first pays one-time costs).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import torch

from cellsam_trt import CellSAM
from cellsam_trt.dev.steering import steer_random_network
from cellsam_trt.dev.synthetic import bench_image, cell_boxes
from cellsam_trt.modeling.checkpoint import random_network
from cellsam_trt.modeling.config import ModelConfig
from cellsam_trt.runtime import TorchBackend


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["tiny", "cellsam-vit-b"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=512, help="side of the synthetic image")
    parser.add_argument("--user-boxes", type=int, default=0, help="user boxes (0: CellFinder's)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--attention", choices=["sdpa", "flash", "eager"], default="sdpa",
                        help="the encoders' attention (flash: the Triton kernel, CUDA)")
    parser.add_argument("--out", help="also write the timings as JSON here")
    args = parser.parse_args()
    image = bench_image(size=args.size, n_cells=200, seed=0)
    network = steer_random_network(random_network(ModelConfig.named(args.config), seed=0), image)
    session = CellSAM(TorchBackend(network, device=args.device, precision=args.precision, attention=args.attention))
    boxes = cell_boxes(args.user_boxes, args.size, args.size, seed=1) if args.user_boxes else None
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            _, details = session.segment(image, boxes=boxes, return_details=True)
            wall = time.perf_counter() - t0
    t = details.timings
    print("| stage | ms | share of the call |\n|---|---|---|")
    for name, seconds in t.items():
        if name != "total":
            print(f"| {name} | {seconds * 1e3:.1f} | {seconds / t['total']:.1%} |")
    print(f"| total (details) | {t['total'] * 1e3:.1f} | 100 % |")
    print(f"| wall clock around the call | {wall * 1e3:.1f} | {wall / t['total']:.1%} |")
    print(f"boxes decoded {details.num_candidates}, kept {len(details.iou)}, backend {details.backend} on {args.device}, "
          f"{args.precision}, attention {args.attention}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"config": args.config, "device": args.device, "size": args.size, "user_boxes": args.user_boxes,
                       "precision": args.precision, "attention": args.attention,
                       "timings": t, "wall": wall, "decoded": details.num_candidates}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
