"""Boxes added and removed one at a time on one embedded image (interactive annotation).

A person correcting CellFinder draws a box, moves one, deletes one: each change must cost
one decoder call, not the whole model. ``Annotation`` keeps the image embedding
(``CellSAM.embed``), decodes only the box that changed and paints its mask into the
painted labels (a later box wins where masks overlap, as in one ``segment`` call); the
clean-up (hole filling, small cells dropped, renumbering) is redone where the edit can
reach, so ``labels`` always equals ``session.segment(embedding, boxes=annotation.boxes)``.

    session = CellSAM.from_checkpoint("cellsam_general.pt")
    annotation = Annotation(session, session.embed(image, cellfinder=False))
    cell = annotation.add([10, 12, 40, 45])      # one decoder call; 0 when the IoU filter drops it
    annotation.remove(cell)                      # no decoder call
    annotation.undo()                            # the cell is back, no decoder call
    labels = annotation.labels                   # (H, W) int32
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .engine import postprocess as post
from .engine import preprocess as pre
from .engine.embedding import ImageEmbedding
from .engine.options import SegmentOptions

_NOTHING = (slice(0, 0), slice(0, 0))


@dataclass(frozen=True)
class _Cell:
    """What an annotation keeps of one decoded box (enough to paint it again without the decoder)."""

    box: np.ndarray  # (4,) float32 x1, y1, x2, y2, image pixels
    logits: Tensor  # the low-res mask logits the painter reads, (k1 - k0, j1 - j0), backend's device
    reads: np.ndarray  # (4,) int64 k0, k1, j0, j1 of ``logits`` in the (L, L) mask (end exclusive)
    iou: float  # predicted mask IoU
    score: float  # CellFinder's score; NaN for a drawn box
    window: np.ndarray  # (4,) int64 y0, y1, x0, x1 the mask may paint (end exclusive)

    def mask(self, side: int) -> Tensor:
        """(1, L, L) logits that paint exactly what the decoder's mask painted: the read
        window's values, and far below any threshold elsewhere (finite: the painter's padded
        reads multiply by zero weights)."""
        full = torch.full((1, side, side), -1e4, dtype=self.logits.dtype, device=self.logits.device)
        k0, k1, j0, j1 = self.reads.tolist()
        full[0, k0:k1, j0:j1] = self.logits
        return full

    @classmethod
    def of(cls, box: np.ndarray, logits: Tensor, painted: np.ndarray, iou: float, score: float) -> _Cell:
        """A cell from its decoded (L, L) logits and the painter's (8,) row for them."""
        k0, k1, j0, j1 = painted[4:].tolist()
        return cls(box, logits[k0:k1, j0:j1].clone(), painted[4:].copy(), iou, score, painted[:4].copy())


@dataclass(frozen=True)
class LabelTable:
    """Per label of ``Annotation.labels``, row k - 1 for label k (the fields ``batch.cell_rows``
    reads; a label id no pixel carries keeps its row, as ids can have gaps).

    boxes: (K, 4) float32 prompt boxes, image pixels. iou: (K,) float32 predicted IoU.
    scores: (K,) float32 CellFinder scores, NaN for drawn boxes.
    """

    boxes: np.ndarray
    iou: np.ndarray
    scores: np.ndarray


class Annotation:
    """The cells of one image, edited box by box.

    Args:
        session: the ``CellSAM`` that decodes (the embedding must be its own).
        embedded: the image's ``ImageEmbedding``.
        boxes: optional (N, 4) boxes to start from (x1, y1, x2, y2, image pixels), decoded in
            the batched calls ``segment`` makes (e.g. CellFinder's boxes from ``details.boxes``).
        scores: optional (N,) CellFinder scores of ``boxes`` (kept for the per-cell table).

    Cells are numbered by the order their boxes were added (``add`` returns the number,
    which stays the cell's until it is removed); ``labels`` renumbers them 1..K after the
    clean-up, as ``segment`` does, and ``cell_labels`` keeps the cells' own numbers (stable
    colours in a viewer).

    An edit costs work near the box, not over the whole image: the clean-up of a cell can
    only reach other cells whose windows overlap its own (a filled hole overwrites what lay
    inside it; a cell that loses pixels may drop under the minimum size), so after an edit
    the clean-up is redone on the smallest rectangle that holds the edited window and every
    cell window that overlaps it, transitively (``changed`` says which rectangle).

    Each cell keeps the part of its low-res mask logits that painting reads (a few KiB for a
    cell-sized mask; 256 KiB at most), so that removing, undoing and redoing cost no
    decoder call.
    """

    def __init__(self, session: Any, embedded: ImageEmbedding, boxes: Any = None, scores: Any = None) -> None:
        backend = session.backend
        embedded.check_made_by(backend, "embedded")
        self.session = session
        self.embedded = embedded
        self._embedding = embedded.embedding.to(backend.device)
        self._cells: dict[int, _Cell] = {}  # cell number -> what it needs, in number (= adding) order
        self._next = 1
        self.decoder_calls = 0  # decoder calls that went through (a chunk retried after running out of memory counts once)
        # the session's thresholds, decoder chunks capped at what its backend takes (as segment)
        self._thresholds = session.thresholds(SegmentOptions())
        self._side = backend.config.sam.low_res_size
        self._painter = session.core.new_painter((embedded.height, embedded.width), self._thresholds)
        # the clean-up of the painted labels, in cell numbers (0 background), and the cells it
        # numbers (as the released clean-up does, ids can have gaps where a fill covered a cell)
        self._cleaned = np.zeros((embedded.height, embedded.width), np.int32)
        self._kept: set[int] = set()
        self._done: list[list[tuple[str, int, _Cell]]] = []  # edits, each a list of steps, for undo
        self._undone: list[list[tuple[str, int, _Cell]]] = []
        self.changed: tuple[slice, slice] = _NOTHING
        if boxes is not None:
            self.add_many(boxes, scores)
            self._done.clear()  # the starting point, not an edit

    @property
    def boxes(self) -> np.ndarray:
        """(K, 4) float32 boxes of the cells kept, in adding order (x1, y1, x2, y2, image pixels)."""
        return np.array([c.box for c in self._cells.values()], np.float32).reshape(-1, 4)

    @property
    def nbytes(self) -> int:
        """Bytes kept for the cells' mask logits (what removing and undoing repaint from)."""
        return sum(c.logits.numel() * c.logits.element_size() for c in self._cells.values())

    @property
    def cells(self) -> list[int]:
        """Numbers of the cells kept, in adding order."""
        return list(self._cells)

    def add(self, box: Any) -> int:
        """Decode one box (x1, y1, x2, y2 in image pixels) and paint its mask on top.

        Args:
            box: four numbers (a list, tuple or (4,) / (1, 4) array); several boxes go to
                ``add_many``.

        Returns:
            the cell's number, or 0 when its predicted IoU is below the session's threshold
            (as ``segment`` drops such masks).
        """
        try:
            shape = np.shape(box)
        except ValueError:  # ragged nested lists
            shape = None
        if shape not in ((4,), (1, 4)):
            raise ValueError(f"box: expected one box [x1, y1, x2, y2], got "
                             f"{'shape ' + str(shape) if shape is not None else repr(box)}; "
                             "pass several boxes (N, 4) to add_many(boxes)")
        return self.add_many(np.reshape(np.asarray(box), (1, 4)))[0]

    def add_many(self, boxes: Any, scores: Any = None) -> list[int]:
        """Decode (N, 4) boxes in batched calls and paint their masks on top, in order.

        Returns:
            each box's cell number, 0 where the IoU filter dropped its mask. One edit for ``undo``.
        """
        from .engine.core import validate_boxes

        height, width = self.embedded.height, self.embedded.width
        boxes = validate_boxes(boxes, height, width)
        scores = np.full(len(boxes), np.nan, np.float32) if scores is None else np.asarray(scores, np.float32)
        if scores.shape != (len(boxes),):
            raise ValueError(f"scores: expected shape ({len(boxes)},) to match boxes, got {scores.shape}")
        size = self.session.backend.config.image_size
        return self._decode(boxes, torch.from_numpy(pre.boxes_to_model(boxes, height, width, size)), scores)

    @classmethod
    def from_cellfinder(cls, session: Any, embedded: ImageEmbedding, bbox_threshold: float | None = None) -> Annotation:
        """Start from CellFinder's boxes, selected and decoded as ``session.segment(embedded)``
        does (same model-space boxes, same batched calls): the same labels, ready to edit.

        ``bbox_threshold``: CellFinder confidence weight (default: the session's).
        """
        if embedded.finder is None:
            raise ValueError("embedded: has no CellFinder outputs (made with cellfinder=False); "
                             "embed the image again with cellfinder=True")
        annotation = cls(session, embedded)
        size = session.backend.config.image_size
        threshold = annotation._thresholds.bbox_threshold if bbox_threshold is None else bbox_threshold
        logits, boxes = (t.to(session.backend.device) for t in embedded.finder)
        scores, boxes_model = post.cellfinder_boxes(logits, boxes, size, threshold)
        image_boxes = pre.boxes_to_image(boxes_model.cpu().numpy(), embedded.height, embedded.width, size)
        annotation._decode(image_boxes, boxes_model, scores.float().cpu().numpy())
        annotation._done.clear()  # the starting point, not an edit
        return annotation

    def _decode(self, boxes: np.ndarray, boxes_model: Tensor, scores: np.ndarray) -> list[int]:
        """Decode (N, 4) model-space boxes as ``segment`` does (the graph core's chunks), paint
        the kept masks on top in order, and keep each kept mask as a cell."""
        numbers = np.zeros(len(boxes), np.int64)
        steps, changed = [], []

        def keep_cells(start, first, logits, iou, rows, windows):
            self.decoder_calls += 1
            iou = iou[:, 0].float().cpu().numpy()  # one transfer per chunk, not one per cell
            for j, k in enumerate(rows.tolist()):  # kept masks took consecutive numbers
                cell = _Cell.of(boxes[start + k], logits[j, 0], windows[j], float(iou[k]), float(scores[start + k]))
                self._cells[first + j] = cell
                steps.append(("add", first + j, cell))
                numbers[start + k] = first + j
                changed.append(cell.window)

        with self.session._device_lock:
            self.session.core.paint_boxes(self._embedding, boxes_model.to(self.session.backend.device), self._painter,
                                          self._thresholds, first_label=self._next, on_chunk=keep_cells)
        self._next += len(steps)
        self._record(steps)
        self._clean_up(_union(changed))
        return numbers.tolist()

    def box(self, cell: int) -> np.ndarray:
        """(4,) float32 box of a cell (x1, y1, x2, y2, image pixels)."""
        self._check_cells([cell])
        return self._cells[cell].box

    def remove(self, cell: int) -> None:
        """Delete a cell; the masks it covered show again (no decoder call)."""
        self.remove_many([cell])

    def remove_many(self, cells: list[int]) -> None:
        """Delete several cells as one edit (no decoder call)."""
        self._check_cells(cells)
        steps = [("remove", cell, self._detach(cell, clean=False)) for cell in dict.fromkeys(cells)]
        self._clean_up(_union([data.window for _, _, data in steps]))
        self._record(steps)

    def _check_cells(self, cells: list[int]) -> None:
        missing = [c for c in cells if c not in self._cells]
        if missing:
            raise KeyError(f"cell: {missing[0]} is not one of this annotation's cells {self.cells}")

    def move(self, cell: int, box: Any) -> int:
        """Replace a cell's box (it becomes the newest cell); returns its new number (0 when
        the IoU filter drops the new mask). One decoder call; one edit for ``undo``."""
        self._check_cells([cell])
        steps = [("remove", cell, self._detach(cell))]
        number = self.add(box)
        if number:
            steps += self._done.pop()  # the add, recorded by add(): one edit with the removal
        self._record(steps)
        return number

    def undo(self) -> bool:
        """Revert the last edit exactly (no decoder call); False when there is none."""
        if not self._done:
            return False
        edit = self._done.pop()
        self._apply([("remove" if kind == "add" else "add", cell, data) for kind, cell, data in reversed(edit)])
        self._undone.append(edit)
        return True

    def redo(self) -> bool:
        """Apply the last undone edit again (no decoder call); False when there is none."""
        if not self._undone:
            return False
        edit = self._undone.pop()
        self._apply(edit)
        self._done.append(edit)
        return True

    @property
    def labels(self) -> np.ndarray:
        """(H, W) int32: the painted masks after the clean-up, cells renumbered 1..K in adding order."""
        return self._renumbering()[self._cleaned]

    @property
    def cell_labels(self) -> np.ndarray:
        """(H, W) int32 read-only view: the same cells as ``labels``, each with its own number."""
        view = self._cleaned.view()
        view.flags.writeable = False
        return view

    def table(self) -> LabelTable:
        """Box, predicted IoU and CellFinder score of every label id of ``labels``."""
        numbers = sorted(self._kept)
        cells = [self._cells[n] for n in numbers]
        return LabelTable(boxes=np.array([c.box for c in cells], np.float32).reshape(-1, 4),
                          iou=np.array([c.iou for c in cells], np.float32),
                          scores=np.array([c.score for c in cells], np.float32))

    def _renumbering(self) -> np.ndarray:
        lut = np.zeros(self._next, np.int32)
        lut[sorted(self._kept)] = np.arange(1, len(self._kept) + 1, dtype=np.int32)
        return lut

    def _record(self, steps: list[tuple[str, int, _Cell]]) -> None:
        if steps:
            self._done.append(steps)
            self._undone.clear()

    def _apply(self, steps: list[tuple[str, int, _Cell]]) -> None:
        windows = []
        for kind, cell, data in steps:
            if kind == "add":
                self._cells[cell] = data
                self._painter.paint(data.mask(self._side), cell)
            else:
                self._detach(cell, clean=False)
            windows.append(data.window)
        self._cells = dict(sorted(self._cells.items()))  # numbers are the painting order
        self._clean_up(_union(windows))

    def _detach(self, cell: int, clean: bool = True) -> _Cell:
        data = self._cells.pop(cell)
        self._kept.discard(cell)
        y0, y1, x0, x1 = data.window.tolist()
        self._painter.result()[y0:y1, x0:x1] = 0
        # the masks that may paint inside the cleared window, painted again (the painter keeps
        # the highest number per pixel, so painting a mask twice changes nothing elsewhere)
        for number in self._overlapping(data.window):
            self._painter.paint(self._cells[number].mask(self._side), number)
        if clean:
            self._clean_up(data.window)
        return data

    def _overlapping(self, window: np.ndarray) -> list[int]:
        """Cells (adding order) whose windows overlap ``window`` (y0, y1, x0, x1)."""
        if not self._cells:
            return []
        cells = np.fromiter(self._cells, np.int64, len(self._cells))
        w = np.stack([c.window for c in self._cells.values()])
        hit = (w[:, 0] < window[1]) & (window[0] < w[:, 1]) & (w[:, 2] < window[3]) & (window[2] < w[:, 3])
        return cells[hit].tolist()

    def _clean_up(self, window: np.ndarray | None) -> None:
        """Redo the clean-up on the rectangle the edit of ``window`` can reach."""
        if window is None or window[1] <= window[0] or window[3] <= window[2]:
            self.changed = _NOTHING
            return
        region = np.asarray(window, np.int64)
        while True:  # grow to hold every cell window it overlaps, until nothing changes
            reached = self._overlapping(region)
            grown = _union([region] + [self._cells[c].window for c in reached])
            if np.array_equal(grown, region):
                break
            region = grown
        rows, cols = slice(int(region[0]), int(region[1])), slice(int(region[2]), int(region[3]))
        # a copy: on the CPU .numpy() shares the painter's memory, and the clean-up works in place
        painted = self._painter.result()[rows, cols].cpu().numpy().copy()
        kept = post.fill_holes_and_remove_small_kept(painted, self._thresholds.min_size, renumber=False)
        self._cleaned[rows, cols] = painted
        # a cell counts (takes an id) when it passes at its turn, even if a later fill covers it
        self._kept.difference_update(reached)
        self._kept.update(kept)
        self.changed = (rows, cols)


def _union(windows: list[np.ndarray]) -> np.ndarray | None:
    """Smallest (y0, y1, x0, x1) holding every non-empty window; None when there is none."""
    w = [np.asarray(v, np.int64) for v in windows if v[1] > v[0] and v[3] > v[2]]
    if not w:
        return None
    w = np.stack(w)
    return np.array([w[:, 0].min(), w[:, 1].max(), w[:, 2].min(), w[:, 3].max()])
