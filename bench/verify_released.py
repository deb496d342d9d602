"""Check cellsam-trt against the released CellSAM code on the same weights (CPU, fp32).

Needs a checkout of https://github.com/vanvalenlab/cellSAM (not part of this project) and
what it imports beyond our dependencies (``pip install requests dask-image``):

    python bench/verify_released.py --released ~/src/cellSAM --size 384x320

Without ``--checkpoint`` it writes random ViT-B weights in the official layout, steered
on the test image so that CellFinder keeps boxes and masks are partial
(``cellsam_trt.dev.steering``). It loads that file into the released ``CellSAM`` with
``strict=True``, runs the released ``segment_cellular_image`` and ``CellSAM.segment`` of
each ``--backends`` entry on the same image (CellFinder boxes, then 30 user boxes) and
prints, as JSON, the differences: embedding, boxes, label pixels. Full ViT-B on a CPU:
several minutes per backend.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--released", required=True, help="folder of a vanvalenlab/cellSAM checkout (holds cellSAM/)")
    parser.add_argument("--checkpoint", help="weights in the released format (default: steered random ViT-B)")
    parser.add_argument("--size", default="384x320", help="HxW of the synthetic test image")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--backends", default="torch",
                        help="ours to compare, comma-separated: torch (fused attention, the default), torch-eager "
                             "(SAM's attention), onnxruntime (graphs exported into a temporary cache); default torch")
    args = parser.parse_args()
    released = Path(args.released).expanduser()
    if not (released / "cellSAM" / "sam_inference.py").is_file():
        parser.error(f"--released {released}: no cellSAM/sam_inference.py there")
    sys.path.insert(0, str(released))
    import yaml
    from cellSAM.model import segment_cellular_image
    from cellSAM.sam_inference import CellSAM as ReleasedCellSAM

    import cellsam_trt
    from cellsam_trt.dev.steering import steer_random_network
    from cellsam_trt.dev.synthetic import synthetic_cells
    from cellsam_trt.modeling.checkpoint import random_network, read_state_dict, write_checkpoint
    from cellsam_trt.modeling.config import ModelConfig

    height, width = (int(v) for v in args.size.lower().split("x"))
    image = synthetic_cells(height, width, n_cells=60, seed=args.seed)
    report: dict = {"image": [height, width]}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            network = steer_random_network(random_network(ModelConfig.cellsam(), seed=11), image)
            checkpoint = str(write_checkpoint(network, Path(tmp) / "steered.pt"))
            report["weights"] = "random ViT-B, steered"
        state = read_state_dict(checkpoint)
        config = yaml.safe_load((released / "cellSAM" / "modelconfig.yaml").read_text())
        model = ReleasedCellSAM(config)
        model.load_state_dict(state, strict=True)  # raises on any missing / unexpected key
        report["strict_load_keys"] = len(state)

        def released_run(boxes=None):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return segment_cellular_image(image, model, normalize=True, device="cpu",
                                              bounding_boxes=None if boxes is None else boxes.tolist())

        t0 = time.perf_counter()
        theirs, their_embedding, their_boxes = released_run()
        report["released_seconds"] = round(time.perf_counter() - t0, 1)
        rng = np.random.default_rng(1)
        corner = rng.uniform(0, [width - 40, height - 40], size=(30, 2))
        boxes = np.concatenate([corner, corner + rng.uniform(8, 40, size=(30, 2))], 1).astype(np.float32)
        theirs_user = released_run(boxes)[0]
        for name in args.backends.split(","):
            backend, _, variant = name.partition("-")
            options = {"attention": "eager"} if variant == "eager" else {}
            session = cellsam_trt.CellSAM.from_checkpoint(checkpoint, backend=backend, device="cpu",
                                                          cache=Path(tmp) / "cache", **options)
            t1 = time.perf_counter()
            ours, details = session.segment(image, return_details=True)
            t2 = time.perf_counter()
            ours_user = session.segment(image, boxes=boxes)
            report[name] = {
                "cellfinder": {
                    "ours_seconds": round(t2 - t1, 1),
                    "boxes_decoded": details.num_candidates, "masks_kept": len(details.iou), "cells": int(ours.max()),
                    "embedding_max_abs_diff": float(np.abs(their_embedding - details.embedding).max()),
                    "masks_kept_released": len(their_boxes),
                    # a box whose predicted IoU sits within rounding of the filter's threshold
                    # can be kept by one and dropped by the other: then only the counts compare
                    "boxes_max_abs_diff": (float(np.abs(np.asarray(their_boxes, np.float32) - details.boxes).max())
                                           if len(their_boxes) == len(details.boxes) else None),
                    "differing_label_pixels": int((theirs != ours).sum()),
                },
                "user_boxes": {"boxes": len(boxes), "cells": int(ours_user.max()),
                               "differing_label_pixels": int((theirs_user != ours_user).sum())},
            }
            del session
    print(json.dumps(report, indent=2))
    same = all(report[name][path]["differing_label_pixels"] == 0
               for name in args.backends.split(",") for path in ("cellfinder", "user_boxes"))
    return 0 if same else 1


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
