"""Property-based checks of the input boundary and of mask painting (hypothesis)."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cellsam_trt.api import CellSAM
from cellsam_trt.engine import postprocess as post
from cellsam_trt.engine import preprocess as pre
from cellsam_trt.engine.core import validate_boxes


@pytest.fixture(scope="module")
def tiny_session(steered_tiny):
    return CellSAM.from_network(steered_tiny, device="cpu")

DTYPES = [np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64,
          np.float16, np.float32, np.float64]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def images(draw):
    dtype = draw(st.sampled_from(DTYPES))
    ndim = draw(st.sampled_from([2, 3]))
    h = draw(st.integers(1, 40))
    w = draw(st.integers(1, 1200))  # up to wide strips
    shape = (h, w) if ndim == 2 else tuple(draw(st.permutations([h, w, draw(st.integers(1, 5))])))
    elements = None
    if np.dtype(dtype).kind == "f":
        elements = st.floats(allow_nan=True, allow_infinity=True, width=np.dtype(dtype).itemsize * 8)
    elif dtype is not np.bool_:
        info = np.iinfo(dtype)
        elements = st.integers(int(info.min), int(info.max))
    return draw(hnp.arrays(dtype, shape, elements=elements))


@FAST
@given(images())
def test_format_image_either_formats_or_raises_value_error(image):
    try:
        out = pre.format_image(image)
    except ValueError as err:
        assert str(err).startswith(("image:", "channel_axis:"))
        return
    assert out.ndim == 3 and out.shape[2] == 3 and out.dtype == np.float64
    assert np.isfinite(out).all()
    assert out.shape[0] >= 2 and out.shape[1] >= 2
    # values are kept (channels only moved and zero-padded)
    assert np.array_equal(np.sort(out[out != 0]), np.sort(image.astype(np.float64)[image.astype(np.float64) != 0]))


@FAST
@given(images())
def test_normalize_output_is_in_unit_range(image):
    try:
        formatted = pre.format_image(image)
    except ValueError:
        return
    out = pre.normalize_image(formatted)
    assert out.shape == formatted.shape
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


@FAST
@given(
    hnp.arrays(np.float64, st.tuples(st.integers(0, 6), st.integers(0, 6)),
               elements=st.floats(-50, 200) | st.sampled_from([np.nan, np.inf, -np.inf])),
    st.integers(2, 120), st.integers(2, 120),
)
def test_validate_boxes_accepts_exactly_valid_boxes(boxes, height, width):
    """Well-formed boxes that overlap the image, reaching past its edge or not."""
    valid = (
        boxes.shape == (0, 4)
        or (boxes.size > 0 and boxes.ndim == 2 and boxes.shape[1] == 4 and np.isfinite(boxes).all()
            and (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
            and (boxes[:, 2] >= 0).all() and (boxes[:, 3] >= 0).all()  # each box overlaps the image
            and (boxes[:, 0] <= width).all() and (boxes[:, 1] <= height).all())
    )
    if valid:
        out = validate_boxes(boxes, height, width)
        assert out.dtype == np.float32 and out.shape == (len(boxes), 4)
    else:
        with pytest.raises(ValueError, match="^boxes:"):
            validate_boxes(boxes, height, width)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 700), st.integers(1, 700), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_painting_equals_full_resolution_on_any_shape(height, width, n, seed):
    """Equal to the released float32 resize-twice path, except where that path's logit lies
    within float32 rounding of the threshold; there the painter, which computes the same
    sum in float64 on the CPU, agrees with the resize-twice path run in float64. (One
    rounding can flip several pixels: at the image border they read the same clamped source.)"""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 16, 16, generator=g) * 3 - 2
    logits = torch.nn.functional.interpolate(base[:, None], (256, 256), mode="bilinear")[:, 0]
    painter = post.MaskPainter((height, width))
    painter.paint(logits, 1)
    ours = painter.result().numpy()
    released = np.zeros((height, width), np.int64)
    exact = np.zeros((height, width), np.int64)
    ambiguous = np.zeros((height, width), bool)
    cut = np.log(0.4 / 0.6)

    def resize_twice(mask):
        up = torch.nn.functional.interpolate(mask[None, None], (1024, 1024), mode="bilinear", align_corners=False)
        return torch.nn.functional.interpolate(up, (height, width), mode="bilinear", align_corners=False)[0, 0]

    for k, mask in enumerate(logits, 1):
        up = resize_twice(mask)
        released = np.maximum(released, (torch.sigmoid(up) > 0.4).numpy() * k)
        ambiguous |= np.abs(up.numpy() - cut) < 1e-5
        exact = np.maximum(exact, (resize_twice(mask.double()).numpy() > cut) * k)
    differ = ours != released
    assert not (differ & ~ambiguous).any(), np.argwhere(differ & ~ambiguous)[:5]
    np.testing.assert_array_equal(ours[differ], exact[differ])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(images(), st.sampled_from([None, 0, 1, 2, -1, 3, -4, 1.5, "x", True]))
def test_segment_either_labels_or_raises_value_error(tiny_session, image, channel_axis):
    """The public entry point, with any image and any channel_axis: labels of the image's
    size, or one ValueError naming the argument; nothing from deep inside a library."""
    import warnings

    from cellsam_trt import NoCellsWarning

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoCellsWarning)
            labels = tiny_session.segment(image, boxes=np.zeros((0, 4)), channel_axis=channel_axis)
    except ValueError as err:
        assert str(err).startswith(("image:", "channel_axis:")), err
        return
    spatial = image.shape if image.ndim == 2 else tuple(
        s for i, s in enumerate(image.shape) if i != (np.argmin(image.shape) if channel_axis is None else channel_axis % 3))
    assert labels.shape == spatial and labels.dtype == np.int32 and not labels.any()


def test_channel_axis_ties_take_the_first_smallest_axis():
    image = np.zeros((3, 3, 5), np.uint8)
    image[1] = 7  # axis 0 and 1 tie at 3: axis 0 holds the channels, as in the released code
    out = pre.format_image(image)
    assert out.shape == (3, 5, 3) and (out[..., 1] == 7).all() and not out[..., 0].any()
