"""Stacks (T / Z axes) segmented frame by frame: ``segment_stack`` and ``cellsam-trt segment`` on stack files."""
import csv
import warnings

import numpy as np
import pytest
import tifffile

import cellsam_trt.stack as stack_module
from cellsam_trt import CellSAM, NoCellsWarning
from cellsam_trt.cli.main import main
from cellsam_trt.dev.synthetic import synthetic_cells
from cellsam_trt.stack import segment_stack


@pytest.fixture(scope="module")
def session(checkpoint):
    return CellSAM.from_checkpoint(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def frames():
    """Two (128, 128, 2) uint16 frames [nuclear, whole-cell], a few cells each."""
    return [synthetic_cells(128, 128, n_cells=4, seed=seed) for seed in (3, 4)]


def quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoCellsWarning)
        return function(*args, **kwargs)


@pytest.fixture(scope="module")
def alone(session, frames):
    """Each frame segmented alone: {name: labels} for the whole-cell plane and the two-channel frame."""
    out = {}
    for k, frame in enumerate(frames):
        out[f"plane{k}"] = quiet(session.segment, frame[..., 1])
        out[f"both{k}"] = quiet(session.segment, frame)
    assert all(labels.max() >= 1 for labels in out.values())  # the comparisons below see cells
    return out


def run_cli(*args):
    return main(["segment", *map(str, args), "--device", "cpu", "--no-progress"])


def test_frames_equal_segmenting_each_frame_alone(session, frames, alone):
    stack = np.stack([frames[0], frames[1], frames[0]])  # T, Y, X, C
    labels, details = quiet(session.segment_stack, np.moveaxis(stack, -1, 1), axes="TCYX", batch_size=2,
                            return_details=True)
    assert labels.shape == (3, 128, 128) and labels.dtype == np.int32 and len(details) == 3
    for t, name in enumerate(["both0", "both1", "both0"]):
        np.testing.assert_array_equal(labels[t], alone[name])  # labels 1..K_f of the frame alone
        painted = details[t].labels_of_boxes
        np.testing.assert_array_equal(np.unique(painted[painted > 0]), np.unique(labels[t])[1:])  # this frame's


class _FakeSession:
    """Labels each frame by its first value (so placement is visible); records the calls."""

    def __init__(self):
        self.calls = []

    def _label(self, frame):
        plane = frame if frame.ndim == 2 else frame[..., 0]
        return np.full(plane.shape, int(plane[0, 0]), np.int32)

    def segment_batch(self, images, **kwargs):
        self.calls.append(("batch", len(images), kwargs["channel_axis"]))
        return [(self._label(f), None) for f in images]

    def segment(self, image, **kwargs):
        self.calls.append(("tiled", 1, kwargs["channel_axis"]))
        return self._label(image), None


def test_frames_are_batched_and_placed_by_axes():
    # (Y, X, T, Z) with a (2, 3) stack: frame (t, z) holds 10 t + z
    data = np.zeros((8, 6, 2, 3), np.uint16)
    for t in range(2):
        for z in range(3):
            data[:, :, t, z] = 10 * t + z
    fake = _FakeSession()
    with pytest.warns(NoCellsWarning, match="1 of 6 frames"):  # frame (0, 0) is all zeros
        labels = segment_stack(fake, data, axes="YXTZ", batch_size=4)
    assert labels.shape == (8, 6, 2, 3)  # the input's axes
    np.testing.assert_array_equal(labels[0, 0], [[0, 1, 2], [10, 11, 12]])
    assert fake.calls == [("batch", 4, None), ("batch", 2, None)]

    fake = _FakeSession()
    big = np.zeros((3, 2, 80, 70), np.uint16)  # T C Y X; frames larger than the tile size go alone
    quiet(segment_stack, fake, big, axes="TCYX", batch_size=4, tile_size=64, overlap=16)
    assert fake.calls == [("tiled", 1, -1)] * 3
    with pytest.raises(ValueError, match="axes"):
        segment_stack(fake, big)


def test_segment_stack_of_a_plain_tiff_reads_it_as_its_array(session, frames, alone, tmp_path):
    """``segment_stack(read_image(p))`` of files written without axes: the "?" letters are
    resolved as for the array (smallest axis = channels), the guess is a warning naming the
    keyword, with the labels of ``segment`` of the array."""
    from cellsam_trt.axes import AxesGuessWarning
    from cellsam_trt.io import read_image

    tifffile.imwrite(tmp_path / "yxc.tif", frames[0])  # (128, 128, 2): tifffile records "QYX"
    with pytest.warns(AxesGuessWarning, match="read as 2 channels"):
        labels = quiet(segment_stack, session, read_image(tmp_path / "yxc.tif"))
    np.testing.assert_array_equal(labels, alone["both0"])

    planes = np.stack([frames[0][..., 1], frames[1][..., 1], frames[0][..., 1]])
    with warnings.catch_warnings():  # tifffile's notice that it stores 3 planes as planar RGB by default
        warnings.simplefilter("ignore", DeprecationWarning)
        tifffile.imwrite(tmp_path / "three.tif", planes, metadata=None)
    with pytest.warns(AxesGuessWarning, match=r"axis 0 \(length 3\).*axes='TYX'"):
        labels = quiet(segment_stack, session, read_image(tmp_path / "three.tif"))
    np.testing.assert_array_equal(labels, quiet(session.segment, planes, channel_axis=0))


@pytest.mark.slow
def test_cli_reads_axes_from_files_and_writes_label_stacks(checkpoint, frames, alone, tmp_path, capsys):
    planes = np.stack([f[..., 1] for f in frames])  # (2, Y, X)
    both = np.stack([np.moveaxis(f, -1, 0) for f in frames])  # (2, C, Y, X)
    data = tmp_path / "data"
    data.mkdir()
    tifffile.imwrite(data / "tyx.ome.tif", planes[[0, 1, 0]], ome=True, metadata={"axes": "TYX"})
    tifffile.imwrite(data / "zyx.tif", planes[[1, 0]], imagej=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(data / "tcyx.ome.tif", both, ome=True, metadata={"axes": "TCYX"})
    tifffile.imwrite(data / "cyx.ome.tif", both[0], ome=True, metadata={"axes": "CYX"})
    out = tmp_path / "out"

    assert run_cli(data, "-o", out, "--checkpoint", checkpoint, "--csv", "--overlay") == 0
    captured = capsys.readouterr()
    assert "segmented 4 of 4 images" in captured.out and "warning" not in captured.err
    expected = {
        "tyx": ("TYX", [alone["plane0"], alone["plane1"], alone["plane0"]]),  # 3 frames, never 3 channels
        "zyx": ("ZYX", [alone["plane1"], alone["plane0"]]),
        "tcyx": ("TYX", [alone["both0"], alone["both1"]]),
    }
    for name, (axes, stack) in expected.items():
        with tifffile.TiffFile(out / f"{name}_labels.tif") as tif:
            assert tif.series[0].axes == axes
            np.testing.assert_array_equal(tif.asarray(), np.stack(stack))
        with open(out / f"{name}_cells.csv") as fh:
            rows = list(csv.DictReader(fh))
        letter = axes[0].lower()
        assert [(int(r[letter]), int(r["label"])) for r in rows] == [
            (f, int(v)) for f, labels in enumerate(stack) for v in np.unique(labels) if v]
    np.testing.assert_array_equal(tifffile.imread(out / "cyx_labels.tif"), alone["both0"])  # one 2-channel image
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # frame store removed
    assert len(list(out.glob("*_overlay.png"))) == 4  # a stack's shows its first frame


def test_unlabelled_small_first_axis_is_guessed_with_a_warning(checkpoint, session, frames, tmp_path, capsys):
    planes = np.stack([frames[0][..., 1], frames[1][..., 1], frames[0][..., 0]])
    np.save(tmp_path / "three.npy", planes)
    assert run_cli(tmp_path / "three.npy", "-o", tmp_path / "out", "--checkpoint", checkpoint) == 0
    err = capsys.readouterr().err
    assert "read as 3 channels" in err and "--axes TYX" in err and "--stack-axis 0" in err
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "three_labels.tif"),
                                  quiet(session.segment, planes, channel_axis=0))

    np.save(tmp_path / "ten.npy", np.zeros((10, 64, 64), np.uint8))
    assert run_cli(tmp_path / "ten.npy", "-o", tmp_path / "out", "--checkpoint", checkpoint) == 1
    err = capsys.readouterr().err
    assert "10 channels on axis 0" in err and "--axes TYX" in err and "--nuclear-channel" in err


def test_cli_resumes_a_stack_frame_by_frame(checkpoint, frames, alone, tmp_path, capsys, monkeypatch):
    np.save(tmp_path / "movie.npy", np.stack([frames[0][..., 1], frames[1][..., 1], frames[0][..., 1]]))
    out = tmp_path / "out"
    real = stack_module.segment_frames
    seen, largest_seen = [], []

    def interrupted(session, read, indices, **kwargs):
        for result in real(session, read, indices, **kwargs):
            seen.append(result[0])
            largest_seen.append(int(result[1].max()))
            yield result
            if len(seen) == 2:
                raise RuntimeError("killed")

    monkeypatch.setattr(stack_module, "segment_frames", interrupted)
    assert run_cli(tmp_path / "movie.npy", "-o", out, "--checkpoint", checkpoint, "--axes", "TYX",
                   "--batch-size", "1") == 1
    assert "killed" in capsys.readouterr().err and not (out / "movie_labels.tif").exists()
    saved = out / ".movie_labels.tif.frames"
    largest = sorted(saved.glob("frame_*.max"))
    assert [int(f.read_text()) for f in largest] == largest_seen
    largest[0].unlink()  # as a run before the largest labels were kept would have left it

    monkeypatch.setattr(stack_module, "segment_frames", lambda *a, **k: (seen.append(r[0]) or r for r in real(*a, **k)))
    seen.clear()
    assert run_cli(tmp_path / "movie.npy", "-o", out, "--checkpoint", checkpoint, "--stack-axis", "0", "--resume") == 0
    assert seen == [(2,)]  # the two finished frames were kept
    with tifffile.TiffFile(out / "movie_labels.tif") as tif:
        assert tif.series[0].axes == "TYX"
        np.testing.assert_array_equal(tif.asarray(), np.stack([alone["plane0"], alone["plane1"], alone["plane0"]]))
