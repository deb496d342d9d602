"""The napari plugin: boxes and labels layers kept in step with an annotation (headless),
the dock widget in a real viewer (needs an X display: Xvfb in CI), the npe2 manifest."""
import csv
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

napari = pytest.importorskip("napari", reason="the napari extra is not installed (pip install 'cellsam-trt[napari]')")

from test_interactive import boxes_on, counting_session  # noqa: E402

from cellsam_trt.interactive import Annotation  # noqa: E402
from cellsam_trt.napari_plugin.layers import BoxEditor, rectangles  # noqa: E402


@pytest.fixture()
def counting(steered_tiny):
    return counting_session(steered_tiny)


def edit_layers(counting, image, boxes=None):
    """Layers edited from CellFinder's boxes, or from ``boxes`` (CellFinder's may reach past the
    image's edge, which ``segment(boxes=...)`` refuses: comparisons start from boxes inside)."""
    embedded = counting.embed(image)
    annotation = (Annotation.from_cellfinder(counting, embedded) if boxes is None
                  else Annotation(counting, embedded, boxes=boxes))
    shapes = napari.layers.Shapes(ndim=2)
    labels = napari.layers.Labels(np.zeros(image.shape[:2], np.int32))
    return BoxEditor(annotation, shapes, labels, notify=lambda message: None), embedded


def test_boxes_drawn_moved_and_deleted_update_their_cells_only(counting, cell_image):
    editor, embedded = edit_layers(counting, cell_image, boxes=boxes_on(cell_image, 12, seed=4))
    shapes, labels, annotation = editor.shapes, editor.labels, editor.annotation
    calls = counting.backend.calls

    def one_call_with_the_drawn_boxes():
        """The labels of one segment call with the boxes now drawn (its graph calls not counted)."""
        before = dict(calls)
        expected = counting.segment(embedded, boxes=annotation.boxes)
        calls.update(before)
        return expected

    assert calls["encoder"] == 1
    assert len(shapes.data) == len(annotation.cells) >= 3  # CellFinder's boxes, drawn
    np.testing.assert_array_equal(labels.data, annotation.cell_labels)
    np.testing.assert_array_equal(annotation.labels, one_call_with_the_drawn_boxes())

    # two boxes drawn one after the other: one decoder call each, no encoder call
    start = calls["decoder"]
    drawn = np.array([[20, 30, 70, 80], [200, 150, 260, 210]], np.float32)
    for k, box in enumerate(drawn):
        shapes.add_rectangles(rectangles(box))
        assert calls == {"encoder": 1, "cellfinder": 1, "decoder": start + k + 1}
    np.testing.assert_array_equal(labels.data, annotation.cell_labels)
    np.testing.assert_array_equal(annotation.labels, one_call_with_the_drawn_boxes())
    assert len(shapes.data) == len(editor.cells) == len(annotation.cells)

    # deleting a box removes its cell, with no decoder call
    victim = len(shapes.data) - 1
    cell = editor.cells[victim]
    assert (labels.data == cell).any()
    shapes.remove([victim])
    assert calls["decoder"] == start + 2
    assert not (labels.data == cell).any() and cell not in annotation.cells
    np.testing.assert_array_equal(labels.data, annotation.cell_labels)

    # moving a box: one decoder call, the labels of one call with the boxes now drawn
    moved = [np.asarray(s).copy() for s in shapes.data]
    moved[0] = moved[0] + 5
    shapes.data = moved
    assert calls["decoder"] == start + 3
    np.testing.assert_array_equal(labels.data, annotation.cell_labels)
    np.testing.assert_array_equal(annotation.labels, one_call_with_the_drawn_boxes())

    # Ctrl-Z undoes the move, then the deletion: boxes and labels as before, no decoder call
    assert editor.undo() and editor.undo()
    assert calls["decoder"] == start + 3
    assert cell in annotation.cells and len(shapes.data) == len(annotation.cells)
    np.testing.assert_array_equal(labels.data, annotation.cell_labels)
    np.testing.assert_array_equal(annotation.labels, one_call_with_the_drawn_boxes())


def test_export_writes_the_labels_and_the_command_lines_cell_table(counting, cell_image, tmp_path):
    from cellsam_trt.cli.segment import CSV_HEADER
    from cellsam_trt.io import read_image

    editor, _ = edit_layers(counting, cell_image)
    labels_path, table_path = editor.export(tmp_path / "out", "cells")
    np.testing.assert_array_equal(np.asarray(read_image(labels_path).array), editor.annotation.labels)
    with table_path.open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == CSV_HEADER
    present = np.unique(editor.annotation.labels)
    assert [int(r[0]) for r in rows[1:]] == present[present > 0].tolist()


def test_the_manifest_names_the_widget():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("cellsam-trt")
    (widget,) = manifest.contributions.widgets
    command = next(c for c in manifest.contributions.commands if c.id == widget.command)
    assert command.python_name == "cellsam_trt.napari_plugin.widget:CellSAMWidget"


def test_the_command_line_opens_a_viewer_only_with_napari(monkeypatch):
    from cellsam_trt.cli.main import build_parser

    args = build_parser().parse_args(["napari", "image.tif", "--backend", "torch"])
    assert args.image == "image.tif" and args.backend == "torch" and callable(args.func)


def test_the_command_line_says_what_to_do_without_a_display(monkeypatch, capsys):
    from cellsam_trt.cli.main import main

    monkeypatch.setattr(sys, "platform", "linux")
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(name, raising=False)
    assert main(["napari"]) == 1  # an error line, not Qt's abort
    assert "xvfb-run" in capsys.readouterr().err
    monkeypatch.setenv("DISPLAY", ":99")
    from cellsam_trt.cli.napari import missing_display

    assert missing_display() is None


@pytest.mark.slow
@pytest.mark.display  # a viewer needs OpenGL in a window: an X display (Xvfb will do) on Linux
def test_the_widget_segments_in_a_worker_and_edits_from_the_kept_embedding(counting, cell_image, qtbot, tmp_path,
                                                                           monkeypatch):
    from cellsam_trt.napari_plugin.widget import BOXES_LAYER, LABELS_LAYER, CellSAMWidget

    target = os.environ.get("CELLSAM_TRT_SCREENSHOT")  # set to refresh the README's picture
    target = Path(target).resolve() if target else tmp_path / "viewer.png"
    # the export folder defaults to the working directory: a short, neutral one for the README's picture
    neutral = Path(tempfile.mkdtemp()) / "example"
    neutral.mkdir()
    monkeypatch.chdir(neutral)
    viewer = napari.Viewer()  # shown (on the X display, Xvfb in CI): a hidden window draws no canvas
    try:
        nuclear = viewer.add_image(cell_image[..., 0], name="nuclear")
        whole = viewer.add_image(cell_image[..., 1], name="whole-cell")
        widget = CellSAMWidget(viewer, session=counting)
        assert Path(str(widget.export_folder.value)).name == "example"
        viewer.window.add_dock_widget(widget, name="CellSAM")
        widget.whole_cell.value, widget.nuclear.value = whole, nuclear
        worker = widget.segment()
        with qtbot.waitSignal(worker.finished, timeout=120_000):
            pass
        qtbot.waitUntil(lambda: BOXES_LAYER in viewer.layers, timeout=10_000)
        labels, shapes = viewer.layers[LABELS_LAYER], viewer.layers[BOXES_LAYER]
        np.testing.assert_array_equal(widget.editor.annotation.labels, counting.segment(cell_image))
        assert labels.data.max() >= 3 and len(shapes.data) >= 3

        calls = dict(counting.backend.calls)  # after the comparison's own segment call
        shapes.add_rectangles(rectangles(np.array([20, 30, 70, 80], np.float32)))
        shapes.add_rectangles(rectangles(np.array([200, 150, 260, 210], np.float32)))
        assert counting.backend.calls["encoder"] == calls["encoder"]
        assert counting.backend.calls["decoder"] == calls["decoder"] + 2
        np.testing.assert_array_equal(labels.data, widget.editor.annotation.cell_labels)

        viewer.window.resize(1500, 820)
        viewer.reset_view()
        canvas = viewer.screenshot(canvas_only=True, flash=False)
        assert canvas.ndim == 3 and min(canvas.shape[:2]) > 100
        assert canvas[..., :3].std() > 5 and len(np.unique(canvas[..., :3].reshape(-1, 3), axis=0)) > 20  # drawn
        viewer.layers.selection.active = shapes
        _close_notifications(viewer)  # "segmenting..." may still be on screen; the count below says it ended
        shot = viewer.screenshot(canvas_only=False, flash=False)
        from skimage.io import imsave

        imsave(target, shot[..., :3], check_contrast=False)
    finally:
        viewer.close()
        shutil.rmtree(neutral.parent, ignore_errors=True)


def _close_notifications(viewer) -> None:
    from qtpy.QtWidgets import QApplication, QWidget

    for toast in viewer.window._qt_window.findChildren(QWidget):
        if type(toast).__name__ == "NapariQtNotification":
            toast.close()
    QApplication.processEvents()
