"""Progress on long work: one tqdm bar factory for every loop that reports progress, and a
way to print a line without breaking an open bar."""
from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

from tqdm import tqdm


def progress_bar(total: int | None, desc: str, unit: str, enabled: bool = True, **tqdm_arguments: Any) -> tqdm | None:
    """A tqdm bar over ``total`` units of ``unit`` labelled ``desc``, or None when not ``enabled``
    (callers skip their updates then); ``tqdm_arguments`` go to tqdm (file, unit_scale, ...)."""
    if not enabled:
        return None
    return tqdm(total=total, desc=desc, unit=unit, **tqdm_arguments)


def write_line(message: str, file: TextIO | None = None) -> None:
    """Print ``message`` on a line of its own, above any progress bar that is open."""
    tqdm.write(message, file=file or sys.stderr)


class LineHandler(logging.Handler):
    """A logging handler that prints each record with ``write_line``: on a line of its own,
    never glued to the end of an open progress bar."""

    def __init__(self, file: TextIO | None = None) -> None:
        super().__init__()
        self.file = file

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write_line(self.format(record), self.file)
        except Exception:  # logging must not raise into the code that logs
            self.handleError(record)
