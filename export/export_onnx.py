#!/usr/bin/env python
"""Export CellSAM's encoder, cellfinder and decoder graphs to ONNX (runs on any machine).

    python export/export_onnx.py --checkpoint ~/.deepcell/models/cellsam_v1.2/cellsam_general.pt --out onnx/

Same options as ``cellsam-trt export`` (see ``--help``); the work is in cellsam_trt.graphs.onnx_export.
"""
import sys

from cellsam_trt.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
