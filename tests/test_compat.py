"""cellsam_trt.compat: scripts written for the released cellSAM package run with only the
import line changed, get the released return structures, and the labels of our pipeline."""
import hashlib
import warnings

import numpy as np
import pytest
import torch

import cellsam_trt.modeling.checkpoint as ckpt
from cellsam_trt import CellSAM, InferenceConfig, NoCellsWarning, compat

# the calls below are written as in the released README / tutorial, with this import
from cellsam_trt.compat import cellsam_pipeline, format_image_shape, get_model, normalize_image, segment_cellular_image
from cellsam_trt.engine.postprocess import fill_holes_and_remove_small
from cellsam_trt.engine.preprocess import format_image
from cellsam_trt.large.tiling import segment_large
from cellsam_trt.modeling.checkpoint import CheckpointError, random_network, write_checkpoint
from cellsam_trt.modeling.config import ModelConfig

# decoder calls of 64 boxes: the tiny decoder is cheap, the default 4 per call (for ViT-B
# on the CPU) would spend the tests' time in Python overhead
OPTIONS = InferenceConfig(chunk_size=64)


@pytest.fixture(scope="module")
def session(steered_tiny):
    return compat.CompatCellSAM.from_network(steered_tiny, device="cpu", inference=OPTIONS)


@pytest.fixture(scope="module")
def finder_result(session, cell_image):
    return session.segment(cell_image, return_details=True)


@pytest.fixture(scope="module")
def asset_dir(tmp_path_factory, steered_tiny):
    """A ~/.deepcell/models look-alike holding the tiny weights as the released general model."""
    root = tmp_path_factory.mktemp("deepcell_models")
    write_checkpoint(steered_tiny, root / f"cellsam_v{ckpt.MODEL_VERSION}" / "cellsam_general.pt")
    return root


@pytest.fixture
def released_location(monkeypatch, asset_dir):
    """get_model() without arguments finds the tiny weights, on the torch backend (the
    library default "auto" would look for exported graphs first)."""
    monkeypatch.setattr(ckpt, "ASSET_DIR", asset_dir)
    monkeypatch.setattr(compat, "DEFAULT_BACKEND", "torch")
    return asset_dir


def released_min_max(image3):
    """The released pipeline's first step on an (H, W, 3) image, written out independently."""
    img = image3.astype(np.float32)
    for i in range(3):
        span = img[..., i].max() - img[..., i].min()
        img[..., i] = (img[..., i] - img[..., i].min()) / span if span != 0 else 0
    return img


def assert_same_weights(session, network):
    """The session's torch backend runs exactly ``network``'s weights."""
    pairs = [(session.backend.image_encoder, network.sam.image_encoder),
             (session.backend.cellfinder_module, network.cellfinder.decode_head),
             (session.backend.box_decoder.prompt_encoder, network.sam.prompt_encoder),
             (session.backend.box_decoder.mask_decoder, network.sam.mask_decoder)]
    for ours, theirs in pairs:
        loaded = ours.state_dict()
        for key, value in theirs.state_dict().items():
            assert torch.equal(loaded[key].cpu(), value), key


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def small_user_boxes(details, n=3):
    """A few of CellFinder's boxes, as a script would pass its own."""
    return np.round(details.boxes[:n]).astype(np.float64)


# ---------------------------------------------------------------------------- loading

def test_get_local_model_loads_the_released_file_unchanged(asset_dir, steered_tiny):
    path = asset_dir / f"cellsam_v{ckpt.MODEL_VERSION}" / "cellsam_general.pt"
    before = sha256(path)
    model = compat.get_local_model(path, backend="torch", device="cpu")
    assert sha256(path) == before
    assert isinstance(model, CellSAM) and model.backend.name == "torch"
    assert_same_weights(model, steered_tiny)
    # what scripts do with the released nn.Module
    assert model.eval() is model and model.to("cpu") is model
    with pytest.raises(ValueError, match="get_model\\(device="):
        model.to("cuda" if model.backend.device.type == "cpu" else "cpu")
    model.bbox_threshold = 0.3
    assert model.inference.bbox_threshold == 0.3
    with pytest.raises(ValueError, match="bbox_threshold"):
        model.bbox_threshold = 2


def test_get_model_reads_the_released_location(released_location, monkeypatch, steered_tiny):
    model = get_model()
    assert isinstance(model, compat.CompatCellSAM)
    assert_same_weights(model, steered_tiny)
    with pytest.raises(ValueError, match="version"):
        get_model(version="0.1")
    with pytest.raises(CheckpointError, match="cellsam_extra.pt"):
        get_model("cellsam_extra")
    # a missing version folder means a download, which needs the token (checked before any network use)
    monkeypatch.setattr(ckpt, "ASSET_DIR", released_location / "empty")
    monkeypatch.delenv("DEEPCELL_ACCESS_TOKEN", raising=False)
    with pytest.raises(CheckpointError, match="DEEPCELL_ACCESS_TOKEN"):
        get_model()


# ---------------------------------------------------------------------------- segment_cellular_image

def test_segment_cellular_image_returns_the_released_structure(session, cell_image, finder_result):
    labels, details = finder_result
    out = segment_cellular_image(cell_image, model=session, device="cpu")
    assert isinstance(out, tuple) and len(out) == 3
    mask, embedding, boxes = out
    assert isinstance(mask, np.ndarray) and mask.shape == cell_image.shape[:2] and mask.dtype == np.int64
    assert isinstance(embedding, np.ndarray) and embedding.dtype == np.float32
    assert embedding.shape == (1, session.backend.config.sam.prompt_embed_dim, 64, 64)
    assert isinstance(boxes, np.ndarray) and boxes.dtype == np.float32 and boxes.shape == (len(details.iou), 4)
    assert labels.max() > 5
    np.testing.assert_array_equal(mask, labels)
    np.testing.assert_array_equal(embedding, details.embedding)
    np.testing.assert_array_equal(boxes, details.boxes)


def test_released_positional_arguments_reach_the_pipeline(session, cell_image, finder_result):
    boxes = small_user_boxes(finder_result[1], n=8)
    # img, model, normalize, postprocess, remove_boundaries, bounding_boxes, bbox_threshold, fast, device
    mask, embedding, out_boxes = segment_cellular_image(cell_image, session, True, False, True, boxes.tolist(), 0.3, True, "cpu")
    expected, details = session.segment(cell_image, boxes=boxes, bbox_threshold=0.3, remove_boundaries=True,
                                        return_details=True)
    np.testing.assert_array_equal(mask, expected)
    assert mask.any() and embedding is not None
    np.testing.assert_array_equal(out_boxes, details.boxes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoCellsWarning)  # the clean-up may remove these small cells
        smoothed = segment_cellular_image(cell_image, session, postprocess=True, bounding_boxes=boxes)[0]
        expected = session.segment(cell_image, boxes=boxes, postprocess=True)
    np.testing.assert_array_equal(smoothed, expected)
    assert not np.array_equal(smoothed, session.segment(cell_image, boxes=boxes))


def test_normalize_false_takes_a_normalised_image(session, cell_image, finder_result):
    boxes = small_user_boxes(finder_result[1])
    unit = normalize_image(cell_image)
    mask = segment_cellular_image(unit, session, normalize=False, bounding_boxes=boxes)[0]
    np.testing.assert_array_equal(mask, session.segment(cell_image, boxes=boxes))


def test_no_cells_as_released(cell_image):
    untrained = compat.CompatCellSAM.from_network(random_network(ModelConfig.tiny(), seed=0), device="cpu", inference=OPTIONS)
    image = cell_image[:64, :80]
    with pytest.warns(NoCellsWarning, match="No cells detected"):
        mask, embedding, boxes = segment_cellular_image(image, model=untrained)
    assert embedding is None and boxes is None
    # the released code returns (3, H, W) here, the shape of its channels-first tensor
    assert mask.shape == (64, 80) and mask.dtype == np.int32 and not mask.any()


def test_zero_boxes_are_no_cells(session, cell_image):
    with pytest.warns(NoCellsWarning):
        mask, embedding, boxes = segment_cellular_image(cell_image, session, bounding_boxes=np.zeros((0, 4)))
    assert embedding is None and boxes is None and not mask.any()


def test_bad_arguments_name_themselves(session, cell_image):
    with pytest.raises(TypeError, match="get_local_model"):
        segment_cellular_image(cell_image, model=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="device"):
        segment_cellular_image(cell_image, session, device=0)
    with pytest.raises(ValueError, match="fast"):
        segment_cellular_image(cell_image, session, fast="yes")


# ---------------------------------------------------------------------------- the released README

def test_readme_call_on_the_cpu(released_location, session, cell_image):
    img = cell_image[:128, :160]
    mask, _, _ = segment_cellular_image(img, device='cpu')
    np.testing.assert_array_equal(mask, session.segment(img))


@pytest.mark.gpu
def test_readme_call_as_written(released_location, cell_image):
    img = cell_image[:128, :160]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # get_model() loads on CUDA here, so no device warning either
        mask, _, _ = segment_cellular_image(img, device='cuda')
    assert mask.shape == img.shape[:2] and mask.dtype == np.int64 and mask.any()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a missing GPU")
def test_cuda_without_a_gpu_is_a_clear_error(session, cell_image):
    with pytest.raises(ValueError, match="device='cpu'"):
        segment_cellular_image(cell_image, session, device="cuda")


# ---------------------------------------------------------------------------- the released tutorial

def test_tutorial_calls(released_location, session, cell_image, finder_result):
    img = cell_image[..., 1]  # a 2-D image like the tutorial's
    mask = cellsam_pipeline(
        img, use_wsi=False, low_contrast_enhancement=False, gauge_cell_size=False
    )
    expected = session.segment(released_min_max(format_image(img)))
    assert mask.dtype == np.int64 and mask.any()
    np.testing.assert_array_equal(mask, expected)

    x1, y1, x2, y2 = np.round(finder_result[1].boxes[0]).tolist()
    predictor = get_model()
    im = format_image_shape(img)
    im = normalize_image(im)
    im = np.transpose(im, (2, 0, 1))
    im = np.expand_dims(im, axis=0)
    pred_mask, masks, embedding, boxes = predictor.predict(im, boxes_per_heatmap=[[[x1, y1, x2, y2]]])
    assert pred_mask.shape == img.shape and pred_mask.dtype == np.int64 and set(np.unique(pred_mask)) == {0, 1}
    assert masks.shape == (1, *img.shape) and masks.dtype == np.uint8
    np.testing.assert_array_equal(masks[0], pred_mask)
    assert isinstance(embedding, torch.Tensor) and embedding.shape[-2:] == (64, 64)
    np.testing.assert_array_equal(boxes, np.float32([[x1, y1, x2, y2]]))
    # predict's labels are segment()'s before hole filling and the size filter
    np.testing.assert_array_equal(
        fill_holes_and_remove_small(pred_mask.copy()), session.segment(img, boxes=[[x1, y1, x2, y2]])
    )


def test_predict_with_cellfinder_matches_segment(session, cell_image, finder_result):
    labels, details = finder_result
    im = np.expand_dims(np.transpose(normalize_image(cell_image), (2, 0, 1)), 0)
    pred_mask, masks, _, boxes = session.predict(torch.from_numpy(im))
    np.testing.assert_array_equal(fill_holes_and_remove_small(pred_mask.copy()), labels)
    np.testing.assert_array_equal(boxes, details.boxes)
    assert masks.shape == (len(details.iou), *labels.shape)
    # the painted label image is the stack's top mask per pixel
    top = np.max(masks * np.arange(1, len(masks) + 1, dtype=np.int64)[:, None, None], axis=0)
    assert np.mean(top == pred_mask) > 0.999
    with pytest.raises(ValueError, match="one image"):
        session.predict(np.concatenate([im, im]))


# ---------------------------------------------------------------------------- cellsam_pipeline

def test_tiled_pipeline_uses_the_released_tiles_and_ignores_merge_arguments(session, cell_image):
    # block 300 + 2 x 28 = 356 px tiles sharing 56 px: two tiles across the 400 px width
    labels = cellsam_pipeline(cell_image, chunks=64, swap_channels=True, block_size=300, overlap=28,
                              iou_depth=10, iou_threshold=0.9, model=session)
    expected = segment_large(session, released_min_max(format_image(cell_image)), tile_size=356, overlap=56,
                             channel_axis=-1)
    assert labels.dtype == np.int32 and labels.shape == cell_image.shape[:2] and labels.max() > 5
    np.testing.assert_array_equal(labels, expected)


def test_gauge_cell_size_follows_the_released_rule(session, cell_image):
    image = cell_image[:200, :320]
    unit = released_min_max(format_image(image))
    labels = cellsam_pipeline(image, block_size=200, overlap=28, gauge_cell_size=True, model=session)
    tiled = segment_large(session, unit, tile_size=256, overlap=56, normalize=False, channel_axis=-1)
    areas = [np.sum(tiled == v) for v in np.unique(tiled) if v]
    small = np.median(areas) / tiled.size < 0.002
    expected = tiled if small else session.segment(unit, normalize=False)
    np.testing.assert_array_equal(labels, expected)


def test_median_cell_fraction():
    labels = np.zeros((10, 10), np.int32)
    labels[0, :2] = 1
    labels[5:8, 5:8] = 3
    labels[9, :4] = 7
    assert compat.median_cell_fraction(labels) == 0.04
    assert np.isnan(compat.median_cell_fraction(np.zeros((4, 4), np.uint32)))


@pytest.mark.parametrize("median, spread, settings", [
    (0.04, 0.02, None), (0.12, 0.02, None),
    (0.07, 0.06, (0.01, 256, 2.0)),
    (0.06, 0.045, (0.02, 384, 1.2)),
    (0.07, 0.045, (0.05, 384, 1.2)),
    (0.07, 0.037, (0.01, 384, 1.2)),
])
def test_low_contrast_settings(median, spread, settings):
    assert compat.low_contrast_settings(median, spread) == settings


def test_low_contrast_enhancement_is_applied_before_segmentation(session, cell_image, monkeypatch):
    from skimage.exposure import adjust_gamma, equalize_adapthist

    # a gamma of 0.3 flattens the synthetic cells into the heuristic's low-contrast range
    image = released_min_max(format_image(cell_image[:160, :200])) ** 0.3
    unit = released_min_max(image)
    change = np.abs(unit - equalize_adapthist(unit, kernel_size=256))
    change = change[change > 0]
    settings = compat.low_contrast_settings(float(np.median(change)), float(np.std(change)))
    assert settings is not None
    clip, kernel, gamma = settings
    enhanced = adjust_gamma(equalize_adapthist(unit, kernel_size=kernel, clip_limit=clip), gamma=gamma)
    assert not np.allclose(enhanced, unit)
    np.testing.assert_array_equal(compat.enhance_low_contrast(unit), enhanced)

    # what the pipeline hands to the segmentation (the enhanced image has no cells for the
    # steered tiny network, so comparing labels would compare zeros)
    class Handed(Exception):
        pass

    def record(image, **kwargs):
        raise Handed(image, kwargs)

    monkeypatch.setattr(session, "segment", record)
    with pytest.raises(Handed) as handed:
        cellsam_pipeline(image, low_contrast_enhancement=True, use_wsi=False, model=session)
    given, kwargs = handed.value.args
    np.testing.assert_array_equal(given, enhanced)
    assert kwargs["normalize"] is True


def test_pipeline_argument_errors(session, cell_image):
    with pytest.raises(ValueError, match="model= or model_path="):
        cellsam_pipeline(cell_image, model_path="x.pt", model=session)
    with pytest.raises(ValueError, match="block_size"):
        cellsam_pipeline(cell_image, block_size=0, model=session)
    with pytest.raises(ValueError, match="overlap"):
        cellsam_pipeline(cell_image, overlap=-1, model=session)
