"""napari plugin: segment an image layer with CellSAM, then correct the cells box by box.

``widget.CellSAMWidget`` runs the automatic pipeline (preprocessing, encoder, CellFinder,
decoder) in a worker thread into a Labels layer and shows CellFinder's boxes in a Shapes
layer; ``layers.BoxEditor`` then keeps the two in step with an ``interactive.Annotation``:
drawing, moving or deleting a rectangle re-decodes that box alone from the kept image
embedding, and Ctrl-Z / Ctrl-Shift-Z undo and redo. Installed with the ``napari`` extra
(``pip install "cellsam-trt[napari]"``), found by napari through ``napari.yaml``;
``cellsam-trt napari [IMAGE]`` (``cli.napari``) opens a viewer with the widget docked.
"""
from __future__ import annotations

from pathlib import Path


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
