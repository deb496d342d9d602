"""``cellsam-trt demo``: the whole pipeline on a generated cell image, end to end."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

NOTICE = """\
========================================================================
 NO RELEASED CELLSAM WEIGHTS FOUND: RUNNING WITH RANDOM WEIGHTS
 ({config}, official checkpoint layout, steered so every stage has work)
 The labels below are NOT a real segmentation.
 Real weights: `cellsam-trt download` (needs DEEPCELL_ACCESS_TOKEN), or
 `cellsam-trt demo --checkpoint path/to/cellsam_general.pt`.
========================================================================"""


def run(args: argparse.Namespace) -> int:
    # the model stack is imported here, when the command runs, not when the parser is built
    from ..api import CellSAM
    from ..dev.steering import steer_random_network
    from ..dev.synthetic import synthetic_cells
    from ..io import write_labels_tiff
    from ..modeling import checkpoint as ckpt
    from ..modeling.config import ModelConfig
    from ..runtime import TorchBackend, resolve_device
    from .pictures import overlay, write_png

    if args.write_weights and args.checkpoint:
        raise ValueError("--write-weights: writes random weights; leave out --checkpoint")
    device = resolve_device(args.device)
    image = synthetic_cells(args.size, args.size, n_cells=args.cells, seed=args.seed)
    path = Path(args.checkpoint).expanduser() if args.checkpoint else ckpt.DEFAULT_CHECKPOINT
    t0 = time.perf_counter()
    if path.is_file() and not args.write_weights:
        network = ckpt.load_checkpoint(path)
        source = f"checkpoint {path}"
    else:
        if args.checkpoint:
            raise ckpt.CheckpointError(f"checkpoint: no file at {path}")
        name = args.config or ("cellsam-vit-b" if device.type == "cuda" else "tiny")
        print(NOTICE.format(config=name), file=sys.stderr)
        network = steer_random_network(ckpt.random_network(ModelConfig.named(name), seed=args.seed), image)
        source = f"random weights ({name})"
        if args.write_weights:
            written = ckpt.write_checkpoint(network, Path(args.write_weights).expanduser())
            print(f"wrote these random weights ({name}, the released checkpoint layout) to {written}: "
                  f"cellsam_trt.segment(image, checkpoint=\"{written}\") or `cellsam-trt segment IMAGE -o OUT "
                  f"--checkpoint {written}` run with them (not a real segmentation)")
    load_time = time.perf_counter() - t0
    session = CellSAM(TorchBackend(network, device=device))
    labels, details = session.segment(image, return_details=True)
    out = Path(args.out)
    write_labels_tiff(out / "demo_labels.tif", labels)
    write_png(out / "demo_overlay.png", overlay(image, labels))
    print(f"weights: {source} (loaded in {load_time:.2f} s); device: {device}")
    print(f"image: {image.shape} {image.dtype}; boxes decoded: {details.num_candidates}; "
          f"masks kept: {len(details.iou)}; cells: {int(labels.max())}")
    print("stage timings:")
    stages = {k: v for k, v in details.timings.items() if k not in ("total", "unattributed")}
    for stage, seconds in stages.items():
        print(f"  {stage:<12} {seconds * 1000:9.1f} ms")
    # the call's own clock where it has one (the stages leave a little unattributed)
    print(f"  {'total':<12} {details.timings.get('total', sum(stages.values())) * 1000:9.1f} ms")
    print(f"wrote {out / 'demo_labels.tif'} and {out / 'demo_overlay.png'}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="segment a generated cell image and write labels + overlay")
    p.add_argument("--checkpoint", help="CellSAM weights (default: ~/.deepcell/models/cellsam_v1.2/cellsam_general.pt)")
    p.add_argument("--out", default="cellsam-demo", help="output folder (default: ./cellsam-demo)")
    p.add_argument("--device", help="torch device (default: cuda if available)")
    p.add_argument("--config", choices=["tiny", "cellsam-vit-b"], help="architecture for random weights "
                   "(default: cellsam-vit-b on a GPU, tiny on the CPU)")
    p.add_argument("--size", type=int, default=512, help="side of the generated image (default 512)")
    p.add_argument("--cells", type=int, default=40, help="cells in the generated image (default 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-weights", metavar="PATH",
                   help="also save the random weights the demo runs (steered on its image, --config) to PATH, to "
                        "try segment(), the API and `cellsam-trt segment` without the released weights")
    p.set_defaults(func=run)
