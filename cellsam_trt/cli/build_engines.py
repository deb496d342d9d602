"""``cellsam-trt build-engines``: TensorRT engines from an ONNX export or into the artifact
cache, on the GPU that will serve them; optional verification against the graphs."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..runtime.artifacts import DEFAULT_MAX_BATCH, DEFAULT_MAX_BOXES, DEFAULT_OPT_BOXES, GRAPH_NAMES


def fill_cache(args: argparse.Namespace) -> int:
    """``build-engines`` without ``--onnx-dir`` / ``--out``: the artifact cache's engines for
    ``--checkpoint`` on this GPU (exporting its graphs into the cache first if needed)."""
    from ..modeling.checkpoint import find_checkpoint
    from ..runtime import resolve_device
    from ..runtime.cache import ArtifactCache, EngineRequest
    from ..runtime.tensorrt_backend import current_gpu, require_tensorrt

    if args.verify_only or args.verify:
        raise ValueError("--verify / --verify-only: give --onnx-dir (and --out) to compare engines with their graphs")
    trt = require_tensorrt()
    device = resolve_device(args.device or "cuda")
    if device.type != "cuda":
        raise ValueError(f"--device: TensorRT engines are built on a CUDA GPU, not {device}")
    request = EngineRequest(gpu=current_gpu(device), tensorrt_version=str(trt.__version__),
                            precision="fp32" if args.fp32 else "fp16", max_batch=args.max_batch,
                            max_boxes=args.max_boxes, device=device.index or 0)
    folder = ArtifactCache(args.cache_dir, build=True).engine_dir(find_checkpoint(args.checkpoint), request)
    print(f"TensorRT engines for {request.gpu['name']} in the cache: {folder}")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..graphs.tensorrt_engines import build_engines, format_rows, verify_engines  # torch: when it runs

    if args.onnx_dir is None:
        if args.out is not None:
            raise ValueError("--onnx-dir: needed with --out (without both, the engines go to the artifact cache)")
        return fill_cache(args)
    engine_dir = args.out or args.onnx_dir
    if not args.verify_only:
        meta = build_engines(
            args.onnx_dir, engine_dir, graphs=args.graphs, max_batch=args.max_batch, max_boxes=args.max_boxes,
            opt_boxes=args.opt_boxes, precision="fp32" if args.fp32 else "fp16",
            workspace_gib=args.workspace_gib, timing_cache=args.timing_cache, device=args.device,
            checkpoint=args.checkpoint,
        )
        for name, entry in meta["engines"].items():
            print(f"{name:<11}{Path(engine_dir) / entry['file']}  {entry['size_bytes'] / 2**20:8.1f} MiB  "
                  f"{entry['build_seconds']:7.1f} s  from {entry['onnx_file']}  profile {entry['profile']}  "
                  f"layers by output type {entry['layer_precisions']}")
        print(f"engines.json: {meta['gpu']['name']} (sm {meta['gpu']['compute_capability']}), "
              f"TensorRT {meta['tensorrt_version']}, checkpoint sha256 {meta['checkpoint']['sha256']}")
    if args.verify or args.verify_only:
        rows = verify_engines(engine_dir, args.onnx_dir, reference=args.reference, checkpoint=args.checkpoint,
                              num_boxes=args.verify_boxes, batch=args.verify_batch, device=args.device)
        print(f"verification against {args.reference}:")
        print(format_rows(rows))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("build-engines", help="build FP16 TensorRT engines from an ONNX export (on the target GPU)")
    p.add_argument("--onnx-dir", help="export folder of `cellsam-trt export` (without it and --out: build the "
                   "engines of --checkpoint into the artifact cache, where backend='auto' finds them)")
    p.add_argument("--out", help="engine folder (default: the ONNX folder)")
    p.add_argument("--cache-dir", help="artifact cache folder without --onnx-dir (default: $CELLSAM_TRT_CACHE or "
                   "the user cache folder)")
    p.add_argument("--graphs", nargs="+", choices=GRAPH_NAMES, default=list(GRAPH_NAMES))
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help=f"image batch profile max (default {DEFAULT_MAX_BATCH})")
    p.add_argument("--max-boxes", type=int, default=DEFAULT_MAX_BOXES,
                   help=f"decoder boxes per call, profile max (default {DEFAULT_MAX_BOXES})")
    p.add_argument("--opt-boxes", type=int, default=DEFAULT_OPT_BOXES, help=f"decoder profile opt (default {DEFAULT_OPT_BOXES})")
    p.add_argument("--fp32", action="store_true",
                   help="build FP32 engines from the FP32 graphs (default: FP16 engines from the mixed-precision graphs)")
    p.add_argument("--workspace-gib", type=float, help="builder workspace cap in GiB")
    p.add_argument("--timing-cache", help="timing cache file (default: ENGINE_DIR/timing.cache)")
    p.add_argument("--device", help="CUDA device (default: the current one)")
    p.add_argument("--checkpoint", help="refuse an export from another checkpoint; reference weights for --reference torch")
    p.add_argument("--verify", action="store_true", help="after building, compare each engine with the reference")
    p.add_argument("--verify-only", action="store_true", help="only compare existing engines with the reference")
    p.add_argument("--reference", choices=["onnxruntime", "torch"], default="onnxruntime",
                   help="what --verify compares with (default: the ONNX graphs in ONNX Runtime, CPU)")
    p.add_argument("--verify-boxes", type=int, default=64, help="boxes decoded by --verify (default 64)")
    p.add_argument("--verify-batch", type=int, default=1, help="image batch of --verify (default 1)")
    p.set_defaults(func=run)
