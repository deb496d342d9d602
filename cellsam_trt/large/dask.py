"""Scale-out on dask.distributed: one model per worker, tiles over workers, labels to zarr.

``segment_dask`` runs the streamed tiled run (``streamed.segment_streamed``: same tiles,
batches and stitching as ``tiling.segment_large``, so the same labels) with its tasks on
dask workers, each holding one session (``workers.CellSAMWorkerPlugin``).

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
GPU pinning: see ``cellsam_trt.large.workers`` (one GPU per worker, chosen from the worker's
name and ``CUDA_VISIBLE_DEVICES``).
With ``threads_per_worker=2`` one tile batch is preprocessed while another uses the GPU
(the session serialises device work).
"""
from __future__ import annotations

import os
from typing import Any

from ..engine.options import SegmentOptions
from ..modeling.config import InferenceConfig
from .streamed import segment_streamed


def segment_dask(
    image: Any,
    client: Any = None,
    *,
    output: str | os.PathLike,
    options: SegmentOptions | InferenceConfig | None = None,
    inference: InferenceConfig | None = None,
    **arguments: Any,
) -> Any:
    """Segment a large image on a dask.distributed cluster; labels go to a zarr store.

    Args:
        image, output, inference and every other keyword: as ``streamed.segment_streamed``
            (checkpoint, backend, device, backend_options, torch_threads, boxes, overwrite,
            resume, keep_scratch, return_details, and the ``SegmentOptions`` fields).
        client: a ``distributed.Client``; None: the current client, or a LocalCluster with
            one worker per GPU (one CPU worker without GPUs) for the duration of the call.
        options: the call's ``SegmentOptions`` (an ``InferenceConfig`` here is taken as
            ``inference``, as before).

    Returns:
        the ``labels`` zarr array (and ``TiledDetails`` with ``return_details``).
    """
    if isinstance(options, InferenceConfig):
        inference, options = options, None
    own_cluster = None
    if client is None:
        client, own_cluster = _default_client()
    try:
        return segment_streamed(image, client, output=output, options=options, inference=inference, **arguments)
    finally:
        if own_cluster is not None:
            client.close()
            own_cluster.close()


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
