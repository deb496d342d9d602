"""``cellsam-trt`` command line: demo | segment | export | build-engines | bench | cache | napari | download.

Each sub-command is a module of this package with ``register(subparsers)``, which adds its
parser and sets ``func``; the library code a command runs is imported when it runs.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator

from ..progress import LineHandler, write_line
from . import bench, build_engines, cache, demo, export, napari, segment

COMMANDS = (demo, segment, export, build_engines, bench, cache, napari)


def _download(args: argparse.Namespace) -> int:
    from ..modeling.checkpoint import download_weights

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
    for command in COMMANDS:
        command.register(sub)
    return parser


@contextlib.contextmanager
def warnings_as_lines(command: str) -> Iterator[None]:
    """Python warnings printed as ``cellsam-trt COMMAND: warning: ...`` lines above any open
    progress bar (``progress.write_line``), not glued to the bar's line; restored after."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        write_line(f"cellsam-trt {command}: warning: {message}", file)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # log records on lines of their own, above any progress bar
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[LineHandler()],
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with warnings_as_lines(args.command):
            return int(args.func(args) or 0)
    except (ValueError, OSError, RuntimeError) as err:
        # User-facing errors (bad input, missing files, unavailable backends): one line, no traceback.
        if args.verbose:
            raise
        print(f"cellsam-trt {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
