"""Answering ``--help``, an argument error or ``import cellsam_trt`` loads no model stack (torch,
torchvision through segment-anything, ONNX Runtime, scikit-image): they are imported where a
command or a name needs them."""
import subprocess
import sys

import pytest

HEAVY = ("torch", "torchvision", "segment_anything", "onnxruntime", "onnx", "skimage", "cv2", "napari")


def heavy_modules_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint('loaded:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = result.stdout.strip().splitlines()[-1].removeprefix("loaded:")  # after any help text
    return [m for m in loaded.split(",") if m]


@pytest.mark.parametrize("code", [
    "import cellsam_trt",
    "from cellsam_trt.cli.main import build_parser\nfor command in (['--help'], ['segment', '--help'], ['export', '--help'],"
    " ['build-engines', '--help'], ['bench', '--help'], ['cache', 'list', '--help'], ['napari', '--help'],"
    " ['demo', '--help']):\n    try:\n        build_parser().parse_args(command)\n    except SystemExit:\n        pass",
    "from cellsam_trt.cli.main import main\nimport contextlib, io\nwith contextlib.redirect_stderr(io.StringIO()):\n"
    "    try:\n        main(['segment'])\n    except SystemExit:\n        pass",
], ids=["import", "help of every command", "argument error"])
def test_no_model_stack_is_imported(code):
    assert heavy_modules_after(code) == []


def test_the_public_names_still_import_on_use():
    assert heavy_modules_after("import cellsam_trt\ncellsam_trt.SegmentOptions") != []  # loaded when asked for
    result = subprocess.run([sys.executable, "-c", "import cellsam_trt\ncellsam_trt.no_such_name"],
                            capture_output=True, text=True, timeout=120)
    assert "has no attribute 'no_such_name'" in result.stderr
