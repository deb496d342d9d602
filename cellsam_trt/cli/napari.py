"""``cellsam-trt napari [IMAGE]``: napari with the CellSAM widget docked (the ``napari`` extra)."""
from __future__ import annotations

import argparse
import os
import sys


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
    from ..napari_plugin import add_image_layers
    from ..napari_plugin.widget import CellSAMWidget

    viewer = napari.Viewer(title="cellsam-trt")
    if args.image:
        add_image_layers(viewer, args.image)
    widget = CellSAMWidget(viewer, checkpoint=args.checkpoint, backend=args.backend)
    viewer.window.add_dock_widget(widget, name="CellSAM", area="right")
    napari.run()
    return 0
