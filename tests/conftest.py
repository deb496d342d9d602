import json
import os
import shutil
import sys
import warnings

# Triton's interpreter runs the fused decoder's kernels on the CPU. It must be on before
# triton is first imported (torch may import it), and only where there is no GPU driver.
if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from export_shared import tiny_export  # noqa: E402

from cellsam_trt.dev.steering import steer_random_network  # noqa: E402
from cellsam_trt.dev.synthetic import synthetic_cells  # noqa: E402
from cellsam_trt.modeling.checkpoint import random_network  # noqa: E402
from cellsam_trt.modeling.config import ModelConfig  # noqa: E402

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(scope="session")
def cell_image() -> np.ndarray:
    """(300, 400, 2) uint16 nuclear + whole-cell image."""
    return synthetic_cells(300, 400, n_cells=25, seed=1)


@pytest.fixture(scope="session")
def steered_tiny(cell_image):
    """Tiny-config random network steered on ``cell_image`` (model_cp present)."""
    return steer_random_network(random_network(ModelConfig.tiny(), seed=0), cell_image)


@pytest.fixture(scope="session")
def checkpoint(steered_tiny, tmp_path_factory) -> str:
    """``steered_tiny`` written as a checkpoint file in the released layout."""
    from cellsam_trt.modeling.checkpoint import write_checkpoint

    return str(write_checkpoint(steered_tiny, tmp_path_factory.mktemp("weights") / "tiny.pt"))


@pytest.fixture(scope="session")
def exported(tmp_path_factory, steered_tiny):
    """(checkpoint file, ONNX export folder) of ``steered_tiny``; read-only (``copy_export`` to tamper)."""
    return tiny_export(tmp_path_factory, steered_tiny)


@pytest.fixture(scope="session")
def manifest(exported):
    """The parsed manifest.json of ``exported``."""
    return json.loads((exported[1] / "manifest.json").read_text())


@pytest.fixture(autouse=True)
def _no_unexpected_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        yield


@pytest.fixture(scope="session", autouse=True)
def _artifact_cache(tmp_path_factory):
    """A fresh artifact cache for the test session (never the user's); subprocesses inherit it."""
    old = os.environ.get("CELLSAM_TRT_CACHE")
    os.environ["CELLSAM_TRT_CACHE"] = str(tmp_path_factory.mktemp("artifact_cache"))
    yield
    if old is None:
        os.environ.pop("CELLSAM_TRT_CACHE", None)
    else:
        os.environ["CELLSAM_TRT_CACHE"] = old


@pytest.fixture()
def no_tf32():
    """Full fp32 matmuls and convolutions on CUDA for the test, as on the CPU (cuDNN's
    default is TF32, a 10-bit mantissa); the flags are restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def has_display() -> bool:
    """An X display to draw a napari viewer on (Xvfb will do); other platforms have their own screen."""
    return not sys.platform.startswith("linux") or bool(os.environ.get("DISPLAY"))


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """Without a display, Qt's offscreen platform: a Qt application started by a headless test
    then runs instead of aborting the whole test process. Runs after pytest-xvfb, which sets
    DISPLAY where Xvfb is installed."""
    if not has_display():
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def pytest_collection_modifyitems(config, items):
    """``gpu``, ``interpreter``, ``tensorrt`` and ``display`` tests run where their hardware is and skip with
    the reason elsewhere (before their fixtures are set up: pytest-qt's application would
    abort the process without a display)."""
    import importlib.util

    has_cuda = torch.cuda.is_available()
    has_tensorrt = importlib.util.find_spec("tensorrt") is not None
    display = has_display()
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    for item in items:
        if "display" in item.keywords and not display:
            item.add_marker(pytest.mark.skip(reason="no X display for napari's canvas: install Xvfb (Debian: xvfb "
                                                    "libgl1-mesa-dri, see .ci/run); pytest-xvfb then starts one"))
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (torch sees none)"))
        if "interpreter" in item.keywords and not interpreted:
            item.add_marker(pytest.mark.skip(reason="Triton's interpreter is off (TRITON_INTERPRET is not 1: a GPU "
                                                    "driver is present, or it was set so)"))
        if "tensorrt" in item.keywords and not (has_tensorrt and has_cuda):
            item.add_marker(pytest.mark.skip(reason="needs the tensorrt package and a CUDA GPU"))
