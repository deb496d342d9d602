"""Stacks (time-lapse T, z-stacks Z, or both) segmented frame by frame.

Every frame (one Y-X plane with its channels) is segmented on its own, exactly as
``CellSAM.segment`` would segment it alone, and labelled 1..K_f independently: labels are
unique within a frame, not across frames (no tracking over time, no 3-D stitching over z).
Frames no larger than the tile size go through ``CellSAM.segment_batch`` a few at a time
(one batched encoder call and one batched CellFinder call per batch); larger frames go
one by one through ``CellSAM.segment`` (tiled, ``tiling.segment_large``).
"""
from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from .axes import AxesGuessWarning, Layout, resolve_layout
from .engine.options import SegmentOptions
from .progress import progress_bar


def frame_indices(layout: Layout) -> list[tuple[int, ...]]:
    """Indices over the stack axes (in the order of ``layout.stack_axes``), C order."""
    return list(itertools.product(*(range(n) for n in layout.stack_shape)))


def read_frame(array: Any, layout: Layout, index: Sequence[int]) -> np.ndarray:
    """One frame of ``array``: (Y, X) or (Y, X, C) numpy array, read lazily from array-likes."""
    full: list[Any] = [slice(None)] * len(layout.axes)
    for axis, i in zip(layout.stack_axes, index):
        full[axis] = int(i)
    frame = np.asarray(array[tuple(full)])
    kept = [a for a in layout.axes if a not in "TZ"]  # the frame's axes, in array order
    order = [kept.index(a) for a in "YXC" if a in kept]
    return frame.transpose(order)


FrameResult = tuple[tuple[int, ...], np.ndarray, Any]


def segment_frames(session: Any, read: Callable[[tuple[int, ...]], np.ndarray], indices: Iterable[tuple[int, ...]],
                   *, return_details: bool = False, options: SegmentOptions | None = None,
                   **settings: Any) -> Iterator[FrameResult]:
    """Segment frames; yields (index, labels (H, W) int32, details or None) in the order of ``indices``.

    Args:
        read: index -> frame (Y, X) or (Y, X, C) numpy array.
        options, **settings: the ``SegmentOptions`` of every frame (normalize,
            bbox_threshold, postprocess, ...): ``batch_size`` frames per batched encoder /
            CellFinder call; frames with a side longer than ``tile_size`` are tiled (as
            ``CellSAM.segment``; None segments every frame whole). The channel axis is the
            frame's last (``read`` returns Y, X[, C]).
    """
    opts = SegmentOptions.of(options, **settings)
    from .engine.core import NoCellsWarning

    pending: list[tuple[tuple[int, ...], np.ndarray]] = []

    def flush() -> Iterator[FrameResult]:
        if not pending:
            return
        results = session.segment_batch([f for _, f in pending], return_details=True, warn_empty=False,
                                        options=opts, channel_axis=-1 if pending[0][1].ndim == 3 else None)
        for (index, _), (labels, details) in zip(pending, results):
            yield index, labels, details if return_details else None
        pending.clear()

    for index in indices:
        frame = read(index)
        if opts.tile_size is not None and max(frame.shape[:2]) > opts.tile_size:
            yield from flush()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NoCellsWarning)  # reported once for the stack
                labels, details = session.segment(frame, return_details=True, options=opts,
                                                  channel_axis=-1 if frame.ndim == 3 else None)
            yield index, labels, details if return_details else None
            continue
        pending.append((index, frame))
        if len(pending) >= opts.batch_size:
            yield from flush()
    yield from flush()


def segment_stack(session: Any, stack: Any, *, axes: str | None = None, return_details: bool = False,
                  options: SegmentOptions | None = None, **settings: Any) -> np.ndarray | tuple[np.ndarray, list]:
    """Segment every frame of a stack (time-lapse, z-stack, or both) on its own.

    Args:
        session: a ``CellSAM``.
        stack: array-like (numpy, zarr, memory map), or an ``io.ImageFile``: its axes are
            used when ``axes`` is None, and an axis the file does not label is read as
            ``segment`` reads a plain array (the smallest holds the channels), with an
            ``axes.AxesGuessWarning`` where that could be wrong (3 planes could be 3 time
            points: pass ``axes=`` to say).
        axes: one letter per dimension: T and/or Z (stack axes), optional C (at most 3
            channels), Y and X (Y before X), e.g. "TYX", "ZYX", "TCYX", "TZYXC".
        return_details: also return one details object per frame, in C order of the stack
            axes.
        options, **settings: the ``SegmentOptions`` of every frame, as ``CellSAM.segment``:
            ``batch_size`` frames per batched encoder / CellFinder call (frames no larger
            than ``tile_size``; larger frames are tiled), ``progress`` a bar over frames,
            normalize, bbox_threshold, postprocess, ...

    Returns:
        labels int32 with the input's axes without C (e.g. (T, H, W) for "TCYX"); each
        frame labelled 0 background, cells 1..K_f. With ``return_details``, a tuple.
    """
    opts = SegmentOptions.of(options, **settings)
    from .engine.core import NoCellsWarning
    from .io import ImageFile

    file_axes, from_file = None, isinstance(stack, ImageFile)
    if from_file:
        # the file's letters, "?" where it does not label an axis (None: a format without
        # axes, every axis unlabelled): resolved, and guessed, as the command line resolves
        # them; ``axes`` replaces them all
        stack, file_axes = stack.array, stack.axes
    if axes is None and not from_file:
        raise ValueError("axes: say which axis is what, e.g. axes='TYX' (time, y, x) or 'ZCYX'")
    if not hasattr(stack, "shape") or not hasattr(stack, "__getitem__"):
        stack = np.asarray(stack)
    layout = resolve_layout(tuple(stack.shape), file_axes, axes=axes)
    for message in layout.guessed:
        warnings.warn(message, AxesGuessWarning, stacklevel=2)
    indices = frame_indices(layout)
    labels = np.zeros(layout.stack_shape + layout.plane_shape, np.int32)
    details: list = []
    empty: list[tuple[int, ...]] = []
    bar = progress_bar(len(indices), "segmenting frames", "frame", opts.progress)
    try:
        for index, frame_labels, frame_details in segment_frames(
                session, lambda i: read_frame(stack, layout, i), indices, return_details=return_details,
                options=replace(opts, progress=False)):
            labels[index] = frame_labels
            if not frame_labels.any():
                empty.append(index)
            if return_details:
                details.append(frame_details)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if empty:
        shown = ", ".join(str(i if len(i) > 1 else i[0]) for i in empty[:10]) + (", ..." if len(empty) > 10 else "")
        warnings.warn(f"No cells detected in {len(empty)} of {len(indices)} frames ({shown}); their labels are zero.",
                      NoCellsWarning, stacklevel=2)
    labels = np.moveaxis(labels, list(range(len(layout.stack_axes))),
                         [layout.label_axes.index(layout.axes[a]) for a in layout.stack_axes])
    return (labels, details) if return_details else labels
