"""Where the tasks of a tiled run execute: dask.distributed workers, or this process.

A ``distributed.Client`` runs ``scale.segment_dask``'s tasks on workers that each load one
``CellSAM`` session (``CellSAMWorkerPlugin``) and pick their GPU (``worker_device``).
``InProcessClient`` runs the same tasks in this process, one after another, with the
session it holds: ``tiling.segment_large`` uses it for images whose in-memory run would not
fit. ``runner(client)`` gives both the same interface (``Runner``), so the driver never asks
which one it has.

GPU pinning: a worker uses ``device`` when it names one (``"cuda:1"``); otherwise, with a
single visible GPU (SLURM's ``--gpus-per-task``) that one; with dask-cuda's per-worker
``CUDA_VISIBLE_DEVICES`` (worker 1 of 4 sees "1,2,3,0": its own GPU first) the first
visible one, ``cuda:0``; else (every GPU visible in their natural order) GPU ``i % count``
where ``i`` is the trailing number of the worker name (LocalCluster: 0, 1, ...;
dask-jobqueue: the process index in its job).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..progress import progress_bar

log = logging.getLogger(__name__)

PLUGIN_PREFIX = "cellsam-trt-session-"

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
            from ..runtime import BackendError

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
        inference: ``InferenceConfig`` thresholds.
        torch_threads: torch intra-op threads for the worker's process (CPU workers: cores
            per worker; in-process workers share one setting).
    """

    idempotent = True  # registering the same configuration again keeps the loaded sessions

    def __init__(self, checkpoint: str | None = None, backend: str = "auto", device: str | None = None,
                 backend_options: dict | None = None, inference: Any = None, torch_threads: int | None = None) -> None:
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.torch_threads = torch_threads
        self.backend = backend
        self.device = device
        self.backend_options = dict(backend_options or {})
        self.inference = inference
        self.session = None
        self.loads = 0
        self.name = PLUGIN_PREFIX + self.fingerprint()

    def fingerprint(self) -> str:
        """Hash of the configuration (and of the checkpoint file's size and mtime)."""
        stat = None
        if self.checkpoint is not None and os.path.exists(self.checkpoint):
            st = os.stat(self.checkpoint)
            stat = (st.st_size, st.st_mtime_ns)
        key = json.dumps([self.checkpoint, stat, self.backend, self.device, self.backend_options, repr(self.inference),
                          self.torch_threads],
                         sort_keys=True, default=str)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def setup(self, worker: Any = None) -> None:
        import torch

        from ..engine.session import Session

        device = worker_device(self.device, getattr(worker, "name", None))
        if self.torch_threads:
            torch.set_num_threads(int(self.torch_threads))
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        self.session = Session.from_checkpoint(self.checkpoint, backend=self.backend, device=device,
                                               inference=self.inference, **self.backend_options)
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
                    device: str | None = None, backend_options: dict | None = None, inference: Any = None,
                    torch_threads: int | None = None) -> str:
    """Register the session plugin (each worker loads the model once); returns its name.

    Calling it again with the same configuration does not reload anything. An
    ``InProcessClient`` already holds its session: its name comes back.
    """
    return runner(client).load_sessions(checkpoint, backend=backend, device=device, backend_options=backend_options,
                                        inference=inference, torch_threads=torch_threads)


def runner(client: Any) -> Any:
    """The ``Runner`` for ``client``: an ``InProcessClient`` is one; a ``distributed.Client``
    is wrapped in a ``DistributedRunner``."""
    return client if isinstance(client, InProcessClient) else DistributedRunner(client)


class DistributedRunner:
    """The ``Runner`` interface on a ``distributed.Client``: tasks on its workers.

    A Runner loads the sessions (``load_sessions``), shares data with every task once
    (``share``), starts tasks (``map``; ``spread`` puts them round-robin on the workers),
    waits for them in order (``gather``) and stores a dask array (``store``).
    """

    def __init__(self, client: Any) -> None:
        self.client = client

    def load_sessions(self, checkpoint: str | os.PathLike | None, **config: Any) -> str:
        if checkpoint is not None and not Path(checkpoint).exists():
            raise FileNotFoundError(f"checkpoint: no file at {checkpoint}")
        plugin = CellSAMWorkerPlugin(None if checkpoint is None else str(Path(checkpoint).resolve()), **config)
        self.client.register_plugin(plugin, name=plugin.name)
        return plugin.name

    def share(self, data: Any) -> Any:
        # in a list: a dict or list would otherwise be scattered item by item
        return self.client.scatter([data], broadcast=True, hash=False)[0]

    def map(self, fn: Callable, *iterables: Sequence, **kwargs: Any) -> list:
        return self.client.map(fn, *iterables, pure=False, **kwargs)

    def spread(self, fn: Callable, argsets: Sequence[tuple]) -> list:
        # GPU work: started round-robin on the workers so every GPU is busy from the first
        # task on (the scheduler would otherwise favour the worker holding the shared data);
        # the restriction is loose, so a lost worker's tasks move on
        workers = sorted(self.client.scheduler_info()["workers"])
        return [self.client.submit(fn, *args, pure=False, workers=[workers[k % len(workers)]] if workers else None,
                                   allow_other_workers=True) for k, args in enumerate(argsets)]

    def gather(self, futures: list, desc: str, progress: bool) -> list:
        """Results in submission order; cancels the rest on the first error."""
        from distributed import as_completed

        bar = _bar(len(futures), desc, progress)
        try:
            for _ in as_completed(futures):
                if bar is not None:
                    bar.update(1)
            return self.client.gather(futures)
        except BaseException:
            self.client.cancel(futures)
            raise
        finally:
            if bar is not None:
                bar.close()

    def store(self, array: Any, target: Any) -> None:
        import dask.array as da

        self.client.compute(da.store(array, target, lock=False, compute=False)).result()


def _bar(total: int, desc: str, enabled: bool):
    return progress_bar(total, desc, "task", enabled)


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
    """``segment_dask``'s tasks run in this process (a ``Runner``, as ``DistributedRunner``).

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

    # the Runner interface (DistributedRunner), in this process

    def load_sessions(self, checkpoint: Any = None, **config: Any) -> str:
        return self.plugin_name  # the session is loaded already

    def share(self, data: Any) -> Any:
        return data

    def map(self, fn: Callable, *iterables: Sequence, **kwargs: Any) -> list[_Task]:
        return [_Task(fn, args, kwargs) for args in zip(*iterables)]

    def spread(self, fn: Callable, argsets: Sequence[tuple]) -> list[_Task]:
        return [_Task(fn, args, {}) for args in argsets]

    def gather(self, tasks: list[_Task], desc: str, progress: bool) -> list:
        """Run the tasks in order; results in that order."""
        bar = _bar(len(tasks), desc, progress)
        try:
            results = []
            for task in tasks:
                results.append(task.run())
                if bar is not None:
                    bar.update(1)
            return results
        finally:
            if bar is not None:
                bar.close()

    def store(self, array: Any, target: Any) -> None:
        import dask.array as da

        da.store(array, target, lock=False)
