"""``cellsam-trt bench``: latency per stage against the number of boxes, per backend (``bench``)."""
from __future__ import annotations

import argparse

from ..bench.options import add_arguments, options_from_args


def run(args: argparse.Namespace) -> int:
    from ..bench.latency import run_bench, summary_lines, write_report  # the model stack: when it runs

    opts = options_from_args(args)
    report = run_bench(opts)
    path = write_report(report, opts.out_dir)
    print("\n".join(summary_lines(report)))
    print(f"wrote {path} (tables and plot: python bench/report.py {path}, in a checkout of the repository)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="latency per stage against the number of boxes, per backend, vs the per-box loop")
    add_arguments(p)
    p.set_defaults(func=run)
