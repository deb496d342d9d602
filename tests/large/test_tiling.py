"""Large images: tile grid, exact whole-image normalisation in chunks, stitching, segment_large."""
import logging
import os
import warnings

import numpy as np
import pytest

from cellsam_trt import CellSAM, NoCellsWarning
from cellsam_trt.dev.synthetic import synthetic_slide
from cellsam_trt.engine import preprocess as pre
from cellsam_trt.engine.source import ImageSource, open_image
from cellsam_trt.large.grid import TileGrid, regions
from cellsam_trt.large.normalize import normalize_large, percentile_of_top, scale_clahe
from cellsam_trt.large.plan import assign_boxes
from cellsam_trt.large.stitch import label_dtype, paint_tile, stitch_tiles, tile_candidates
from cellsam_trt.large.tiling import segment_large

# ---------------------------------------------------------------------------- grid

@pytest.mark.parametrize("length", [64, 300, 1024, 1025, 1100, 2500, 3000, 4097])
@pytest.mark.parametrize("tile,overlap", [(1024, 128), (256, 64), (128, 0), (512, 256)])
def test_grid_covers_image_with_overlap_and_cores_partition_it(length, tile, overlap):
    grid = TileGrid.plan(length, 5000, tile, overlap)
    starts, bounds = grid.starts_y, grid.bounds_y
    size = min(tile, length)
    assert grid.tile_size == size and grid.overlap == min(overlap, size // 2)
    overlap = grid.overlap
    assert TileGrid.plan(length, min(length, tile), tile, overlap).shape[1] == 1
    assert starts[0] == 0 and starts[-1] + size == length
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # overlap >= O
    assert bounds[0] == 0 and bounds[-1] == length and list(bounds) == sorted(bounds)
    for k, s in enumerate(starts):
        core0, core1 = bounds[k], bounds[k + 1]
        assert core0 < core1
        # inner core edges keep at least O/2 of context inside the tile
        if k > 0:
            assert core0 - s >= overlap // 2
        if k < len(starts) - 1:
            assert s + size - core1 >= overlap // 2
    if length <= tile:
        assert len(starts) == 1


def test_tiles_are_square_for_narrow_images():
    grid = TileGrid.plan(300, 5000, 1024, 128)
    assert grid.shape[0] == 1 and grid.tile_size == 300 and grid.overlap == 128
    assert all(t.shape == (300, 300) for t in grid.tiles())
    assert TileGrid.plan(100, 1900, 1024, 128).overlap == 50
    single = TileGrid.plan(300, 900, 1024, 128)  # fits one tile: the whole image, like segment()
    assert len(single) == 1 and single.tile(0).shape == (300, 900)


def test_grid_tiles_and_owner():
    grid = TileGrid.plan(3000, 2500, 1024, 128)
    tiles = grid.tiles()
    assert len(tiles) == len(grid) == grid.shape[0] * grid.shape[1]
    assert all(t.shape == (1024, 1024) for t in tiles)
    cover = np.zeros((3000, 2500), np.int32)
    for t in tiles:
        cover[t.cy0:t.cy1, t.cx0:t.cx1] += 1
    assert (cover == 1).all()  # cores partition the image
    ys, xs = np.random.default_rng(0).integers(0, [3000, 2500], size=(500, 2)).T
    for y, x, owner in zip(ys, xs, grid.owner(ys, xs)):
        t = grid.tile(int(owner))
        assert t.cy0 <= y < t.cy1 and t.cx0 <= x < t.cx1


@pytest.mark.parametrize("kwargs, name", [
    (dict(tile_size=32), "tile_size"), (dict(tile_size=256.0), "tile_size"), (dict(overlap=-1), "overlap"),
    (dict(overlap=200, tile_size=256), "overlap"), (dict(overlap=True), "overlap"),
])
def test_grid_rejects_bad_sizes(kwargs, name):
    args = dict(tile_size=256, overlap=32) | kwargs
    with pytest.raises(ValueError, match=name):
        TileGrid.plan(1000, 1000, **args)


def test_regions_cover_and_merge_slivers():
    parts = regions(513, 1025, 256)
    cover = np.zeros((513, 1025), np.int32)
    for y0, y1, x0, x1 in parts:
        assert y1 - y0 >= 2 and x1 - x0 >= 2
        cover[y0:y1, x0:x1] += 1
    assert (cover == 1).all()


# ------------------------------------------------------------------ normalisation

def test_percentile_of_top_equals_numpy():
    rng = np.random.default_rng(1)
    for n in [1, 2, 3, 10, 999, 1000, 1001, 54321]:
        values = rng.standard_normal(n) * rng.choice([1e-3, 1.0, 1e5])
        keep = int(np.ceil(n * 0.001)) + 2
        top = rng.permutation(np.sort(values)[-keep:])
        assert percentile_of_top(top, n) == np.percentile(values, 99.9)


@pytest.mark.parametrize("method", pre.CLAHE_METHODS)
@pytest.mark.parametrize("shape, block, dtype", [
    ((700, 900, 2), 256, np.uint16),   # blocks smaller than the image, aligned to the kernels
    ((513, 1030, 3), 300, np.uint16),  # blocks not a multiple of the CLAHE kernel, constant channel
    ((301, 257), 256, np.float32),     # 2-D float with negative values, remainder rows
])
def test_chunked_normalisation_is_the_whole_image_one(shape, block, dtype, method):
    rng = np.random.default_rng(0)
    image = (rng.random(shape) ** 3 * 5000).astype(dtype)
    image[:40] = 0
    if len(shape) == 3 and shape[2] == 3:
        image[..., 0] = 7
    if dtype == np.float32:
        image -= 300
    # "torch" runs the port of scikit-image's CLAHE: the same numbers as "skimage"
    expected = pre.normalize_image(pre.format_image(image), "skimage" if method == "torch" else method)
    expected = expected.astype(np.float32)
    clahe, norm = normalize_large(ImageSource(image), block=block, method=method)
    np.testing.assert_array_equal(scale_clahe(clahe, norm), expected)
    region = scale_clahe(clahe[100:250, 37:200], norm)
    np.testing.assert_array_equal(region, expected[100:250, 37:200])


def test_all_zero_image_normalises_to_zero():
    clahe, norm = normalize_large(ImageSource(np.zeros((300, 400), np.uint8)), block=256)
    assert all(n.constant for n in norm) and not scale_clahe(clahe, norm).any()


# --------------------------------------------------------------------- stitching

def disc_labels(height, width, centres, radius):
    labels = np.zeros((height, width), np.int32)
    yy, xx = np.ogrid[:height, :width]
    for k, (cy, cx) in enumerate(centres, 1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = k
    return labels


def border_centres(grid, radius, rng, extra=40):
    """Disc centres on core boundaries, tile edges, their crossings (corners), the image border, and random."""
    def special(starts, bounds, length):
        inner_edges = [s for s in starts[1:]] + [s + min(grid.tile_size, length) - 1 for s in starts[:-1]]
        return sorted(set(list(bounds[1:-1]) + inner_edges + [0, length - 1]))

    ys = special(grid.starts_y, grid.bounds_y, grid.height)
    xs = special(grid.starts_x, grid.bounds_x, grid.width)
    candidates = [(y, x) for y in ys for x in xs]
    candidates += [(y, int(x)) for y in ys for x in rng.integers(0, grid.width, 3)]
    candidates += [(int(y), x) for x in xs for y in rng.integers(0, grid.height, 3)]
    candidates += [tuple(int(v) for v in p) for p in rng.integers(0, [grid.height, grid.width], size=(extra, 2))]
    chosen = []
    for c in candidates:
        if all((c[0] - d[0]) ** 2 + (c[1] - d[1]) ** 2 > (2 * radius + 3) ** 2 for d in chosen):
            chosen.append(c)
    return chosen


def tile_views(grid, truth, rng, disagree=False):
    """What independent per-tile segmentations would return: crops of the truth (cells cut at
    the tile edges), ids shuffled per tile; with ``disagree``, views of cells a tile does not
    own are grown by a pixel or lost."""
    from scipy.ndimage import binary_dilation

    views = []
    for t in grid.tiles():
        crop = truth[t.y0:t.y1, t.x0:t.x1].copy()
        if disagree:
            for k in np.unique(crop)[1:]:
                ys, xs = np.nonzero(crop == k)
                cy, cx = ys.mean() + t.y0, xs.mean() + t.x0
                if t.cy0 <= cy < t.cy1 and t.cx0 <= cx < t.cx1:
                    continue
                if rng.random() < 0.3:
                    crop[crop == k] = 0
                else:
                    crop[binary_dilation(crop == k) & (crop == 0)] = k
        ids = np.unique(crop)[1:]
        lut = np.zeros(truth.max() + 1, np.int32)
        lut[ids] = rng.permutation(len(ids)) + 1  # ids repeat between tiles
        views.append(lut[crop])
    return views


def assert_same_partition(result, truth):
    """result equals truth up to renaming the cells (one label per cell, same pixels)."""
    assert ((result > 0) == (truth > 0)).all()
    pairs = np.unique(np.stack([truth[truth > 0], result[truth > 0]]), axis=1)
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


@pytest.mark.parametrize("disagree", [False, True])
def test_stitching_cells_on_borders_and_corners(disagree):
    rng = np.random.default_rng(3)
    grid = TileGrid.plan(700, 610, 256, 64)
    radius = 12  # < overlap / 2: every cell lies whole in the tile that owns it
    truth = disc_labels(700, 610, border_centres(grid, radius, rng), radius)
    assert truth.max() > 60
    result = stitch_tiles(grid, tile_views(grid, truth, rng, disagree))
    assert result.dtype == np.int32
    # ids unique over the image and consecutive; no duplicates, no cut halves
    assert set(np.unique(result)) == set(range(truth.max() + 1))
    assert_same_partition(result, truth)


@pytest.mark.parametrize("lean", [+2, -2], ids=["views-lean-apart-would-lose", "views-lean-together-would-split"])
def test_tiles_that_disagree_about_a_boundary_cell_give_one_label(lean):
    """Both tiles see a cell near the core boundary whole, but each view puts its centroid
    on the other side (``lean`` > 0: both outside their core, the centroid rule alone loses
    the cell) or both on their own side (< 0: both keep it, two halves split at the boundary).
    The band matching keeps exactly one view."""
    from cellsam_trt.dev.accuracy import label_agreement

    grid = TileGrid.plan(256, 700, 256, 64)  # one row of four tiles
    radius = 12
    centres = [(y, b + side) for b in grid.bounds_x[1:-1] for y, side in zip(range(20, 240, 30), [-1, 1] * 4)]
    centres += [(128, 100), (128, 600)]  # far from any boundary: one view only
    truth = disc_labels(256, 700, centres, radius)
    views = []
    for t in grid.tiles():
        shifted = []
        for cy, cx in centres:
            # a boundary cell seen from the tile left of it leans right by ``lean``, and vice versa
            near = [b for b in grid.bounds_x[1:-1] if abs(cx - b) <= 1]
            dx = 0 if not near else (lean if t.cx1 <= near[0] else -lean)
            shifted.append((cy, cx + dx))
        views.append(disc_labels(256, 700, shifted, radius)[t.y0:t.y1, t.x0:t.x1])
    result = stitch_tiles(grid, views)
    agreement = label_agreement(truth, result)
    assert agreement["reference_cells"] == len(centres) == agreement["test_cells"] == agreement["matched"]
    assert agreement["iou_min"] > 0.75  # each kept view is the cell, shifted by 2 px


def test_stitching_conflicting_views_is_region_independent():
    """Painting the whole image or chunk by chunk (the dask path) gives the same pixels."""
    rng = np.random.default_rng(4)
    grid = TileGrid.plan(500, 450, 200, 64)
    truth = disc_labels(500, 450, border_centres(grid, 20, rng, extra=30), 20)
    views = tile_views(grid, truth, rng, disagree=True)
    kept = [tile_candidates(v, t, 500, 450)[0] for v, t in zip(views, grid.tiles())]
    offsets = np.cumsum([0] + [int(k.max()) for k in kept])
    whole = np.zeros((500, 450), np.uint32)
    for k, t, off in zip(kept, grid.tiles(), offsets):
        paint_tile(whole, (0, 0), k, t, int(off))
    chunked = np.zeros((500, 450), np.uint32)
    for y0, y1, x0, x1 in regions(500, 450, 97):
        part = np.zeros((y1 - y0, x1 - x0), np.uint32)
        for t in grid.overlapping(y0, y1, x0, x1):
            paint_tile(part, (y0, x0), kept[t.index], t, int(offsets[t.index]))
        chunked[y0:y1, x0:x1] = part
    np.testing.assert_array_equal(whole, chunked)


def test_more_than_65535_cells_gives_uint32_and_unique_ids():
    grid = TileGrid.plan(600, 600, 128, 16)
    truth = np.zeros((600, 600), np.int64)
    truth[::2, ::2] = np.arange(1, 300 * 300 + 1).reshape(300, 300)  # 90000 one-pixel cells
    result = stitch_tiles(grid, tile_views(grid, truth, np.random.default_rng(0)))
    assert result.dtype == np.uint32 and label_dtype(70000) == np.uint32 and label_dtype(65535) == np.int32
    assert result.max() == 90000
    assert_same_partition(result, truth)


def test_big_cells_are_flagged_as_possibly_cut():
    grid = TileGrid.plan(600, 300, 256, 32)
    b = grid.bounds_y[1]
    truth = disc_labels(600, 300, [(b, 150), (100, 150)], 60)  # radius 60 > overlap / 2
    owner = grid.tile(int(grid.owner(np.array([b]), np.array([150]))[0]))
    _, kept, cut = tile_candidates(truth[owner.y0:owner.y1, owner.x0:owner.x1], owner, 600, 300)[:3]
    assert 1 in kept and cut[list(kept).index(1)]


# --------------------------------------------------------------- segment_large

@pytest.fixture(scope="module")
def session(steered_tiny):
    return CellSAM.from_network(steered_tiny, device="cpu")


def reference_tiled(session, image, grid, tile_boxes=None):
    """Independent composition: whole-image normalize_image, plain segment() per tile, stitch_tiles."""
    norm = pre.normalize_image(pre.format_image(image)).astype(np.float32)
    views = []
    for t in grid.tiles():
        crop = norm[t.y0:t.y1, t.x0:t.x1]
        if tile_boxes is not None and t.index not in tile_boxes:
            views.append(np.zeros(t.shape, np.int32))
            continue
        boxes = None if tile_boxes is None else tile_boxes[t.index]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoCellsWarning)  # tiles without cells are expected
            views.append(session.segment(crop, boxes=boxes, normalize=False, channel_axis=-1))
    return stitch_tiles(grid, views, keep_all=tile_boxes is not None)


def test_cellfinder_tiles_equal_per_tile_segment_and_stitch(session):
    # big cells: on this image the random weights give a few dozen detections, not hundreds
    image = synthetic_slide(600, 384, density=0.25, cell_radius=20, seed=1)[0]
    grid = TileGrid.plan(600, 384, 384, 64)
    assert len(grid) == 2
    labels, details = segment_large(session, image, tile_size=384, overlap=64, batch_size=2, return_details=True)
    assert details.num_candidates > 0 and labels.max() >= 2  # the comparison has content
    assert set(details.tile_of_cell) == {0, 1}
    np.testing.assert_array_equal(labels, reference_tiled(session, image, grid))
    assert labels.dtype == np.int32
    assert set(np.unique(labels)) == set(range(labels.max() + 1))
    assert details.num_cells == labels.max() and details.boxes.shape == (labels.max(), 4)
    assert np.isfinite(details.scores[np.isfinite(details.boxes[:, 0])]).all()
    assert ((details.tile_of_cell >= 0) & (details.tile_of_cell < 2)).all()
    assert set(details.timings) == {"normalize", "tiles", "stitch"}


@pytest.mark.slow
def test_3000x2500_end_to_end_with_user_boxes(session):
    image, cells = synthetic_slide(3000, 2500, seed=1)
    rng = np.random.default_rng(0)
    grid = TileGrid.plan(3000, 2500, 1024, 128)
    owners = grid.owner((cells[:, 1] + cells[:, 3]) / 2, (cells[:, 0] + cells[:, 2]) / 2)
    # boxes in three tiles (one on the image border, two inner), some near tile borders
    picked = np.concatenate([rng.choice(np.flatnonzero(owners == k), 5, replace=False) for k in (0, 4, 10)])
    boxes = cells[picked]
    labels, details = segment_large(session, image, boxes=boxes, return_details=True)
    assert labels.shape == (3000, 2500) and labels.dtype == np.int32
    assert 1 <= labels.max() <= len(boxes)
    assert set(np.unique(labels)) == set(range(labels.max() + 1))
    assert set(np.unique(details.tile_of_cell)) <= {0, 4, 10}
    assert np.isnan(details.scores).all() and details.num_candidates == len(boxes)
    # every reported box is one of the user's boxes
    assert all(any(np.allclose(b, u) for u in boxes) for b in details.boxes if np.isfinite(b).all())
    tile_boxes = assign_boxes(grid, boxes)
    assert sorted(tile_boxes) == [0, 4, 10]
    np.testing.assert_array_equal(labels, reference_tiled(session, image, grid, tile_boxes))


def test_boxes_past_the_image_edge_keep_their_outside_part_on_the_tiled_path(session, caplog):
    """A box reaching past the image's edge goes to the tile holding its centre (clamped to the
    image) and stays as given on that side, as the whole-image path passes it; only a tile
    edge inside the image cuts it."""
    grid = TileGrid.plan(700, 300, 512, 64)  # 300 x 300 tiles in one column
    boxes = np.array([[-11, -5, 40, 60],        # top-left corner, reaching out on two sides
                      [-60, 100, 10, 140],      # centre left of the image
                      [250, 650, 320, 712],     # bottom-right corner
                      [100, 150, 140, 320]],    # crosses the inner edge of tile 0 (y = 300)
                     np.float32)
    with caplog.at_level(logging.WARNING, logger="cellsam_trt.large.plan"):
        tile_boxes = assign_boxes(grid, boxes)
    last = grid.tile(len(grid) - 1)
    np.testing.assert_array_equal(tile_boxes[0], [[-11, -5, 40, 60], [-60, 100, 10, 140], [100, 150, 140, 300]])
    np.testing.assert_array_equal(tile_boxes[last.index], [[250 - last.x0, 650 - last.y0, 320 - last.x0,
                                                            712 - last.y0]])
    assert "1 boxes reach beyond the tile" in caplog.text  # only the one cut by an inner edge

    image = synthetic_slide(700, 300, seed=5)[0]
    labels = segment_large(session, image, boxes=boxes, tile_size=512, overlap=64)  # accepted as given
    assert labels.shape == (700, 300)


def test_small_image_is_segment_unchanged(session, cell_image):
    boxes = np.array([[10, 10, 60, 70], [100, 120, 160, 170]], np.float32)
    expected = session.segment(cell_image, boxes=boxes)
    np.testing.assert_array_equal(segment_large(session, cell_image, boxes=boxes), expected)
    labels, details = segment_large(session, cell_image, boxes=boxes, return_details=True)
    assert details.grid is None and (details.tile_of_cell == -1).all() and len(details.iou) == labels.max()


def test_lazy_sources_give_the_same_labels(session, tmp_path):
    import tifffile

    image, cells = synthetic_slide(700, 300, seed=5)
    boxes = cells[:6]
    expected = segment_large(session, image, boxes=boxes, tile_size=512, overlap=64)
    path = tmp_path / "slide.ome.tif"
    tifffile.imwrite(path, np.moveaxis(image, -1, 0), ome=True, compression="zlib", tile=(128, 128))
    lazy = open_image(path, lazy=True)
    assert lazy.shape == (2, 700, 300) and not isinstance(lazy, np.ndarray)
    np.testing.assert_array_equal(segment_large(session, lazy, boxes=boxes, tile_size=512, overlap=64), expected)


@pytest.mark.parametrize("image, kwargs, name", [
    (np.zeros((5, 4, 3, 2)), {}, "image"),
    (np.zeros((300, 300, 5)), {}, "image"),
    (np.zeros((300, 300), complex), {}, "image"),
    (np.zeros((300, 300)), dict(batch_size=0), "batch_size"),
    (np.zeros((300, 300)), dict(tile_size=10), "tile_size"),
    (np.zeros((3000, 300)), dict(boxes=[[310, 0, 400, 10]]), "boxes"),  # entirely outside the 300-wide image
    (np.zeros((3000, 300, 2)), dict(channel_axis=7), "channel_axis"),
    ("not an image", {}, "image"),
])
def test_bad_arguments_name_themselves(session, image, kwargs, name):
    with pytest.raises(ValueError, match=name):
        segment_large(session, image, **kwargs)


def test_segment_batch_equals_segment_per_image(session, cell_image):
    second = cell_image[:200, :256]
    boxes = [np.array([[10, 10, 60, 70], [150, 100, 200, 160]], np.float32),
             np.array([[5, 5, 40, 50]], np.float32)]
    batched = session.segment_batch([cell_image, second], boxes=boxes, return_details=True)
    for (labels, details), image, b in zip(batched, [cell_image, second], boxes):
        expected, exp_details = session.segment(image, boxes=b, return_details=True)
        np.testing.assert_array_equal(labels, expected)
        np.testing.assert_array_equal(details.labels_of_boxes, exp_details.labels_of_boxes)
        assert set(details.timings) == {"format", "clip", "clahe", "inputs", "encoder", "decoder", "download",
                                        "cleanup", "details"}
    with pytest.raises(ValueError, match="boxes"):
        session.segment_batch([cell_image], boxes=[None, None])
    assert session.segment_batch([]) == []


def test_a_cell_that_loses_all_its_pixels_leaves_no_gap_in_the_ids():
    grid = TileGrid.plan(400, 400, 256, 64)
    assert grid.bounds_y[1] == grid.bounds_x[1] == 200
    views = [np.zeros(t.shape, np.int32) for t in grid.tiles()]
    # tile 0 keeps an L-shaped cell: its centroid lies in tile 0's core, its pixels in the
    # cores of tiles 1 and 2, whose own cells claim exactly those pixels
    views[0][205:215, 170:180] = 1
    views[0][170:180, 205:215] = 1
    t1, t2 = grid.tile(1), grid.tile(2)
    views[1][170:180, 205 - t1.x0:215 - t1.x0] = 4
    views[2][205 - t2.y0:215 - t2.y0, 170:180] = 9
    result = stitch_tiles(grid, views)
    assert sorted(np.unique(result)) == [0, 1, 2]
    assert (result[170:180, 205:215] == 1).all() and (result[205:215, 170:180] == 2).all()


# ------------------------------------------------------------- memory-bounded large images

@pytest.fixture(scope="module")
def slide_image():
    return synthetic_slide(600, 384, density=0.25, cell_radius=20, seed=1)[0]


@pytest.mark.slow
def test_streamed_run_equals_the_in_memory_one(session, slide_image, tmp_path, monkeypatch):
    in_memory, details = segment_large(session, slide_image, tile_size=256, overlap=64, return_details=True,
                                       stream=False)
    assert in_memory.max() >= 2 and len(details.grid) > 2  # the comparison has content
    streamed, streamed_details = segment_large(session, slide_image, tile_size=256, overlap=64,
                                               return_details=True, stream=True)
    assert isinstance(streamed, np.ndarray) and streamed.dtype == in_memory.dtype
    np.testing.assert_array_equal(streamed, in_memory)
    np.testing.assert_array_equal(streamed_details.iou, details.iou)
    # above the limit the default is the streamed run: the scratch stores go to a temporary
    # folder, which is gone afterwards
    from cellsam_trt.engine import memory
    from cellsam_trt.large import streamed

    calls = []
    monkeypatch.setattr(memory, "STREAM_ABOVE_BYTES", 0)
    monkeypatch.setattr(streamed, "segment_streamed", lambda *a, _inner=streamed.segment_streamed, **k:
                        calls.append(k["output"]) or _inner(*a, **k))
    np.testing.assert_array_equal(segment_large(session, slide_image, tile_size=256, overlap=64), in_memory)
    assert len(calls) == 1 and not os.path.exists(calls[0])
    # with output=, the labels stay in that zarr group
    stored = segment_large(session, slide_image, tile_size=256, overlap=64, output=tmp_path / "labels.zarr")
    np.testing.assert_array_equal(stored[...], in_memory)
    # read back as the README says: the store is a group, the labels its "labels" array
    import zarr

    group = zarr.open(str(tmp_path / "labels.zarr"), mode="r")
    assert not hasattr(group, "shape") and set(group) >= {"labels", "cells"}
    np.testing.assert_array_equal(zarr.open(str(tmp_path / "labels.zarr" / "labels"), mode="r")[...], in_memory)
    assert group["cells/boxes"].shape[1:] == (4,)  # the per-cell table beside them


def test_segment_tiles_images_larger_than_the_tile_size(session, slide_image):
    labels, details = session.segment(slide_image, tile_size=256, overlap=64, return_details=True)
    assert details.path == "tiled" and details.num_tiles == len(TileGrid.plan(600, 384, 256, 64))
    np.testing.assert_array_equal(labels, segment_large(session, slide_image, tile_size=256, overlap=64))
    # tile_size=None: the whole image as one model input, the released behaviour
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoCellsWarning)  # squashed into one input, the big cells vanish
        whole, whole_details = session.segment(slide_image, tile_size=None, return_details=True)
        # the default tile size is the model input's side: this image fits, the whole path runs
        _, default_details = session.segment(slide_image, return_details=True)
    assert whole_details.path == "whole" and whole.shape == labels.shape
    assert default_details.path == "whole"
    with pytest.raises(ValueError, match="tile_size"):
        session.segment(slide_image, tile_size=10)


def test_an_image_that_cannot_fit_is_refused_before_any_work(session, monkeypatch):
    from cellsam_trt.engine import memory

    image = np.zeros((3000, 2500), np.uint8)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 64 << 20)  # a 64 MiB machine
    monkeypatch.setattr(session, "segment_batch", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(MemoryError, match=r"needs about [\d.]+ GiB of host memory.*only 0\.06 GiB is available.*"
                                          r"output='labels\.zarr'"):
        segment_large(session, image, tile_size=1024, overlap=128, stream=False)
    with pytest.raises(MemoryError, match="needs about .* GiB .* available"):
        session.segment(image)  # the tiled default, streamed or not, still returns the labels
    with pytest.raises(MemoryError, match=r"segment\(\) of a 3000x2500 image as one model input needs about "
                                          r"0\.70 GiB .* leave tile_size at its default"):
        session.segment(image, tile_size=None)
