"""The torch port of the preprocessing against the host path (numpy, scikit-image).

On the CPU the port gives the host path's numbers exactly (the tolerance written in the
README for the CPU is 0); on CUDA the model inputs agree within ``DEVICE_TOLERANCE``.
"""
import logging

import numpy as np
import pytest
import torch
from skimage.exposure._adapthist import _clahe, clip_histogram

from cellsam_trt import CellSAM
from cellsam_trt.dev.synthetic import bench_image, cell_boxes, synthetic_cells
from cellsam_trt.engine import device_preprocess as dp
from cellsam_trt.engine import preprocess as pre

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n", [1, 2, 3, 1000, 40001])
def test_percentiles_are_numpys(n, dtype):
    rng = np.random.default_rng(n)
    values = (rng.standard_normal(n) * 100 * (rng.random(n) > 0.4)).astype(dtype)
    values[0] = 5  # at least one non-zero value
    nonzero = values[values != 0]
    rows = torch.from_numpy(values)[None]
    assert dp.percentiles_of_nonzero(rows, 99.9).item() == np.percentile(nonzero, 99.9)
    np.testing.assert_array_equal(dp.percentiles_of_nonzero(rows, [0.0, 99.5])[0].numpy(),
                                  np.percentile(nonzero, [0.0, 99.5]))


def test_a_row_without_nonzero_values_has_no_percentile_and_is_left_as_it_is():
    assert torch.isnan(dp.percentiles_of_nonzero(torch.zeros(2, 10), 99.9)).all()
    image = torch.zeros(3, 4, 5, dtype=torch.float64)
    image[2] = torch.arange(20.0).view(4, 5)
    clipped = dp.percentile_clip(image)
    np.testing.assert_array_equal(clipped.numpy().transpose(1, 2, 0),
                                  pre.percentile_clip(image.numpy().transpose(1, 2, 0)))


@pytest.mark.parametrize("seed", range(4))
def test_histogram_clipping_is_scikit_images(seed):
    """Spiky histograms, so that the redistribution loop runs (several passes for some rows)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(64):
        hist = rng.poisson(rng.uniform(0.5, 80), 256)
        hist[rng.integers(0, 256, rng.integers(1, 6))] += rng.integers(100, 9000)
        rows.append(hist)
    rows.append(np.zeros(256, np.int64))  # an empty region
    rows.append(np.full(256, 163))  # every bin at the limit: nothing to move
    limit = 163
    want = np.stack([clip_histogram(r.copy(), limit) for r in rows])
    got = dp.clip_histograms(torch.from_numpy(np.stack(rows)).to(torch.int64), limit).numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [(300, 257), (1024, 1024), (64, 90), (5, 3), (129, 700)])
def test_clahe_levels_are_scikit_images(shape):
    rng = np.random.default_rng(sum(shape))
    plane = rng.random(shape) ** 3
    plane[: shape[0] // 3] = 0.25  # a flat region: clipped histograms
    levels = pre.quantize_for_clahe(plane)
    np.testing.assert_array_equal(dp.quantize_for_clahe(torch.from_numpy(plane)[None])[0].numpy(), levels)
    want = _clahe(levels, [pre.CLAHE_KERNEL] * 2, pre.CLAHE_CLIP_LIMIT, pre.CLAHE_NBINS)
    got = dp.equalize_levels(torch.from_numpy(levels.astype(np.int64))[None])[0].numpy()
    np.testing.assert_array_equal(got, want)


def images():
    two = synthetic_cells(300, 420, n_cells=30, seed=3)
    one = synthetic_cells(200, 150, n_cells=8, seed=4)[..., 1]
    constant = np.stack([two[..., 0], np.full(two.shape[:2], 9, two.dtype), two[..., 1]], axis=-1)
    floats = (np.random.default_rng(5).random((130, 260)) * 2 - 0.5).astype(np.float32)
    return {"two channels": two, "one channel": one, "a constant channel": constant, "negative floats": floats,
            "check image": dp.check_image()}


@pytest.mark.parametrize("name, adapted", [(name, True) for name in images()] + [("two channels", False)])
def test_model_inputs_on_the_cpu_are_the_host_paths(name, adapted):
    formatted = pre.format_image(images()[name])
    host = pre.to_tensor(pre.normalize_image(formatted.copy()))
    np.testing.assert_array_equal(dp.normalize_image(torch.from_numpy(formatted.transpose(2, 0, 1).copy())).numpy(),
                                  pre.normalize_image(formatted.copy()).transpose(2, 0, 1))
    embedding, finder = dp.model_inputs(formatted, "cpu", 1024, adapted)
    assert embedding.dtype == finder.dtype == torch.float32 and embedding.shape == finder.shape == (1, 3, 1024, 1024)
    torch.testing.assert_close(embedding, pre.embedding_input(host, 1024, adapted), rtol=0, atol=0)
    torch.testing.assert_close(finder, pre.cellfinder_input(host, 1024, adapted), rtol=0, atol=0)
    assert dp.agreement(formatted, "cpu", 1024, adapted) == {"embedding_input": 0.0, "cellfinder_input": 0.0,
                                                             "cellfinder_level_moves": 0.0}


@pytest.fixture(scope="module")
def session(steered_tiny):
    return CellSAM.from_network(steered_tiny, device="cpu")


def test_labels_of_the_torch_path_are_the_host_paths(session, cell_image):
    host, host_details = session.segment(cell_image, normalize="skimage", return_details=True)
    device, details = session.segment(cell_image, normalize="torch", return_details=True)
    assert host.any()
    np.testing.assert_array_equal(device, host)
    np.testing.assert_array_equal(details.embedding, host_details.embedding)
    assert {"format", "upload", "clip", "clahe", "inputs"} <= set(details.timings)
    boxes = cell_boxes(40, *cell_image.shape[:2], seed=2)
    np.testing.assert_array_equal(session.segment(cell_image, boxes=boxes, normalize="torch"),
                                  session.segment(cell_image, boxes=boxes, normalize="skimage"))


def test_on_the_cpu_the_default_is_the_host_path(session, cell_image, monkeypatch):
    monkeypatch.setattr(dp, "model_inputs", lambda *a, **k: pytest.fail("the CPU default ran the device path"))
    assert session.core.normalization(True) == "skimage" and not session.core.device_normalization
    assert session.core.normalization("torch") == "torch" and session.core.normalization(False) is None
    details = session.segment(cell_image, return_details=True)[1]
    assert "upload" not in details.timings


def test_a_failing_start_up_check_keeps_the_host_path(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(dp, "agreement", broken)
    with caplog.at_level(logging.WARNING):
        assert not dp.self_check("cpu", 1024, True)
    assert "the host path (scikit-image) runs" in caplog.text
    monkeypatch.setattr(dp, "agreement", lambda *a, **k: {**dict.fromkeys(dp.DEVICE_TOLERANCE, 0.0),
                                                          "embedding_input": 0.5})
    with caplog.at_level(logging.WARNING):
        assert not dp.self_check("cpu", 1024, True)
    assert "beyond the tolerance" in caplog.text


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the device path on CUDA)")
@pytest.mark.parametrize("name", list(images()))
def test_model_inputs_on_cuda_agree_with_the_host_path(name):
    formatted = pre.format_image(images()[name])
    measured = dp.agreement(formatted, "cuda", 1024, True)
    assert all(measured[k] <= dp.DEVICE_TOLERANCE[k] for k in measured), measured


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the device path on CUDA)")
def test_cuda_sessions_preprocess_on_the_device_with_the_host_paths_labels(steered_tiny):
    session = CellSAM.from_network(steered_tiny, device="cuda")
    assert session.core.normalization(True) == "torch"
    image = bench_image(size=512, n_cells=120, seed=0)
    host = session.segment(image, normalize="skimage")
    device, details = session.segment(image, return_details=True)
    assert "upload" in details.timings
    agree = ((host > 0) == (device > 0)).mean()
    assert agree > 0.999, agree


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.int16, np.int64, np.float16, np.float32,
                                   np.bool_])
def test_the_image_crosses_in_its_own_dtype_with_the_same_values(dtype):
    rng = np.random.default_rng(0)
    high = {np.uint8: 255, np.uint16: 65535, np.uint32: 2**32 - 1, np.int16: 32767, np.int64: 2**40}.get(dtype, 1)
    image = (rng.random((40, 30, 2)) * high).astype(dtype)
    image.flat[0] = high if dtype not in (np.float16, np.float32, np.bool_) else image.flat[0]
    channels = pre.checked_channels(image, channel_axis=-1)
    np.testing.assert_array_equal(dp.upload(channels, "cpu").numpy(),
                                  pre.format_image(image, channel_axis=-1).transpose(2, 0, 1))
