"""``cellsam-trt segment INPUT... -o OUTDIR``: segment image files, folders and globs.

Per image the command writes one set of outputs, all or nothing (each to a temp file,
renamed into place together once all are written, so an interrupted run or a full disk
never leaves a half-written file or a half set):

- ``<name>_labels.tif``: (H, W) labels, uint16 (uint32 above 65535 cells; ``--label-dtype``),
  zlib-compressed;
- ``<name>_overlay.png`` with ``--overlay``: the image with cells tinted and outlined;
- ``<name>_cells.csv`` with ``--csv``: one row per cell: label, prompt box (x1, y1, x2, y2),
  CellFinder score (empty for none), predicted IoU, area (px), centroid (y, x).

``<name>`` depends on the input alone (``output_name``): its file name without the image
suffix (``a.ome.tif`` -> ``a``; with the suffix where its folder holds another image of that
stem: ``img.npy`` and ``img.zarr`` -> ``img.npy``, ``img.zarr``), under the sub-folder it was
found in when a folder is searched with ``--recursive``. Two inputs of one run that would share a name are refused
before any work; the run prints each input with its labels file.

Stacks (time-lapse, z-stacks: T / Z axes, from the file's axes metadata or ``--axes``) are
segmented frame by frame (``stack.segment_frames``: frames batched through the graphs) into
one ``<name>_labels.tif`` with the stack axes and Y, X (OME axes metadata), each frame
labelled 1..K_f; ``--csv`` rows then start with the frame's index on each stack axis, and
``--overlay`` shows the first frame.
Finished frames are kept in a hidden folder beside the outputs until the stack is written,
so ``--resume`` carries on from the first unfinished frame.

Axes: the file's (``io.read_image``: OME / ImageJ / tifffile TIFF metadata, OME-Zarr
``multiscales``); ``--axes`` (one letter per axis) or ``--channel-axis`` / ``--stack-axis``
for files without them. Without any, a 3-D image's smallest axis holds the channels, and
when that guess could be wrong (length <= 3) the command says so with the option to pass.

Images larger than ``--tile-size`` go through ``tiling.segment_large`` (overlapping tiles,
stitched into one label image); smaller ones through ``CellSAM.segment``. One model is
loaded for the whole run. A file that cannot be read or segmented is reported and skipped;
the exit status is 1 when any input failed. ``--resume`` skips images whose requested
outputs all exist and deletes the temp files a killed run left behind: a run killed at any
point and resumed ends with the outputs of an uninterrupted run.
"""
from __future__ import annotations

import argparse
import csv
import glob
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..io import IMAGE_SUFFIXES, LABEL_DTYPES, label_file_dtype, read_image, write_together
from ..progress import progress_bar, write_line
from ..runtime import BACKENDS

if TYPE_CHECKING:
    from ..engine.options import SegmentOptions

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ inputs

def is_image_path(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_SUFFIXES)


def _is_zarr(path: Path) -> bool:
    return path.suffix.lower() == ".zarr"


def _inside_zarr(path: Path) -> bool:
    return any(_is_zarr(parent) for parent in path.parents)


@dataclass(frozen=True)
class Input:
    """One image to segment.

    Attributes:
        path: the image file (or .zarr store).
        location: where its outputs go, relative to the output folder: its path under the
            folder argument that found it (sub-folders with ``--recursive``), else its name.
    """

    path: Path
    location: Path


def find_inputs(inputs: list[str], recursive: bool = False, exclude: Path | None = None
                ) -> tuple[list[Input], list[tuple[str, str]]]:
    """Files, folders (their image files; with ``recursive`` also sub-folders) and glob
    patterns -> (the images in order, without duplicates; inputs that matched nothing with
    the reason). Paths under ``exclude`` (the output folder) are left out."""
    found: list[Input] = []
    problems: list[tuple[str, str]] = []
    excluded = exclude.resolve() if exclude is not None else None

    def outside(p: Path) -> bool:
        return excluded is None or not p.resolve().is_relative_to(excluded)

    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir() and not _is_zarr(path):
            walker = path.rglob("*") if recursive else path.iterdir()
            files = sorted(p for p in walker if is_image_path(p) and (p.is_file() or _is_zarr(p)) and outside(p)
                           and not _inside_zarr(p.relative_to(path)))
            if not files:
                problems.append((item, f"folder holds no images ({', '.join(IMAGE_SUFFIXES)})"))
            found.extend(Input(p, p.relative_to(path)) for p in files)
        elif path.exists():
            found.append(Input(path, Path(path.name)))
        elif glob.has_magic(item):
            matches = [Path(m) for m in sorted(glob.glob(str(path), recursive=True))]
            matches = [m for m in matches if is_image_path(m) and outside(m) and not _inside_zarr(m)]
            if not matches:
                problems.append((item, "pattern matches no image files"))
            found.extend(Input(m, Path(m.name)) for m in matches)
        else:
            problems.append((item, "no such file or folder"))
    seen, unique = set(), []
    for image in found:
        key = image.path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(image)
    return unique, problems


def expand_inputs(inputs: list[str], recursive: bool = False, exclude: Path | None = None
                  ) -> tuple[list[Path], list[tuple[str, str]]]:
    """``find_inputs``, as image paths."""
    found, problems = find_inputs(inputs, recursive, exclude)
    return [image.path for image in found], problems


def output_stem(path: Path) -> str:
    """File name without its image suffix(es): ``a.ome.tif`` -> ``a``."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif") + IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def output_name(image: Input) -> str:
    """The outputs' name for one input, from that input alone (so ``--resume`` finds them
    whatever else is segmented): its location without the image suffix, e.g. ``a.ome.tif``
    -> ``a``, ``deep/x.png`` (found by ``--recursive``) -> ``deep/x``. Where the input's
    folder holds another image with the same stem (``img.npy`` beside ``img.zarr``) the name
    keeps the suffix (``img.npy``), so the two never share outputs."""
    stem = output_stem(image.location)
    if _has_namesake(image.path):
        stem = image.location.name
    return (image.location.parent / stem).as_posix()


def _has_namesake(path: Path) -> bool:
    """Whether ``path``'s folder holds another image file with its stem (case-insensitive:
    such names share a file on macOS and Windows)."""
    stem = output_stem(path).casefold()
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return False
    return any(other.name != path.name and is_image_path(other) and output_stem(other).casefold() == stem
               for other in siblings)


def output_names(images: list[Input]) -> list[str]:
    """``output_name`` of each input; ValueError, before any work, when two inputs would
    write the same outputs (``img.npy`` and ``img.zarr`` in one folder, or ``img.tif`` in
    two folders given as two inputs): names never depend on the other inputs of a run."""
    names = [output_name(image) for image in images]
    first: dict[str, Input] = {}
    for image, name in zip(images, names):
        key = name.casefold()  # case-insensitive file systems (macOS, Windows) would share the file
        if key in first:
            raise ValueError(f"{first[key].path} and {image.path} would both write {name}_labels.tif; rename one, "
                             "segment them into different -o folders, or give their common parent folder with "
                             "--recursive (outputs then keep the sub-folders)")
        first[key] = image
    return names


class ChannelView:
    """Lazy (H, W, 2) [nuclear, whole-cell] view of chosen channels of a multi-channel array.

    A missing channel reads as zeros (as ``segment`` treats a 1-channel image).
    """

    def __init__(self, array: Any, axis: int, nuclear: int | None, whole_cell: int | None) -> None:
        self.array = array
        self.axis = axis
        self.picks = (nuclear, whole_cell)
        spatial = [int(s) for i, s in enumerate(array.shape) if i != axis]
        self.shape = (spatial[0], spatial[1], 2)
        self.dtype = np.dtype(array.dtype)
        self.ndim = 3

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        spatial = list(index[:2]) + [slice(None)] * (2 - len(index[:2]))
        planes = []
        for pick in self.picks:
            if pick is None:
                planes.append(None)
                continue
            full = list(spatial)
            full.insert(self.axis, pick)
            planes.append(np.asarray(self.array[tuple(full)]))
        shape = next(p.shape for p in planes if p is not None)
        stack = np.stack([p if p is not None else np.zeros(shape, self.dtype) for p in planes], axis=-1)
        return stack[(slice(None), slice(None)) + tuple(index[2:])] if len(index) > 2 else stack


def select_channels(array: Any, channel_axis: int | None, nuclear: int | None, whole_cell: int | None) -> Any:
    """Apply ``--nuclear-channel`` / ``--whole-cell-channel`` (indices along the channel axis)."""
    shape = tuple(int(s) for s in array.shape)
    if channel_axis is not None and not -3 <= channel_axis <= 2:
        raise ValueError(f"--channel-axis {channel_axis}: expected 0, 1, 2 or negative")
    axis = (int(np.argmin(shape)) if channel_axis is None else channel_axis % 3) if len(shape) == 3 else None
    if nuclear is None and whole_cell is None:
        if axis is not None and shape[axis] > 3:
            raise ValueError(f"the image has {shape[axis]} channels on axis {axis} (shape {shape}); choose them "
                             "with --nuclear-channel and/or --whole-cell-channel")
        return array
    if axis is None:
        raise ValueError(f"--nuclear-channel/--whole-cell-channel need a multi-channel image, got shape {shape}")
    for flag, value in (("--nuclear-channel", nuclear), ("--whole-cell-channel", whole_cell)):
        if value is not None and not 0 <= value < shape[axis]:
            raise ValueError(f"{flag} {value}: the image has {shape[axis]} channels on axis {axis} (shape {shape})")
    return ChannelView(array, axis, nuclear, whole_cell)


# ----------------------------------------------------------------------------- outputs

@dataclass
class Outputs:
    labels: Path
    overlay: Path | None
    cells: Path | None
    label_dtype: str = "auto"  # the labels file's integer type (``io.label_file_dtype``)

    def all(self) -> list[Path]:
        return [p for p in (self.labels, self.overlay, self.cells) if p is not None]

    def done(self) -> bool:
        return all(p.exists() for p in self.all())


def cell_rows(labels: Any, details: Any, block: int = 4096) -> list[list]:
    """One row per label present: label, x1, y1, x2, y2, score, iou, area, centroid_y, centroid_x.

    ``labels`` (H, W) is a numpy array or an array read region by region (zarr): areas and
    centroids are summed over ``block``-sized regions, so a label image larger than memory
    works.
    """
    height, width = (int(v) for v in labels.shape)
    n = len(details.iou) + 1
    area, sum_y, sum_x = np.zeros(n, np.int64), np.zeros(n), np.zeros(n)
    for y0 in range(0, height, block):
        for x0 in range(0, width, block):
            part = np.asarray(labels[y0:y0 + block, x0:x0 + block]).astype(np.int64)
            flat = part.ravel()
            top = int(flat.max()) + 1 if flat.size else 1
            if top > n:  # labels beyond the table (not expected): grow the sums
                area, sum_y, sum_x = (np.pad(a, (0, top - n)) for a in (area, sum_y, sum_x))
                n = top
            ys, xs = np.divmod(np.arange(flat.size), part.shape[1])
            area += np.bincount(flat, minlength=n)
            sum_y += np.bincount(flat, weights=ys + y0, minlength=n)
            sum_x += np.bincount(flat, weights=xs + x0, minlength=n)
    cy = sum_y / np.maximum(area, 1)
    cx = sum_x / np.maximum(area, 1)

    def num(v, digits=2):
        return "" if not np.isfinite(v) else round(float(v), digits)

    rows = []
    for label in np.flatnonzero(area[1:]) + 1:
        k = label - 1
        box = details.boxes[k] if k < len(details.boxes) else np.full(4, np.nan)
        score = details.scores[k] if k < len(details.scores) else np.nan
        iou = details.iou[k] if k < len(details.iou) else np.nan
        rows.append([int(label), *(num(b) for b in box), num(score, 4), num(iou, 4), int(area[label]),
                     num(cy[label]), num(cx[label])])
    return rows


CSV_HEADER = ["label", "x1", "y1", "x2", "y2", "score", "iou", "area", "centroid_y", "centroid_x"]


def write_cells_csv(path: Path, rows: list[list]) -> Path:
    from ..io import atomic_write

    def write(tmp):
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(CSV_HEADER)
            writer.writerows(rows)

    return atomic_write(path, write)


# --------------------------------------------------------------------------------- run

def image_layout(image: Any, args: argparse.Namespace) -> Any:
    """The ``axes.Layout`` of an ``io.ImageFile`` under ``--axes`` / ``--channel-axis`` / ``--stack-axis``."""
    from ..axes import COMMAND_LINE, resolve_layout

    shape = image.shape
    # a 2-D image has no channel axis to choose (a singleton one was dropped on reading)
    channel_axis = args.channel_axis if len(shape) > 2 else None
    layout = resolve_layout(shape, image.axes, axes=args.axes, channel_axis=channel_axis, stack_axis=args.stack_axis,
                            names=COMMAND_LINE)
    c = layout.channel_axis
    if (layout.channels_guessed and c is not None and shape[c] > 3 and args.nuclear_channel is None
            and args.whole_cell_channel is None):
        stack_letter = "T" if "T" not in layout.axes else "Z"
        example = layout.axes[:c] + stack_letter + layout.axes[c + 1:]
        raise ValueError(f"the image has {shape[c]} channels on axis {c} (shape {shape}; the file does not label that "
                         "axis); choose them with --nuclear-channel and/or --whole-cell-channel, or, if axis "
                         f"{c} is time or z, pass --axes {example} (or --stack-axis {c})")
    return layout


def segment_options(args: argparse.Namespace) -> SegmentOptions:
    """The ``SegmentOptions`` the command's flags ask for; ValueError naming the flag."""
    from ..engine.options import SegmentOptions
    try:
        return SegmentOptions(bbox_threshold=args.bbox_threshold, normalize=True if args.clahe == "auto" else args.clahe,
                              postprocess=args.postprocess,
                              remove_boundaries=args.remove_boundaries,
                              tile_size=None if args.no_tiling else args.tile_size, overlap=args.overlap,
                              batch_size=args.batch_size)
    except ValueError as err:
        name, _, reason = str(err).partition(": ")
        flag = "--clahe" if name == "normalize" else "--" + name.replace("_", "-")
        raise ValueError(f"{flag}: {reason}") from None


def segment_one(session: Any, path: Path, outputs: Outputs, args: argparse.Namespace,
                options: SegmentOptions | None = None) -> int:
    """Segment one file (an image or a stack) and write its outputs; returns the number of cells.

    ``options``: the flags' ``segment_options(args)`` (made here when not given)."""
    options = segment_options(args) if options is None else options
    image = read_image(path)
    try:
        layout = image_layout(image, args)
        if layout.guessed:
            for message in layout.guessed:
                write_line(f"cellsam-trt segment: {path}: warning: {message}")
        if layout.is_stack:
            return _segment_stack(session, image.array, layout, outputs, args, options)
        return _segment_opened(session, image.array, outputs, args, replace(options, channel_axis=layout.channel_axis))
    finally:
        image.close()


def _segment_opened(session: Any, raw: Any, outputs: Outputs, args: argparse.Namespace,
                    options: SegmentOptions) -> int:
    from ..engine.core import NoCellsWarning
    from ..engine.source import ImageSource
    from ..io import write_labels_tiff
    from ..large.stitch import details_from_segmentation
    from ..large.tiling import segment_large, streams_by_default
    from .pictures import overlay, write_png

    image = select_channels(raw, options.channel_axis, args.nuclear_channel, args.whole_cell_channel)
    axis = None if isinstance(image, ChannelView) else options.channel_axis
    options = replace(options, channel_axis=axis)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoCellsWarning)  # an empty image is a result, reported in the summary
        if options.tile_size is None:
            source = ImageSource(image, axis)
            full = source.read(0, source.height, 0, source.width)
            labels, seg = session.segment(full, return_details=True, options=replace(options, channel_axis=-1))
            details = details_from_segmentation(labels, seg)
        else:
            shape = ImageSource(image, axis).shape
            if max(shape) > options.tile_size:
                # a tiled image takes minutes on a CPU: a bar over its tiles (under the images' bar)
                options = replace(options, progress=not args.no_progress)
            if streams_by_default(*shape, options.tile_size, options.overlap, options.batch_size,
                                  options.normalize):
                return _segment_streamed(session, image, outputs, options)
            labels, details = segment_large(session, image, return_details=True, stream=False, options=options)
    # one set, all or nothing (a full disk leaves no table without its labels); labels last
    with write_together():
        if outputs.cells is not None:
            write_cells_csv(outputs.cells, cell_rows(labels, details))
        if outputs.overlay is not None:
            source = ImageSource(image, axis)
            write_png(outputs.overlay, overlay(source.read(0, source.height, 0, source.width), labels))
        write_labels_tiff(outputs.labels, labels, outputs.label_dtype)
    return int(np.count_nonzero(np.bincount(labels.ravel())[1:]))


def _segment_stack(session: Any, array: Any, layout: Any, outputs: Outputs, args: argparse.Namespace,
                   options: SegmentOptions) -> int:
    """A stack frame by frame: each finished frame's labels (and cell rows) saved in a hidden
    folder beside the outputs (``--resume`` skips them), then one label stack written."""
    import shutil
    from functools import partial

    from ..engine.core import NoCellsWarning
    from ..io import atomic_write, write_label_stack_tiff
    from ..stack import frame_indices, read_frame, segment_frames

    indices = frame_indices(layout)
    frames_dir = outputs.labels.parent / f".{outputs.labels.name}.frames"
    if not args.resume:
        shutil.rmtree(frames_dir, ignore_errors=True)
    frames_dir.mkdir(parents=True, exist_ok=True)
    for stale in frames_dir.glob(".*"):  # temp files of a killed run
        stale.unlink(missing_ok=True)
    stack_letters = "".join(layout.axes[a] for a in layout.stack_axes)

    def frame_file(index: tuple[int, ...], suffix: str) -> Path:
        return frames_dir / ("frame_" + "_".join(f"{i:06d}" for i in index) + suffix)

    def read(index: tuple[int, ...]) -> np.ndarray:
        frame = read_frame(array, layout, index)
        picked = select_channels(frame, 2 if frame.ndim == 3 else None, args.nuclear_channel, args.whole_cell_channel)
        return picked[:, :] if isinstance(picked, ChannelView) else frame

    first = read(indices[0])  # bad channel options fail here, before any work
    todo = [i for i in indices
            if not (frame_file(i, ".npy").exists() and (outputs.cells is None or frame_file(i, ".csv").exists()))]
    bar = progress_bar(len(indices), outputs.labels.name, "frame", initial=len(indices) - len(todo), leave=False,
                       disable=args.no_progress)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoCellsWarning)  # an empty frame is a result
            for index, labels, details in segment_frames(
                    session, read, todo, return_details=outputs.cells is not None, options=options):
                if outputs.cells is not None:
                    rows = [[*index, *row] for row in cell_rows(labels, details)]
                    atomic_write(frame_file(index, ".csv"), partial(_write_rows, rows=rows))
                # the largest label picks the file's integer type: kept beside the frame, so
                # the stack is not read twice to learn it (saved first: a frame is done when
                # its .npy is there)
                atomic_write(frame_file(index, ".max"), partial(_write_text, text=str(int(labels.max(initial=0)))))
                atomic_write(frame_file(index, ".npy"), partial(np.save, arr=labels))
                bar.update(1)
    finally:
        bar.close()

    def largest_label(index: tuple[int, ...]) -> int:
        saved = frame_file(index, ".max")
        if saved.exists():
            return int(saved.read_text())
        # a frame saved by an older run: read its labels once more
        return int(np.load(frame_file(index, ".npy"), mmap_mode="r").max(initial=0))

    def write_table(tmp):
        with open(tmp, "w", newline="") as fh:
            csv.writer(fh).writerow([a.lower() for a in stack_letters] + CSV_HEADER)
            for index in indices:
                fh.write(frame_file(index, ".csv").read_text())

    cells = 0

    def frames():
        nonlocal cells
        for index in indices:
            labels = np.load(frame_file(index, ".npy"))
            cells += int(np.count_nonzero(np.bincount(labels.ravel())[1:]))
            yield labels

    # one set, all or nothing, labels last: with --resume an interrupted stack is redone from
    # its saved frames, which stay until the set is in place
    with write_together():
        if outputs.cells is not None:
            atomic_write(outputs.cells, write_table)
        if outputs.overlay is not None:  # the first frame
            from .pictures import overlay, write_png

            write_png(outputs.overlay, overlay(first, np.load(frame_file(indices[0], ".npy"))))
        largest = max(largest_label(index) for index in indices)
        write_label_stack_tiff(outputs.labels, frames(), layout.stack_shape + layout.plane_shape,
                               stack_letters + "YX", dtype=label_file_dtype(largest, outputs.label_dtype))
    shutil.rmtree(frames_dir, ignore_errors=True)
    return cells


def _write_text(path: str, *, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


def _write_rows(path: str, *, rows: list[list]) -> None:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def _segment_streamed(session: Any, image: Any, outputs: Outputs, options: SegmentOptions) -> int:
    """A large image tile by tile: scratch zarr beside the outputs, labels TIFF written tile by
    tile from it, cell table summed block by block; memory bounded by a few tiles."""
    import shutil
    import tempfile

    from ..io import write_labels_tiff_tiled
    from ..large.tiling import segment_large

    if outputs.overlay is not None:
        log.warning("%s: no overlay PNG for an image this large (written tile by tile); use the labels TIFF",
                    outputs.labels.name)
    outputs.labels.parent.mkdir(parents=True, exist_ok=True)
    # beside the outputs: the scratch stores are about as large as the labels, on that disk
    scratch = tempfile.mkdtemp(prefix=f".{outputs.labels.name}.", dir=outputs.labels.parent)
    try:
        labels, details = segment_large(session, image, return_details=True, output=os.path.join(scratch, "run.zarr"),
                                        options=options)
        with write_together():  # one set, all or nothing, labels last
            if outputs.cells is not None:
                write_cells_csv(outputs.cells, cell_rows(labels, details))
            write_labels_tiff_tiled(outputs.labels, labels, max_label=details.num_cells,
                                    label_dtype=outputs.label_dtype)
        return details.num_cells
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    outdir = Path(args.outdir)
    # inputs first: a mistyped path answers before the model stack is imported
    images, problems = find_inputs(args.inputs, args.recursive, exclude=outdir)
    failed: list[tuple[str, str]] = list(problems)
    for item, reason in problems:
        print(f"cellsam-trt segment: {item}: {reason}", file=sys.stderr)
    if not images:
        print(f"cellsam-trt segment: no images to segment ({len(problems)} inputs matched nothing)", file=sys.stderr)
        return 1
    names = output_names(images)  # two inputs for one set of outputs fail here, before any work
    options = segment_options(args)  # bad flags fail here, before any work
    check_output_folder(outdir)  # and an output that cannot be written, before the first image
    from ..api import CellSAM
    plan = [(image.path, Outputs(outdir / f"{s}_labels.tif", outdir / f"{s}_overlay.png" if args.overlay else None,
                                 outdir / f"{s}_cells.csv" if args.csv else None, args.label_dtype))
            for image, s in zip(images, names)]
    print(f"{len(plan)} {_plural(len(plan), 'image')} -> {outdir}:")
    for path, outputs in plan:
        print(f"  {path} -> {outputs.labels.relative_to(outdir)}"
              + (" (done)" if args.resume and outputs.done() else ""))
    todo = [(p, o) for p, o in plan if not (args.resume and o.done())]
    skipped = len(plan) - len(todo)
    if args.resume:
        # a killed run leaves its in-flight temp files; they are never outputs, so drop them
        from ..io import remove_stale_temp_files

        stale = [t for _, o in todo for out in o.all() for t in remove_stale_temp_files(out)]
        if stale:
            log.info("removed %d temp files of an interrupted run", len(stale))

    t0 = time.perf_counter()
    done, cells, empty = 0, 0, 0
    if todo:
        dirs = {k: v for k, v in (("onnx_dir", args.onnx_dir), ("engine_dir", args.engine_dir)) if v is not None}
        session = CellSAM.from_checkpoint(args.checkpoint, backend=args.backend, device=args.device,
                                          cache=args.cache_dir, build=False if args.no_build else None, **dirs)
        log.info("backend %s on %s", session.backend.name, session.backend.device)
        bar = progress_bar(len(todo), "segmenting", "image", disable=args.no_progress)
        for path, outputs in todo:
            bar.set_postfix_str(path.name, refresh=False)
            try:
                n = segment_one(session, path, outputs, args, options)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as err:  # one bad file must not stop the batch
                reason = f"{type(err).__name__}: {err}" if not isinstance(err, (ValueError, OSError)) else str(err)
                failed.append((str(path), reason))
                write_line(f"cellsam-trt segment: {path}: FAILED: {reason}")
                if args.verbose:
                    log.exception("%s failed", path)
                continue
            finally:
                bar.update(1)
            done += 1
            cells += n
            empty += n == 0
        bar.close()
    seconds = time.perf_counter() - t0

    given = len(plan) + len(problems)  # every input counts, those that matched nothing too
    print(f"segmented {done} of {given} {_plural(given, 'image')} in {seconds:.1f} s: {cells} {_plural(cells, 'cell')}"
          + (f", {empty} {_plural(empty, 'image')} without cells" if empty else "")
          + (f"; skipped {skipped} already done (--resume)" if skipped else "")
          + (f"; {len(failed)} failed" if failed else "")
          + f"; outputs in {outdir}")
    if failed:
        print("failed:", file=sys.stderr)
        for item, reason in failed:
            print(f"  {item}: {reason}", file=sys.stderr)
        return 1
    return 0


def check_output_folder(folder: Path) -> None:
    """Make ``folder`` (and its parents) and check that files can be written in it; an OSError
    naming the folder and the reason otherwise (an existing file, a path under a file, no
    permission), so that no image is segmented for outputs that cannot be written."""
    if folder.exists() and not folder.is_dir():
        raise OSError(f"-o: {folder} is a file, not a folder; give a folder for the outputs")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a parent is a file, a read-only file system, no permission
        raise OSError(f"-o: cannot make the output folder {folder} ({err.strerror or err})") from None
    probe = folder / f".cellsam-trt-write-check-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OSError(f"-o: cannot write in {folder} ({err.strerror or err})") from None


def _plural(count: int, noun: str) -> str:
    return noun if count == 1 else noun + "s"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "segment", help="segment image files, folders or globs; write label TIFFs (and overlays, cell tables)",
        description="Segment images; per image write <name>_labels.tif (and with --overlay / --csv an overlay PNG "
                    "and a per-cell table). Images larger than --tile-size are tiled and stitched.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files (.tif/.tiff/OME-TIFF, .png, .jpg, .npy, .zarr), folders or glob patterns")
    p.add_argument("-o", "--outdir", required=True, help="output folder (created if needed)")
    p.add_argument("--checkpoint", help="CellSAM weights (default: ~/.deepcell/models/cellsam_v1.2/cellsam_general.pt)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="engine kind (default auto: TensorRT on a GPU where engines build, else ONNX Runtime, "
                        "else torch); graphs and engines come from --onnx-dir / --engine-dir, else from the "
                        "artifact cache, made on first use")
    p.add_argument("--onnx-dir", help="export folder of `cellsam-trt export` (backends onnxruntime, auto)")
    p.add_argument("--engine-dir", help="engine folder of `cellsam-trt build-engines` (backends tensorrt, auto)")
    p.add_argument("--cache-dir", help="artifact cache folder (default: $CELLSAM_TRT_CACHE or the user cache folder)")
    p.add_argument("--label-dtype", choices=LABEL_DTYPES, default="auto",
                   help="integer type of the label TIFFs: auto (default: uint16, uint32 above 65535 cells; "
                        "uint16 files carry ImageJ metadata for Fiji), uint16, uint32, or int32")
    p.add_argument("--no-build", action="store_true",
                   help="never export graphs or build engines here: use what the cache or the folders hold")
    p.add_argument("--device", help="torch device (default: cuda if available)")
    p.add_argument("--axes", metavar="LETTERS",
                   help="what each axis of the image is, one letter per axis after singleton axes are dropped: "
                        "T (time), Z (depth), C (channels), Y, X, e.g. TYX, ZCYX (default: the file's axes "
                        "metadata, OME / ImageJ TIFF or OME-Zarr; else channels on the smallest axis)")
    p.add_argument("--stack-axis", type=int, metavar="I",
                   help="axis I is a stack axis (time or z): each frame along it is segmented on its own")
    p.add_argument("--channel-axis", type=int,
                   help="axis of the channels (default: from the file's axes, else the smallest axis)")
    p.add_argument("--nuclear-channel", type=int, metavar="I", help="index of the nuclear channel on the channel axis")
    p.add_argument("--whole-cell-channel", type=int, metavar="I",
                   help="index of the whole-cell (membrane / cytoplasm) channel on the channel axis")
    p.add_argument("--bbox-threshold", type=float, help="CellFinder confidence weight (default 0.4)")
    p.add_argument("--tile-size", type=int, default=1024, help="tile side for images larger than it (default 1024)")
    p.add_argument("--overlap", type=int, default=128, help="minimum tile overlap in px (default 128)")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per encoder / CellFinder call (default 4)")
    p.add_argument("--no-tiling", action="store_true", help="squash every image to the model input, however large")
    p.add_argument("--clahe", default="auto", choices=("auto", "skimage", "opencv", "torch"),
                   help="CLAHE implementation of the normalisation: auto (default: the released algorithm, on the "
                        "GPU by its torch port where the model runs on CUDA, else scikit-image), skimage (on the "
                        "host, bit-identical to the released code), torch (the port, on the model's device) or "
                        "opencv (2-3x faster on the CPU, not bit-identical; `cellsam-trt bench` reports the deviation)")
    p.add_argument("--postprocess", action="store_true", help="the released morphological clean-up")
    p.add_argument("--remove-boundaries", action="store_true", help="zero a one-pixel outline around each cell")
    p.add_argument("--overlay", action="store_true", help="also write <name>_overlay.png")
    p.add_argument("--csv", action="store_true", help="also write <name>_cells.csv (one row per cell)")
    p.add_argument("--resume", action="store_true", help="skip images whose requested outputs all exist")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders of folder inputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
