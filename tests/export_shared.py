"""One ONNX export of the steered tiny network per test session, shared by the export,
ONNX Runtime and TensorRT test modules (exporting takes ~10 s on 2 cores)."""
from __future__ import annotations

import shutil
from pathlib import Path

from cellsam_trt.graphs.onnx_export import export_checkpoint
from cellsam_trt.modeling.checkpoint import write_checkpoint

_CACHE: dict[int, tuple[Path, Path]] = {}


def tiny_export(tmp_path_factory, network) -> tuple[Path, Path]:
    """(checkpoint file, export folder) of ``network``; exported once per session.

    The export goes through the checkpoint file, as users do, so that the manifest records
    the checkpoint's sha256. Treat the folder as read-only; use ``copy_export`` to tamper.
    """
    key = id(tmp_path_factory)
    if key not in _CACHE:
        root = tmp_path_factory.mktemp("tiny_export")
        checkpoint = write_checkpoint(network, root / "tiny.pt")
        export_checkpoint(checkpoint, root / "onnx")
        _CACHE[key] = (checkpoint, root / "onnx")
    return _CACHE[key]


def copy_export(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "onnx_copy"
    shutil.copytree(folder, target)
    return target
