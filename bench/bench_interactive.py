"""Interactive annotation: embed once, then each prompt costs the decoder only.

One session, one image; side by side in one run:

    full        ``session.segment(image, boxes=b)`` (preprocessing, encoder, decoder, clean-up)
    embed       ``session.embed(image, cellfinder=False)`` (preprocessing and encoder, once)
    prompt      ``session.segment(embedding, boxes=b)`` on that embedding (decoder, clean-up)
    add         ``Annotation.add(box)`` with N cells already on screen (one box decoded and
                painted, the labels cleaned up again)

Labels of ``prompt`` are compared with ``full`` (they must be equal)::

    python bench/bench_interactive.py --checkpoint STEERED_VIT_B.pt --boxes 5 --on-screen 0,10,100

Without ``--checkpoint``: random weights of ``--config`` (tiny by default, or cellsam-vit-b)
steered on the image (ratios only). The image is
a 512 x 512 crop of the released code's tissue sample when ``--released`` names a checkout,
else a synthetic one. The JSON report goes to ``bench/results/<device>/interactive-<date>.json``
with a markdown table beside it.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np


def timed(call, repeats: int, synchronize=lambda: None) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls, and the last result.

    ``synchronize`` waits for queued device work, so that a call returning a GPU tensor
    (the embedding) is timed to its end rather than to its launch.
    """
    seconds, out = [], None
    for _ in range(repeats):
        synchronize()
        t0 = time.perf_counter()
        out = call()
        synchronize()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds), out


def grid_boxes(n: int, height: int, width: int, seed: int) -> np.ndarray:
    """(n, 4) float32 boxes tiled on a square grid, one per cell of side ``sqrt(H W / n)``,
    each shrunk a little at random: a confluent cell layer, boxes that barely overlap."""
    rng = np.random.default_rng(seed)
    side = max(4.0, float(np.sqrt(height * width / n)))
    ys, xs = np.meshgrid(np.arange(0, height - side + 1, side), np.arange(0, width - side + 1, side), indexing="ij")
    corners = np.stack([xs.ravel(), ys.ravel()], 1)[rng.permutation(xs.size)][:n]
    margin = rng.uniform(0, side * 0.15, size=(len(corners), 4))
    boxes = np.concatenate([corners + margin[:, :2], corners + side - margin[:, 2:]], 1)
    return np.resize(boxes, (n, 4)).astype(np.float32)  # more boxes than grid cells: repeat


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="weights in the released format (default: steered random tiny weights)")
    parser.add_argument("--config", default="tiny", help="random weights without --checkpoint: tiny or cellsam-vit-b")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default=None)
    parser.add_argument("--released", help="vanvalenlab/cellSAM checkout: its tissue sample image is used")
    parser.add_argument("--boxes", type=int, default=5, help="boxes per prompt (default 5)")
    parser.add_argument("--on-screen", default="0,10,100", help="cells already annotated before an add")
    parser.add_argument("--layout", choices=("random", "grid"), default="random",
                        help="boxes scattered at random (they overlap) or tiled on a grid like a cell layer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="JSON report (default: bench/results/<device>/interactive-<date>.json)")
    args = parser.parse_args()

    from report import machine_record, save_report

    import cellsam_trt
    from cellsam_trt.dev.synthetic import cell_boxes, synthetic_cells

    warnings.simplefilter("ignore", cellsam_trt.NoCellsWarning)
    if args.released:
        from skimage.io import imread

        image = np.ascontiguousarray(imread(Path(args.released).expanduser() / "sample_imgs" / "tissuenet.png")[:512, :512])
    else:
        image = synthetic_cells(512, 512, n_cells=60, seed=0)
    if args.checkpoint:
        session = cellsam_trt.CellSAM.from_checkpoint(args.checkpoint, backend=args.backend, device=args.device)
    else:
        from cellsam_trt.dev.steering import steer_random_network
        from cellsam_trt.modeling.checkpoint import random_network
        from cellsam_trt.modeling.config import ModelConfig

        network = steer_random_network(random_network(ModelConfig.named(args.config), seed=0), image)
        session = cellsam_trt.CellSAM.from_network(network, device=args.device)  # torch
    h, w = image.shape[:2]
    counts = [int(n) for n in args.on_screen.split(",") if n]
    total = args.boxes + max(counts) + 1
    boxes = cell_boxes(total, h, w, seed=1) if args.layout == "random" else grid_boxes(total, h, w, seed=1)
    prompt_boxes = boxes[:args.boxes]
    session.segment(image, boxes=prompt_boxes)  # warm-up: sessions, arenas, caches

    sync = session.backend.synchronize
    full_seconds, full = timed(lambda: session.segment(image, boxes=prompt_boxes), args.repeats, sync)
    embed_seconds, embedding = timed(lambda: session.embed(image, cellfinder=False), args.repeats, sync)
    prompt_seconds, prompted = timed(lambda: session.segment(embedding, boxes=prompt_boxes), args.repeats, sync)
    rows = []
    for count in counts:
        annotation = cellsam_trt.Annotation(session, embedding)
        for box in boxes[args.boxes:args.boxes + count]:
            annotation.add(box)
        seconds, areas = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            cell = annotation.add(boxes[-1])
            _ = annotation.labels  # what a viewer shows after the add
            seconds.append(time.perf_counter() - t0)
            rows_, cols_ = annotation.changed  # the rectangle whose clean-up was redone
            areas.append((rows_.stop - rows_.start) * (cols_.stop - cols_.start) / (h * w))
            if cell:
                annotation.remove(cell)
        rows.append({"on_screen": count, "cells": len(annotation.cells), "add_seconds": statistics.median(seconds),
                     "cleaned_fraction": statistics.median(areas)})
    report = {
        "what": "embed once, prompt many times: full call vs prompt on a kept embedding",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_record(session.backend.device),
        "backend": session.backend.describe(),
        "config": session.backend.config.name,
        "image": list(image.shape), "boxes": args.boxes, "layout": args.layout, "repeats": args.repeats,
        "full_seconds": full_seconds, "embed_seconds": embed_seconds, "prompt_seconds": prompt_seconds,
        "speedup_prompt": full_seconds / prompt_seconds,
        "labels_equal": bool(np.array_equal(full, prompted)), "cells": int(full.max()),
        "embedding_mib": embedding.nbytes / 2**20,
        "add": rows,
    }
    save_report(report, args.out, "interactive", session.backend.device, markdown)
    return 0 if report["labels_equal"] else 1


def markdown(report: dict) -> str:
    lines = [f"# Embed once, prompt many times ({report['created']})", "",
             f"{report['config']} on {report['backend']['backend']} ({report['backend']['device']}), image "
             f"{tuple(report['image'])}, {report['boxes']} boxes per prompt, boxes laid out {report.get('layout', 'random')}, "
             f"medians of {report['repeats']} calls.", "",
             "| call | seconds |", "|---|---|",
             f"| full `segment(image, boxes)` | {report['full_seconds']:.3f} |",
             f"| `embed(image)` (once) | {report['embed_seconds']:.3f} |",
             f"| `segment(embedding, boxes)` | {report['prompt_seconds']:.3f} |"]
    lines += [f"| `Annotation.add` + labels, {r['on_screen']} boxes on screen | {r['add_seconds']:.3f} |"
              for r in report["add"]]
    lines += ["", "| boxes on screen | cells kept | share of the image cleaned again per add |", "|---|---|---|"]
    lines += [f"| {r['on_screen']} | {r.get('cells', '')} | {r.get('cleaned_fraction', float('nan')):.4f} |"
              for r in report["add"]]
    lines += ["", f"Prompt on the kept embedding: **{report['speedup_prompt']:.1f}x** the full call; labels "
              f"{'equal' if report['labels_equal'] else 'DIFFERENT'} ({report['cells']} cells). The embedding holds "
              f"{report['embedding_mib']:.1f} MiB.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
