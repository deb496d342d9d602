"""A Shapes layer of boxes and a Labels layer kept in step with an ``interactive.Annotation``.

Every rectangle of the Shapes layer is one cell of the annotation (``BoxEditor.cells[i]`` is
the cell number of shape ``i``). A rectangle drawn, moved, resized or deleted in napari
becomes ``Annotation.add`` / ``move`` / ``remove`` (one decoder call at most), and only the
rectangle of the Labels layer that the edit can change is copied back. A drawn box whose
mask the IoU filter drops is taken off the Shapes layer again, with a message. Nothing here
needs a window: the layers work headless.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..interactive import Annotation

BOX_STYLE = {"edge_color": "yellow", "face_color": "transparent", "edge_width": 1}


def box_of(shape: np.ndarray, height: int, width: int) -> np.ndarray:
    """(4,) float32 x1, y1, x2, y2 of a shape's vertices ((V, 2) row, column), inside the image."""
    shape = np.asarray(shape, np.float64)[:, -2:]
    y1, x1 = np.clip(shape.min(axis=0), 0, [height, width])
    y2, x2 = np.clip(shape.max(axis=0), 0, [height, width])
    return np.array([x1, y1, x2, y2], np.float32)


def rectangles(boxes: np.ndarray) -> list[np.ndarray]:
    """(N, 4) x1, y1, x2, y2 -> napari rectangles, (2, 2) corners (row, column) each."""
    return [np.array([[b[1], b[0]], [b[3], b[2]]], np.float64) for b in np.asarray(boxes).reshape(-1, 4)]


class BoxEditor:
    """Keeps ``shapes`` (rectangles) and ``labels`` (cell numbers) in step with ``annotation``.

    Args:
        annotation: the cells; its boxes are drawn into ``shapes`` (replacing what is there).
        shapes: a napari Shapes layer; edits made there are sent to the annotation.
        labels: a napari Labels layer of the image's size; its data shows
            ``annotation.cell_labels`` (each cell keeps its number, so colours stay).
        notify: called with a message when a drawn box yields no cell.
    """

    def __init__(self, annotation: Annotation, shapes: Any, labels: Any, notify: Callable[[str], None] = print) -> None:
        self.annotation = annotation
        self.shapes = shapes
        self.labels = labels
        self.notify = notify
        self.cells: list[int] = []
        self._show_all()
        shapes.events.data.connect(self._on_data)
        shapes.bind_key("Control-z", lambda layer: self.undo(), overwrite=True)
        shapes.bind_key("Control-Shift-z", lambda layer: self.redo(), overwrite=True)

    @property
    def size(self) -> tuple[int, int]:
        return self.annotation.embedded.height, self.annotation.embedded.width

    def undo(self) -> bool:
        """Undo the last edit (Ctrl-Z on the Shapes layer): boxes and labels as before it."""
        done = self.annotation.undo()
        if done:
            self._show_all(changed_only=True)
        return done

    def redo(self) -> bool:
        """Redo the last undone edit (Ctrl-Shift-Z on the Shapes layer)."""
        done = self.annotation.redo()
        if done:
            self._show_all(changed_only=True)
        return done

    def export(self, folder: str | Path, name: str) -> tuple[Path, Path]:
        """Write ``<name>_labels.tif`` (cells 1..K, as ``cellsam-trt segment``) and
        ``<name>_cells.csv`` (the command line's per-cell columns) into ``folder``."""
        from ..cli.segment import cell_rows, write_cells_csv
        from ..io import write_labels_tiff

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        labels = self.annotation.labels
        return (write_labels_tiff(folder / f"{name}_labels.tif", labels),
                write_cells_csv(folder / f"{name}_cells.csv", cell_rows(labels, self.annotation.table())))

    def _on_data(self, event: Any) -> None:
        from napari.layers.base._base_constants import ActionType

        action = getattr(event, "action", None)
        if action == ActionType.ADDED:
            self._added()
        elif action == ActionType.REMOVED:
            self._removed(sorted(int(i) for i in event.data_indices))
        elif action == ActionType.CHANGED:
            self._changed([int(i) for i in event.data_indices])

    def _added(self) -> None:
        new = range(len(self.cells), len(self.shapes.data))
        boxes = np.array([box_of(self.shapes.data[i], *self.size) for i in new], np.float32).reshape(-1, 4)
        usable = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        numbers = np.zeros(len(boxes), np.int64)
        if usable.any():
            numbers[usable] = self.annotation.add_many(boxes[usable])
        self.cells.extend(int(n) for n in numbers)
        self._update_labels()
        self._drop_shapes_without_cells(f"{int((numbers == 0).sum())} drawn box(es) gave no cell (predicted IoU "
                                        f"below {self.annotation.session.inference.iou_threshold}, or an empty box)")

    def _removed(self, indices: list[int]) -> None:
        cells = [self.cells[i] for i in indices if i < len(self.cells)]
        for i in reversed(indices):
            if i < len(self.cells):
                del self.cells[i]
        self.annotation.remove_many([c for c in cells if c])
        self._update_labels()

    def _changed(self, indices: list[int]) -> None:
        if len(self.shapes.data) != len(self.cells):  # the whole layer was replaced: start again
            self.annotation.remove_many([c for c in self.cells if c])
            self.cells = []
            self._added()
            return
        for i in indices:
            box = box_of(self.shapes.data[i], *self.size)
            if not np.array_equal(box, self.annotation.box(self.cells[i])):
                self.cells[i] = self.annotation.move(self.cells[i], box)
                self._update_labels()
        self._drop_shapes_without_cells("the moved box gave no cell (predicted IoU below "
                                        f"{self.annotation.session.inference.iou_threshold})")

    def _drop_shapes_without_cells(self, message: str) -> None:
        empty = [i for i, c in enumerate(self.cells) if c == 0]
        if not empty:
            return
        with self.shapes.events.data.blocker():
            self.shapes.remove(empty)
        self.cells = [c for c in self.cells if c]
        self.notify(message)

    def _update_labels(self) -> None:
        rows, cols = self.annotation.changed
        if rows.stop > rows.start and cols.stop > cols.start:
            self.labels.data[rows, cols] = self.annotation.cell_labels[rows, cols]
            self.labels.refresh()

    def _show_all(self, changed_only: bool = False) -> None:
        """Shapes from the annotation's boxes (adding order), and the labels."""
        with self.shapes.events.data.blocker():
            if len(self.shapes.data):
                self.shapes.data = []
            if len(self.annotation.cells):
                self.shapes.add_rectangles(rectangles(self.annotation.boxes), **BOX_STYLE)
        self.cells = list(self.annotation.cells)
        if changed_only:
            self._update_labels()
        else:
            self.labels.data[...] = self.annotation.cell_labels
            self.labels.refresh()
