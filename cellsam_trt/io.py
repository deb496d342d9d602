"""Reading images and writing results (atomic writes: temp file + rename)."""
from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def _process_umask() -> int:
    # read once at import: os.umask can only be read by setting it, which is not thread-safe
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _process_umask()


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        # mkstemp makes the file private (0600); outputs get the permissions of any new file
        os.chmod(tmp, 0o666 & ~_UMASK)
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Delete temp files that ``atomic_write`` left beside ``path`` when its process was killed.

    Only names ``atomic_write`` makes for this exact ``path`` are touched; returns them.
    """
    path = Path(path)
    stale = sorted(path.parent.glob(f".{glob.escape(path.name)}.*{glob.escape(path.suffix)}"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def write_labels_tiff(path: str | os.PathLike, labels: np.ndarray) -> Path:
    """Labels (H, W) integer -> compressed TIFF."""
    import tifffile

    return atomic_write(path, lambda tmp: tifffile.imwrite(tmp, labels, compression="zlib"))


def write_labels_tiff_tiled(path: str | os.PathLike, labels: Any, tile: int = 1024) -> Path:
    """Labels (H, W) from an array read region by region (a zarr array) -> tiled, compressed
    BigTIFF, one tile in memory at a time.

    Args:
        labels: (H, W) integer array-like with numpy slicing.
        tile: tile side, a multiple of 16.
    """
    import tifffile

    height, width = (int(v) for v in labels.shape)
    dtype = np.dtype(labels.dtype)

    def tiles():
        for y0 in range(0, height, tile):
            for x0 in range(0, width, tile):
                part = np.asarray(labels[y0:y0 + tile, x0:x0 + tile])
                if part.shape != (tile, tile):  # edge tiles, zero-padded to the tile shape
                    part = np.pad(part, ((0, tile - part.shape[0]), (0, tile - part.shape[1])))
                yield np.ascontiguousarray(part, dtype=dtype)

    return atomic_write(path, lambda tmp: tifffile.imwrite(tmp, tiles(), shape=(height, width), dtype=dtype,
                                                           tile=(tile, tile), compression="zlib", bigtiff=True))


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(H, W[, C]) image + (H, W) labels -> (H, W, 3) uint8 RGB with cells tinted and outlined."""
    from skimage.color import label2rgb
    from skimage.segmentation import find_boundaries

    from .preprocess import format_image

    planes = format_image(image)
    shown = planes[..., 1:].max(axis=-1) if planes[..., 1].any() else planes[..., 2]
    lo, hi = np.percentile(shown, [1, 99.5])
    gray = np.clip((shown - lo) / max(hi - lo, 1e-12), 0, 1)
    rgb = label2rgb(labels, image=gray, alpha=0.3, bg_label=0, image_alpha=1.0)
    rgb[find_boundaries(labels, mode="inner")] = (1.0, 1.0, 0.0)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    import cv2

    def write(tmp):
        if not cv2.imwrite(tmp, np.ascontiguousarray(rgb[..., ::-1])):
            raise OSError(f"could not write PNG {path}")

    return atomic_write(path, write)
