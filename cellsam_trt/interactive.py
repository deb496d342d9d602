"""Boxes added and removed one at a time on one embedded image (interactive annotation).

A person correcting CellFinder draws a box, moves one, deletes one: each change must cost
one decoder call, not the whole model. ``Annotation`` keeps the image embedding
(``CellSAM.embed``), decodes only the box that changed and paints its mask into the
painted labels (a later box wins where masks overlap, as in one ``segment`` call); the
clean-up (hole filling, small cells dropped, renumbering) is redone on the painted labels,
so ``labels`` always equals ``session.segment(embedding, boxes=annotation.boxes)``.

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
    clean-up, as ``segment`` does.
    """

    def __init__(self, session: Any, embedded: ImageEmbedding) -> None:
        backend = session.backend
        embedded.check_made_by(backend, "embedded")
        self.session = session
        self.embedded = embedded
        self._embedding = embedded.embedding.to(backend.device)
        self._masks: dict[int, Tensor] = {}  # cell number -> (L, L) mask logits, in adding order
        self._boxes: dict[int, np.ndarray] = {}
        self._next = 1
        self.decoder_calls = 0
        self._painter = self._new_painter()

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
            return 0
        cell = self._next
        self._next += 1
        self._masks[cell] = logits[0, 0]
        self._boxes[cell] = box[0]
        self._painter.paint(logits[:, 0], cell)
        return cell

    def remove(self, cell: int) -> None:
        """Delete a cell; the masks it covered show again (no decoder call)."""
        if cell not in self._boxes:
            raise KeyError(f"cell: {cell} is not one of this annotation's cells {self.cells}")
        del self._boxes[cell], self._masks[cell]
        self._painter = self._new_painter()
        for number, logits in self._masks.items():  # adding order: later cells win again
            self._painter.paint(logits[None], number)

    def move(self, cell: int, box: Any) -> int:
        """Replace a cell's box (it becomes the newest cell); returns its new number."""
        self.remove(cell)
        return self.add(box)

    @property
    def labels(self) -> np.ndarray:
        """(H, W) int32: the painted masks after the clean-up, cells 1..K."""
        painted = self._painter.result().cpu().numpy()
        # painted numbers with gaps (removed cells) renumber to 1..K in order, as in one call
        present = np.zeros(self._next, np.int32)
        present[list(self._boxes)] = np.arange(1, len(self._boxes) + 1, dtype=np.int32)
        return post.fill_holes_and_remove_small(present[painted], self.session.options.min_size)

    def _new_painter(self) -> post.MaskPainter:
        backend = self.session.backend
        return post.MaskPainter((self.embedded.height, self.embedded.width), low_res=backend.config.sam.low_res_size,
                                model_size=backend.config.image_size,
                                mask_threshold=self.session.options.mask_threshold, device=backend.device)
