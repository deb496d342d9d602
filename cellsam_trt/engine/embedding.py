"""An embedded image: what decoding boxes on it needs, kept between calls and on disk.

``CellSAM.embed(image)`` runs preprocessing and the image encoder once (and CellFinder,
unless told not to) and returns an ``ImageEmbedding``; ``CellSAM.segment(embedding,
boxes=...)`` and ``interactive.Annotation`` decode boxes on it without the encoder. Saved as
``.npz`` (no pickles), keyed by the image's content, the preprocessing options and the
weights (``Backend.weights_identity``), so an annotation project computes each image's
embedding once.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

FORMAT = 1


@dataclass
class ImageEmbedding:
    """One image's encoder output and the geometry that decoding needs.

    Attributes:
        embedding: (1, C, G, G) float32 image embedding (ViT-B: 256 x 64 x 64, 4 MiB), on
            ``embedding.device`` (the backend's device when computed, the CPU when loaded;
            the decoder moves it once per call).
        height, width: the image's size in pixels (boxes are given in these pixels).
        finder: CellFinder's raw outputs for the image, (logits (Q, 2), boxes (Q, 4) cxcywh
            in [0, 1]), or None when it was not run (then only user boxes can be decoded).
        image_key: sha256 of the image (shape, dtype, bytes) and the preprocessing options.
        weights: ``Backend.weights_identity()`` of the session that computed it.
    """

    embedding: Tensor
    height: int
    width: int
    finder: tuple[Tensor, Tensor] | None
    image_key: str
    weights: str

    @property
    def nbytes(self) -> int:
        """Bytes held (embedding and CellFinder outputs)."""
        extra = 0 if self.finder is None else sum(t.numel() * t.element_size() for t in self.finder)
        return self.embedding.numel() * self.embedding.element_size() + extra

    @property
    def key(self) -> str:
        """File name stem of this embedding in a folder of saved embeddings."""
        return embedding_key(self.image_key, self.weights)

    def check_made_by(self, backend: Any, argument: str) -> None:
        """ValueError naming ``argument`` unless ``backend`` (its weights and precision) computed this embedding."""
        if self.weights != backend.weights_identity():
            raise ValueError(f"{argument}: this embedding was computed with other weights or precision than this "
                             "session's; compute it again with this session's embed()")

    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (.npz; atomically)."""
        from ..io import atomic_write

        arrays = {"embedding": self.embedding.detach().cpu().numpy(),
                  "meta": np.frombuffer(json.dumps({
                      "format": FORMAT, "height": self.height, "width": self.width,
                      "image_key": self.image_key, "weights": self.weights}).encode(), np.uint8)}
        if self.finder is not None:
            arrays["finder_logits"] = self.finder[0].detach().cpu().numpy()
            arrays["finder_boxes"] = self.finder[1].detach().cpu().numpy()

        def write(tmp):
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)

        return atomic_write(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike, *, weights: str | None = None) -> ImageEmbedding:
        """Read what ``save`` wrote.

        Args:
            weights: when given, the ``Backend.weights_identity()`` the embedding must have
                been computed with (``ValueError`` otherwise: recompute it).
        """
        try:
            # our own handle: numpy leaves its file open when the archive is damaged
            with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes().decode())
                embedding = torch.from_numpy(z["embedding"].copy())
                finder = None
                if "finder_logits" in z:
                    finder = (torch.from_numpy(z["finder_logits"].copy()), torch.from_numpy(z["finder_boxes"].copy()))
        except FileNotFoundError:
            raise
        except Exception as err:  # a damaged .npz fails inside zipfile, zlib or json, each in its own way
            raise ValueError(f"embedding file {path}: damaged, or not a saved cellsam-trt embedding "
                             f"({type(err).__name__}: {err}); recompute it with CellSAM.embed") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"embedding file {path}: format {meta.get('format')}, this version reads {FORMAT}; "
                             "recompute it with CellSAM.embed")
        if weights is not None and meta["weights"] != weights:
            raise ValueError(f"embedding file {path} was computed with other weights or precision than this "
                             "session's; recompute it with CellSAM.embed")
        return cls(embedding, int(meta["height"]), int(meta["width"]), finder, meta["image_key"], meta["weights"])


def image_key(image: Any, normalize: Any, channel_axis: int | None) -> str:
    """sha256 of an image's content and of the options its preprocessing depends on."""
    array = np.ascontiguousarray(np.asarray(image))
    digest = hashlib.sha256(json.dumps([list(array.shape), str(array.dtype), str(normalize), channel_axis]).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def embedding_key(image_key: str, weights: str) -> str:
    return hashlib.sha256(f"{image_key}:{weights}".encode()).hexdigest()[:32]
