"""``progress``: log records and warnings print on lines of their own, above an open bar."""
import io
import logging
import warnings

from cellsam_trt.cli.main import warnings_as_lines
from cellsam_trt.progress import LineHandler, progress_bar


def pieces(text):
    return text.replace("\r", "\n").splitlines()


def test_log_records_and_warnings_do_not_land_on_the_bar(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    bar = progress_bar(3, "segmenting", "image", file=stream)
    bar.update(1)
    logger = logging.getLogger("cellsam_trt.test_progress")
    handler = LineHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("a record")
        with warnings_as_lines("segment"):
            warnings.warn("a warning", UserWarning, stacklevel=1)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        bar.close()
    lines = pieces(stream.getvalue())
    assert "WARNING cellsam_trt.test_progress: a record" in lines
    assert "cellsam-trt segment: warning: a warning" in lines
