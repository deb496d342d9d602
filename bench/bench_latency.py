#!/usr/bin/env python
"""Latency per stage against the number of boxes, per backend, beside the released per-box loop.

Same options as ``cellsam-trt bench`` (see ``--help``), e.g.

    python bench/bench_latency.py --config tiny --n 1,10,100 --cap baseline=100
    python bench/bench_latency.py --smoke --out-dir /tmp/bench
    python bench/bench_latency.py --render bench/results/<device>/<date>.json
"""
import sys

from cellsam_trt.bench import main

if __name__ == "__main__":
    sys.exit(main())
