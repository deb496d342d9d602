"""Which axis of an image array is what: channels (C), stack axes (T time, Z depth) and the
plane (Y, X).

The letters come from the file where it records them (``io.read_image``), else from the
caller (``axes="TYX"``, ``channel_axis=``, ``stack_axis=``), else from the guess that
``segment`` has always made for 3-D input: the smallest axis holds the channels. A guess
that could be wrong (an unlabelled axis of length <= 3 read as channels could as well be 3
time points or 2 z-planes) is reported in ``Layout.guessed`` with the option that
overrides it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .io import UNKNOWN_AXIS

STACK_LETTERS = "TZ"
AXIS_LETTERS = "TZCYX"


class AxesGuessWarning(UserWarning):
    """An axis the file does not label was read by a guess that could be wrong (e.g. 3
    planes read as 3 channels); the message names the option that says otherwise."""


@dataclass(frozen=True)
class OptionNames:
    """How messages name the options that choose axes: the keywords of the Python functions
    (``PYTHON``) or the command line's flags (``COMMAND_LINE``)."""

    axes: str
    channel_axis: str
    stack_axis: str
    flags: bool

    def say(self, option: str, value: object) -> str:
        """``option`` ("axes", "channel_axis", "stack_axis") given ``value``, as the caller types it."""
        name = getattr(self, option)
        return f"{name} {value}" if self.flags else f"{name}{value!r}"


PYTHON = OptionNames("axes=", "channel_axis=", "stack_axis=", flags=False)
COMMAND_LINE = OptionNames("--axes", "--channel-axis", "--stack-axis", flags=True)


@dataclass(frozen=True)
class Layout:
    """The resolved axes of an array.

    Attributes:
        axes: one letter per dimension from "TZCYX", each at most once, Y before X.
        shape: the array's shape.
        guessed: messages about axes read by a guess (each names the option that overrides it).
        channels_guessed: the channel axis was guessed, not labelled.
    """

    axes: str
    shape: tuple[int, ...]
    guessed: tuple[str, ...] = ()
    channels_guessed: bool = False

    @property
    def channel_axis(self) -> int | None:
        return self.axes.index("C") if "C" in self.axes else None

    @property
    def stack_axes(self) -> tuple[int, ...]:
        """Positions of T / Z in ``axes``, in order."""
        return tuple(i for i, a in enumerate(self.axes) if a in STACK_LETTERS)

    @property
    def is_stack(self) -> bool:
        return bool(self.stack_axes)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[i] for i in self.stack_axes)

    @property
    def plane_shape(self) -> tuple[int, int]:
        return self.shape[self.axes.index("Y")], self.shape[self.axes.index("X")]

    @property
    def label_axes(self) -> str:
        """Axes of the label stack: the input's without C."""
        return self.axes.replace("C", "")

    @property
    def label_shape(self) -> tuple[int, ...]:
        return tuple(s for s, a in zip(self.shape, self.axes) if a != "C")


def _check_axes(axes: str, ndim: int, name: str) -> str:
    """The letters ``axes`` upper-cased; ValueError starting with ``name`` (the option as given)."""
    if not isinstance(axes, str):
        raise TypeError(f"{name}: expected a string of axis letters such as 'TYX', got {axes!r}")
    letters = axes.upper()
    bad = sorted(set(letters) - set(AXIS_LETTERS))
    if bad:
        raise ValueError(f"{name}: unknown letters {bad}; use T (time), Z (depth), C (channels), Y, X")
    if len(letters) != ndim:
        raise ValueError(f"{name}: {len(letters)} letters for an image with {ndim} dimensions "
                         "(singleton dimensions are dropped first)")
    repeated = sorted({a for a in letters if letters.count(a) > 1})
    if repeated:
        raise ValueError(f"{name}: {repeated} given more than once")
    if "Y" not in letters or "X" not in letters:
        raise ValueError(f"{name}: needs both Y and X")
    if letters.index("Y") > letters.index("X"):
        raise ValueError(f"{name}: Y must come before X (transpose the image first)")
    return letters


def _axis_index(value: int, ndim: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -ndim <= value < ndim:
        raise ValueError(f"{name}: expected an axis of the {ndim}-dimensional image (0..{ndim - 1} "
                         "or negative)")
    return value % ndim


def resolve_layout(shape: tuple[int, ...], file_axes: str | None = None, *, axes: str | None = None,
                   channel_axis: int | None = None, stack_axis: int | None = None,
                   names: OptionNames = PYTHON) -> Layout:
    """The axes of an array of ``shape`` (singleton dimensions already dropped).

    Args:
        file_axes: letters from the file ("TZCYX" and "?" for unlabelled), or None.
        axes: the caller's letters for every axis (``--axes``); replaces the file's.
        channel_axis, stack_axis: the caller's channel axis / one stack axis (read as T, or
            Z where the file calls it Z or already has a T), on top of the file's letters.
        names: how messages name those options (``PYTHON`` keywords, or the
            ``COMMAND_LINE`` flags).

    Raises:
        ValueError: contradictory options, or axes that cannot be told apart without one
            (the message names the option).
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(f"image: expected at least 2 dimensions (Y, X), got shape {shape}")
    if axes is not None:
        if channel_axis is not None or stack_axis is not None:
            raise ValueError(f"pass either {names.axes} or {names.channel_axis} / {names.stack_axis}, not both")
        return Layout(_check_axes(axes, ndim, names.say("axes", axes)), shape)
    letters = list(file_axes) if file_axes is not None and len(file_axes) == ndim else [UNKNOWN_AXIS] * ndim
    labelled = "".join(letters)
    relabel = f"pass {names.axes} to relabel every axis"
    for value, letter, option in ((channel_axis, "C", "channel_axis"), (stack_axis, "T", "stack_axis")):
        if value is None:
            continue
        name = names.say(option, value)
        index = _axis_index(value, ndim, name)
        current = letters[index]
        if letter == "T" and current in STACK_LETTERS:
            continue
        if letter == "T" and "T" in letters:
            letter = "Z"
        if current != UNKNOWN_AXIS and current != letter:
            raise ValueError(f"{name}: the file labels that axis {current} (axes {labelled}, shape {shape}); "
                             f"{relabel}")
        if letter in letters and letters.index(letter) != index:
            raise ValueError(f"{name}: the file labels axis {letters.index(letter)} {letter} "
                             f"(axes {labelled}, shape {shape}); {relabel}")
        letters[index] = letter
    unknown = [i for i, a in enumerate(letters) if a == UNKNOWN_AXIS]
    missing = [a for a in "YX" if a not in letters]
    extra = len(unknown) - len(missing)
    guessed: list[str] = []
    channels_guessed = False
    if extra == 1 and "C" not in letters:
        # the released guess: the smallest unlabelled axis holds the channels
        pick = min(unknown, key=lambda i: shape[i])
        letters[pick] = "C"
        unknown.remove(pick)
        channels_guessed = True
        free = [a for a in STACK_LETTERS if a not in letters]
        if shape[pick] <= 3 and free:
            example = "".join(free[0] if i == pick else a for i, a in enumerate(letters))
            example = _fill_plane(example)
            guessed.append(f"axis {pick} (length {shape[pick]}) of shape {shape} is not labelled by the file; "
                           f"read as {shape[pick]} channels. If it is time or z, pass {names.say('axes', example)} "
                           f"(or {names.say('stack_axis', pick)})")
    elif extra != 0:
        raise ValueError(f"cannot tell which axes of shape {shape} (file axes {labelled}) are channels, time or z; "
                         f"pass {names.axes} with one letter per axis (T, Z, C, Y, X), e.g. "
                         f"{names.say('axes', _example(ndim))}")
    for index, letter in zip(unknown, missing):
        letters[index] = letter
    return Layout(_check_axes("".join(letters), ndim, f"axes {''.join(letters)!r}"), shape, tuple(guessed),
                  channels_guessed)


def _fill_plane(letters: str) -> str:
    """Unlabelled positions of an example: Y and X in order."""
    out = list(letters)
    for letter in "YX":
        if letter not in out and UNKNOWN_AXIS in out:
            out[out.index(UNKNOWN_AXIS)] = letter
    return "".join(out)


def _example(ndim: int) -> str:
    return {2: "YX", 3: "TYX", 4: "TCYX", 5: "TZCYX"}.get(ndim, "TZCYX")
