#!/usr/bin/env python
"""Build FP16 TensorRT engines from an ONNX export; run it on the GPU that will serve them.

    python export/build_engines.py --onnx-dir onnx/ --verify

Same options as ``cellsam-trt build-engines`` (see ``--help``); the work is in cellsam_trt.graphs.tensorrt_engines.
"""
import sys

from cellsam_trt.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["build-engines", *sys.argv[1:]]))
