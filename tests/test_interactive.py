"""Embed once, prompt many times: ``CellSAM.embed``, ``segment(embedding)``, saved embeddings,
and ``interactive.Annotation`` (one decoder call per added box)."""
import warnings

import numpy as np
import pytest

from cellsam_trt import CellSAM, NoCellsWarning
from cellsam_trt.engine.embedding import ImageEmbedding
from cellsam_trt.interactive import Annotation
from cellsam_trt.modeling.checkpoint import random_network
from cellsam_trt.modeling.config import ModelConfig


@pytest.fixture(scope="module")
def session(steered_tiny):
    return CellSAM.from_network(steered_tiny, device="cpu")


@pytest.fixture(scope="module")
def embedded(session, cell_image):
    return session.embed(cell_image)


def boxes_on(image, n, seed):
    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    corner = rng.uniform(0, [w - 60, h - 60], size=(n, 2))
    return np.concatenate([corner, corner + rng.uniform(20, 60, size=(n, 2))], 1).astype(np.float32)


def counting_session(network):
    """A session whose backend counts its graph calls (in ``backend.calls``)."""
    from cellsam_trt.runtime import TorchBackend

    backend = TorchBackend(network, device="cpu")
    backend.calls = {"encoder": 0, "cellfinder": 0, "decoder": 0}

    def counting(name):
        inner = getattr(backend, name)

        def counted(*args, **kwargs):
            backend.calls[name] += 1
            return inner(*args, **kwargs)
        return counted

    for name in backend.calls:
        setattr(backend, name, counting(name))
    return CellSAM(backend)


def test_segment_on_an_embedding_equals_segment_on_the_image(session, embedded, cell_image):
    assert embedded.embedding.shape[0] == 1 and (embedded.height, embedded.width) == cell_image.shape[:2]
    assert embedded.nbytes > embedded.embedding.numel() * 4  # CellFinder's outputs are held too
    np.testing.assert_array_equal(session.segment(embedded), session.segment(cell_image))
    boxes = boxes_on(cell_image, 12, seed=0)
    labels, details = session.segment(embedded, boxes=boxes, return_details=True)
    expected, expected_details = session.segment(cell_image, boxes=boxes, return_details=True)
    assert expected.max() >= 3  # the comparison has content
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(details.labels_of_boxes, expected_details.labels_of_boxes)


def test_embedding_without_cellfinder_takes_user_boxes_only(session, steered_tiny, cell_image):
    counting = counting_session(steered_tiny)
    embedded = counting.embed(cell_image, cellfinder=False)
    assert counting.backend.calls == {"encoder": 1, "cellfinder": 0, "decoder": 0}
    with pytest.raises(ValueError, match=r"cellfinder=False\); pass boxes="):
        counting.segment(embedded)
    boxes = boxes_on(cell_image, 5, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoCellsWarning)
        np.testing.assert_array_equal(counting.segment(embedded, boxes=boxes), session.segment(cell_image, boxes=boxes))
    assert counting.backend.calls["encoder"] == 1  # segment(embedding) ran no encoder


def test_saved_embeddings_are_reused_for_the_same_image_and_weights(session, steered_tiny, cell_image, tmp_path):
    counting = counting_session(steered_tiny)
    first = counting.embed(cell_image, cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f"{first.key}.npz"]
    again = counting.embed(cell_image, cache_dir=tmp_path)
    assert counting.backend.calls["encoder"] == 1  # loaded, not computed
    np.testing.assert_array_equal(again.embedding.numpy(), first.embedding.numpy())
    np.testing.assert_array_equal(session.segment(again), session.segment(first))
    # another image, or other normalisation: another file
    counting.embed(cell_image[:200], cache_dir=tmp_path)
    counting.embed(cell_image, normalize="opencv", cache_dir=tmp_path)
    assert counting.backend.calls["encoder"] == 3 and len(list(tmp_path.iterdir())) == 3
    # other weights refuse the file
    other = CellSAM.from_network(random_network(ModelConfig.tiny(), seed=5), device="cpu")
    with pytest.raises(ValueError, match="other weights"):
        ImageEmbedding.load(tmp_path / f"{first.key}.npz", weights=other.backend.weights_identity())
    with pytest.raises(ValueError, match="other weights"):
        other.segment(first)
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="not a saved cellsam-trt embedding"):
        ImageEmbedding.load(tmp_path / "bad.npz")


def test_boxes_given_as_lists_are_taken_or_refused_by_name(session, embedded, cell_image):
    """``add`` takes one box as a list; two boxes are refused naming ``box`` and pointing to
    ``add_many``, which takes the (2, 4) list; malformed boxes name ``boxes``."""
    annotation = Annotation(session, embedded)
    two = boxes_on(cell_image, 2, seed=4).tolist()
    with pytest.raises(ValueError, match=r"^box: expected one box .*shape \(2, 4\).*add_many"):
        annotation.add(two)
    with pytest.raises(ValueError, match="^box: expected one box"):
        annotation.add([1, 2, 3])
    assert annotation.cells == [] and annotation.decoder_calls == 0  # refused before any decoding
    numbers = annotation.add_many(two)
    assert len(numbers) == 2
    single = Annotation(session, embedded)
    assert single.add(two[0]) == (1 if numbers[0] else 0)
    with pytest.raises(ValueError, match="^boxes: x2 < x1"):
        annotation.add([50, 50, 10, 60])


def test_boxes_added_one_at_a_time_give_the_labels_of_one_call(session, steered_tiny, cell_image):
    counting = counting_session(steered_tiny)
    embedded = counting.embed(cell_image, cellfinder=False)
    annotation = Annotation(counting, embedded)
    boxes = boxes_on(cell_image, 10, seed=2)
    numbers = [annotation.add(box) for box in boxes]
    assert counting.backend.calls == {"encoder": 1, "cellfinder": 0, "decoder": len(boxes)}
    kept = [b for b, n in zip(boxes, numbers) if n]
    assert len(kept) >= 3
    expected = session.segment(cell_image, boxes=boxes)
    np.testing.assert_array_equal(annotation.labels, expected)
    np.testing.assert_array_equal(annotation.boxes, np.array(kept))

    # deleting a cell: no decoder call, the labels of one call with the other boxes
    victim = next(n for n in numbers if n)
    annotation.remove(victim)
    assert counting.backend.calls["decoder"] == len(boxes)
    rest = [b for b, n in zip(boxes, numbers) if n and n != victim]
    np.testing.assert_array_equal(annotation.labels, session.segment(cell_image, boxes=np.array(rest)))
    with pytest.raises(KeyError, match="not one of this annotation's cells"):
        annotation.remove(victim)
    # moving a cell: one decoder call, the cell becomes the newest
    moved = annotation.move(annotation.cells[0], boxes[-1] + 1)
    assert counting.backend.calls["decoder"] == len(boxes) + 1
    assert moved == 0 or annotation.cells[-1] == moved


def ring_decoder_session(steered_tiny):
    """A session whose decoder draws, for each box, a ring (an ellipse with a hole when the box
    is wide enough) inside the box, the same whatever the other boxes of the call: the clean-up
    windowing is then compared exactly, with holes that swallow other cells."""
    import torch

    from cellsam_trt.runtime.base import kept_masks

    session = counting_session(steered_tiny)
    backend = session.backend
    low = backend.config.sam.low_res_size
    step = backend.config.image_size / low
    grid = (torch.arange(low, dtype=torch.float32) + 0.5) * step  # low-res pixel centres, model pixels

    def decoder(embedding, boxes, *, keep_iou=None, last_call=False):
        backend.calls["decoder"] += 1
        x0, y0, x1, y1 = (boxes[:, k, None, None].float() for k in range(4))
        cy, cx, ry, rx = (y0 + y1) / 2, (x0 + x1) / 2, (y1 - y0) / 2, (x1 - x0) / 2
        r = ((grid[None, :, None] - cy) / ry) ** 2 + ((grid[None, None, :] - cx) / rx) ** 2
        ring = (r < 1) & ((r > 0.25) | (rx < 3 * step))
        logits = torch.where(ring, 6.0, -6.0)[:, None]
        iou = torch.where((x1 - x0)[:, 0, 0] > 25 * step / 4, 0.95, 0.05)[:, None]  # thin boxes fail the filter
        return kept_masks(logits, iou, keep_iou), iou

    backend.decoder = decoder
    return session


@pytest.mark.slow
def test_edits_redo_the_clean_up_only_where_they_reach(steered_tiny, cell_image):
    """A long random sequence of overlapping adds, removals and moves: after every edit the
    labels equal one call with the kept boxes, and a small box cleans a window, not the image."""
    session = ring_decoder_session(steered_tiny)
    embedded = session.embed(cell_image, cellfinder=False)
    annotation = Annotation(session, embedded)
    rng = np.random.default_rng(7)
    h, w = cell_image.shape[:2]
    corner = rng.uniform(0, [w - 30, h - 30], size=(60, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(6, 30, size=(60, 2))], 1).astype(np.float32)
    boxes[::9, 2:] = np.minimum(boxes[::9, :2] + 80, [w, h])  # a few large rings that swallow cells in their holes
    partial = dropped = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoCellsWarning)
        for step, box in enumerate(boxes):
            cell = annotation.add(box)
            dropped += cell == 0
            rows, cols = annotation.changed
            partial += bool(cell) and (rows.stop - rows.start) * (cols.stop - cols.start) < h * w / 4
            if step % 5 == 4 and annotation.cells:
                annotation.remove(annotation.cells[int(rng.integers(len(annotation.cells)))])
            if step % 7 == 6 and annotation.cells:
                annotation.move(annotation.cells[0], np.minimum(box + 3, [w, h, w, h]))
            expected = session.segment(embedded, boxes=annotation.boxes) if annotation.cells else 0 * annotation.labels
            np.testing.assert_array_equal(annotation.labels, expected, err_msg=f"after edit {step}")
            numbers = np.unique(annotation.cell_labels)
            assert set(numbers[numbers > 0]) <= set(annotation.cells)
            np.testing.assert_array_equal(annotation.cell_labels > 0, annotation.labels > 0)
    assert annotation.labels.max() >= 15 and dropped >= 3  # the comparison had content
    assert partial >= 20
    # cell-sized masks keep cell-sized logits, not the whole (L, L) mask each
    side = session.backend.config.sam.low_res_size
    assert 0 < annotation.nbytes < len(annotation.cells) * side * side * 4 / 20


def test_an_annotation_agrees_with_one_call_of_the_real_decoder(session, cell_image):
    """With the real decoder a box decoded alone and in a batch can differ in the last
    float bits (matrix products block differently by batch size), so a boundary pixel may
    flip: the labels agree with one call to within a few pixels, with the same cells."""
    embedded = session.embed(cell_image, cellfinder=False)
    annotation = Annotation(session, embedded)
    for box in boxes_on(cell_image, 24, seed=11):
        annotation.add(box)
    for cell in annotation.cells[::6]:
        annotation.remove(cell)
    expected = session.segment(embedded, boxes=annotation.boxes)
    assert expected.max() >= 3
    assert annotation.labels.max() == expected.max()
    assert (annotation.labels != expected).mean() < 1e-4


def test_undo_and_redo_restore_the_labels_exactly_without_the_decoder(steered_tiny, cell_image):
    session = ring_decoder_session(steered_tiny)
    embedded = session.embed(cell_image, cellfinder=False)
    h, w = cell_image.shape[:2]
    rng = np.random.default_rng(3)
    corner = rng.uniform(0, [w - 40, h - 40], size=(30, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(12, 40, size=(30, 2))], 1).astype(np.float32)
    # a starting set decoded in the batched calls of one segment call, as from CellFinder
    start = Annotation(session, embedded, boxes=boxes[:20], scores=np.linspace(0.5, 0.9, 20))
    from cellsam_trt.engine.memory import fit_chunk_size

    chunk = fit_chunk_size(session.backend.config, session.backend.device, h, w, session.inference.chunk_size)
    assert session.backend.calls["decoder"] == -(-20 // chunk) and not start.undo()
    np.testing.assert_array_equal(start.labels, session.segment(embedded, boxes=start.boxes))
    table = start.table()
    assert len(table.iou) == len(table.scores) == len(table.boxes) >= start.labels.max()
    assert np.all(np.isfinite(table.scores))

    states = [start.labels.copy()]
    start.add(boxes[20])
    states.append(start.labels.copy())
    start.remove(start.cells[3])
    states.append(start.labels.copy())
    start.move(start.cells[5], boxes[21])
    states.append(start.labels.copy())
    start.add_many(boxes[22:26])
    states.append(start.labels.copy())
    calls = session.backend.calls["decoder"]
    for expected in reversed(states[:-1]):  # undo every edit, one at a time
        assert start.undo()
        np.testing.assert_array_equal(start.labels, expected)
    assert not start.undo()
    for expected in states[1:]:
        assert start.redo()
        np.testing.assert_array_equal(start.labels, expected)
    assert not start.redo()
    assert session.backend.calls["decoder"] == calls  # undo and redo decoded nothing
    np.testing.assert_array_equal(start.labels, session.segment(embedded, boxes=start.boxes))
    start.undo()
    start.add(boxes[27])  # a new edit after an undo drops what could be redone
    assert not start.redo()


def test_an_annotation_from_cellfinder_has_the_labels_of_the_automatic_call(session, embedded):
    annotation = Annotation.from_cellfinder(session, embedded)
    labels, details = session.segment(embedded, return_details=True)
    assert labels.max() >= 3
    np.testing.assert_array_equal(annotation.labels, labels)
    np.testing.assert_allclose(annotation.boxes, details.boxes)
    table = annotation.table()  # row L - 1 describes label L
    final = details.labels_of_boxes
    assert (final > 0).sum() >= 3
    np.testing.assert_array_equal(table.scores[final[final > 0] - 1], details.scores[final > 0])
    np.testing.assert_array_equal(table.boxes[final[final > 0] - 1], details.boxes[final > 0])
    assert not annotation.undo()  # the starting point is not an edit
    with pytest.raises(ValueError, match="cellfinder=True"):
        Annotation.from_cellfinder(session, session.embed(np.asarray(embedded_image_stub(embedded)), cellfinder=False))


def embedded_image_stub(embedded):
    """A small image of the embedded one's size (content does not matter for the refusal)."""
    return np.zeros((embedded.height, embedded.width), np.uint8)


@pytest.mark.gpu
def test_an_annotation_on_cuda_matches_one_call_and_undoes_exactly(steered_tiny, cell_image):
    session = CellSAM.from_network(steered_tiny, device="cuda")
    embedded = session.embed(cell_image)
    annotation = Annotation.from_cellfinder(session, embedded)
    np.testing.assert_array_equal(annotation.labels, session.segment(embedded))
    before = annotation.labels.copy()
    for box in boxes_on(cell_image, 6, seed=5):
        annotation.add(box)
    annotation.remove(annotation.cells[0])
    kept_boxes = annotation.boxes
    inside = np.all((kept_boxes[:, :2] >= 0) & (kept_boxes[:, 2:] <= cell_image.shape[1::-1]), axis=1)
    if inside.all():  # CellFinder's boxes may reach past the edge, which segment(boxes=) refuses
        expected = session.segment(embedded, boxes=kept_boxes)
        assert (annotation.labels != expected).mean() < 1e-3
    while annotation.undo():
        pass
    np.testing.assert_array_equal(annotation.labels, before)
