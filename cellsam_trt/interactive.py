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
    labels = annotation.labels                   # (H, W) int32
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import postprocess as post
from .embedding import ImageEmbedding


class Annotation:
    """The cells of one image, edited box by box.

    Args:
        session: the ``CellSAM`` that decodes (the embedding must be its own).
        embedded: the image's ``ImageEmbedding``.

    Cells are numbered by the order their boxes were added (``add`` returns the number,
    which stays the cell's until it is removed); ``labels`` renumbers them 1..K after the
    clean-up, as ``segment`` does, and ``cell_labels`` keeps the cells' own numbers (stable
    colours in a viewer).

    An edit costs work near the box, not over the whole image: the clean-up of a cell can
    only reach other cells whose windows overlap its own (a filled hole overwrites what lay
    inside it; a cell that loses pixels may drop under the minimum size), so after an edit
    the clean-up is redone on the smallest rectangle that holds the edited window and every
    cell window that overlaps it, transitively (``changed`` says which rectangle).
    """

    def __init__(self, session: Any, embedded: ImageEmbedding) -> None:
        backend = session.backend
        embedded.check_made_by(backend, "embedded")
        self.session = session
        self.embedded = embedded
        self._embedding = embedded.embedding.to(backend.device)
        self._masks: dict[int, Tensor] = {}  # cell number -> (L, L) mask logits, in adding order
        self._boxes: dict[int, np.ndarray] = {}
        self._windows: dict[int, np.ndarray] = {}  # cell number -> (y0, y1, x0, x1) it may paint
        self._next = 1
        self.decoder_calls = 0
        self._painter = self._new_painter()
        # the clean-up of the painted labels, in cell numbers (0 background), and the cells it
        # numbers (as the released clean-up does, ids can have gaps where a fill covered a cell)
        self._cleaned = np.zeros((embedded.height, embedded.width), np.int32)
        self._kept: set[int] = set()
        self.changed: tuple[slice, slice] = (slice(0, 0), slice(0, 0))

    @property
    def boxes(self) -> np.ndarray:
        """(K, 4) float32 boxes of the cells kept, in adding order (x1, y1, x2, y2, image pixels)."""
        return np.array(list(self._boxes.values()), np.float32).reshape(-1, 4)

    @property
    def cells(self) -> list[int]:
        """Numbers of the cells kept, in adding order."""
        return list(self._boxes)

    def add(self, box: Any) -> int:
        """Decode one box (x1, y1, x2, y2 in image pixels) and paint its mask on top.

        Returns:
            the cell's number, or 0 when its predicted IoU is below the session's threshold
            (as ``segment`` drops such masks).
        """
        from .pipeline import validate_boxes

        box = validate_boxes(np.asarray(box, np.float64).reshape(1, 4), self.embedded.height, self.embedded.width)
        backend = self.session.backend
        size = backend.config.image_size
        scale = np.array([size / self.embedded.width, size / self.embedded.height] * 2, np.float32)
        with self.session._device_lock:
            logits, iou = backend.decoder(self._embedding, torch.from_numpy(box * scale).to(backend.device),
                                          last_call=True)
        self.decoder_calls += 1
        if float(iou[0, 0]) < self.session.options.iou_threshold:
            self.changed = (slice(0, 0), slice(0, 0))
            return 0
        cell = self._next
        self._next += 1
        self._masks[cell] = logits[0, 0]
        self._boxes[cell] = box[0]
        self._windows[cell] = self._painter.paint(logits[:, 0], cell)[0]
        self._clean_up(self._windows[cell])
        return cell

    def remove(self, cell: int) -> None:
        """Delete a cell; the masks it covered show again (no decoder call)."""
        if cell not in self._boxes:
            raise KeyError(f"cell: {cell} is not one of this annotation's cells {self.cells}")
        window = self._windows.pop(cell)
        del self._boxes[cell], self._masks[cell]
        self._kept.discard(cell)
        y0, y1, x0, x1 = window.tolist()
        self._painter.result()[y0:y1, x0:x1] = 0
        # the masks that may paint inside the cleared window, painted again (the painter keeps
        # the highest number per pixel, so painting a mask twice changes nothing elsewhere)
        for number in self._overlapping(window):
            self._painter.paint(self._masks[number][None], number)
        self._clean_up(window)

    def move(self, cell: int, box: Any) -> int:
        """Replace a cell's box (it becomes the newest cell); returns its new number."""
        self.remove(cell)
        return self.add(box)

    @property
    def labels(self) -> np.ndarray:
        """(H, W) int32: the painted masks after the clean-up, cells renumbered 1..K in adding order."""
        lut = np.zeros(self._next, np.int32)
        lut[sorted(self._kept)] = np.arange(1, len(self._kept) + 1, dtype=np.int32)
        return lut[self._cleaned]

    @property
    def cell_labels(self) -> np.ndarray:
        """(H, W) int32 read-only view: the same cells as ``labels``, each with its own number."""
        view = self._cleaned.view()
        view.flags.writeable = False
        return view

    def _overlapping(self, window: np.ndarray) -> list[int]:
        """Cells (adding order) whose windows overlap ``window`` (y0, y1, x0, x1)."""
        if not self._windows:
            return []
        cells = np.fromiter(self._windows, np.int64, len(self._windows))
        w = np.stack(list(self._windows.values()))
        hit = (w[:, 0] < window[1]) & (window[0] < w[:, 1]) & (w[:, 2] < window[3]) & (window[2] < w[:, 3])
        return cells[hit].tolist()

    def _clean_up(self, window: np.ndarray) -> None:
        """Redo the clean-up on the rectangle the edit of ``window`` can reach."""
        region = np.asarray(window, np.int64).copy()
        if region[1] <= region[0] or region[3] <= region[2]:
            self.changed = (slice(0, 0), slice(0, 0))
            return
        while True:  # grow to hold every cell window it overlaps, until nothing changes
            reached = self._overlapping(region)
            grown = region.copy()
            if reached:
                w = np.stack([self._windows[c] for c in reached])
                grown = np.array([min(region[0], w[:, 0].min()), max(region[1], w[:, 1].max()),
                                  min(region[2], w[:, 2].min()), max(region[3], w[:, 3].max())])
            if np.array_equal(grown, region):
                break
            region = grown
        rows, cols = slice(int(region[0]), int(region[1])), slice(int(region[2]), int(region[3]))
        # a copy: on the CPU .numpy() shares the painter's memory, and the clean-up works in place
        painted = self._painter.result()[rows, cols].cpu().numpy().copy()
        kept = post.fill_holes_and_remove_small_kept(painted, self.session.options.min_size, renumber=False)
        self._cleaned[rows, cols] = painted
        # a cell counts (takes an id) when it passes at its turn, even if a later fill covers it
        self._kept.difference_update(reached)
        self._kept.update(kept)
        self.changed = (rows, cols)

    def _new_painter(self) -> post.MaskPainter:
        backend = self.session.backend
        return post.MaskPainter((self.embedded.height, self.embedded.width), low_res=backend.config.sam.low_res_size,
                                model_size=backend.config.image_size,
                                mask_threshold=self.session.options.mask_threshold, device=backend.device)
