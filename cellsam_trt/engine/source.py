"""Image access: any array-like (numpy, memmap, zarr, a lazily read file) read region by
region as the formatted (h, w, 3) float64 planes that preprocessing works on."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..io import read_image
from . import preprocess as pre


class ImageSource:
    """Reads regions of an image array-like as formatted (h, w, 3) float64, like ``format_image``.

    Args:
        image: (H, W) or 3-D with C <= 3 channels: numpy array, np.memmap, zarr array, or
            anything with ``shape``, ``dtype`` and numpy slicing. Read lazily, region by region.
        channel_axis: channel axis of a 3-D image (default: the smallest axis, as ``segment``).

    Only shape and dtype are checked here; values (finite) are checked per region read.
    """

    def __init__(self, image: Any, channel_axis: int | None = None) -> None:
        if isinstance(image, ImageSource):
            image = image.array
        if isinstance(image, (list, tuple)):
            image = np.asarray(image)
        if not hasattr(image, "shape") or not hasattr(image, "dtype") or not hasattr(image, "__getitem__"):
            raise ValueError(f"image: expected an array (H, W) or (H, W, C), got {type(image).__name__}")
        dtype = np.dtype(image.dtype)
        if dtype.kind == "O" or not (np.issubdtype(dtype, np.number) or dtype.kind == "b") \
                or np.issubdtype(dtype, np.complexfloating):
            raise ValueError(f"image: expected a real numeric dtype, got {dtype}")
        shape = tuple(int(s) for s in image.shape)
        if len(shape) not in (2, 3):
            raise ValueError(f"image: expected 2 dimensions (H, W) or 3 (H, W, C), got shape {shape}")
        if len(shape) == 3:
            axis = int(np.argmin(shape)) if channel_axis is None else channel_axis
            if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -3 <= axis <= 2:
                raise ValueError(f"channel_axis: must be 0, 1, 2 or negative, got {channel_axis!r}")
            axis = int(axis) % 3
            if shape[axis] > 3:
                raise ValueError(
                    f"image: at most 3 channels (blank, nuclear, whole-cell) are supported, got {shape[axis]} "
                    f"on axis {axis} of shape {shape}; pass channel_axis= or select channels"
                )
            self.channel_axis: int | None = axis
            spatial = [s for i, s in enumerate(shape) if i != axis]
        else:
            self.channel_axis = None
            spatial = list(shape)
        self.height, self.width = spatial
        if self.height < 2 or self.width < 2:
            raise ValueError(f"image: needs at least 2x2 pixels, got {self.height}x{self.width}")
        self.array = image
        self.dtype = dtype

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Region [y0, y1) x [x0, x1) -> (h, w, 3) float64 (channels in the last slots)."""
        index: list[slice] = [slice(y0, y1), slice(x0, x1)]
        if self.channel_axis is not None:
            index.insert(self.channel_axis, slice(None))
        crop = np.asarray(self.array[tuple(index)])
        return pre.format_image(crop, channel_axis=self.channel_axis)

    def __getstate__(self):
        # path-backed arrays (zarr over a TIFF, memmaps) are reopened where they are used
        state = dict(self.__dict__)
        opener = state.get("_opener")
        if opener is not None:
            state["array"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.__dict__.get("_opener") is not None and self.array is None:
            self.array = open_image(*self._opener)

    @classmethod
    def from_path(cls, path: str | os.PathLike, channel_axis: int | None = None) -> ImageSource:
        """Open an image file lazily (see ``open_image``); pickles as its path."""
        path = str(path)
        source = cls(open_image(path), channel_axis)
        source._opener = (path,)
        return source


def open_image(path: str | os.PathLike, lazy: bool | None = None) -> Any:
    """An image file as an array-like, read lazily where the format allows, without its
    singleton dimensions: ``io.read_image(path, lazy).array`` (``io.read_image`` also gives
    the axes the file records)."""
    return read_image(path, lazy).array
