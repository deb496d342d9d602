"""The batched pipeline gives the released per-box algorithm's labels."""
import warnings

import numpy as np
import pytest
import torch

import cellsam_trt
from cellsam_trt import CellSAM, NoCellsWarning, segment
from cellsam_trt.dev.reference import reference_segment
from cellsam_trt.dev.steering import steer_random_network
from cellsam_trt.modeling.checkpoint import random_network, write_checkpoint
from cellsam_trt.modeling.config import ModelConfig


@pytest.fixture(scope="module")
def session(steered_tiny):
    return CellSAM.from_network(steered_tiny, device="cpu")


@pytest.fixture(scope="module")
def finder_result(session, cell_image):
    return session.segment(cell_image, return_details=True)


def user_boxes(n, height, width, seed=0):
    rng = np.random.default_rng(seed)
    x1 = rng.uniform(0, width - 40, n)
    y1 = rng.uniform(0, height - 40, n)
    return np.stack([x1, y1, x1 + rng.uniform(8, 40, n), y1 + rng.uniform(8, 40, n)], 1).astype(np.float32)


def test_cellfinder_path_equals_per_box_reference(steered_tiny, cell_image, finder_result):
    labels, details = finder_result
    expected = reference_segment(steered_tiny, cell_image)
    assert labels.shape == cell_image.shape[:2] and labels.dtype == np.int32
    # the weights are steered so that the comparison has content
    assert details.num_candidates > len(details.iou) > 10
    assert labels.max() >= 5
    np.testing.assert_array_equal(labels, expected)


def test_boxes_reaching_past_the_edge_are_decoded_as_given(steered_tiny, session, cell_image):
    """CellFinder's boxes can reach outside the image; fed back (or given), such boxes are taken
    unchanged, as the released code takes them, with its labels."""
    labels, details = session.segment(cell_image, return_details=True)
    height, width = cell_image.shape[:2]
    edge = np.array([[-11, 5, 60, 70], [width - 50, height - 40, width + 20, height + 9]], np.float32)
    boxes = np.concatenate([details.boxes, edge])
    again = session.segment(cell_image, boxes=boxes)
    np.testing.assert_array_equal(again, reference_segment(steered_tiny, cell_image, boxes=boxes))
    assert again.max() >= 3


def test_an_image_file_is_segmented_with_the_axes_it_records(session, cell_image, finder_result, tmp_path):
    """``segment(read_image(p))``: the array, its channel axis from the file; a stack file is
    sent to ``segment_stack``."""
    import tifffile

    from cellsam_trt.axes import AxesGuessWarning

    channels_first = np.moveaxis(cell_image, -1, 0)
    tifffile.imwrite(tmp_path / "cyx.ome.tif", channels_first, ome=True, metadata={"axes": "CYX"})
    np.testing.assert_array_equal(session.segment(cellsam_trt.read_image(tmp_path / "cyx.ome.tif")),
                                  finder_result[0])
    tifffile.imwrite(tmp_path / "plain.tif", cell_image)  # no axes: read as the array is, with the guess said
    with pytest.warns(AxesGuessWarning, match="plain.tif: axis 2 .* stack_axis=2"):
        labels = session.segment(cellsam_trt.read_image(tmp_path / "plain.tif"))
    np.testing.assert_array_equal(labels, finder_result[0])
    tifffile.imwrite(tmp_path / "tyx.ome.tif", channels_first, ome=True, metadata={"axes": "TYX"})
    with pytest.raises(ValueError, match="segment_stack"):
        session.segment(cellsam_trt.read_image(tmp_path / "tyx.ome.tif"))


def test_user_boxes_equal_per_box_reference(steered_tiny, session, cell_image):
    boxes = user_boxes(40, *cell_image.shape[:2])
    labels, details = session.segment(cell_image, boxes=boxes, return_details=True)
    np.testing.assert_array_equal(labels, reference_segment(steered_tiny, cell_image, boxes=boxes))
    assert labels.max() >= 3
    assert details.num_candidates == 40
    assert np.isnan(details.scores).all()
    # the boxes reported are the user's, for the masks that passed the IoU filter
    assert all(any(np.array_equal(b, u) for u in boxes) for b in details.boxes)


@pytest.mark.parametrize("chunk_size", [1, 7])
def test_chunk_size_does_not_change_labels(session, cell_image, finder_result, chunk_size):
    labels = session.segment(cell_image, chunk_size=chunk_size)
    np.testing.assert_array_equal(labels, finder_result[0])


def test_details_are_consistent(finder_result):
    labels, d = finder_result
    k = len(d.iou)
    assert d.boxes.shape == (k, 4) and d.scores.shape == (k,) and d.labels_of_boxes.shape == (k,)
    assert (d.iou >= 0.5).all()
    assert (np.diff(d.scores) <= 0).all()  # decoding order is score order
    assert d.embedding.shape == (1, 32, 64, 64)
    # on the CPU the host path: no upload stage
    assert set(d.timings) == {"checks", "format", "clip", "clahe", "inputs", "encoder", "cellfinder", "boxes",
                              "decoder", "download", "cleanup", "details", "release", "total", "unattributed"}
    stages = sum(v for k, v in d.timings.items() if k not in ("total", "unattributed"))
    assert stages + d.timings["unattributed"] == pytest.approx(d.timings["total"])
    final = set(np.unique(labels)) - {0}
    assert final == set(d.labels_of_boxes[d.labels_of_boxes > 0].tolist())


def test_no_boxes_gives_zeros_and_warning(session, cell_image):
    with pytest.warns(NoCellsWarning):
        labels = session.segment(cell_image, boxes=np.zeros((0, 4)))
    assert labels.shape == cell_image.shape[:2] and not labels.any()


def test_all_masks_below_iou_threshold_gives_zeros_and_warning(cell_image):
    net = steer_random_network(random_network(ModelConfig.tiny(), seed=5), cell_image, iou_margin=-0.4, iou_spread=0.01)
    with pytest.warns(NoCellsWarning):
        labels, details = CellSAM.from_network(net).segment(cell_image, boxes=user_boxes(5, 300, 400), return_details=True)
    assert not labels.any() and len(details.iou) == 0


@pytest.mark.parametrize("dtype", [np.int8, np.uint64, np.float16, bool, np.int64])
def test_any_real_dtype_works(session, dtype):
    rng = np.random.default_rng(0)
    image = (rng.random((64, 80)) * (1 if dtype in (np.float16, bool) else 100)).astype(dtype)
    image = image > 0.5 if dtype is bool else image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoCellsWarning)
        labels = session.segment(image, boxes=[[5, 5, 30, 30], [40, 20, 70, 60]])
    assert labels.shape == (64, 80) and labels.dtype == np.int32


@pytest.mark.parametrize(
    "boxes, message",
    [
        (np.zeros((3, 5)), r"shape \(N, 4\)"),
        ([[10, 10, 5, 20]], "x2 < x1"),
        ([[420, 0, 500, 20]], "entirely outside"),
        ([[-30, 0, -1, 20]], "entirely outside"),
        ([[0, 0, np.nan, 20]], "NaN"),
        ([["a", 0, 1, 2]], "real numbers"),
        ([[0, 0, 1], [0, 0, 1, 2]], "cannot be read"),
    ],
)
def test_bad_boxes_raise(session, cell_image, boxes, message):
    with pytest.raises(ValueError, match=message):
        session.segment(cell_image, boxes=boxes)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bbox_threshold": 1.5}, "bbox_threshold"),
        ({"bbox_threshold": "high"}, "bbox_threshold"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": 2.5}, "chunk_size"),
        ({"normalize": "cv2"}, "normalize"),
        ({"normalize": None}, "normalize"),
    ],
)
def test_bad_options_raise(session, cell_image, kwargs, message):
    with pytest.raises(ValueError, match=message):
        session.segment(cell_image, **kwargs)


def test_normalize_false_needs_unit_range(session):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        session.segment(np.full((32, 32), 7.0), normalize=False, boxes=[[0, 0, 10, 10]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoCellsWarning)
        out = session.segment(np.random.default_rng(0).random((32, 32)), normalize=False, boxes=[[0, 0, 10, 10]])
    assert out.shape == (32, 32)


def test_segment_wrapper_loads_checkpoint_and_accepts_models(tmp_path, steered_tiny, session, cell_image):
    boxes = user_boxes(6, *cell_image.shape[:2], seed=2)
    path = write_checkpoint(steered_tiny, tmp_path / "w.pt")
    via_path = segment(cell_image, checkpoint=path, boxes=boxes, device="cpu")
    via_network = segment(cell_image, model=steered_tiny, boxes=boxes, device="cpu")
    via_session = cellsam_trt.segment(cell_image, model=session, boxes=boxes)
    np.testing.assert_array_equal(via_path, via_network)
    np.testing.assert_array_equal(via_path, via_session)
    with pytest.raises(ValueError, match="either model= or checkpoint="):
        segment(cell_image, model=session, checkpoint=path)
    with pytest.raises(TypeError, match="model"):
        segment(cell_image, model="weights.pt")


def test_optional_cleanups_run(session, cell_image, finder_result):
    bounded = session.segment(cell_image, remove_boundaries=True)
    assert (bounded > 0).sum() < (finder_result[0] > 0).sum()
    with warnings.catch_warnings():
        # random-weight masks are thin stripes that the disk(10) opening may remove entirely
        warnings.simplefilter("ignore", NoCellsWarning)
        smooth = session.segment(cell_image, postprocess=True)
    assert smooth.shape == cell_image.shape[:2] and smooth.dtype == np.int32


@pytest.mark.gpu
def test_cuda_matches_cpu(steered_tiny, cell_image, finder_result, no_tf32):
    from cellsam_trt.dev.accuracy import label_agreement

    labels = CellSAM.from_network(steered_tiny, device="cuda").segment(cell_image)
    # Compared cell by cell, not label id by label id: even at full fp32, CUDA kernels round
    # differently from the CPU's, so one box near the CellFinder threshold or the IoU filter
    # may come or go, and every later label id shifts by one while the cells stay the same.
    out = label_agreement(finder_result[0], labels)
    assert out["reference_cells"] >= 5, out
    assert out["f1"] >= 0.95 and out["iou_mean"] >= 0.99 and out["foreground_agreement"] >= 0.999, out


@pytest.mark.gpu
@pytest.mark.parametrize("chunk_size", [1, 7])
def test_cuda_chunks_give_the_labels_of_one_call(steered_tiny, cell_image, no_tf32, chunk_size):
    # a chunk's painting runs while the next chunk is issued: the chunks must still give the
    # cells of one call
    from cellsam_trt.dev.accuracy import label_agreement

    session = CellSAM.from_network(steered_tiny, device="cuda")
    boxes = user_boxes(40, *cell_image.shape[:2])
    whole, one_call = session.segment(cell_image, boxes=boxes, chunk_size=64, return_details=True)
    chunked, details = session.segment(cell_image, boxes=boxes, chunk_size=chunk_size, return_details=True)
    out = label_agreement(whole, chunked)
    assert out["reference_cells"] >= 3, out
    assert out["f1"] >= 0.95 and out["foreground_agreement"] >= 0.999, out
    assert abs(len(details.iou) - len(one_call.iou)) <= 1


class _SmallMemoryBackend:
    """Wraps a backend; its decoder 'runs out of memory' above ``limit`` boxes."""

    def __init__(self, inner, limit):
        self.inner, self.limit, self.calls = inner, limit, []

    def decoder(self, embedding, boxes, *, keep_iou=None, last_call=False):
        from cellsam_trt.runtime import OutOfDeviceMemory

        self.calls.append(len(boxes))
        if len(boxes) > self.limit:
            raise OutOfDeviceMemory(f"{len(boxes)} boxes do not fit")
        return self.inner.decoder(embedding, boxes, keep_iou=keep_iou, last_call=last_call)


def _with_decoder(session, fake):
    from cellsam_trt.runtime import TorchBackend

    class Patched(TorchBackend):
        def __init__(self):
            self.__dict__.update(session.backend.__dict__)

        def decoder(self, embedding, boxes, *, keep_iou=None, last_call=False):
            return fake.decoder(embedding, boxes, keep_iou=keep_iou, last_call=last_call)

    return CellSAM(Patched(), session.inference)


def test_out_of_memory_halves_the_chunk_and_keeps_labels(session, cell_image, caplog):
    boxes = user_boxes(20, *cell_image.shape[:2], seed=3)
    expected = session.segment(cell_image, boxes=boxes)
    fake = _SmallMemoryBackend(session.backend, limit=3)
    with caplog.at_level("WARNING"):
        labels = _with_decoder(session, fake).segment(cell_image, boxes=boxes, chunk_size=16)
    np.testing.assert_array_equal(labels, expected)
    assert fake.calls[:4] == [16, 8, 4, 2] and set(fake.calls[4:]) == {2}
    assert sum(fake.calls[3:]) == 20  # every box decoded once after the last failure
    assert "retrying with 2 boxes per call" in caplog.text


def test_painter_out_of_memory_is_retried_like_the_decoders(session, cell_image, monkeypatch):
    """On a GPU the painter allocates on the device too; its failures halve the chunk."""
    from cellsam_trt.engine import postprocess

    boxes = user_boxes(12, *cell_image.shape[:2], seed=4)
    expected = session.segment(cell_image, boxes=boxes)
    paint = postprocess.MaskPainter.paint
    sizes = []

    def small_paint(self, logits, first_label):
        sizes.append(len(logits))
        if len(logits) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return paint(self, logits, first_label)

    monkeypatch.setattr(postprocess.MaskPainter, "paint", small_paint)
    np.testing.assert_array_equal(session.segment(cell_image, boxes=boxes, chunk_size=12), expected)
    assert max(sizes) > 3 and sizes[-1] <= 3


def test_out_of_memory_for_one_box_is_an_error_not_partial_labels(session, cell_image):
    fake = _SmallMemoryBackend(session.backend, limit=0)
    with pytest.raises(MemoryError, match="one box does not fit"):
        _with_decoder(session, fake).segment(cell_image, boxes=user_boxes(4, *cell_image.shape[:2]))


def test_threads_share_one_session(session, cell_image):
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(cell_image[: 200 + 20 * i], user_boxes(6, 200 + 20 * i, 400, seed=i)) for i in range(4)]
    jobs += [(cell_image[:160, :200], None), (cell_image[100:, 150:], None)]  # the CellFinder path too
    sequential = [session.segment(img, boxes=b) for img, b in jobs]
    assert all(labels.any() for labels in sequential)
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda job: session.segment(job[0], boxes=job[1]), jobs))
    for a, b in zip(sequential, threaded):
        np.testing.assert_array_equal(a, b)


def test_cpu_calls_give_freed_heap_back_once_per_call(session, cell_image, monkeypatch):
    import cellsam_trt.engine.session as session_module

    calls = []
    monkeypatch.setattr(session_module, "release_freed_host_memory", lambda: calls.append(1) or True)
    boxes = user_boxes(3, *cell_image.shape[:2], seed=5)
    session.segment(cell_image, boxes=boxes)
    assert len(calls) == 1
    session.segment_batch([cell_image, cell_image], boxes=[boxes, boxes])
    assert len(calls) == 2  # one for the batch
