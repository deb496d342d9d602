#!/usr/bin/env python
"""Latency per stage against the number of boxes, per backend, beside the released per-box loop.

Same options as ``cellsam-trt bench`` (see ``--help``); from a checkout this also records
the git commit and writes the markdown tables and the PNG plot beside the JSON, e.g.

    python bench/bench_latency.py --config tiny --n 1,10,100 --cap baseline=100
    python bench/bench_latency.py --smoke --out-dir /tmp/bench
    python bench/report.py bench/results/<device>/<date>.json     # tables and plot again
"""
from __future__ import annotations

import argparse
import logging
import sys

from report import git_state, render_report

from cellsam_trt.bench.latency import run_bench, write_report
from cellsam_trt.bench.options import add_arguments, options_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    opts = options_from_args(args)
    report = run_bench(opts)
    report["machine"]["git"] = git_state()
    path = write_report(report, opts.out_dir)
    markdown, png = render_report(path)
    print(markdown.read_text())
    print(f"wrote {path}, {markdown}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
