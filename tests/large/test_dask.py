"""dask.distributed: two workers give the labels of the single-process path; one model per worker."""
import numpy as np
import pytest

pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")

from distributed import Client, LocalCluster, get_task_stream  # noqa: E402

from cellsam_trt import CellSAM  # noqa: E402
from cellsam_trt.dev.synthetic import synthetic_slide  # noqa: E402
from cellsam_trt.large.dask import segment_dask  # noqa: E402
from cellsam_trt.large.grid import TileGrid  # noqa: E402
from cellsam_trt.large.tiling import segment_large  # noqa: E402
from cellsam_trt.large.workers import prepare_workers, worker_device  # noqa: E402
from cellsam_trt.modeling.checkpoint import write_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(steered_tiny, tmp_path_factory):
    return write_checkpoint(steered_tiny, tmp_path_factory.mktemp("weights") / "tiny.pt")


@pytest.fixture(scope="module")
def client():
    # in-process workers start in milliseconds; each still loads its own session
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None)
    client = Client(cluster)
    yield client
    client.close()
    cluster.close()


@pytest.fixture(scope="module")
def session(checkpoint):
    return CellSAM.from_checkpoint(checkpoint, device="cpu")


@pytest.mark.slow
def test_two_workers_give_the_single_process_labels(client, checkpoint, session, tmp_path):
    image = synthetic_slide(600, 384, density=0.25, cell_radius=20, seed=1)[0]
    options = dict(tile_size=384, overlap=64, batch_size=1)  # one tile per task: both workers get work
    expected, exp_details = segment_large(session, image, return_details=True, **options)
    assert expected.max() >= 2
    with get_task_stream(client) as stream:
        labels, details = segment_dask(image, client, output=tmp_path / "out.zarr", checkpoint=checkpoint,
                                       return_details=True, **options)
    assert isinstance(labels, zarr.Array) and labels.dtype == expected.dtype
    np.testing.assert_array_equal(labels[...], expected)
    np.testing.assert_array_equal(details.boxes, exp_details.boxes)
    np.testing.assert_array_equal(details.tile_of_cell, exp_details.tile_of_cell)
    group = zarr.open_group(tmp_path / "out.zarr", mode="r")
    assert group.attrs["num_cells"] == expected.max() and group.attrs["complete"]
    assert "_scratch" not in group  # intermediate arrays removed
    np.testing.assert_array_equal(group["cells/iou"][...], exp_details.iou)
    # the two tile tasks ran on both workers
    tile_workers = {t["worker"] for t in stream.data if "_task_tiles" in str(t["key"])}
    assert len(tile_workers) == 2


def test_user_boxes_small_chunks_remove_boundaries_opencv_clahe_from_a_tiff_path(client, checkpoint, session, tmp_path):
    import tifffile

    image, cells = synthetic_slide(1100, 700, seed=3)
    grid = TileGrid.plan(1100, 700, 512, 64)
    owners = grid.owner((cells[:, 1] + cells[:, 3]) / 2, (cells[:, 0] + cells[:, 2]) / 2)
    boxes = np.concatenate([cells[owners == k][:3] for k in (0, 4)])
    options = dict(tile_size=512, overlap=64, boxes=boxes, remove_boundaries=True, normalize="opencv")
    expected = segment_large(session, image, **options)
    assert expected.max() >= 2
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, np.moveaxis(image, -1, 0), compression="zlib", tile=(256, 256))  # (C, H, W)
    # 256-px output chunks: stitching and outlines cross many chunk borders
    labels = segment_dask(str(path), client, output=tmp_path / "out.zarr", checkpoint=checkpoint, block=256,
                          **options)
    assert labels.chunks == (256, 256)
    np.testing.assert_array_equal(labels[...], expected)
    assert zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["clahe"] == "opencv"


def test_each_worker_loads_the_model_once(client, checkpoint):
    name = prepare_workers(client, checkpoint)
    again = prepare_workers(client, checkpoint)  # same configuration: nothing reloads
    assert name == again

    def loads(dask_worker):
        plugin = dask_worker.plugins[name]
        return plugin.loads, id(plugin.session), str(plugin.session.backend.device)

    per_worker = client.run(loads)
    assert len(per_worker) == 2
    assert all(n == 1 for n, _, _ in per_worker.values())
    assert len({sid for _, sid, _ in per_worker.values()}) == 2  # one session per worker
    assert {dev for _, _, dev in per_worker.values()} == {"cpu"}


def test_existing_output_is_not_overwritten(client, checkpoint, tmp_path):
    out = tmp_path / "out.zarr"
    out.mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        segment_dask(np.zeros((300, 300)), client, output=out, checkpoint=checkpoint)
    with pytest.raises(ValueError, match="overlap"):
        segment_dask(np.zeros((300, 300)), client, output=tmp_path / "x.zarr", checkpoint=checkpoint, overlap=-3)


def test_worker_device_choice():
    import torch

    assert worker_device("cuda:3", "anything") == "cuda:3"
    assert worker_device("cpu", 0) == "cpu"
    if not torch.cuda.is_available():
        assert worker_device(None, 1) == "cpu"
        from cellsam_trt.runtime import BackendError

        with pytest.raises(BackendError, match="CUDA"):
            worker_device("cuda", 0)


@pytest.mark.parametrize("visible, name, expected", [
    # dask-cuda's LocalCUDACluster: worker i sees the list rotated by i, its own GPU first
    ("0,1,2,3", 0, "cuda:0"), ("1,2,3,0", 1, "cuda:0"), ("2,3,0,1", "tcp-worker-2", "cuda:0"),
    ("3,0,1,2", 3, "cuda:0"), ("GPU-b1c2,GPU-a3d4", 1, "cuda:0"),
    # every GPU visible in natural order (plain LocalCluster, one worker per GPU): i % count
    (None, 1, "cuda:1"), (None, 6, "cuda:2"), ("0,1,2,3", 2, "cuda:2"), ("4,5,6,7", 3, "cuda:3"),
])
def test_worker_device_with_several_gpus(monkeypatch, visible, name, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert worker_device(None, name) == expected
    assert worker_device("cuda", name) == expected
    assert worker_device("cuda:1", name) == "cuda:1"  # an explicit choice is kept


@pytest.mark.slow
def test_a_failed_run_resumes_to_the_uninterrupted_labels(client, checkpoint, session, tmp_path, monkeypatch):
    from cellsam_trt.large import plan

    image, cells = synthetic_slide(700, 640, seed=5)
    options = dict(tile_size=256, overlap=64, batch_size=2, boxes=cells[::4], return_details=True)
    expected, exp_details = segment_large(session, image, **options)
    assert expected.max() >= 5

    real = plan.segment_tile_batch
    ran: list[tuple[int, ...]] = []

    def failing(session, grid, indices, *args, **kwargs):
        if 4 in indices:
            raise RuntimeError("worker lost (staged)")
        ran.append(tuple(indices))
        return real(session, grid, indices, *args, **kwargs)

    out = tmp_path / "out.zarr"
    monkeypatch.setattr(plan, "segment_tile_batch", failing)
    with pytest.raises(RuntimeError, match="staged"):
        segment_dask(image, client, output=out, checkpoint=checkpoint, **options)
    finished = {i for batch in ran for i in batch}
    assert finished and len(list((out / "_scratch" / "tables").glob("tile-*.npz"))) <= len(finished)

    def counting(session, grid, indices, *args, **kwargs):
        ran.append(tuple(indices))
        return real(session, grid, indices, *args, **kwargs)

    monkeypatch.setattr(plan, "segment_tile_batch", counting)
    with pytest.raises(FileExistsError, match="resume=True"):
        segment_dask(image, client, output=out, checkpoint=checkpoint, **options)
    with pytest.raises(ValueError, match="another image, other weights or other settings"):
        segment_dask(image, client, output=out, checkpoint=checkpoint, resume=True, **dict(options, overlap=32))
    with pytest.raises(ValueError, match="other settings"):
        segment_dask(image, client, output=out, checkpoint=checkpoint, resume=True, **dict(options, normalize="opencv"))
    saved = {i for i in finished if (out / "_scratch" / "tables" / f"tile-{i:06d}.npz").exists()}
    assert saved  # what finished before the failure is on disk
    ran.clear()
    labels, details = segment_dask(image, client, output=out, checkpoint=checkpoint, resume=True, **options)
    redone = {i for batch in ran for i in batch}
    assert redone and not redone & saved  # finished batches are not computed again
    np.testing.assert_array_equal(labels[...], expected)
    np.testing.assert_array_equal(details.boxes, exp_details.boxes)

    ran.clear()  # resuming a complete output returns it
    again, again_details = segment_dask(image, client, output=out, checkpoint=checkpoint, resume=True, **options)
    assert not ran
    np.testing.assert_array_equal(again[...], expected)
    np.testing.assert_array_equal(again_details.iou, exp_details.iou)
