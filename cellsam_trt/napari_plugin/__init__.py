"""napari plugin: segment an image layer with CellSAM, then correct the cells box by box.

``widget.CellSAMWidget`` runs the automatic pipeline (preprocessing, encoder, CellFinder,
decoder) in a worker thread into a Labels layer and shows CellFinder's boxes in a Shapes
layer; ``layers.BoxEditor`` then keeps the two in step with an ``interactive.Annotation``:
drawing, moving or deleting a rectangle re-decodes that box alone from the kept image
embedding, and Ctrl-Z / Ctrl-Shift-Z undo and redo. Installed with the ``napari`` extra
(``pip install "cellsam-trt[napari]"``), found by napari through ``napari.yaml``;
``cellsam-trt napari [IMAGE]`` opens a viewer with the widget docked.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def register(subparsers) -> None:
    """The ``cellsam-trt napari`` sub-command (napari is imported only when it runs)."""
    p = subparsers.add_parser("napari", help="open napari with the CellSAM widget docked (needs the napari extra)",
                              description="Open napari with the CellSAM widget docked, and IMAGE when given.")
    p.add_argument("image", nargs="?", help="a 2-D image file (TIFF, OME-TIFF, PNG, OME-Zarr); channels become layers")
    p.add_argument("--checkpoint", help="weights in the released format (default: the released file's location)")
    p.add_argument("--backend", default="auto", choices=("auto", "tensorrt", "onnxruntime", "torch"))
    p.set_defaults(func=_open_viewer)


def missing_display() -> str | None:
    """Why no viewer window can open here (Linux without an X or Wayland display), or None.

    Qt aborts the whole process (SIGABRT) when it finds no display, so this is asked first.
    """
    if not sys.platform.startswith("linux") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return None
    if os.environ.get("QT_QPA_PLATFORM", "").startswith(("offscreen", "minimal", "vnc", "eglfs", "linuxfb")):
        return None  # the user chose a platform that needs no display
    return ("no display to open napari's window on (neither DISPLAY nor WAYLAND_DISPLAY is set): run it in a desktop "
            "session or over `ssh -X`, or on a virtual display: `xvfb-run -a cellsam-trt napari ...` "
            "(Debian/Ubuntu: apt install xvfb libgl1-mesa-dri)")


def _open_viewer(args: argparse.Namespace) -> int:
    reason = missing_display()
    if reason:
        raise RuntimeError(reason)
    try:
        import napari
    except ImportError as err:
        raise RuntimeError(f"napari is not installed ({err}): pip install \"cellsam-trt[napari]\"") from None
    from .widget import CellSAMWidget

    viewer = napari.Viewer(title="cellsam-trt")
    if args.image:
        add_image_layers(viewer, args.image)
    widget = CellSAMWidget(viewer, checkpoint=args.checkpoint, backend=args.backend)
    viewer.window.add_dock_widget(widget, name="CellSAM", area="right")
    napari.run()
    return 0


def add_image_layers(viewer, path: str | Path) -> list:
    """Add a 2-D image file to ``viewer``: one layer per channel, named after the slot CellSAM
    gives it (C channels fill the last C of blank, nuclear, whole-cell). Returns the layers."""
    from ..axes import resolve_layout
    from ..io import read_image

    image = read_image(path, lazy=False)
    layout = resolve_layout(image.array.shape, image.axes)
    if layout.stack_axes:
        raise ValueError(f"image: {path} holds a stack (axes {image.axes}); the widget segments one 2-D image: "
                         f"open one frame, or segment the stack with `cellsam-trt segment {path}`")
    array = image.array
    stem = Path(path).stem
    if layout.channel_axis is None:
        return [viewer.add_image(array, name=stem)]
    import numpy as np

    channels = np.moveaxis(np.asarray(array), layout.channel_axis, 0)
    slots = ("blank", "nuclear", "whole-cell")[3 - len(channels):]
    return [viewer.add_image(channel, name=f"{stem} {slot}", blending="additive") for channel, slot in zip(channels, slots)]
