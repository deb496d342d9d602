"""Throughput of one large image: a single process against a dask LocalCluster."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ..dev.synthetic import synthetic_slide
from ..large.dask import segment_dask
from ..large.grid import TileGrid
from ..large.workers import prepare_workers


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

    from ..api import CellSAM
    from ..dev.steering import steer_random_network
    from ..large.tiling import segment_large
    from ..modeling import checkpoint as ckpt
    from ..modeling.config import ModelConfig

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


