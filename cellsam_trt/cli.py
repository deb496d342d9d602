"""``cellsam-trt`` command line: demo | segment | export | build-engines | bench | cache | napari | download.

Each sub-command lives in the module that does the work; that module exposes
``register(subparsers)`` which adds its parser and sets ``func``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (module, required extra) for every sub-command; imported lazily so that a missing
# optional dependency only affects its own command.
COMMAND_MODULES = (
    "cellsam_trt.demo",
    "cellsam_trt.batch",
    "cellsam_trt.export_onnx",
    "cellsam_trt.engines",
    "cellsam_trt.bench.latency",
    "cellsam_trt.cache",
    "cellsam_trt.napari_plugin",
)


def _download(args: argparse.Namespace) -> int:
    from .checkpoint import download_weights

    folder = download_weights(version=args.version)
    print(f"released CellSAM weights in {folder}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellsam-trt", description="Fast, faithful CellSAM cell segmentation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    download = sub.add_parser("download", help="fetch the released weights (needs DEEPCELL_ACCESS_TOKEN)")
    download.add_argument("--version", default="1.2", help="model version (default 1.2)")
    download.set_defaults(func=_download)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # command not part of this build
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, RuntimeError) as err:
        # User-facing errors (bad input, missing files, unavailable backends): one line, no traceback.
        if args.verbose:
            raise
        print(f"cellsam-trt {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
