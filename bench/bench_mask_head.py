"""The mask head only for the boxes that pass the IoU filter, against every box's mask, side by side.

    python bench/bench_mask_head.py --baseline-tree OLD_CHECKOUT --out bench/results/cpu-amd-epyc/mask-head.json

One process, one torch session, one image embedding: the decoder stage of ``segment`` on that
embedding, alternating between the pipeline as it is (the backend's ``keep_iou``: the mask
head runs for the kept boxes only) and the same backend asked for every box's mask, then
the filter applied (what the pipeline did before). CellFinder's boxes and user boxes. The
labels of both must be identical; with ``--baseline-tree`` (a checkout of an earlier
revision) that revision segments the same image with the same weights in a child process
and its labels are compared too.

Default weights: random ViT-B in the official layout, steered on the image
(``cellsam_trt.dev.steering``); default image: the 512 x 512 crop of scikit-image's
immunohistochemistry sample (about two thousand CellFinder boxes with these weights).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from cellsam_trt import CellSAM
from cellsam_trt.dev.steering import steer_random_network
from cellsam_trt.dev.synthetic import cell_boxes
from cellsam_trt.engine.core import NoCellsWarning
from cellsam_trt.modeling.checkpoint import random_network, write_checkpoint
from cellsam_trt.modeling.config import ModelConfig
from cellsam_trt.runtime.base import Backend, kept_masks

BASELINE_CODE = """
import sys, warnings
import numpy as np
import cellsam_trt
from cellsam_trt import CellSAM
checkpoint, image_path, boxes_path, out, tree = sys.argv[1:6]
assert cellsam_trt.__file__.startswith(tree), f"imported {cellsam_trt.__file__}, not the baseline tree {tree}"
image, boxes = np.load(image_path), np.load(boxes_path)
session = CellSAM.from_checkpoint(checkpoint, backend="torch", device="cpu")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    np.save(out + "-cellfinder.npy", session.segment(image))
    np.save(out + "-boxes.npy", session.segment(image, boxes=boxes))
"""


class EveryMask(Backend):
    """A backend that computes every box's mask and then drops the ones the filter drops:
    the decoder stage as it was before the mask head ran for the kept boxes only."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name, self.device, self.config = inner.name, inner.device, inner.config
        self.adapted_inputs, self.max_decoder_boxes = inner.adapted_inputs, inner.max_decoder_boxes
        self.default_chunk_size = inner.default_chunk_size

    def encoder(self, images):
        return self.inner.encoder(images)

    def cellfinder(self, images):
        return self.inner.cellfinder(images)

    def decoder(self, embedding, boxes, *, keep_iou=None, last_call=False):
        masks, iou = self.inner.decoder(embedding, boxes, keep_iou=None, last_call=last_call)
        return kept_masks(masks, iou, keep_iou), iou

    def describe(self):
        return self.inner.describe()

    def weights_identity(self):
        return self.inner.weights_identity()


def image_of(args: argparse.Namespace) -> np.ndarray:
    if args.image:
        from skimage.io import imread

        image = np.load(args.image) if args.image.endswith(".npy") else imread(args.image)
    else:
        from skimage.data import immunohistochemistry

        image = immunohistochemistry()
    return np.ascontiguousarray(image[:args.crop, :args.crop])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["tiny", "cellsam-vit-b"], default="cellsam-vit-b")
    parser.add_argument("--image", help="image file (.png/.tif/.npy; default: scikit-image's immunohistochemistry)")
    parser.add_argument("--crop", type=int, default=512, help="top-left crop side (default 512)")
    parser.add_argument("--user-boxes", type=int, default=256, help="user boxes for the second comparison (0: none)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of each variant (default 2)")
    parser.add_argument("--baseline-tree", help="a checkout of an earlier revision whose labels to compare")
    parser.add_argument("--out", help="JSON report path (default: print only)")
    args = parser.parse_args()

    torch.manual_seed(0)
    image = image_of(args)
    config = ModelConfig.named(args.config)
    network = steer_random_network(random_network(config, seed=0), image)
    work = Path(tempfile.mkdtemp(prefix="cellsam-mask-head-"))
    checkpoint = write_checkpoint(network, work / "steered.pt")
    boxes = cell_boxes(args.user_boxes, image.shape[0], image.shape[1], seed=1) if args.user_boxes else None
    np.save(work / "image.npy", image)
    np.save(work / "boxes.npy", boxes if boxes is not None else np.zeros((0, 4), np.float32))

    session = CellSAM.from_checkpoint(checkpoint, backend="torch", device="cpu")
    every = CellSAM(EveryMask(session.backend), session.inference)
    embedded = session.embed(image)
    report: dict = {"config": args.config, "image": list(image.shape), "threads": torch.get_num_threads(),
                    "rounds": args.rounds, "paths": {}}
    paths = {"cellfinder": None} | ({"user_boxes": boxes} if boxes is not None else {})
    for path, user_boxes in paths.items():
        times: dict[str, list[float]] = {"kept_only": [], "every_mask": []}
        labels: dict[str, np.ndarray] = {}
        details = None
        for _ in range(args.rounds):
            for variant, runner in (("kept_only", session), ("every_mask", every)):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", NoCellsWarning)
                    out, details = runner.segment(embedded, boxes=user_boxes, return_details=True)
                times[variant].append(details.timings["decoder"])
                if variant in labels:
                    assert np.array_equal(labels[variant], out), f"{variant}: labels changed between rounds"
                labels[variant] = out
        decoded, kept = details.num_candidates, len(details.iou)
        row = {
            "boxes_decoded": decoded, "masks_kept": kept,
            "share_skipping_the_mask_head": round(1 - kept / max(decoded, 1), 4),
            "decoder_stage_s": {k: [round(v, 3) for v in vs] for k, vs in times.items()},
            "median_ratio_every_over_kept": round(statistics.median(times["every_mask"])
                                                  / statistics.median(times["kept_only"]), 3),
            "labels_identical": bool(np.array_equal(labels["kept_only"], labels["every_mask"])),
            "cells": int(labels["kept_only"].max()),
        }
        report["paths"][path] = row
        print(path, json.dumps(row), flush=True)
        np.save(work / f"labels-{path}.npy", labels["kept_only"])

    if args.baseline_tree:
        env = dict(os.environ, PYTHONPATH=str(Path(args.baseline_tree).resolve()))
        prefix = str(work / "baseline")
        subprocess.run([sys.executable, "-c", BASELINE_CODE, str(checkpoint), str(work / "image.npy"),
                        str(work / "boxes.npy"), prefix, str(Path(args.baseline_tree).resolve())], env=env,
                       check=True, cwd=work)
        report["baseline"] = {"tree": subprocess.run(["git", "-C", args.baseline_tree, "rev-parse", "--short", "HEAD"],
                                                     capture_output=True, text=True).stdout.strip()}
        for path, name in (("cellfinder", "cellfinder"), ("user_boxes", "boxes")):
            if path in report["paths"]:
                old = np.load(f"{prefix}-{name}.npy")
                new = np.load(work / f"labels-{path}.npy")
                report["baseline"][path] = {"labels_identical": bool(np.array_equal(old, new)),
                                            "differing_pixels": int((old != new).sum())}
        print("baseline", json.dumps(report["baseline"]), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
