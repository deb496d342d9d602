"""``axes.resolve_layout``: the file's axes, the caller's options, and the guess for files without axes."""
import re

import pytest

from cellsam_trt.axes import COMMAND_LINE, resolve_layout


@pytest.mark.parametrize("shape, file_axes, options, axes", [
    ((3, 64, 80), "TYX", {}, "TYX"),
    ((2, 64, 80), "ZYX", {}, "ZYX"),
    ((4, 2, 64, 80), "TCYX", {}, "TCYX"),
    ((2, 64, 80), "CYX", {}, "CYX"),
    ((64, 80, 3), "YXC", {}, "YXC"),
    ((3, 64, 80), None, {"axes": "tyx"}, "TYX"),
    ((3, 64, 80), "?YX", {"stack_axis": 0}, "TYX"),
    ((3, 64, 80), None, {"stack_axis": 0}, "TYX"),
    ((2, 64, 80), "ZYX", {"stack_axis": 0}, "ZYX"),  # the file's Z stays Z
    ((5, 64, 80, 2), None, {"stack_axis": 0, "channel_axis": -1}, "TYXC"),
    ((10, 64, 80), "?YX", {}, "CYX"),  # unlabelled: the released smallest-axis guess
    ((64, 80, 2), None, {}, "YXC"),
    ((64, 80), None, {}, "YX"),
    ((2, 3, 64, 80), "T?YX", {}, "TCYX"),
])
def test_layouts(shape, file_axes, options, axes):
    assert resolve_layout(shape, file_axes, **options).axes == axes


def test_labelled_stacks_are_never_channels():
    layout = resolve_layout((3, 64, 80), "TYX")
    assert layout.is_stack and layout.channel_axis is None and not layout.guessed
    assert layout.stack_shape == (3,) and layout.plane_shape == (64, 80) and layout.label_axes == "TYX"
    layout = resolve_layout((2, 4, 2, 64, 80), "TZCYX")
    assert layout.stack_axes == (0, 1) and layout.channel_axis == 2
    assert layout.label_axes == "TZYX" and layout.label_shape == (2, 4, 64, 80)


def test_a_guess_that_could_be_wrong_names_the_override():
    layout = resolve_layout((3, 64, 80), None, names=COMMAND_LINE)
    assert layout.axes == "CYX" and layout.channels_guessed
    (message,) = layout.guessed
    assert "axis 0 (length 3)" in message and "--axes TYX" in message and "--stack-axis 0" in message
    (message,) = resolve_layout((64, 80, 2), None, names=COMMAND_LINE).guessed
    assert "--axes YXT" in message and "--stack-axis 2" in message
    (message,) = resolve_layout((5, 64, 80, 2), None, stack_axis=0, names=COMMAND_LINE).guessed
    assert "--axes TYXZ" in message and "--stack-axis 3" in message
    assert resolve_layout((5, 64, 80, 2), None, stack_axis=0, channel_axis=3).axes == "TYXC"
    assert resolve_layout((5, 64, 80, 2), "T???", stack_axis=3).axes == "TYXZ"  # a second stack axis is Z
    assert not resolve_layout((10, 64, 80), None).guessed  # 10 channels fail later, with their own message
    assert not resolve_layout((3, 64, 80), None, channel_axis=0).guessed  # said by the caller


@pytest.mark.parametrize("shape, file_axes, options, match", [
    ((3, 64, 80), None, {"axes": "TY"}, "2 letters"),
    ((3, 64, 80), None, {"axes": "TYQ"}, "unknown letters"),
    ((3, 64, 80), None, {"axes": "TXY"}, "Y must come before X"),
    ((3, 64, 80), None, {"axes": "TTX"}, "more than once"),
    ((3, 64, 80), None, {"axes": "TYX", "stack_axis": 0}, "either --axes"),
    ((3, 64, 80), "TYX", {"channel_axis": 0}, "labels that axis T"),
    ((2, 3, 64, 80), "C?YX", {"channel_axis": 1}, "labels axis 0 C"),
    ((3, 64, 80), None, {"stack_axis": 5}, "--stack-axis 5"),
    ((2, 3, 64, 80), None, {}, "--axes"),  # two unlabelled axes: no guess
])
def test_bad_or_ambiguous_axes_name_the_option(shape, file_axes, options, match):
    with pytest.raises(ValueError, match=match):
        resolve_layout(shape, file_axes, names=COMMAND_LINE, **options)


@pytest.mark.parametrize("shape, file_axes, options, match", [
    ((3, 64, 80), None, {}, r"axes='TYX' \(or stack_axis=0\)"),  # the guess, as a warning text
    ((3, 64, 80), None, {"axes": "TY"}, "^axes='TY': 2 letters"),
    ((3, 64, 80), None, {"axes": "TYX", "stack_axis": 0}, "either axes= or channel_axis="),
    ((3, 64, 80), "TYX", {"channel_axis": 0}, "^channel_axis=0: the file labels that axis T.*pass axes= "),
    ((3, 64, 80), None, {"stack_axis": 5}, "^stack_axis=5: "),
    ((2, 3, 64, 80), None, {}, "e.g. axes='TCYX'"),
])
def test_library_callers_see_the_keywords_not_the_flags(shape, file_axes, options, match):
    """``segment_stack(read_image(p))`` and friends name their own keywords; only the command
    line speaks of --axes."""
    try:
        messages = resolve_layout(shape, file_axes, **options).guessed
    except ValueError as err:
        messages = (str(err),)
    assert any(re.search(match, m) for m in messages), messages
    assert not any("--" in m for m in messages)
