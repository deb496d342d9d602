"""Accuracy of the mixed-precision (FP16) graphs against the FP32 graphs, in ONNX Runtime on the CPU.

    python bench/bench_fp16.py --work /tmp/fp16-bench --seeds 0,1,2 --user-boxes 200 \\
        --variant none= --variant islands=LayerNormalization,InstanceNormalization,ReduceMean,Pow,Sqrt,Softmax

Without ``--checkpoint`` the weights are random ViT-B weights steered on the first bench
image (``cellsam_trt.dev.steering``, as ``cellsam-trt bench`` makes them), written with their
export to ``--work`` and reused by later runs. Each ``--variant NAME=OPS`` converts the
FP32 graphs again with OPS (comma separated ONNX op types, empty: no FP32 islands beyond
the converter's defaults) kept in FP32; without ``--variant`` the export's own FP16 graphs
(``cellsam_trt.graphs.mixed_precision.FP32_ISLAND_OPS``) are measured.

For every bench image (``cellsam_trt.dev.synthetic.bench_image`` with each seed) it compares, against
the FP32 graphs: the CellFinder path (boxes kept, matched-cell F1 and per-cell IoU of the
labels), the user-box path (``--user-boxes`` boxes from ``cell_boxes``), and the max abs
difference of every graph output on that image's inputs (the decoder fed the FP32
embedding and the FP32 top-scoring CellFinder boxes, so its error is its own). Sessions run
one at a time (a ViT-B ONNX Runtime session holds several GB). Prints JSON and, with
``--out``, writes it. ONNX Runtime's CPU provider computes float16 ops that lack a CPU
kernel in float32 between casts: every activation is still rounded to float16 between ops,
as on a GPU, but the arithmetic inside an op is not the GPU kernel's.
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def variant_folder(base: Path, name: str, ops: list[str], work: Path) -> Path:
    """An export folder whose FP16 graphs keep ``ops`` in FP32 (FP32 graphs linked from ``base``)."""
    from cellsam_trt.graphs.mixed_precision import convert_graph
    from cellsam_trt.runtime.artifacts import GRAPH_SPECS, MANIFEST_NAME

    folder = work / f"variant-{name}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    manifest = json.loads((base / MANIFEST_NAME).read_text())
    for graph, entry in manifest["graphs"].items():
        for item in [entry] + ([entry["external_data"]] if entry.get("external_data") else []):
            (folder / item["file"]).symlink_to((base / item["file"]).resolve())
        entry["fp16"] = convert_graph(base / entry["file"], folder / GRAPH_SPECS[graph].fp16_onnx_file, fp32_ops=ops)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return folder


def run_precision(folder: Path, precision: str, images: list[np.ndarray], user_boxes: list[np.ndarray],
                  reference: list[dict] | None, num_boxes: int, chunk_size: int) -> list[dict]:
    """Segment every image (CellFinder path, user boxes) and run each graph on its inputs."""
    from cellsam_trt import CellSAM
    from cellsam_trt.engine import postprocess as post
    from cellsam_trt.engine.core import NoCellsWarning
    from cellsam_trt.graphs.tensorrt_engines import verification_inputs
    from cellsam_trt.modeling.config import InferenceConfig
    from cellsam_trt.runtime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(folder, precision=precision)
    session = CellSAM(backend, InferenceConfig(chunk_size=chunk_size))
    config = backend.config
    results = []
    for i, (image, boxes) in enumerate(zip(images, user_boxes)):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoCellsWarning)
            labels, details = session.segment(image, return_details=True)
            user_labels = session.segment(image, boxes=boxes)
        emb_in, finder_in = verification_inputs(config, backend.adapted_inputs, image=image)
        embedding = backend.encoder(emb_in)
        logits, finder_boxes = backend.cellfinder(finder_in)
        if reference is None:
            _, top = post.score_boxes(logits[0].cpu(), finder_boxes[0].cpu(), config.image_size)
            top = top[:num_boxes]
            decoder_embedding = embedding[:1]
        else:
            top, decoder_embedding = reference[i]["top"], reference[i]["embedding"]
        masks, iou = backend.decoder(decoder_embedding, top)
        results.append({
            "labels": labels, "user_labels": user_labels, "kept_boxes": details.boxes,
            "candidates": details.num_candidates, "top": top, "embedding": embedding[:1],
            "outputs": {"encoder/embedding": embedding, "cellfinder/logits": logits, "cellfinder/boxes": finder_boxes,
                        "decoder/mask_logits": masks, "decoder/iou": iou},
            "seconds": round(time.perf_counter() - t0, 1),
        })
        print(f"  {precision} image {i}: {details.num_candidates} CellFinder boxes, {int(labels.max())} cells, "
              f"{results[-1]['seconds']} s", file=sys.stderr, flush=True)
    del session, backend
    gc.collect()
    return results


def compare(reference: list[dict], test: list[dict]) -> list[dict]:
    from cellsam_trt.dev.accuracy import box_agreement, label_agreement
    from cellsam_trt.graphs.tensorrt_engines import compare_arrays, mask_agreement

    rows = []
    for ref, out in zip(reference, test):
        outputs = {}
        for key, value in ref["outputs"].items():
            stats = compare_arrays(value, out["outputs"][key])
            outputs[key] = {"max_abs": stats["max_abs"], "max_rel": stats["max_rel"]}
            if key == "decoder/mask_logits":
                outputs[key].update(mask_agreement(value, out["outputs"][key]))
        rows.append({
            "cellfinder": {"candidates": [ref["candidates"], out["candidates"]],
                           "kept": [len(ref["kept_boxes"]), len(out["kept_boxes"])],
                           "boxes": box_agreement(ref["kept_boxes"], out["kept_boxes"]),
                           "labels": label_agreement(ref["labels"], out["labels"])},
            "user_boxes": {"labels": label_agreement(ref["user_labels"], out["user_labels"])},
            "outputs": outputs,
            "seconds": [ref["seconds"], out["seconds"]],
        })
    return rows


def markdown(report: dict) -> str:
    """The report as tables: one row per variant and image."""
    lines = ["| FP32 islands | image | CellFinder boxes kept (FP32 / FP16) | CellFinder F1 | CellFinder per-cell IoU min / mean "
             "| user boxes F1 | user boxes per-cell IoU min / mean |",
             "|---|---|---|---|---|---|---|"]

    def iou(stats):
        return "-" if stats["iou_min"] is None else f"{stats['iou_min']:.3f} / {stats['iou_mean']:.4f}"

    for variant in report["variants"].values():
        islands = ", ".join(variant["fp32_ops"]) or "none"
        for seed, row in zip(report["seeds"], variant["images"]):
            finder, user = row["cellfinder"], row["user_boxes"]["labels"]
            kept = finder["kept"]
            lines.append(f"| {islands} | seed {seed} | {kept[0]} / {kept[1]} | {finder['labels']['f1']:.4f} | "
                         f"{iou(finder['labels'])} | {user['f1']:.4f} | {iou(user)} |")
    lines += ["", "Max abs difference of each graph output (FP32 scale in brackets: max |FP32 output|):", "",
              "| FP32 islands | image | " + " | ".join(next(iter(report["variants"].values()))["images"][0]["outputs"]) + " |",
              "|---|---|" + "---|" * len(next(iter(report["variants"].values()))["images"][0]["outputs"])]
    for variant in report["variants"].values():
        islands = ", ".join(variant["fp32_ops"]) or "none"
        for seed, row in zip(report["seeds"], variant["images"]):
            cells = []
            for stats in row["outputs"].values():
                scale = stats["max_abs"] / stats["max_rel"] if stats["max_rel"] else float("nan")
                extra = f", mask IoU min {stats['min_iou']:.4f}" if "min_iou" in stats else ""
                cells.append(f"{stats['max_abs']:.3g} ({scale:.3g}){extra}")
            lines.append(f"| {islands} | seed {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder for the steered weights and their export (reused)")
    parser.add_argument("--checkpoint", help="real weights instead of steered random ViT-B weights")
    parser.add_argument("--config", default="cellsam-vit-b", choices=["cellsam-vit-b", "tiny"],
                        help="architecture of the steered random weights (tiny: a quick check of this script)")
    parser.add_argument("--seeds", default="0,1,2", help="bench image seeds (default 0,1,2)")
    parser.add_argument("--score-shift", type=float, default=-2.0,
                        help="centre of the steered CellFinder logits (default -2; lower: fewer boxes pass)")
    parser.add_argument("--mask-coverage", type=float, default=0.05,
                        help="fraction of the image each steered mask covers (default 0.05; about 0.002 gives "
                             "cell-sized masks that overlap less, so labels are not a mosaic of painted-over masks)")
    parser.add_argument("--size", type=int, default=1024, help="bench image side (default 1024)")
    parser.add_argument("--cells", type=int, default=800, help="cells per bench image (default 800)")
    parser.add_argument("--user-boxes", type=int, default=200, help="user boxes per image (default 200)")
    parser.add_argument("--graph-boxes", type=int, default=64, help="boxes of the decoder output comparison (default 64)")
    parser.add_argument("--chunk-size", type=int, default=32,
                        help="boxes per decoder call (default 32: ONNX Runtime's CPU arena keeps the peak)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OPS",
                        help="FP32 island op types of a variant to measure (repeatable)")
    parser.add_argument("--out", help="write the JSON report here (and its tables beside it, .md)")
    parser.add_argument("--render", help="only print the tables of an earlier JSON report")
    args = parser.parse_args()
    if args.render:
        print(markdown(json.loads(Path(args.render).read_text())))
        return 0

    from cellsam_trt.dev.steering import steer_random_network
    from cellsam_trt.dev.synthetic import bench_image, cell_boxes
    from cellsam_trt.graphs.onnx_export import export_checkpoint
    from cellsam_trt.modeling.checkpoint import random_network, write_checkpoint
    from cellsam_trt.modeling.config import ModelConfig
    from cellsam_trt.runtime.artifacts import MANIFEST_NAME

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    images = [bench_image(args.size, args.cells, seed=s) for s in seeds]
    user_boxes = [cell_boxes(args.user_boxes, args.size, args.size, seed=s + 1) for s in seeds]
    base = work / "onnx"
    report: dict = {"seeds": seeds, "size": args.size, "cells": args.cells, "user_boxes": args.user_boxes,
                    "mask_coverage": args.mask_coverage, "score_shift": args.score_shift,
                    "chunk_size": args.chunk_size,
                    "torch_threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    if not (base / MANIFEST_NAME).is_file():
        if args.checkpoint:
            checkpoint = args.checkpoint
        else:
            network = steer_random_network(random_network(ModelConfig.named(args.config), seed=0), images[0],
                                           mask_coverage=args.mask_coverage, score_shift=args.score_shift)
            checkpoint = write_checkpoint(network, work / "steered-vit-b.pt")
            del network
        export_checkpoint(checkpoint, base)
        report["export_seconds"] = round(time.perf_counter() - t0, 1)
    manifest = json.loads((base / MANIFEST_NAME).read_text())
    report["weights"] = "checkpoint" if args.checkpoint else f"random {args.config}, steered on the first bench image"
    report["config"] = manifest["model_config"].get("name")

    variants = {}
    for spec in args.variant:
        name, _, ops = spec.partition("=")
        variants[name] = variant_folder(base, name, [o for o in ops.split(",") if o], work)
    if not variants:
        variants["export"] = base

    print("fp32", file=sys.stderr, flush=True)
    reference = run_precision(base, "fp32", images, user_boxes, None, args.graph_boxes, args.chunk_size)
    report["variants"] = {}
    for name, folder in variants.items():
        print(f"fp16 variant {name}", file=sys.stderr, flush=True)
        fp16_manifest = json.loads((folder / MANIFEST_NAME).read_text())
        test = run_precision(folder, "fp16", images, user_boxes, reference, args.graph_boxes, args.chunk_size)
        report["variants"][name] = {
            "fp32_ops": fp16_manifest["graphs"]["encoder"]["fp16"]["fp32_ops"],
            "graphs": {g: {k: e["fp16"][k] for k in ("fp32_nodes", "casts", "size_bytes", "convert_seconds")}
                       for g, e in fp16_manifest["graphs"].items()},
            "images": compare(reference, test),
        }
        del test
        gc.collect()
    report["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=2)
    print(text)
    print(markdown(report))
    if args.out:
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".md").write_text(markdown(report) + "\n")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
