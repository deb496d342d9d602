"""SegmentOptions: one validated object for a call's settings, the same labels as keywords."""
import dataclasses

import numpy as np
import pytest

import cellsam_trt
from cellsam_trt import CellSAM, SegmentOptions
from cellsam_trt.dev.synthetic import synthetic_slide
from cellsam_trt.large.tiling import segment_large


@pytest.fixture(scope="module")
def session(steered_tiny):
    return CellSAM.from_network(steered_tiny, device="cpu")


@pytest.mark.parametrize(
    "settings, name",
    [
        ({"bbox_threshold": 1.5}, "bbox_threshold"),
        ({"bbox_threshold": "high"}, "bbox_threshold"),
        ({"normalize": "cv2"}, "normalize"),
        ({"normalize": None}, "normalize"),
        ({"postprocess": "yes"}, "postprocess"),
        ({"remove_boundaries": 1}, "remove_boundaries"),
        ({"progress": None}, "progress"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": 2.5}, "chunk_size"),
        ({"channel_axis": 3}, "channel_axis"),
        ({"channel_axis": True}, "channel_axis"),
        ({"tile_size": 32}, "tile_size"),
        ({"tile_size": 1024.0}, "tile_size"),
        ({"tile_size": 256, "overlap": 129}, "overlap"),
        ({"tile_size": None, "overlap": -1}, "overlap"),
        ({"batch_size": 0}, "batch_size"),
        ({"block": 100}, "block"),
    ],
)
def test_each_bad_setting_is_refused_naming_it(settings, name, session, cell_image):
    with pytest.raises(ValueError, match=f"^{name}: "):
        SegmentOptions(**settings)
    # every entry point checks the same way, before any work
    with pytest.raises(ValueError, match=f"^{name}: "):
        session.segment(cell_image, **settings)
    with pytest.raises(ValueError, match=f"^{name}: "):
        session.segment_batch([cell_image], **settings)
    with pytest.raises(ValueError, match=f"^{name}: "):
        segment_large(session, cell_image, **settings)


def test_options_are_frozen_and_keep_valid_values():
    opts = SegmentOptions(bbox_threshold=1, normalize="opencv", tile_size=None, overlap=0)
    assert opts.bbox_threshold == 1.0 and isinstance(opts.bbox_threshold, float)
    assert opts.clahe == "opencv" and SegmentOptions(normalize=False).clahe is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.tile_size = 512


def test_unknown_keywords_and_wrong_options_type_are_refused(session, cell_image):
    with pytest.raises(TypeError, match="tile_sise"):
        session.segment(cell_image, tile_sise=512)
    with pytest.raises(TypeError, match="options: expected a cellsam_trt.SegmentOptions"):
        session.segment(cell_image, options={"bbox_threshold": 0.5})


def test_keywords_and_options_give_identical_labels(session, cell_image):
    settings = dict(bbox_threshold=0.4, remove_boundaries=True, chunk_size=3)
    opts = SegmentOptions(**settings)
    by_keywords, details = session.segment(cell_image, return_details=True, **settings)
    by_options, options_details = session.segment(cell_image, return_details=True, options=opts)
    assert by_keywords.max() >= 5  # the comparison has content
    np.testing.assert_array_equal(by_options, by_keywords)
    np.testing.assert_array_equal(options_details.iou, details.iou)
    # the module-level function and the batch take the same object
    np.testing.assert_array_equal(cellsam_trt.segment(cell_image, model=session, options=opts), by_keywords)
    [batched] = session.segment_batch([cell_image], options=opts)
    np.testing.assert_array_equal(batched, session.segment_batch([cell_image], **settings)[0])
    # keywords beside options= replace its fields
    default = session.segment(cell_image)
    np.testing.assert_array_equal(session.segment(cell_image, options=opts, bbox_threshold=None,
                                                  remove_boundaries=False, chunk_size=None), default)


@pytest.mark.slow
def test_tiled_run_takes_options_as_keywords(session):
    image = synthetic_slide(600, 384, density=0.25, cell_radius=20, seed=1)[0]
    settings = dict(tile_size=256, overlap=64, batch_size=2)
    by_keywords = segment_large(session, image, **settings)
    assert by_keywords.max() >= 2  # the comparison has content
    np.testing.assert_array_equal(segment_large(session, image, options=SegmentOptions(**settings)), by_keywords)
    np.testing.assert_array_equal(session.segment(image, options=SegmentOptions(**settings)), by_keywords)


def test_embedding_takes_the_same_options(session, cell_image):
    opts = SegmentOptions(normalize="opencv", chunk_size=5)
    embedded = session.embed(cell_image, options=opts)
    np.testing.assert_array_equal(session.segment(embedded, options=opts),
                                  session.segment(cell_image, options=opts))
