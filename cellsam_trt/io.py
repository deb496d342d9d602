"""Reading images (with the axes their files record) and writing results (atomic writes:
temp file + rename)."""
from __future__ import annotations

import contextlib
import contextvars
import glob
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def _process_umask() -> int:
    # read once at import: os.umask can only be read by setting it, which is not thread-safe
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _process_umask()

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ reading

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npy", ".zarr")

LAZY_TIFF_BYTES = 256 << 20

# Axis letters of ``ImageFile.axes``: T time, Z depth (both stack axes), C channels, Y and X
# the plane; "?" an axis the file does not label (or labels with a letter we do not use,
# such as tifffile's Q, I or P).
UNKNOWN_AXIS = "?"


@dataclass
class ImageFile:
    """An image read from a file, with the axes the file records.

    Attributes:
        array: array-like (numpy array, memory map, zarr array or a lazy view with numpy
            slicing) without singleton dimensions.
        axes: one letter per dimension of ``array`` from "TZCYX?" ("?" where the file
            does not say), or None when the file records no axes at all (.npy, plain zarr).
        path: the file.
    """

    array: Any
    axes: str | None
    path: Path

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape)

    def close(self) -> None:
        if hasattr(self.array, "close"):
            self.array.close()


def read_image(path: str | os.PathLike, lazy: bool | None = None) -> ImageFile:
    """An image file as an array-like with its axes, read lazily where the format allows.

    TIFF / OME-TIFF / ImageJ TIFF: the first series; axes from tifffile's ``series.axes``
    where the file records them (OME-XML, ImageJ description, tifffile's shaped
    description with axes; RGB samples as C). Above 256 MiB (or with ``lazy=True``)
    tifffile's zarr view, which reads tiles or strips on demand (``close()`` it when done;
    it also closes when collected), else read whole. ``.npy``: memory-mapped, no axes.
    ``.zarr``: the array, or in a group the OME-Zarr (NGFF) full-resolution level with its
    ``multiscales`` axes, else the array named "0" / the only array. PNG / JPEG: read whole
    with OpenCV (colour as RGB, axes "YXC"). Singleton dimensions are dropped with their
    axis letters (e.g. OME's T and Z of size 1).

    Raises:
        ValueError: unknown suffix, or a file that cannot be read as an image.
        FileNotFoundError: no such file.
    """
    p = Path(path)
    name = p.name.lower()
    if not p.exists():
        raise FileNotFoundError(f"no such image: {p}")
    axes: str | None = None
    if p.is_file() and p.stat().st_size == 0:
        raise ValueError(f"cannot read image {p}: the file is empty (0 bytes)")
    try:
        if name.endswith((".tif", ".tiff")):
            import tifffile

            with tifffile.TiffFile(str(p)) as tif:
                if not tif.series or not tif.series[0].size:
                    # a TIFF header without a readable image (tifffile would return shape (0,))
                    raise ValueError("the file holds no image (truncated or damaged TIFF: no readable page)")
                nbytes = tif.series[0].nbytes
                axes = _tiff_axes(tif)
            if lazy or (lazy is None and nbytes > LAZY_TIFF_BYTES):
                arr = _LazyTiff(str(p))
            else:
                arr = tifffile.imread(str(p))
        elif name.endswith(".npy"):
            arr = np.load(str(p), mmap_mode="r", allow_pickle=False)
        elif name.endswith(".zarr"):
            arr, axes = _open_zarr(p)
        elif name.endswith((".png", ".jpg", ".jpeg")):
            import cv2

            arr = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
            if arr is None:
                raise ValueError("OpenCV cannot decode it")
            if arr.ndim == 3 and arr.shape[2] >= 3:
                arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB if arr.shape[2] == 4 else cv2.COLOR_BGR2RGB)
            axes = "YXC"[:arr.ndim]
        else:
            raise ValueError(f"unknown image type (expected one of {', '.join(IMAGE_SUFFIXES)})")
    except ValueError as err:
        raise ValueError(f"cannot read image {p}: {_first_line(err)}{_damaged(name, err)}") from None
    except Exception as err:  # decoders raise many types for corrupt files
        raise ValueError(f"cannot read image {p}: {type(err).__name__}: {_first_line(err)}{_damaged(name, err)}"
                         ) from None
    if axes is not None and len(axes) != len(arr.shape):
        log.warning("%s: axes %r do not match the array's shape %s; ignored", p, axes, tuple(arr.shape))
        axes = None
    arr, axes = _squeeze(arr, axes)
    return ImageFile(arr, axes, p)


def _first_line(err: BaseException) -> str:
    # some decoders' messages run over several lines (tifffile repeats the page listing)
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _damaged(name: str, err: BaseException) -> str:
    """What a TIFF decoder's complaint about the bytes means for the user."""
    text = str(err)
    if name.endswith((".tif", ".tiff")) and ("failed to read" in text or "corrupted" in text or "invalid" in text):
        return " (the TIFF file is truncated or damaged)"
    return ""


def _tiff_axes(tif: Any) -> str:
    """Axis letters of the first series, "?" where the file itself does not record the axis.

    OME and ImageJ files record their axes; tifffile's own "shaped" files only when they
    were written with ``metadata={"axes": ...}``. Without that, tifffile still names axes
    from the TIFF structure (S for samples, Q / I for pages, Y and X for a page's rows and
    columns), which say how the writer laid the pixels out, not what they are: a
    (192, 192, 2) array is stored as 192 pages of 192 x 2 pixels, and a (3, 192, 192) one
    as planar RGB because the writer defaults to RGB for 3 planes. Such axes are "?", so
    that ``axes.resolve_layout`` reads them as it reads a plain array (the smallest axis
    holds the channels, with a warning where that could be wrong). Only interleaved RGB
    samples count as channels (an RGB camera image; no writer interleaves time points),
    and where every unknown axis can only be Y or X (a plain 2-D page) it is named so.
    """
    import tifffile

    series = tif.series[0]
    page = series.keyframe
    explicit = series.kind in ("ome", "imagej") or (
        series.kind == "shaped" and any("axes" in meta for meta in (tif.shaped_metadata or ())))
    interleaved_rgb = (page.photometric == tifffile.PHOTOMETRIC.RGB
                       and page.planarconfig == tifffile.PLANARCONFIG.CONTIG)
    letters = []
    for letter in series.axes.upper():
        if explicit and letter in "TZCYX":
            letters.append(letter)
        elif letter == "S" and (explicit or interleaved_rgb):
            letters.append("C")
        else:
            letters.append(UNKNOWN_AXIS)
    if letters.count(UNKNOWN_AXIS) == 2 and not {"Y", "X"} & set(letters):
        # nothing else they could be: the plane, in order
        first = letters.index(UNKNOWN_AXIS)
        letters[first] = "Y"
        letters[letters.index(UNKNOWN_AXIS)] = "X"
    return "".join(letters)


def _open_zarr(p: Path) -> tuple[Any, str | None]:
    """A .zarr store: (array, axes from OME-Zarr ``multiscales`` or None)."""
    import zarr

    node = zarr.open(str(p), mode="r")
    if hasattr(node, "shape"):
        return node, None
    attrs = dict(node.attrs)
    multiscales = attrs.get("multiscales") or dict(attrs.get("ome") or {}).get("multiscales")
    if multiscales:
        first = multiscales[0]
        arr = node[first["datasets"][0]["path"]]
        names = [a["name"] if isinstance(a, dict) else a for a in first.get("axes") or ()]
        axes = "".join(n.upper() if str(n).upper() in "TZCYX" and len(str(n)) == 1 else UNKNOWN_AXIS
                       for n in names) or None
        return arr, axes
    names = [k for k, v in node.arrays()]
    if "0" in names:
        return node["0"], None
    if len(names) == 1:
        return node[names[0]], None
    raise ValueError(f"zarr group {p} holds {len(names)} arrays {names}; expected one (or one named '0')")


class _LazyTiff:
    """The first series of a TIFF as a lazily read array (tifffile's zarr view)."""

    def __init__(self, path: str) -> None:
        import tifffile
        import zarr

        self.store = tifffile.imread(path, aszarr=True)
        arr = zarr.open(self.store, mode="r")
        if not hasattr(arr, "shape"):  # multi-resolution: the full-resolution level
            arr = arr["0"]
        self.array = arr
        self.shape = tuple(arr.shape)
        self.dtype = arr.dtype
        self.ndim = len(self.shape)

    def __getitem__(self, index):
        return np.asarray(self.array[index])

    def close(self) -> None:
        store, self.store = getattr(self, "store", None), None
        if store is not None:
            store.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class _Squeezed:
    """Lazy view of an array-like without its singleton dimensions."""

    def __init__(self, array: Any, keep: list[int]) -> None:
        self.array = array
        self.keep = keep
        self.shape = tuple(int(array.shape[i]) for i in keep)
        self.dtype = array.dtype
        self.ndim = len(self.shape)

    def close(self) -> None:
        if hasattr(self.array, "close"):
            self.array.close()

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        full: list[Any] = [0] * len(self.array.shape)
        for axis, item in zip(self.keep, index):
            full[axis] = item
        for axis in self.keep[len(index):]:
            full[axis] = slice(None)
        return np.asarray(self.array[tuple(full)])


def _squeeze(arr: Any, axes: str | None = None) -> tuple[Any, str | None]:
    """(array without its singleton dimensions, the axis letters of the kept ones)."""
    shape = tuple(int(s) for s in arr.shape)
    keep = [i for i, s in enumerate(shape) if s != 1]
    kept_axes = None if axes is None else "".join(axes[i] for i in keep)
    if len(keep) == len(shape):
        return arr, axes
    if isinstance(arr, np.ndarray):
        return arr.reshape([shape[i] for i in keep]), kept_axes
    return _Squeezed(arr, keep), kept_axes


# ------------------------------------------------------------------------------ writing


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file.

    Inside ``write_together()`` the rename waits for the end of the block, with the other
    files of the set. An OSError of the write (a full disk, no permission) names ``path``
    and the system's reason.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    pending = _OUTPUT_SET.get()
    try:
        # mkstemp makes the file private (0600); outputs get the permissions of any new file
        os.chmod(tmp, 0o666 & ~_UMASK)
        try:
            write(tmp)
        except OSError as err:
            if not err.strerror:
                raise
            # the writers' own errors (tifffile's, the csv module's) name the temp file or nothing
            raise OSError(err.errno, f"cannot write {path}: {err.strerror}") from err
        if pending is None:
            os.replace(tmp, path)
        else:
            pending.append((tmp, path))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


_OUTPUT_SET: contextvars.ContextVar[list[tuple[str, Path]] | None] = contextvars.ContextVar("output_set", default=None)


@contextlib.contextmanager
def write_together() -> Iterator[None]:
    """The files ``atomic_write`` writes inside the block are one set, all or nothing: each is
    written to its temp file, and only when the block ends without an error are they renamed
    into place, in the order they were written (write the file that marks a set as done
    last). On an error every temp file of the set is removed, so no half set is left (files
    of an earlier set at those paths stay as they were), and the error is raised.

    >>> with write_together():                                   # doctest: +SKIP
    ...     write_cells_csv(table_path, rows)
    ...     write_labels_tiff(labels_path, labels)
    """
    if _OUTPUT_SET.get() is not None:  # nested: the outer set decides
        yield
        return
    pending: list[tuple[str, Path]] = []
    token = _OUTPUT_SET.set(pending)
    try:
        yield
    except BaseException:
        for tmp, _ in pending:
            Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        _OUTPUT_SET.reset(token)
    done: list[Path] = []
    try:
        for tmp, path in pending:
            os.replace(tmp, path)
            done.append(path)
    except BaseException:
        # a rename failed: take the set's renamed files back out, so that none of it is left
        for path in done:
            path.unlink(missing_ok=True)
        for tmp, _ in pending[len(done):]:
            Path(tmp).unlink(missing_ok=True)
        raise


def write_public(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically write ``data`` (``atomic_write``), readable as the umask allows."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Delete temp files that ``atomic_write`` left beside ``path`` when its process was killed.

    Only names ``atomic_write`` makes for this exact ``path`` are touched; returns them.
    """
    path = Path(path)
    stale = sorted(path.parent.glob(f".{glob.escape(path.name)}.*{glob.escape(path.suffix)}"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


LABEL_DTYPES = ("auto", "uint16", "uint32", "int32")


def label_file_dtype(max_label: int, requested: str = "auto") -> np.dtype:
    """The integer type a label file is written in: "auto" (default) the smallest unsigned type
    that holds ``max_label`` (uint16, uint32 above 65535 labels: what Fiji and cellpose read;
    ImageJ has no signed 32-bit type), or the ``requested`` one, checked to hold the labels."""
    if requested not in LABEL_DTYPES:
        raise ValueError(f"label dtype: expected one of {LABEL_DTYPES}, got {requested!r}")
    dtype = np.dtype(("uint16" if max_label <= 65535 else "uint32") if requested == "auto" else requested)
    if max_label > np.iinfo(dtype).max:
        raise ValueError(f"label dtype: {max_label} labels do not fit in {dtype.name}; use uint32 or auto")
    return dtype


def write_labels_tiff(path: str | os.PathLike, labels: np.ndarray, dtype: str = "auto") -> Path:
    """Labels (H, W) integer -> compressed TIFF in ``label_file_dtype`` (uint16 by default);
    uint16 files carry ImageJ metadata, so Fiji opens them as a 16-bit label image."""
    import tifffile

    labels = np.asarray(labels)
    kind = label_file_dtype(int(labels.max()) if labels.size else 0, dtype)
    data = labels.astype(kind, copy=False)
    imagej = kind == np.uint16  # ImageJ's hyperstacks hold 8/16-bit integers and float32, not 32-bit integers
    return atomic_write(path, lambda tmp: tifffile.imwrite(tmp, data, imagej=imagej, compression="zlib",
                                                           metadata={"axes": "YX"} if imagej else None))


def write_label_stack_tiff(path: str | os.PathLike, frames: Any, shape: tuple[int, ...], axes: str,
                           dtype: Any = np.uint16) -> Path:
    """A label stack -> compressed OME-TIFF with its axes, one frame in memory at a time.

    Args:
        frames: iterable of (H, W) integer arrays in C order of the stack axes.
        shape: (stack sizes..., H, W).
        axes: one letter per entry of ``shape``, e.g. "TYX", "TZYX".
        dtype: the file's integer type (``label_file_dtype`` of the largest label).
    """
    import tifffile

    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    pages = (np.ascontiguousarray(f, dtype=dtype) for f in frames)
    return atomic_write(path, lambda tmp: tifffile.imwrite(
        tmp, pages, shape=shape, dtype=dtype, ome=True, metadata={"axes": axes}, compression="zlib",
        bigtiff=nbytes > (2 << 30) - (64 << 20)))


def write_labels_tiff_tiled(path: str | os.PathLike, labels: Any, tile: int = 1024, *,
                            max_label: int | None = None, label_dtype: str = "auto") -> Path:
    """Labels (H, W) from an array read region by region (a zarr array) -> tiled, compressed
    BigTIFF, one tile in memory at a time.

    Args:
        labels: (H, W) integer array-like with numpy slicing.
        tile: tile side, a multiple of 16.
        max_label, label_dtype: the largest label (None: as many as the array's type holds)
            and the file's type (``label_file_dtype``).
    """
    import tifffile

    height, width = (int(v) for v in labels.shape)
    # the smallest unsigned type the array's own type calls for (uint16 up to 65535 labels)
    dtype = label_file_dtype(max_label if max_label is not None else np.iinfo(labels.dtype).max, label_dtype)

    def tiles():
        for y0 in range(0, height, tile):
            for x0 in range(0, width, tile):
                part = np.asarray(labels[y0:y0 + tile, x0:x0 + tile])
                if part.shape != (tile, tile):  # edge tiles, zero-padded to the tile shape
                    part = np.pad(part, ((0, tile - part.shape[0]), (0, tile - part.shape[1])))
                yield np.ascontiguousarray(part, dtype=dtype)

    return atomic_write(path, lambda tmp: tifffile.imwrite(tmp, tiles(), shape=(height, width), dtype=dtype,
                                                           tile=(tile, tile), compression="zlib", bigtiff=True))
