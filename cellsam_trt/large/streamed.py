"""The tiled run as tasks with bounded memory: labels to zarr, on any runner.

``segment_streamed`` runs the phases of ``plan.TiledRun`` (same tiles, same batches, same
stitching rule, so the labels equal the in-memory ``segment_large``'s) as tasks of a
runner (``workers``): dask.distributed workers (``dask.segment_dask``) or this process
(``tiling.segment_large`` above its memory limit):

    1. normalisation statistics: one task per block, merged on the client (a few MB)
    2. CLAHE per block (with its context) -> scratch zarr, uint16
    3. tile batches -> each worker's CellSAM session (loaded ONCE per worker by a
       ``WorkerPlugin``) -> kept-cell tile labels to scratch zarr, cell tables to the client
    4. stitching per output chunk (reads the tiles that overlap it) -> ``labels`` zarr
    5. only if some ids lost all their pixels: renumbering per chunk

Every task writes whole zarr chunks of its own, so workers never write the same chunk, and
nothing bigger than a few tiles is ever held in memory: a slide larger than RAM works.
Dask does the scheduling; there is no scheduler here.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.options import SegmentOptions
from ..engine.source import ImageSource
from ..modeling.config import InferenceConfig
from .grid import TileGrid, regions
from .normalize import (
    ChannelNorm,
    channel_statistics,
    clahe_region,
    finish_normalization,
    finish_statistics,
    merge_statistics,
    region_extremes,
    top_count,
)
from .plan import TiledRun
from .stitch import TiledDetails, TileResult, compaction_table, label_dtype, paint_tile
from .workers import (
    runner,
    worker_session,
)

log = logging.getLogger(__name__)

SCRATCH = "_scratch"


# ------------------------------------------------------------------------------- tasks

def _open(path: str, mode: str = "r"):
    import zarr

    return zarr.open_array(path, mode=mode)


def _task_statistics(run: TiledRun, region: tuple[int, int, int, int], keep: int):
    return channel_statistics(run.source.read(*region), keep)


def _task_clahe(run: TiledRun, region: tuple[int, int, int, int], norm, path: str):
    y0, y1, x0, x1 = region
    part = clahe_region(run.source, norm, y0, y1, x0, x1, run.options.clahe)
    _open(path, "r+")[y0:y1, x0:x1] = part
    return region_extremes(part)


def save_table(path: str | os.PathLike, r: TileResult) -> None:
    """One tile's cell table (everything but its labels) as .npz (``TileResult.save``)."""
    r.save(path)


def load_table(path: str | os.PathLike) -> TileResult:
    """The table ``save_table`` wrote (``TileResult.load``; ``labels`` is None)."""
    return TileResult.load(path)


def _table_path(tables_dir: str, index: int) -> str:
    return os.path.join(tables_dir, f"tile-{index:06d}.npz")


def _task_tiles(plugin: str, run: TiledRun, batch: list[int], norm, clahe_path: str | None, tiles_path: str,
                tables_dir: str) -> list[TileResult]:
    read_tile = run.reader(None if clahe_path is None else _open(clahe_path), norm)
    results = run.segment_tiles(worker_session(plugin), batch, read_tile)
    tiles = _open(tiles_path, "r+")
    for r in results:
        if r.count:
            tiles[r.index] = r.labels
        r.labels = None  # only the small table goes back
        # after the labels: a table on disk means the tile is done (resume=True reuses it)
        r.save(_table_path(tables_dir, r.index))
    return results


def _task_stitch(grid: TileGrid, tiles_path: str, labels_path: str, offsets: dict[int, int],
                 luts: dict[int, np.ndarray], region: tuple[int, int, int, int], remove_boundaries: bool,
                 dtype: str) -> np.ndarray:
    y0, y1, x0, x1 = region
    # the outline of a pixel depends on its left and lower neighbours
    ey1 = min(grid.height, y1 + 1) if remove_boundaries else y1
    ex0 = max(0, x0 - 1) if remove_boundaries else x0
    out = np.zeros((ey1 - y0, x1 - ex0), dtype=np.uint32)
    tiles = _open(tiles_path)
    for t in grid.overlapping(y0, ey1, ex0, x1):
        if t.index in offsets:
            paint_tile(out, (y0, ex0), np.asarray(tiles[t.index]), t, offsets[t.index], luts[t.index])
    if remove_boundaries:
        from ..engine.postprocess import remove_boundaries as outline

        out = outline(out)
    out = out[:y1 - y0, x0 - ex0:]
    _open(labels_path, "r+")[y0:y1, x0:x1] = out.astype(dtype)
    return np.unique(out)


def _task_relabel(labels_path: str, region: tuple[int, int, int, int], lut: np.ndarray, dtype: str) -> None:
    y0, y1, x0, x1 = region
    arr = _open(labels_path, "r+")
    arr[y0:y1, x0:x1] = lut[np.asarray(arr[y0:y1, x0:x1]).astype(np.uint32)].astype(dtype)


# ------------------------------------------------------------------------------ driver

def _as_source(image: Any, channel_axis: int | None, scratch: str, tasks: Any) -> ImageSource:
    if isinstance(image, ImageSource):
        return image
    if isinstance(image, (str, os.PathLike)):
        return ImageSource.from_path(image, channel_axis)
    if type(image).__module__.startswith("dask"):
        # a lazy dask array: materialise it once, chunk-wise, where the workers can read it
        import zarr

        path = f"{scratch}/input"
        target = zarr.create_array(path, shape=image.shape, chunks=image.chunksize, dtype=image.dtype, overwrite=True)
        tasks.store(image, target)
        return ImageSource(zarr.open_array(path, mode="r"), channel_axis)
    return ImageSource(image, channel_axis)


def segment_streamed(
    image: Any,
    client: Any,
    *,
    output: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    backend: str = "auto",
    device: str | None = None,
    backend_options: dict | None = None,
    inference: InferenceConfig | None = None,
    torch_threads: int | None = None,
    boxes: Any = None,
    overwrite: bool = False,
    resume: bool = False,
    keep_scratch: bool = False,
    return_details: bool = False,
    options: SegmentOptions | None = None,
    **settings: Any,
) -> Any:
    """Segment a large image with the tiled run's phases as tasks of ``client``; labels go to a zarr store.

    Args:
        image: a path (TIFF / OME-TIFF, .npy, .zarr, PNG; read lazily where the format
            allows; workers open it themselves), a numpy array (sent to the workers once),
            a zarr array, or a dask array (stored to the scratch space first).
        client: a ``distributed.Client`` (``dask.segment_dask``) or a
            ``workers.InProcessClient`` (``tiling.segment_large`` with bounded memory).
        output: zarr group to create (a group, so ``zarr.open(output)`` is the group, not
            the labels: ``zarr.open(f"{output}/labels")``): ``labels`` (H, W) int32 (uint32
            above 65535 cells), chunked ``block`` x ``block``; ``cells/boxes|scores|iou|tile``
            per label (row k is label k + 1); attributes with the settings and counts.
        checkpoint, backend, device, backend_options, torch_threads: what each worker loads
            (once; see ``CellSAMWorkerPlugin``).
        inference: the workers' thresholds (``InferenceConfig``).
        boxes: optional (N, 4) x1, y1, x2, y2 in image pixels, as ``tiling.segment_large``.
        overwrite: replace an existing ``output``.
        resume: finish a run into ``output`` that failed or was killed: the normalisation
            and every tile batch it completed are reused (tiles are written to the scratch
            space as they finish), the rest is computed; the result equals an uninterrupted
            run. Refused when ``output`` was started with other settings, another image
            (path, size and mtime; content hash for numpy arrays) or other weights.
        keep_scratch: keep the intermediate CLAHE image and tile labels (``_scratch``).
        return_details: also return ``TiledDetails``.
        options, **settings: the call's ``SegmentOptions`` (tile_size, overlap, batch_size,
            bbox_threshold, normalize, postprocess, remove_boundaries, chunk_size,
            channel_axis, progress: per phase; block: side of the normalisation regions and
            of the output chunks), as ``tiling.segment_large``; the result is identical to
            it (same tiles, batches and stitching).

    Returns:
        the ``labels`` zarr array (and ``TiledDetails`` with ``return_details``).
    """
    import zarr

    opts = SegmentOptions.of(options, **settings)
    if opts.tile_size is None:
        raise ValueError("tile_size: a streamed tiled run needs a tile side (an integer >= 64), got None")
    output = str(Path(output).resolve())
    if overwrite and resume:
        raise ValueError("overwrite/resume: give one of them, not both")
    if os.path.exists(output) and not (overwrite or resume):
        raise FileExistsError(f"output: {output} exists; pass resume=True to finish an interrupted run into it, "
                              "or overwrite=True to replace it")

    tasks = runner(client)
    plugin = tasks.load_sessions(checkpoint, backend=backend, device=device, backend_options=backend_options,
                                 inference=inference, torch_threads=torch_threads)
    run_key = _run_key(image, opts.channel_axis, plugin, boxes, dict(
        tile_size=opts.tile_size, overlap=opts.overlap, batch_size=opts.batch_size, block=opts.block,
        bbox_threshold=opts.bbox_threshold, normalize=opts.clahe, postprocess=opts.postprocess,
        chunk_size=opts.chunk_size))
    root = _open_run(output, run_key, resume)
    if root.attrs.get("complete"):
        log.info("resume: %s is already complete", output)
        return _stored_result(root, output, return_details)
    scratch = f"{output}/{SCRATCH}"
    tables_dir = os.path.join(scratch, "tables")
    os.makedirs(tables_dir, exist_ok=True)
    if root.attrs.get("input_stored"):
        source = ImageSource(zarr.open_array(f"{scratch}/input", mode="r"), opts.channel_axis)
    else:
        source = _as_source(image, opts.channel_axis, scratch, tasks)
        root.attrs["input_stored"] = type(image).__module__.startswith("dask")
    height, width = source.shape
    run = TiledRun.plan(source, opts, boxes)
    grid = run.grid
    timings: dict[str, float] = {}
    blocks = regions(height, width, opts.block)
    # the run (with a numpy image) travels to each worker once, not with every task
    run_arg = tasks.share(run)

    norm, clahe_path = None, None
    if opts.clahe is not None:
        t0 = time.perf_counter()
        clahe_path = f"{scratch}/clahe"
        if "norm" in root.attrs:  # an interrupted run finished this phase
            norm = [ChannelNorm(**n) for n in root.attrs["norm"]]
        else:
            keep = top_count(height, width)
            stats = None
            futures = tasks.map(_task_statistics, [run_arg] * len(blocks), blocks, keep=keep)
            for part in tasks.gather(futures, "statistics", opts.progress):
                stats = merge_statistics(stats, part, keep)
            norm = finish_statistics(stats)
            zarr.create_array(clahe_path, shape=(height, width, 3), chunks=(opts.block, opts.block, 3),
                              dtype="uint16", fill_value=0, overwrite=True)
            futures = tasks.map(_task_clahe, [run_arg] * len(blocks), blocks, norm=norm, path=clahe_path)
            extremes = tasks.gather(futures, "normalisation", opts.progress)
            norm = finish_normalization(norm, [e[0] for e in extremes], [e[1] for e in extremes])
            root.attrs["norm"] = [asdict(n) for n in norm]
        timings["normalize"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    active = run.active
    tiles_path = f"{scratch}/tiles"
    if "tiles" not in root[SCRATCH]:
        zarr.create_array(tiles_path, shape=(len(grid), grid.tile_height, grid.tile_width),
                          chunks=(1, grid.tile_height, grid.tile_width), dtype="int32", fill_value=0)
    # whole batches only: a batch's graph calls are batched, so redoing part of one could
    # change the last float bits of its tiles against an uninterrupted run
    done = {i for i in active if os.path.exists(_table_path(tables_dir, i))}
    batches = [b for b in run.batches() if not set(b) <= done]
    if done:
        log.info("resume: %d of %d tiles already segmented", len(done), len(active))
    futures = tasks.spread(_task_tiles, [(plugin, run_arg, batch, norm, clahe_path, tiles_path, tables_dir)
                                         for batch in batches])
    fresh = {r.index: r for batch_results in tasks.gather(futures, "tiles", opts.progress) for r in batch_results}
    tables = [fresh[i] if i in fresh else TileResult.load(_table_path(tables_dir, i)) for i in active]
    timings["tiles"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    offsets, total = run.resolve(tables)
    dtype = label_dtype(total)
    labels_path = f"{output}/labels"
    zarr.create_array(labels_path, shape=(height, width), chunks=(opts.block, opts.block), dtype=dtype.name,
                      fill_value=0, overwrite=True)
    out_blocks = regions(height, width, opts.block)
    luts = tasks.share({r.index: r.lut for r in tables if r.count})
    futures = tasks.map(_task_stitch, [grid] * len(out_blocks), [tiles_path] * len(out_blocks),
                        [labels_path] * len(out_blocks), [offsets] * len(out_blocks), [luts] * len(out_blocks),
                        out_blocks, remove_boundaries=opts.remove_boundaries, dtype=dtype.name)
    present = np.unique(np.concatenate(tasks.gather(futures, "stitching", opts.progress)))
    lut = compaction_table(present, total)
    if lut is not None:
        lut_arg = tasks.share(lut)
        futures = tasks.map(_task_relabel, [labels_path] * len(out_blocks), out_blocks, lut=lut_arg,
                            dtype=dtype.name)
        tasks.gather(futures, "renumbering", opts.progress)
    details = run.details(tables, lut, total, timings)
    timings["stitch"] = time.perf_counter() - t0

    _write_cells(root, details)
    root.attrs.update({
        "num_cells": details.num_cells, "cut_cells": details.cut_cells, "num_candidates": details.num_candidates,
        "tile_size": opts.tile_size, "overlap": opts.overlap, "tiles": len(grid),
        "normalize": opts.clahe is not None, "clahe": opts.clahe,
        "shape": [height, width], "timings": timings, "complete": True,
    })
    if not keep_scratch and SCRATCH in root:
        del root[SCRATCH]
    labels = zarr.open_array(labels_path, mode="r")
    return (labels, details) if return_details else labels


def _run_key(image: Any, channel_axis: int | None, plugin: str, boxes: Any, settings: dict) -> str:
    """What an output depends on, hashed: the image's identity, the weights, the settings."""
    if isinstance(image, (str, os.PathLike)):
        st = os.stat(image)
        identity: Any = ["path", str(Path(image).resolve()), st.st_size, st.st_mtime_ns]
    elif isinstance(image, np.ndarray):
        identity = ["array", list(image.shape), str(image.dtype), hashlib.sha256(np.ascontiguousarray(image)).hexdigest()]
    elif type(image).__module__.startswith("dask"):
        identity = ["dask", image.name]  # dask's token of the graph that makes the array
    else:
        identity = ["array-like", type(image).__name__, str(getattr(image, "store", "")), str(getattr(image, "path", "")),
                    [int(v) for v in image.shape], str(image.dtype)]
    box_hash = None if boxes is None else hashlib.sha256(np.ascontiguousarray(np.asarray(boxes, np.float64))).hexdigest()
    key = json.dumps([identity, channel_axis, plugin, box_hash, settings], sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()


def _open_run(output: str, run_key: str, resume: bool):
    """The output group: a fresh one, or with ``resume`` the interrupted run's (same key)."""
    import zarr

    if resume and os.path.exists(output):
        try:
            root = zarr.open_group(output, mode="r+")
        except Exception as err:  # zarr raises several types for a folder that is not a group
            raise ValueError(f"output: {output} is not a cellsam-trt output to resume ({err})") from None
        if root.attrs.get("run") != run_key:
            raise ValueError(f"output: {output} was started with another image, other weights or other settings; "
                             "resume=True only finishes the same run (pass overwrite=True to start again)")
        if not root.attrs.get("complete") and SCRATCH not in root:
            raise ValueError(f"output: {output} has no scratch space left to resume from; pass overwrite=True")
        return root
    root = zarr.open_group(output, mode="w")
    root.attrs["run"] = run_key
    root.create_group(SCRATCH)
    return root


def _stored_result(root: Any, output: str, return_details: bool) -> Any:
    """The labels (and details) a completed run left in ``output``."""
    import zarr

    labels = zarr.open_array(f"{output}/labels", mode="r")
    if not return_details:
        return labels
    a = root.attrs
    cells = {name: np.asarray(root[f"cells/{name}"][...]) for name in ("boxes", "scores", "iou", "tile")}
    grid = TileGrid.plan(*a["shape"], a["tile_size"], a["overlap"])
    details = TiledDetails(boxes=cells["boxes"], scores=cells["scores"], iou=cells["iou"], tile_of_cell=cells["tile"],
                           grid=grid, num_candidates=a["num_candidates"], cut_cells=a["cut_cells"],
                           timings=dict(a["timings"]))
    return labels, details


def _write_cells(root: Any, details: TiledDetails) -> None:
    cells = root.create_group("cells", overwrite=True)
    for name, values in (("boxes", details.boxes), ("scores", details.scores), ("iou", details.iou),
                         ("tile", details.tile_of_cell)):
        arr = cells.create_array(name, shape=values.shape, dtype=values.dtype, overwrite=True)
        if values.size:
            arr[...] = values


