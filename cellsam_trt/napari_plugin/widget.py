"""The CellSAM dock widget: choose the channels, segment in a worker thread, edit, export."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import napari
import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, Label, PushButton, create_widget
from napari.qt.threading import create_worker
from napari.utils.notifications import show_info, show_warning

from ..interactive import Annotation
from .layers import BOX_STYLE, BoxEditor

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")
LABELS_LAYER = "CellSAM labels"
BOXES_LAYER = "CellSAM boxes"


def image_of(whole_cell: Any, nuclear: Any = None) -> np.ndarray:
    """The image ``CellSAM.segment`` takes from two napari image layers: (H, W) whole-cell, or
    (H, W, 2) nuclear and whole-cell. Each layer must be one 2-D grey image."""
    planes = []
    for name, layer in (("nuclear", nuclear), ("whole-cell", whole_cell)):
        if layer is None:
            continue
        data = np.asarray(layer.data)
        if layer.rgb or data.ndim != 2:
            raise ValueError(f"{name} layer {layer.name!r}: expected one 2-D grey image, got shape {data.shape}"
                             f"{' (RGB)' if layer.rgb else ''}; split its channels into layers first "
                             "(Layers > Split Stack / Split RGB)")
        planes.append(data)
    if len(planes) == 2 and planes[0].shape != planes[1].shape:
        raise ValueError(f"nuclear layer {nuclear.name!r} {planes[0].shape} and whole-cell layer {whole_cell.name!r} "
                         f"{planes[1].shape}: the two channels must have the same size")
    return planes[0] if len(planes) == 1 else np.stack(planes, axis=-1)


class CellSAMWidget(Container):
    """Segment an image layer with CellSAM; correct the cells box by box.

    Args:
        napari_viewer: the viewer (napari passes it).
        session: a ``CellSAM`` to use; default: one loaded from the weights and backend
            chosen in the widget, kept while they stay the same.
        checkpoint, backend: the widget's starting weights file and backend.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer, *, session: Any = None, checkpoint: str | None = None,
                 backend: str = "auto") -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self._session = session
        self._session_key: tuple | None = None
        self.whole_cell = create_widget(annotation=napari.layers.Image, label="whole-cell")
        self.nuclear = create_widget(annotation=napari.layers.Image | None, label="nuclear (optional)")
        self.checkpoint = FileEdit(mode="r", label="weights", value=checkpoint or "", filter="*.pt *.pth")
        self.backend = ComboBox(choices=BACKENDS, value=backend, label="backend")
        self.segment_button = PushButton(text="Segment")
        self.export_folder = FileEdit(mode="d", label="export to", value=str(Path.cwd()))
        self.export_button = PushButton(text="Export labels and cell table")
        self.status = Label(value="")
        self.status.min_width = 280  # a label sized for its first text would cut later ones
        if session is not None:  # a given session fixes weights and backend
            self.checkpoint.enabled = self.backend.enabled = False
        self.extend([self.whole_cell, self.nuclear, self.checkpoint, self.backend, self.segment_button,
                     self.export_folder, self.export_button, self.status])
        self.segment_button.changed.connect(self.segment)
        self.export_button.changed.connect(self.export)
        self.editor: BoxEditor | None = None
        self.worker = None

    def session(self) -> Any:
        """The ``CellSAM`` for the chosen weights and backend (loaded on first use, then kept)."""
        if self._session is not None and self._session_key is None:
            return self._session
        from ..api import CellSAM

        path = str(self.checkpoint.value) if str(self.checkpoint.value) not in ("", ".") else None
        key = (path, self.backend.value)
        if key != self._session_key:
            self._session = CellSAM.from_checkpoint(path, backend=self.backend.value)
            self._session_key = key
        return self._session

    def segment(self) -> Any:
        """Run the automatic pipeline on the chosen layers in a worker thread; returns the
        worker (started). The result becomes the Labels and Shapes layers when it is done."""
        try:
            image = image_of(self.whole_cell.value, self.nuclear.value)
        except (ValueError, AttributeError) as err:
            message = str(err) if isinstance(err, ValueError) else "choose a whole-cell image layer first"
            self._say(message, warning=True)
            return None
        self.segment_button.enabled = False
        self._say("segmenting…")
        self.worker = create_worker(self._compute, image, _progress={"total": 3, "desc": "CellSAM"})
        self.worker.returned.connect(self._show)
        self.worker.errored.connect(self._failed)
        self.worker.finished.connect(lambda: setattr(self.segment_button, "enabled", True))
        self.worker.start()
        return self.worker

    def _compute(self, image: np.ndarray):
        """In the worker thread: weights, embedding (encoder and CellFinder), decoded boxes."""
        session = self.session()
        yield
        embedded = session.embed(image)
        yield
        annotation = Annotation.from_cellfinder(session, embedded)
        yield
        return annotation

    def _show(self, annotation: Annotation) -> None:
        """In the GUI thread: the annotation into the two layers, and edits wired to it."""
        layer_scale = self.whole_cell.value.scale[-2:]
        layer_translate = self.whole_cell.value.translate[-2:]
        if LABELS_LAYER in self.viewer.layers:
            self.viewer.layers.remove(LABELS_LAYER)
        if BOXES_LAYER in self.viewer.layers:
            self.viewer.layers.remove(BOXES_LAYER)
        labels = self.viewer.add_labels(np.zeros(annotation.cell_labels.shape, np.int32), name=LABELS_LAYER,
                                        scale=layer_scale, translate=layer_translate, opacity=0.5)
        shapes = self.viewer.add_shapes(name=BOXES_LAYER, scale=layer_scale, translate=layer_translate,
                                        ndim=2, **BOX_STYLE)
        self.editor = BoxEditor(annotation, shapes, labels, notify=lambda m: self._say(m, warning=True))
        shapes.current_edge_color = BOX_STYLE["edge_color"]
        shapes.current_face_color = BOX_STYLE["face_color"]
        self.viewer.layers.selection.active = shapes
        cells = len(np.unique(annotation.cell_labels)) - 1
        # the status line stays short (the dock is narrow); the hint goes to the notification
        self.status.value = f"{cells} cells from {len(annotation.cells)} boxes"
        show_info(f"CellSAM: {cells} cells. Draw, move or delete boxes in {BOXES_LAYER!r}; Ctrl-Z undoes.")

    def _failed(self, err: Exception) -> None:
        self._say(f"segmentation failed: {err}", warning=True)

    def export(self) -> tuple[Path, Path] | None:
        """Write the labels (TIFF) and the per-cell table (CSV) of the current annotation."""
        if self.editor is None:
            self._say("nothing to export yet: press Segment first", warning=True)
            return None
        name = self.whole_cell.value.name if self.whole_cell.value is not None else "cellsam"
        written = self.editor.export(self.export_folder.value, "".join(c if c.isalnum() or c in "-_." else "_"
                                                                        for c in name))
        self._say(f"wrote {written[0].name} and {written[1].name} in {written[0].parent}")
        return written

    def _say(self, message: str, warning: bool = False) -> None:
        self.status.value = message
        (show_warning if warning else show_info)(message)
