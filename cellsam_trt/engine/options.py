"""The settings of one segmentation call, in one typed, validated object.

Every entry point (``segment``, ``CellSAM.segment`` / ``segment_batch`` / ``embed`` /
``segment_stack``, ``tiling.segment_large``, ``scale.segment_dask``, the CLI) takes the
same settings, as keywords or as ``options=SegmentOptions(...)`` (keywords given beside
``options`` replace its fields). They are checked here, once, with errors that name the
argument; the code below the entry points reads the fields and checks nothing again.

``InferenceConfig`` (``config.py``) holds the session's thresholds; ``bbox_threshold`` and
``chunk_size`` here override two of them for one call (``SegmentOptions.thresholds``).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from ..modeling.config import InferenceConfig
from . import preprocess as pre

# the smallest normalisation region: two CLAHE kernels (a region reads its kernels' neighbours)
MIN_BLOCK = 2 * pre.CLAHE_KERNEL


def _is_int(value: Any) -> bool:
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, np.integer))


@dataclass(frozen=True)
class SegmentOptions:
    """Per-call settings of a segmentation.

    Attributes:
        bbox_threshold: CellFinder confidence weight in [0, 1] (None: the session's, 0.4).
        normalize: percentile clip + CLAHE first: True (the released algorithm: on the
            host by scikit-image, or on CUDA by its torch port once the session's start-up
            check passes), "skimage" (on the host, bit-identical to the released code),
            "torch" (the port, on the model's device; on the CPU the same numbers),
            "opencv" (OpenCV's CLAHE, faster, not bit-identical) or False (the image must
            already lie in [0, 1]).
        postprocess: the released optional morphological clean-up.
        remove_boundaries: zero a one-pixel outline around each cell.
        chunk_size: boxes per decoder call (None: the session's).
        channel_axis: axis of the channels of a 3-D image (None: the smallest axis).
        tile_size: images with a side longer than this are segmented in overlapping tiles
            of this side (>= 64); None segments every image as one model input.
        overlap: minimum overlap of neighbouring tiles in pixels (at most tile_size // 2).
        batch_size: tiles or frames per batched encoder / CellFinder call.
        block: side of the regions the large-image normalisation works on, and of the
            chunks of a zarr output (>= 256).
        progress: progress bars.
    """

    bbox_threshold: float | None = None
    normalize: bool | str = True
    postprocess: bool = False
    remove_boundaries: bool = False
    chunk_size: int | None = None
    channel_axis: int | None = None
    tile_size: int | None = 1024
    overlap: int = 128
    batch_size: int = 4
    block: int = 2048
    progress: bool = False

    def __post_init__(self) -> None:
        if self.bbox_threshold is not None:
            if not pre.is_real_number(self.bbox_threshold) or not 0 <= self.bbox_threshold <= 1:
                raise ValueError(f"bbox_threshold: expected a number in [0, 1], got {self.bbox_threshold!r}")
            object.__setattr__(self, "bbox_threshold", float(self.bbox_threshold))
        pre.clahe_method(self.normalize)  # ValueError naming normalize
        for name in ("postprocess", "remove_boundaries", "progress"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{name}: expected True or False, got {value!r}")
            object.__setattr__(self, name, bool(value))
        if self.chunk_size is not None and (not _is_int(self.chunk_size) or self.chunk_size < 1):
            raise ValueError(f"chunk_size: expected a positive integer, got {self.chunk_size!r}")
        if self.channel_axis is not None and (not _is_int(self.channel_axis) or not -3 <= self.channel_axis <= 2):
            raise ValueError(f"channel_axis: expected an integer axis (0, 1, 2 or negative) or None, "
                             f"got {self.channel_axis!r}")
        if self.tile_size is not None:
            check_tiling(self.tile_size, self.overlap)
        elif not _is_int(self.overlap) or self.overlap < 0:
            raise ValueError(f"overlap: expected a non-negative integer, got {self.overlap!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {self.batch_size!r}")
        if not _is_int(self.block) or self.block < MIN_BLOCK:
            raise ValueError(f"block: expected an integer >= {MIN_BLOCK}, got {self.block!r}")

    @classmethod
    def of(cls, options: SegmentOptions | None = None, **settings: Any) -> SegmentOptions:
        """The options of a call: ``options`` (default: all defaults) with the keyword
        ``settings`` replacing its fields. TypeError for a keyword that is no setting."""
        unknown = sorted(set(settings) - SETTINGS)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)}; the settings of a segmentation "
                            f"are {', '.join(sorted(SETTINGS))} (cellsam_trt.SegmentOptions)")
        if options is None:
            return cls(**settings)
        if not isinstance(options, cls):
            raise TypeError(f"options: expected a cellsam_trt.SegmentOptions, got {type(options).__name__}")
        return replace(options, **settings) if settings else options

    @property
    def clahe(self) -> str | None:
        """The CLAHE implementation (``preprocess.clahe_method``): None without normalisation."""
        return pre.clahe_method(self.normalize)

    def thresholds(self, base: InferenceConfig) -> InferenceConfig:
        """The session's thresholds ``base`` with this call's bbox_threshold and chunk_size."""
        changes = {name: getattr(self, name) for name in ("bbox_threshold", "chunk_size")
                   if getattr(self, name) is not None}
        return replace(base, **changes) if changes else base


SETTINGS = frozenset(f.name for f in fields(SegmentOptions))


def check_tiling(tile_size: Any, overlap: Any) -> None:
    """ValueError unless 64 <= tile_size and 0 <= overlap <= tile_size // 2."""
    if not _is_int(tile_size) or tile_size < 64:
        raise ValueError(f"tile_size: expected an integer >= 64, got {tile_size!r}")
    if not _is_int(overlap) or not 0 <= overlap <= tile_size // 2:
        raise ValueError(f"overlap: expected an integer in [0, tile_size // 2 = {tile_size // 2}], got {overlap!r}")
