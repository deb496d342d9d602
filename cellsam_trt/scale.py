"""Scale-out on dask.distributed: one model per worker, tiles over workers, labels to zarr.

``segment_dask`` runs the tiling algorithm of ``cellsam_trt.tiling`` (same tiles, same
batches, same stitching rule, so the labels equal ``segment_large``'s) as dask futures:

    1. normalisation statistics: one task per block, merged on the client (a few MB)
    2. CLAHE per block (with its context) -> scratch zarr, uint16
    3. tile batches -> each worker's CellSAM session (loaded ONCE per worker by a
       ``WorkerPlugin``) -> kept-cell tile labels to scratch zarr, cell tables to the client
    4. stitching per output chunk (reads the tiles that overlap it) -> ``labels`` zarr
    5. only if some ids lost all their pixels: renumbering per chunk

Every task writes whole zarr chunks of its own, so workers never write the same chunk, and
nothing bigger than a few tiles is ever held in memory: a slide larger than RAM works.
Dask does the scheduling; there is no scheduler here.

Multi-GPU, one node::

    from dask_cuda import LocalCUDACluster           # one worker per GPU, CUDA_VISIBLE_DEVICES set per worker
    client = Client(LocalCUDACluster())
    # or: Client(LocalCluster(n_workers=torch.cuda.device_count(), threads_per_worker=2))
    segment_dask("slide.ome.tif", client, output="slide_labels.zarr", checkpoint="cellsam_general.pt")

Multi-node (SLURM, dask-jobqueue), one GPU per worker process::

    from dask_jobqueue import SLURMCluster
    cluster = SLURMCluster(queue="gpu", cores=8, processes=1, memory="64GB",
                           job_extra_directives=["--gres=gpu:1"])
    cluster.scale(jobs=8)                            # 8 GPUs
    client = Client(cluster)
    segment_dask("/shared/slide.zarr", client, output="/shared/slide_labels.zarr",
                 checkpoint="/shared/cellsam_general.pt", backend="tensorrt")

Input, checkpoint (or engines) and output must be on a file system every worker sees.
GPU pinning: a worker uses ``device`` when it names one (``"cuda:1"``); otherwise, with a
single visible GPU (SLURM's ``--gpus-per-task``) that one; with dask-cuda's per-worker
``CUDA_VISIBLE_DEVICES`` (worker 1 of 4 sees "1,2,3,0": its own GPU first) the first
visible one, ``cuda:0``; else (every GPU visible in their natural order) GPU ``i % count``
where ``i`` is the trailing number of the worker name (LocalCluster: 0, 1, ...;
dask-jobqueue: the process index in its job).
With ``threads_per_worker=2`` one tile batch is preprocessed while another uses the GPU
(the session serialises device work).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from . import preprocess as pre
from .tiling import (
    ChannelNorm,
    ImageSource,
    TiledDetails,
    TileGrid,
    TileResult,
    assign_boxes,
    channel_statistics,
    check_tiling,
    clahe_region,
    combine_tables,
    compaction_table,
    finish_normalization,
    finish_statistics,
    label_dtype,
    merge_statistics,
    paint_tile,
    region_extremes,
    regions,
    resolve_band,
    scale_clahe,
    segment_tile_batch,
    tile_batches,
    top_count,
)

log = logging.getLogger(__name__)

PLUGIN_PREFIX = "cellsam-trt-session-"
SCRATCH = "_scratch"

try:  # the plugin base class; without distributed only segment_dask is unavailable
    from distributed.diagnostics.plugin import WorkerPlugin as _PluginBase
except ImportError:  # pragma: no cover - distributed is in the [dask] extra
    _PluginBase = object


# ----------------------------------------------------------------------------- workers

def visible_devices_reordered() -> bool:
    """True when ``CUDA_VISIBLE_DEVICES`` names several GPUs in an order chosen for this
    process, as dask-cuda does: it rotates the list per worker ("0,1,2,3", "1,2,3,0", ...),
    so each worker's own GPU comes first and is its ``cuda:0``.

    GPU indices in ascending order are taken as the natural order (every worker sees the
    same list; dask-cuda's worker 0 sees it too, and ``cuda:0`` is right for it either way).
    A list of UUIDs (``GPU-...``, ``MIG-...``) has no natural order; it is taken as a
    per-worker list, since setting one by hand for a whole cluster is rare.
    """
    entries = [e.strip() for e in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if e.strip()]
    if len(entries) < 2:
        return False
    if all(e.isdigit() for e in entries):
        indices = [int(e) for e in entries]
        return indices != sorted(indices)
    return True


def worker_device(requested: str | None, worker_name: Any) -> str:
    """The device a worker should use (see module docstring, GPU pinning).

    Args:
        requested: ``device`` given to ``segment_dask`` (None: automatic).
        worker_name: the dask worker's name.
    """
    import torch

    if requested not in (None, "cuda"):
        return str(requested)
    if not torch.cuda.is_available():
        if requested == "cuda":
            from .runtime import BackendError

            raise BackendError("device: CUDA was requested but this worker sees no CUDA GPU")
        return "cpu"
    count = torch.cuda.device_count()
    if count == 1 or visible_devices_reordered():
        return "cuda:0"
    match = re.search(r"(\d+)$", str(worker_name))
    if match is None:
        log.warning("worker %r: cannot tell which of %d GPUs to use; using cuda:0 "
                    "(set CUDA_VISIBLE_DEVICES per worker, e.g. with dask-cuda)", worker_name, count)
        return "cuda:0"
    return f"cuda:{int(match.group(1)) % count}"


class CellSAMWorkerPlugin(_PluginBase):
    """Loads one ``CellSAM`` session per worker, once, when the plugin is registered (or the
    worker starts). Tasks find it with ``worker_session(name)``.

    Args:
        checkpoint: weights file (or engine folder) every worker can read; None: the default
            location of the released weights.
        backend, device, backend_options: as ``CellSAM.from_checkpoint`` (device None: see
            ``worker_device``). With "auto" (default) each worker takes the graphs or engines
            from the artifact cache; workers asking for the same missing entry make it once
            (a file lock), the others wait and reuse it. On a cluster, put the cache on a
            shared file system (``CELLSAM_TRT_CACHE``) and fill it beforehand with
            ``cellsam-trt export`` (and ``build-engines`` on a GPU node).
        options: ``InferenceConfig`` thresholds.
        torch_threads: torch intra-op threads for the worker's process (CPU workers: cores
            per worker; in-process workers share one setting).
    """

    idempotent = True  # registering the same configuration again keeps the loaded sessions

    def __init__(self, checkpoint: str | None = None, backend: str = "auto", device: str | None = None,
                 backend_options: dict | None = None, options: Any = None, torch_threads: int | None = None) -> None:
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.torch_threads = torch_threads
        self.backend = backend
        self.device = device
        self.backend_options = dict(backend_options or {})
        self.options = options
        self.session = None
        self.loads = 0
        self.name = PLUGIN_PREFIX + self.fingerprint()

    def fingerprint(self) -> str:
        """Hash of the configuration (and of the checkpoint file's size and mtime)."""
        stat = None
        if self.checkpoint is not None and os.path.exists(self.checkpoint):
            st = os.stat(self.checkpoint)
            stat = (st.st_size, st.st_mtime_ns)
        key = json.dumps([self.checkpoint, stat, self.backend, self.device, self.backend_options, repr(self.options),
                          self.torch_threads],
                         sort_keys=True, default=str)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def setup(self, worker: Any = None) -> None:
        import torch

        from .pipeline import CellSAM

        device = worker_device(self.device, getattr(worker, "name", None))
        if self.torch_threads:
            torch.set_num_threads(int(self.torch_threads))
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        self.session = CellSAM.from_checkpoint(self.checkpoint, backend=self.backend, device=device,
                                               options=self.options, **self.backend_options)
        self.loads += 1
        log.info("worker %s: CellSAM loaded on %s", getattr(worker, "name", "?"), device)

    def teardown(self, worker: Any = None) -> None:
        self.session = None


def worker_session(name: str) -> Any:
    """The ``CellSAM`` session the plugin ``name`` loaded on the current worker (or that an
    ``InProcessClient`` holds under that name)."""
    if name in _IN_PROCESS_SESSIONS:
        return _IN_PROCESS_SESSIONS[name]
    from distributed import get_worker

    plugin = get_worker().plugins.get(name)
    if plugin is None or plugin.session is None:
        raise RuntimeError(f"no CellSAM session on this worker (plugin {name} not set up)")
    return plugin.session


def prepare_workers(client: Any, checkpoint: str | os.PathLike | None = None, *, backend: str = "auto",
                    device: str | None = None, backend_options: dict | None = None, options: Any = None,
                    torch_threads: int | None = None) -> str:
    """Register the session plugin (each worker loads the model once); returns its name.

    Calling it again with the same configuration does not reload anything.
    """
    if isinstance(client, InProcessClient):
        return client.plugin_name  # the session is already loaded, in this process
    if checkpoint is not None and not Path(checkpoint).exists():
        raise FileNotFoundError(f"checkpoint: no file at {checkpoint}")
    plugin = CellSAMWorkerPlugin(None if checkpoint is None else str(Path(checkpoint).resolve()), backend, device,
                                 backend_options, options, torch_threads)
    client.register_plugin(plugin, name=plugin.name)
    return plugin.name


# sessions of InProcessClient objects, by plugin name (tasks look them up like a worker's)
_IN_PROCESS_SESSIONS: dict[str, Any] = {}


class _Task:
    """A task an ``InProcessClient`` runs when its results are gathered (in order)."""

    def __init__(self, fn, args, kwargs) -> None:
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def run(self) -> Any:
        fn, args, kwargs = self.fn, self.args, self.kwargs
        self.fn = self.args = self.kwargs = None  # what a task holds goes when it has run
        return fn(*args, **kwargs)


class InProcessClient:
    """The part of a ``distributed.Client`` that ``segment_dask`` uses, run in this process.

    Tasks run one after another, in submission order, when their results are gathered, so
    at most one task's data is in memory at a time: with it, ``segment_dask``'s phases (and
    their scratch zarr stores) bound the memory of a tiled run by a few tiles plus the
    model, without dask.distributed. ``tiling.segment_large`` uses it for images whose
    in-memory run would not fit.

    Args:
        session: the ``CellSAM`` that segments the tiles. Its name in the run's key is this
            session object's, so ``resume`` finishes a run only from the same process.
    """

    def __init__(self, session: Any) -> None:
        self.plugin_name = PLUGIN_PREFIX + f"local-{id(session):x}"
        _IN_PROCESS_SESSIONS[self.plugin_name] = session

    def close(self) -> None:
        _IN_PROCESS_SESSIONS.pop(self.plugin_name, None)

    def __enter__(self) -> InProcessClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def scatter(self, data: Any, broadcast: bool = True, hash: bool = True) -> Any:
        return data

    def submit(self, fn, *args, pure: bool = True, workers: Any = None, allow_other_workers: bool = False,
               **kwargs) -> _Task:
        return _Task(fn, args, kwargs)

    def map(self, fn, *iterables, pure: bool = True, **kwargs) -> list[_Task]:
        return [_Task(fn, args, kwargs) for args in zip(*iterables)]

    def scheduler_info(self) -> dict:
        return {"workers": {}}


# ------------------------------------------------------------------------------- tasks

def _open(path: str, mode: str = "r"):
    import zarr

    return zarr.open_array(path, mode=mode)


def _task_statistics(source: ImageSource, region: tuple[int, int, int, int], keep: int):
    return channel_statistics(source.read(*region), keep)


def _task_clahe(source: ImageSource, region: tuple[int, int, int, int], norm, path: str, method: str):
    y0, y1, x0, x1 = region
    part = clahe_region(source, norm, y0, y1, x0, x1, method)
    _open(path, "r+")[y0:y1, x0:x1] = part
    return region_extremes(part)


def save_table(path: str | os.PathLike, r: TileResult) -> None:
    """One tile's cell table (everything but its labels) as .npz, atomically; no pickles."""
    from .io import atomic_write

    ids = sorted(r.band)
    corners = np.array([[r.band[k][0], r.band[k][1], *r.band[k][2].shape] for k in ids], np.int64).reshape(-1, 4)
    masks = np.concatenate([r.band[k][2].ravel() for k in ids]) if ids else np.zeros(0, bool)
    arrays = dict(index=r.index, count=r.count, num_candidates=r.num_candidates, boxes=r.boxes, scores=r.scores,
                  iou=r.iou, cut=r.cut, inside=r.inside, depth=r.depth, band_ids=np.array(ids, np.int64),
                  band_corners=corners, band_masks=masks)
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def load_table(path: str | os.PathLike) -> TileResult:
    """The table ``save_table`` wrote (labels stay in the scratch zarr: ``labels`` is None)."""
    with np.load(path, allow_pickle=False) as z:
        band, start = {}, 0
        for k, (y0, x0, h, w) in zip(z["band_ids"].tolist(), z["band_corners"].tolist()):
            band[k] = (y0, x0, z["band_masks"][start:start + h * w].reshape(h, w))
            start += h * w
        return TileResult(int(z["index"]), None, int(z["count"]), z["boxes"], z["scores"], z["iou"], z["cut"],
                          int(z["num_candidates"]), z["inside"], z["depth"], band)


def _table_path(tables_dir: str, index: int) -> str:
    return os.path.join(tables_dir, f"tile-{index:06d}.npz")


def _task_tiles(plugin: str, source: ImageSource, grid: TileGrid, batch: list[int], norm, clahe_path: str | None,
                tiles_path: str, tables_dir: str, tile_boxes: dict | None, options: dict) -> list[TileResult]:
    session = worker_session(plugin)
    if clahe_path is None:
        def read_tile(t):
            return source.read(t.y0, t.y1, t.x0, t.x1)
    else:
        clahe = _open(clahe_path)

        def read_tile(t):
            return scale_clahe(np.asarray(clahe[t.y0:t.y1, t.x0:t.x1]), norm)
    results = segment_tile_batch(session, grid, batch, read_tile, tile_boxes, **options)
    tiles = _open(tiles_path, "r+")
    for r in results:
        if r.count:
            tiles[r.index] = r.labels
        r.labels = None  # only the small table goes back
        # after the labels: a table on disk means the tile is done (resume=True reuses it)
        save_table(_table_path(tables_dir, r.index), r)
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
        from .postprocess import remove_boundaries as outline

        out = outline(out)
    out = out[:y1 - y0, x0 - ex0:]
    _open(labels_path, "r+")[y0:y1, x0:x1] = out.astype(dtype)
    return np.unique(out)


def _task_relabel(labels_path: str, region: tuple[int, int, int, int], lut: np.ndarray, dtype: str) -> None:
    y0, y1, x0, x1 = region
    arr = _open(labels_path, "r+")
    arr[y0:y1, x0:x1] = lut[np.asarray(arr[y0:y1, x0:x1]).astype(np.uint32)].astype(dtype)


# ------------------------------------------------------------------------------ driver

def _as_source(image: Any, channel_axis: int | None, scratch: str, client: Any) -> ImageSource:
    if isinstance(image, ImageSource):
        return image
    if isinstance(image, (str, os.PathLike)):
        return ImageSource.from_path(image, channel_axis)
    if type(image).__module__.startswith("dask"):
        # a lazy dask array: materialise it once, chunk-wise, where the workers can read it
        import dask.array as da
        import zarr

        path = f"{scratch}/input"
        target = zarr.create_array(path, shape=image.shape, chunks=image.chunksize, dtype=image.dtype, overwrite=True)
        if isinstance(client, InProcessClient):
            da.store(image, target, lock=False)
        else:
            client.compute(da.store(image, target, lock=False, compute=False)).result()
        return ImageSource(zarr.open_array(path, mode="r"), channel_axis)
    return ImageSource(image, channel_axis)


def _gather(client: Any, futures: list, desc: str, progress: bool) -> list:
    """Results in submission order; cancels the rest on the first error."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(futures), desc=desc, unit="task")
    if isinstance(client, InProcessClient):
        try:
            results = []
            for task in futures:
                results.append(task.run())
                if bar is not None:
                    bar.update(1)
            return results
        finally:
            if bar is not None:
                bar.close()
    from distributed import as_completed

    try:
        for _ in as_completed(futures):
            if bar is not None:
                bar.update(1)
        return client.gather(futures)
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        if bar is not None:
            bar.close()


def segment_dask(
    image: Any,
    client: Any = None,
    *,
    output: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    backend: str = "auto",
    device: str | None = None,
    backend_options: dict | None = None,
    options: Any = None,
    torch_threads: int | None = None,
    tile_size: int = 1024,
    overlap: int = 128,
    batch_size: int = 4,
    block: int = 2048,
    boxes: Any = None,
    bbox_threshold: float | None = None,
    normalize: bool | str = True,
    postprocess: bool = False,
    remove_boundaries: bool = False,
    chunk_size: int | None = None,
    channel_axis: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    keep_scratch: bool = False,
    return_details: bool = False,
    progress: bool = False,
) -> Any:
    """Segment a large image on a dask.distributed cluster; labels go to a zarr store.

    Args:
        image: a path (TIFF / OME-TIFF, .npy, .zarr, PNG; read lazily where the format
            allows; workers open it themselves), a numpy array (sent to the workers once),
            a zarr array, or a dask array (stored to the scratch space first).
        client: a ``distributed.Client``; None: the current client, or a LocalCluster with
            one worker per GPU (one CPU worker without GPUs) for the duration of the call.
        output: zarr group to create: ``labels`` (H, W) int32 (uint32 above 65535 cells),
            chunked ``block`` x ``block``; ``cells/boxes|scores|iou|tile`` per label (row k is
            label k + 1); attributes with the settings and counts.
        checkpoint, backend, device, backend_options, options, torch_threads: what each worker
            loads (once; see ``CellSAMWorkerPlugin``).
        tile_size, overlap, batch_size, boxes, bbox_threshold, normalize, postprocess,
            remove_boundaries, chunk_size, channel_axis: as ``tiling.segment_large``; the
            result is identical to it (same tiles, batches and stitching).
        block: side of the normalisation regions and of the output chunks.
        overwrite: replace an existing ``output``.
        resume: finish a run into ``output`` that failed or was killed: the normalisation
            and every tile batch it completed are reused (tiles are written to the scratch
            space as they finish), the rest is computed; the result equals an uninterrupted
            run. Refused when ``output`` was started with other settings, another image
            (path, size and mtime; content hash for numpy arrays) or other weights.
        keep_scratch: keep the intermediate CLAHE image and tile labels (``_scratch``).
        return_details: also return ``TiledDetails``.
        progress: progress bars per phase.

    Returns:
        the ``labels`` zarr array (and ``TiledDetails`` with ``return_details``).
    """
    import zarr

    check_tiling(tile_size, overlap)
    method = pre.clahe_method(normalize)
    for name, value, low in (("batch_size", batch_size, 1), ("block", block, 256)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    output = str(Path(output).resolve())
    if overwrite and resume:
        raise ValueError("overwrite/resume: give one of them, not both")
    if os.path.exists(output) and not (overwrite or resume):
        raise FileExistsError(f"output: {output} exists; pass resume=True to finish an interrupted run into it, "
                              "or overwrite=True to replace it")

    own_cluster = None
    if client is None:
        client, own_cluster = _default_client()
    try:
        plugin = prepare_workers(client, checkpoint, backend=backend, device=device,
                                 backend_options=backend_options, options=options, torch_threads=torch_threads)
        run_key = _run_key(image, channel_axis, plugin, boxes, dict(
            tile_size=tile_size, overlap=overlap, batch_size=batch_size, block=block, bbox_threshold=bbox_threshold,
            normalize=method, postprocess=bool(postprocess), chunk_size=chunk_size))
        root = _open_run(output, run_key, resume)
        if root.attrs.get("complete"):
            log.info("resume: %s is already complete", output)
            return _stored_result(root, output, return_details)
        scratch = f"{output}/{SCRATCH}"
        tables_dir = os.path.join(scratch, "tables")
        os.makedirs(tables_dir, exist_ok=True)
        if root.attrs.get("input_stored"):
            source = ImageSource(zarr.open_array(f"{scratch}/input", mode="r"), channel_axis)
        else:
            source = _as_source(image, channel_axis, scratch, client)
            root.attrs["input_stored"] = type(image).__module__.startswith("dask")
        height, width = source.shape
        grid = TileGrid.plan(height, width, tile_size, overlap)
        timings: dict[str, float] = {}
        from .pipeline import validate_boxes

        user_boxes = None if boxes is None else validate_boxes(boxes, height, width)
        blocks = regions(height, width, block)
        # a numpy image travels to each worker once, not with every task
        source_arg = client.scatter(source, broadcast=True, hash=False) if _in_memory(source) else source

        norm, clahe_path = None, None
        if method is not None:
            t0 = time.perf_counter()
            clahe_path = f"{scratch}/clahe"
            if "norm" in root.attrs:  # an interrupted run finished this phase
                norm = [ChannelNorm(**n) for n in root.attrs["norm"]]
            else:
                keep = top_count(height, width)
                stats = None
                futures = client.map(_task_statistics, [source_arg] * len(blocks), blocks, keep=keep, pure=False)
                for part in _gather(client, futures, "statistics", progress):
                    stats = merge_statistics(stats, part, keep)
                norm = finish_statistics(stats)
                zarr.create_array(clahe_path, shape=(height, width, 3), chunks=(block, block, 3), dtype="uint16",
                                  fill_value=0, overwrite=True)
                futures = client.map(_task_clahe, [source_arg] * len(blocks), blocks, norm=norm, path=clahe_path,
                                     method=method, pure=False)
                extremes = _gather(client, futures, "normalisation", progress)
                norm = finish_normalization(norm, [e[0] for e in extremes], [e[1] for e in extremes])
                root.attrs["norm"] = [asdict(n) for n in norm]
            timings["normalize"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        tile_boxes = None if user_boxes is None else assign_boxes(grid, user_boxes)
        active = list(range(len(grid))) if tile_boxes is None else sorted(tile_boxes)
        tiles_path = f"{scratch}/tiles"
        if "tiles" not in root[SCRATCH]:
            zarr.create_array(tiles_path, shape=(len(grid), grid.tile_height, grid.tile_width),
                              chunks=(1, grid.tile_height, grid.tile_width), dtype="int32", fill_value=0)
        # whole batches only: a batch's graph calls are batched, so redoing part of one could
        # change the last float bits of its tiles against an uninterrupted run
        done = {i for i in active if os.path.exists(_table_path(tables_dir, i))}
        batches = [b for b in tile_batches(active, batch_size) if not set(b) <= done]
        if done:
            log.info("resume: %d of %d tiles already segmented", len(done), len(active))
        seg_options = dict(bbox_threshold=bbox_threshold, chunk_size=chunk_size, postprocess=postprocess)
        # Tile batches are the GPU work: start them round-robin on the workers so every GPU is
        # busy from the first batch on (the scheduler would otherwise favour the worker holding
        # the scattered image); the restriction is loose, so a lost worker's tiles move on.
        workers = sorted(client.scheduler_info()["workers"])
        futures = [
            client.submit(_task_tiles, plugin, source_arg, grid, batch, norm, clahe_path, tiles_path, tables_dir,
                          None if tile_boxes is None else {i: tile_boxes[i] for i in batch}, seg_options, pure=False,
                          workers=[workers[k % len(workers)]] if workers else None, allow_other_workers=True)
            for k, batch in enumerate(batches)
        ]
        fresh = {r.index: r for batch_results in _gather(client, futures, "tiles", progress) for r in batch_results}
        tables = [fresh[i] if i in fresh else load_table(_table_path(tables_dir, i)) for i in active]
        timings["tiles"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        resolve_band(tables)
        offsets, total = {}, 0
        for r in tables:  # raster order = id order, as in segment_large
            if r.count:
                offsets[r.index] = total
            total += r.count
        dtype = label_dtype(total)
        labels_path = f"{output}/labels"
        zarr.create_array(labels_path, shape=(height, width), chunks=(block, block), dtype=dtype.name,
                          fill_value=0, overwrite=True)
        out_blocks = regions(height, width, block)
        luts = client.scatter([{r.index: r.lut for r in tables if r.count}], broadcast=True, hash=False)[0]
        futures = client.map(_task_stitch, [grid] * len(out_blocks), [tiles_path] * len(out_blocks),
                             [labels_path] * len(out_blocks), [offsets] * len(out_blocks), [luts] * len(out_blocks),
                             out_blocks, remove_boundaries=remove_boundaries, dtype=dtype.name, pure=False)
        present = np.unique(np.concatenate(_gather(client, futures, "stitching", progress)))
        lut = compaction_table(present, total)
        if lut is not None:
            lut_arg = client.scatter(lut, broadcast=True, hash=False)
            futures = client.map(_task_relabel, [labels_path] * len(out_blocks), out_blocks, lut=lut_arg,
                                 dtype=dtype.name, pure=False)
            _gather(client, futures, "renumbering", progress)
        details = combine_tables(tables, lut, grid, total, timings)
        timings["stitch"] = time.perf_counter() - t0

        _write_cells(root, details)
        root.attrs.update({
            "num_cells": details.num_cells, "cut_cells": details.cut_cells, "num_candidates": details.num_candidates,
            "tile_size": tile_size, "overlap": overlap, "tiles": len(grid), "normalize": method is not None,
            "clahe": method,
            "shape": [height, width], "timings": timings, "complete": True,
        })
        if not keep_scratch and SCRATCH in root:
            del root[SCRATCH]
        if details.cut_cells:
            log.warning("%d cells touch an inner tile edge in the tile they were taken from and may be cut; "
                        "raise overlap (now %d)", details.cut_cells, overlap)
        labels = zarr.open_array(labels_path, mode="r")
        return (labels, details) if return_details else labels
    finally:
        if own_cluster is not None:
            client.close()
            own_cluster.close()


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
    details = TiledDetails(cells["boxes"], cells["scores"], cells["iou"], cells["tile"], grid, a["num_candidates"],
                           a["cut_cells"], dict(a["timings"]))
    return labels, details


def _in_memory(source: ImageSource) -> bool:
    return getattr(source, "_opener", None) is None and isinstance(source.array, np.ndarray) \
        and not isinstance(source.array, np.memmap)


def _write_cells(root: Any, details: TiledDetails) -> None:
    cells = root.create_group("cells", overwrite=True)
    for name, values in (("boxes", details.boxes), ("scores", details.scores), ("iou", details.iou),
                         ("tile", details.tile_of_cell)):
        arr = cells.create_array(name, shape=values.shape, dtype=values.dtype, overwrite=True)
        if values.size:
            arr[...] = values


def _default_client():
    import torch
    from distributed import Client, LocalCluster, get_client

    try:
        return get_client(), None
    except ValueError:
        pass
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cluster = LocalCluster(n_workers=max(1, gpus), threads_per_worker=2 if gpus else 1, processes=gpus > 1)
    return Client(cluster), cluster


# ------------------------------------------------------------------------------- bench

def synthetic_slide(height: int, width: int, *, cell_radius: float = 9.0, density: float = 0.25,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A large fluorescence-like image, fast (each cell drawn in its own window).

    Args:
        cell_radius: mean cell radius in pixels.
        density: fraction of the area covered by cells (before overlaps).

    Returns:
        image (H, W, 2) uint16 (nuclear, whole-cell), and the cells' boxes (N, 4) float32
        x1, y1, x2, y2 in image pixels.
    """
    rng = np.random.default_rng(seed)
    n = max(1, int(density * height * width / (np.pi * cell_radius ** 2)))
    whole = np.zeros((height, width), dtype=np.float32)
    nuclear = np.zeros((height, width), dtype=np.float32)
    boxes = []
    for _ in range(n):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = cell_radius * rng.uniform(0.7, 1.3, size=2)
        angle = rng.uniform(0, np.pi)
        reach = max(ry, rx)
        y0, y1 = max(0, int(cy - reach)), min(height, int(cy + reach) + 2)
        x0, x1 = max(0, int(cx - reach)), min(width, int(cx + reach) + 2)
        if y1 - y0 < 2 or x1 - x0 < 2:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
        r2 = u * u + v * v
        inside = r2 < 1
        if not inside.any():
            continue
        whole[y0:y1, x0:x1] = np.maximum(whole[y0:y1, x0:x1], rng.uniform(0.5, 1.0) * inside)
        nuclear[y0:y1, x0:x1] = np.maximum(nuclear[y0:y1, x0:x1], rng.uniform(0.6, 1.0) * (r2 < 0.3))
        ys, xs = np.nonzero(inside)
        boxes.append([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1])
    noise = rng.normal(0, 0.03, size=(2, height, width)).astype(np.float32)
    image = np.stack([np.clip(nuclear + noise[0], 0, None), np.clip(whole + noise[1], 0, None)], axis=-1)
    return (image * 4000).astype(np.uint16), np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def throughput_report(
    checkpoint: str | os.PathLike | None = None,
    *,
    height: int = 3072,
    width: int = 3072,
    tile_size: int = 1024,
    overlap: int = 128,
    batch_size: int = 4,
    n_workers: int = 2,
    processes: bool = False,
    threads_per_worker: int = 1,
    backend: str = "torch",
    device: str | None = None,
    use_cellfinder: bool = True,
    box_limit: int | None = None,
    bbox_threshold: float | None = None,
    seed: int = 0,
    workdir: str | os.PathLike | None = None,
) -> dict:
    """Throughput of one large image: single process (``segment_large``) vs a dask
    LocalCluster (``segment_dask``), in megapixels/s and cells/s.

    Args:
        checkpoint: weights; None writes tiny random weights (steered on the image) to
            ``workdir`` - a pipeline measurement, not real segmentation.
        height, width: synthetic image size (``synthetic_slide``).
        tile_size, overlap, batch_size: tiling.
        n_workers, processes, threads_per_worker: the LocalCluster.
        use_cellfinder: False decodes the synthetic cells' boxes instead (skips CellFinder);
            ``box_limit`` keeps that many of them (random, seeded). With random weights the
            CellFinder count depends on the image; on a CPU keep images small (the tiny
            decoder costs ~15-35 ms per box there).
        bbox_threshold: CellFinder threshold (random weights: higher means fewer boxes).
        workdir: where the zarr output (and random checkpoint) go; default a temp folder.

    Returns:
        a JSON-ready dict: image, tiles, single / dask (seconds, megapixels_per_s, cells,
        cells_per_s; dask also workers, processes, model_load_seconds), speedup,
        identical_labels, settings.
    """
    import torch
    from distributed import Client, LocalCluster

    from . import checkpoint as ckpt
    from .config import ModelConfig
    from .pipeline import CellSAM
    from .testing import steer_random_network
    from .tiling import segment_large

    own_dir = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="cellsam-throughput-") if own_dir else workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        image, cell_boxes = synthetic_slide(height, width, seed=seed)
        weights = "checkpoint"
        if checkpoint is None:
            probe = image[:min(height, 512), :min(width, 512)]
            network = steer_random_network(ckpt.random_network(ModelConfig.tiny(), seed=seed), probe)
            checkpoint = ckpt.write_checkpoint(network, workdir / "random_tiny.pt")
            weights = "random tiny (steered), not a real segmentation"
        boxes = None
        if not use_cellfinder:
            boxes = cell_boxes
            if box_limit is not None and box_limit < len(boxes):
                boxes = boxes[np.sort(np.random.default_rng(seed).choice(len(boxes), box_limit, replace=False))]
        common = dict(tile_size=tile_size, overlap=overlap, batch_size=batch_size, boxes=boxes,
                      bbox_threshold=bbox_threshold)
        megapixels = height * width / 1e6

        t0 = time.perf_counter()
        session = CellSAM.from_checkpoint(checkpoint, backend=backend, device=device)
        single_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        single = segment_large(session, image, **common)
        single_s = time.perf_counter() - t0
        single_cells = int(single.max())
        del session

        # CPU: split the cores between the workers instead of oversubscribing them
        threads_before = torch.get_num_threads()
        on_cpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")
        worker_threads = max(1, threads_before // (n_workers * threads_per_worker)) if on_cpu else None
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=processes,
                               dashboard_address=None)
        client = Client(cluster)
        try:
            t0 = time.perf_counter()
            prepare_workers(client, checkpoint, backend=backend, device=device, torch_threads=worker_threads)
            load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            labels = segment_dask(image, client, output=workdir / "labels.zarr", checkpoint=checkpoint,
                                  backend=backend, device=device, torch_threads=worker_threads, overwrite=True,
                                  **common)
            dask_s = time.perf_counter() - t0
            distributed_labels = np.asarray(labels[...])
        finally:
            client.close()
            cluster.close()
            torch.set_num_threads(threads_before)
        dask_cells = int(distributed_labels.max())

        def rates(seconds, cells):
            return {"seconds": round(seconds, 3), "megapixels_per_s": round(megapixels / seconds, 4),
                    "cells": cells, "cells_per_s": round(cells / seconds, 2)}

        return {
            "image": {"height": height, "width": width, "megapixels": round(megapixels, 3)},
            "tiles": len(TileGrid.plan(height, width, tile_size, overlap)),
            "single": {**rates(single_s, single_cells), "model_load_seconds": round(single_load, 3)},
            "dask": {**rates(dask_s, dask_cells), "workers": n_workers, "processes": processes,
                     "threads_per_worker": threads_per_worker, "torch_threads_per_worker": worker_threads,
                     "model_load_seconds": round(load_s, 3)},
            "speedup": round(single_s / dask_s, 3),
            "identical_labels": bool(np.array_equal(single, distributed_labels)),
            "settings": {"tile_size": tile_size, "overlap": overlap, "batch_size": batch_size,
                         "backend": backend, "device": device or ("cuda" if torch.cuda.is_available() else "cpu"),
                         "cellfinder": use_cellfinder, "boxes": None if boxes is None else len(boxes),
                         "weights": weights, "cpu_threads": torch.get_num_threads()},
        }
    finally:
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)


__all__ = [
    "CellSAMWorkerPlugin", "prepare_workers", "segment_dask", "synthetic_slide", "throughput_report",
    "worker_device", "worker_session",
]

