"""``cellsam-trt export``: the ONNX graphs of a checkpoint, into a folder or the artifact cache."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..modeling.config import ModelConfig
from ..runtime.artifacts import GRAPH_NAMES, MANIFEST_NAME, OPSET, format_shape


def run(args: argparse.Namespace) -> int:
    from ..graphs.onnx_export import export_checkpoint  # torch and onnx: when the command runs

    t0 = time.perf_counter()
    if args.out is None:
        return fill_cache(args)
    config = ModelConfig.named(args.config) if args.config else None
    manifest = export_checkpoint(args.checkpoint, args.out, config=config, download=args.download,
                                 graphs=args.graphs, opset=args.opset, fp16=not args.no_fp16)
    out = Path(args.out)
    for name, entry in manifest["graphs"].items():
        size = entry["size_bytes"] + (entry["external_data"] or {}).get("size_bytes", 0)
        io = ", ".join(f"{t['name']} {format_shape(t['shape'])}" for t in entry["inputs"] + entry["outputs"])
        print(f"{name:<10} {out / entry['file']}  {size / 2**20:8.1f} MiB  {entry['export_seconds']:6.1f} s  {io}")
        if entry.get("fp16"):
            half = entry["fp16"]
            print(f"{'':<10} {out / half['file']}  {half['size_bytes'] / 2**20:8.1f} MiB  {half['convert_seconds']:6.1f} s  "
                  f"FP16 with FP32 {', '.join(half['fp32_ops'])}")
    print(f"manifest: {out / MANIFEST_NAME} (checkpoint sha256 {manifest['checkpoint']['sha256']}); "
          f"total {time.perf_counter() - t0:.1f} s")
    return 0


def fill_cache(args: argparse.Namespace) -> int:
    """``cellsam-trt export`` without ``--out``: the artifact cache's entry for the checkpoint
    (exported now unless present), e.g. to pre-build once on a shared file system."""
    from ..modeling.checkpoint import DEFAULT_CHECKPOINT, download_weights, find_checkpoint
    from ..runtime.cache import ArtifactCache

    custom = [flag for flag, used in (("--graphs", list(args.graphs) != list(GRAPH_NAMES)), ("--opset", args.opset != OPSET),
                                      ("--no-fp16", args.no_fp16)) if used]
    if custom:
        raise ValueError(f"{', '.join(custom)}: only with --out (the cache holds complete default exports)")
    if args.checkpoint is None and args.download and not DEFAULT_CHECKPOINT.is_file():
        download_weights()
    cache = ArtifactCache(args.cache_dir, build=True)
    folder = cache.onnx_dir(find_checkpoint(args.checkpoint), config=args.config)
    print(f"ONNX graphs of {args.checkpoint or DEFAULT_CHECKPOINT} in the cache: {folder}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="CellSAM weights (default: ~/.deepcell/models/cellsam_v1.2/cellsam_general.pt)")
    p.add_argument("--out", help="output folder for the .onnx files and manifest.json (default: the artifact "
                   "cache, where backend='auto' finds them; see `cellsam-trt cache list`)")
    p.add_argument("--cache-dir", help="artifact cache folder without --out (default: $CELLSAM_TRT_CACHE or the "
                   "user cache folder)")
    p.add_argument("--graphs", nargs="+", choices=GRAPH_NAMES, default=list(GRAPH_NAMES),
                   help="graphs to export (default: all three)")
    p.add_argument("--config", choices=["cellsam-vit-b", "tiny"], help="architecture (default: inferred from the weights)")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    p.add_argument("--download", action="store_true", help="fetch the released weights when absent")
    p.add_argument("--no-fp16", action="store_true",
                   help="skip the mixed-precision <graph>.fp16.onnx files (FP16 TensorRT engines need them)")


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export the encoder, cellfinder and decoder graphs to ONNX")
    add_arguments(p)
    p.set_defaults(func=run)
