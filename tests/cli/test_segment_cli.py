"""``cellsam-trt segment``: files, folders, globs, formats, channels, bad files, --resume."""
import csv
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from cellsam_trt import CellSAM, NoCellsWarning
from cellsam_trt.cli.main import main
from cellsam_trt.cli.segment import Input, expand_inputs, output_name, output_names, output_stem
from cellsam_trt.dev.synthetic import synthetic_slide
from cellsam_trt.large.tiling import segment_large


@pytest.fixture(scope="module")
def session(checkpoint):
    return CellSAM.from_checkpoint(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def slide():
    """(600, 384, 2) uint16; big cells, so the random weights give a few dozen detections."""
    return synthetic_slide(600, 384, density=0.25, cell_radius=20, seed=1)[0]


@pytest.fixture(scope="module")
def plane(slide):
    """(256, 256) uint8 whole-cell plane: a handful of detections."""
    return (slide[:256, :256, 1] // 16).astype(np.uint8)


def run_cli(*args):
    return main(["segment", *map(str, args), "--device", "cpu", "--no-progress"])


def quiet_segment(session, image, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoCellsWarning)
        return session.segment(image, **kwargs)


def test_folder_with_a_corrupt_file_then_resume(checkpoint, session, plane, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    tifffile.imwrite(data / "a.tif", plane)
    cv2.imwrite(str(data / "b.png"), plane)
    np.save(data / "c.npy", plane)
    (data / "bad.tif").write_bytes(b"II*\x00 this is not a tiff" + bytes(range(256)))
    (data / "notes.txt").write_text("not an image, ignored")
    out = tmp_path / "out"

    rc = run_cli(data, tmp_path / "missing.tif", "-o", out, "--checkpoint", checkpoint, "--csv", "--overlay")
    captured = capsys.readouterr()
    assert rc == 1  # the bad file and the missing input fail, the rest succeed
    assert "bad.tif" in captured.err and "missing.tif" in captured.err
    # five inputs: the folder's four images and the missing file
    assert "segmented 3 of 5 images" in captured.out and "2 failed" in captured.out
    expected = quiet_segment(session, plane)
    assert expected.max() >= 1
    for name in "abc":
        labels = tifffile.imread(out / f"{name}_labels.tif")
        np.testing.assert_array_equal(labels, expected)  # every reader gives the same pixels
        overlay = cv2.imread(str(out / f"{name}_overlay.png"))
        assert overlay.shape == (256, 256, 3)
        with open(out / f"{name}_cells.csv") as fh:
            rows = list(csv.DictReader(fh))
        assert [int(r["label"]) for r in rows] == sorted(set(np.unique(labels)) - {0})
        for r in rows:
            mask = labels == int(r["label"])
            assert int(r["area"]) == mask.sum()
            assert float(r["centroid_y"]) == pytest.approx(np.nonzero(mask)[0].mean(), abs=0.01)
            if r["x1"]:  # the prompt box of the label (empty if its mask was merged away)
                assert float(r["x1"]) <= float(r["x2"]) and float(r["y1"]) <= float(r["y2"]) and float(r["iou"]) >= 0.5
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no temp files left
    assert not (out / "bad_labels.tif").exists()

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rc = run_cli(data, "-o", out, "--checkpoint", checkpoint, "--csv", "--overlay", "--resume")
    captured = capsys.readouterr()
    assert rc == 1 and "skipped 3 already done" in captured.out and "bad.tif" in captured.err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing rewritten

    (data / "bad.tif").unlink()
    (out / "b_cells.csv").unlink()  # an incomplete image is redone
    rc = run_cli(data, "-o", out, "--checkpoint", checkpoint, "--csv", "--overlay", "--resume")
    captured = capsys.readouterr()
    assert rc == 0 and "segmented 1 of 3 images" in captured.out and "skipped 2" in captured.out
    assert (out / "b_cells.csv").exists()


def test_channel_options_and_glob(checkpoint, session, plane, tmp_path, capsys):
    stack = np.zeros((4, 256, 256), np.uint8)
    stack[1] = 255 - plane
    stack[3] = plane
    tifffile.imwrite(tmp_path / "multi.ome.tif", stack, ome=True)
    np.save(tmp_path / "other.npy", plane)
    out = tmp_path / "out"

    # four channels: the command says which options to use
    assert run_cli(tmp_path / "multi.ome.tif", "-o", out, "--checkpoint", checkpoint) == 1
    assert "--nuclear-channel" in capsys.readouterr().err
    assert run_cli(tmp_path / "multi.ome.tif", "-o", out, "--checkpoint", checkpoint, "--whole-cell-channel", "4") == 1
    assert "--whole-cell-channel 4" in capsys.readouterr().err

    # a glob picks only the OME file; the whole-cell channel alone is the 2-D image
    rc = run_cli(tmp_path / "*.ome.tif", "-o", out, "--checkpoint", checkpoint, "--whole-cell-channel", "3",
                 "--channel-axis", "0")
    assert rc == 0 and "segmented 1 of 1" in capsys.readouterr().out
    np.testing.assert_array_equal(tifffile.imread(out / "multi_labels.tif"), quiet_segment(session, plane))
    assert not (out / "other_labels.tif").exists()


def test_large_images_are_tiled(checkpoint, session, slide, tmp_path, capsys):
    np.save(tmp_path / "slide.npy", slide)
    out = tmp_path / "out"
    rc = run_cli(tmp_path / "slide.npy", "-o", out, "--checkpoint", checkpoint, "--tile-size", "384", "--overlap", "64")
    assert rc == 0
    expected = segment_large(session, slide, tile_size=384, overlap=64)
    assert expected.max() >= 2
    np.testing.assert_array_equal(tifffile.imread(out / "slide_labels.tif"), expected)

    rc = run_cli(tmp_path / "slide.npy", "-o", tmp_path / "whole", "--checkpoint", checkpoint, "--no-tiling")
    assert rc == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "whole" / "slide_labels.tif"),
                                  quiet_segment(session, slide))
    capsys.readouterr()


@pytest.mark.slow
def test_images_too_large_for_memory_are_streamed_to_the_same_outputs(checkpoint, slide, tmp_path, capsys,
                                                                     monkeypatch):
    from cellsam_trt.engine import memory

    np.save(tmp_path / "slide.npy", slide)
    args = ("--checkpoint", checkpoint, "--tile-size", "256", "--overlap", "64", "--csv")
    assert run_cli(tmp_path / "slide.npy", "-o", tmp_path / "in-memory", *args) == 0
    monkeypatch.setattr(memory, "STREAM_ABOVE_BYTES", 0)  # every tiled image counts as too large
    assert run_cli(tmp_path / "slide.npy", "-o", tmp_path / "streamed", *args) == 0
    expected = tifffile.imread(tmp_path / "in-memory" / "slide_labels.tif")
    assert expected.max() >= 2
    with tifffile.TiffFile(tmp_path / "streamed" / "slide_labels.tif") as tif:
        assert tif.pages[0].is_tiled  # written tile by tile
        np.testing.assert_array_equal(tif.asarray(), expected)
    assert (tmp_path / "streamed" / "slide_cells.csv").read_text() == (tmp_path / "in-memory" / "slide_cells.csv").read_text()
    assert sorted(p.name for p in (tmp_path / "streamed").iterdir()) == ["slide_cells.csv", "slide_labels.tif"]
    capsys.readouterr()


def test_opencv_clahe_option_reaches_tiled_and_whole_paths(checkpoint, session, slide, tmp_path, capsys, monkeypatch):
    from cellsam_trt.engine import preprocess as pre

    methods = []
    equalize = pre.equalize_levels

    def spy(levels, method="skimage"):
        methods.append(method)
        return equalize(levels, method)

    monkeypatch.setattr(pre, "equalize_levels", spy)
    np.save(tmp_path / "slide.npy", slide)
    rc = run_cli(tmp_path / "slide.npy", "-o", tmp_path / "tiled", "--checkpoint", checkpoint, "--tile-size", "384",
                 "--overlap", "64", "--clahe", "opencv")
    assert rc == 0 and set(methods) == {"opencv"}
    expected = segment_large(session, slide, tile_size=384, overlap=64, normalize="opencv")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "tiled" / "slide_labels.tif"), expected)

    methods.clear()
    rc = run_cli(tmp_path / "slide.npy", "-o", tmp_path / "whole", "--checkpoint", checkpoint, "--no-tiling",
                 "--clahe", "opencv")
    assert rc == 0 and set(methods) == {"opencv"}
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "whole" / "slide_labels.tif"),
                                  quiet_segment(session, slide, normalize="opencv"))
    capsys.readouterr()


def test_bad_options_are_one_line_errors(checkpoint, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((64, 64), np.uint8))
    assert run_cli(tmp_path / "x.npy", "-o", tmp_path / "o", "--checkpoint", checkpoint, "--overlap", "999") == 1
    assert "overlap" in capsys.readouterr().err
    assert run_cli(tmp_path / "x.npy", "-o", tmp_path / "o", "--checkpoint", tmp_path / "nope.pt") == 1
    assert "nope.pt" in capsys.readouterr().err
    assert run_cli(tmp_path / "nothing-*.tif", "-o", tmp_path / "o", "--checkpoint", checkpoint) == 1
    assert "matches no image" in capsys.readouterr().err


def test_input_expansion_and_output_names(tmp_path):
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2" / "deep").mkdir(parents=True)
    for p in ["d1/img.tif", "d2/img.tif", "d2/deep/x.png", "d1/readme.md", "d1/y.ome.tiff"]:
        (tmp_path / p).write_bytes(b"")
    (tmp_path / "d1" / "store.zarr").mkdir()
    (tmp_path / "d1" / "store.zarr" / "0.tif").write_bytes(b"")  # inside a zarr store: not an input
    paths, problems = expand_inputs([str(tmp_path / "d1"), str(tmp_path / "d2")])
    names = sorted(str(p.relative_to(tmp_path)) for p in paths)
    assert names == ["d1/img.tif", "d1/store.zarr", "d1/y.ome.tiff", "d2/img.tif"] and not problems
    paths, _ = expand_inputs([str(tmp_path / "d2")], recursive=True)
    assert sorted(p.name for p in paths) == ["img.tif", "x.png"]
    paths, problems = expand_inputs([str(tmp_path / "**" / "*.tif"), str(tmp_path / "d1" / "img.tif")])
    assert len(paths) == 2 and not problems  # the glob and the file name the same image once
    assert output_stem(tmp_path / "y.ome.tiff") == "y" and output_stem(tmp_path / "s.zarr") == "s"
    assert output_name(Input(tmp_path / "d2" / "deep" / "x.png", Path("deep/x.png"))) == "deep/x"
    with pytest.raises(ValueError, match="d1/img.tif and .*d2/img.tif would both write img_labels.tif"):
        output_names([Input(tmp_path / "d1" / "img.tif", Path("img.tif")),
                      Input(tmp_path / "d2" / "img.tif", Path("img.tif"))])


def test_output_names_depend_on_each_input_alone(checkpoint, plane, tmp_path, capsys, monkeypatch):
    """A folder searched with --recursive keeps its sub-folders under -o; --resume finds the
    outputs whatever else the run holds; inputs that would share outputs are refused first."""
    import cellsam_trt.api

    data = tmp_path / "plate"
    for well in ("A1", "A2"):
        (data / well).mkdir(parents=True)
        tifffile.imwrite(data / well / "img.tif", plane)
    out = tmp_path / "out"
    assert run_cli(data, "--recursive", "-o", out, "--checkpoint", checkpoint) == 0
    printed = capsys.readouterr().out
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.tif")) == ["A1/img_labels.tif",
                                                                                 "A2/img_labels.tif"]
    assert f"{data / 'A1' / 'img.tif'} -> A1/img_labels.tif" in printed

    (data / "A2" / "img.tif").unlink()  # another set of inputs: the remaining one is still done
    assert run_cli(data, "--recursive", "-o", out, "--checkpoint", checkpoint, "--resume") == 0
    assert "skipped 1 already done" in capsys.readouterr().out

    # one stem, two images in one folder: each keeps its suffix, whatever the run holds
    np.save(data / "A1" / "img.npy", plane)
    assert run_cli(data / "A1" / "img.npy", "-o", tmp_path / "pair", "--checkpoint", checkpoint) == 0
    assert run_cli(data / "A1", "-o", tmp_path / "pair", "--checkpoint", checkpoint, "--resume") == 0
    assert "skipped 1 already done" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "pair").iterdir()) == ["img.npy_labels.tif", "img.tif_labels.tif"]

    # two files of two folders given one by one, for one set of outputs: refused before the model is loaded
    (data / "A1" / "img.npy").unlink()
    (data / "A2" / "img.tif").write_bytes((data / "A1" / "img.tif").read_bytes())
    monkeypatch.setattr(cellsam_trt.api.CellSAM, "from_checkpoint",
                        classmethod(lambda cls, *a, **k: pytest.fail("loaded the model before checking the names")))
    assert run_cli(data / "A1" / "img.tif", data / "A2" / "img.tif", "-o", tmp_path / "other",
                   "--checkpoint", checkpoint) == 1
    assert "would both write img_labels.tif" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_outputs(checkpoint, plane, tmp_path, capsys):
    """SIGKILL a real `cellsam-trt segment` process mid-run, resume it, compare with a clean run."""
    data = tmp_path / "data"
    data.mkdir()
    count = 8
    for i in range(count):
        np.save(data / f"img{i:02d}.npy", np.roll(plane, 17 * i, axis=1))
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    umask = os.umask(0)
    os.umask(umask)
    command = [sys.executable, "-m", "cellsam_trt.cli", "segment", str(data), "-o", str(killed), "--checkpoint",
               checkpoint, "--device", "cpu", "--csv", "--no-progress"]
    log = tmp_path / "killed.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not list(killed.glob("*_labels.tif")):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the run wrote nothing in 240 s"
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    finished = sorted(p.name for p in killed.glob("*_labels.tif"))
    assert 1 <= len(finished) < count
    for name in finished:  # whatever was there at the kill is complete
        tifffile.imread(killed / name)
    # what a kill in the middle of a write leaves behind
    stale = killed / f".img{count - 1:02d}_labels.tif.x1y2z3.tif"
    stale.write_bytes(b"II*\x00 half a tiff")

    assert run_cli(data, "-o", killed, "--checkpoint", checkpoint, "--csv", "--resume") == 0
    out = capsys.readouterr().out
    assert f"segmented {count - len(finished)} of {count} images" in out
    assert f"skipped {len(finished)} already done" in out
    assert not stale.exists()
    assert run_cli(data, "-o", clean, "--checkpoint", checkpoint, "--csv") == 0
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in clean.iterdir())
    for i in range(count):
        assert (killed / f"img{i:02d}_labels.tif").stat().st_mode & 0o777 == 0o666 & ~umask
        np.testing.assert_array_equal(tifffile.imread(killed / f"img{i:02d}_labels.tif"),
                                      tifffile.imread(clean / f"img{i:02d}_labels.tif"))
        assert (killed / f"img{i:02d}_cells.csv").read_text() == (clean / f"img{i:02d}_cells.csv").read_text()


def test_zarr_store_input(checkpoint, session, plane, tmp_path, capsys):
    zarr = pytest.importorskip("zarr")
    store = zarr.create_array(str(tmp_path / "plane.zarr"), shape=plane.shape, chunks=(128, 128), dtype=plane.dtype)
    store[...] = plane
    assert run_cli(tmp_path / "plane.zarr", "-o", tmp_path / "out", "--checkpoint", checkpoint) == 0
    assert "segmented 1 of 1" in capsys.readouterr().out
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "plane_labels.tif"), quiet_segment(session, plane))


def test_the_summary_counts_every_input_and_its_nouns(checkpoint, tmp_path, capsys):
    """One empty image and one path that matches nothing: two inputs, one segmented, one image
    without cells (singular), one failure."""
    import tifffile

    tifffile.imwrite(tmp_path / "blank.tif", np.zeros((64, 64), np.uint16))
    rc = run_cli(tmp_path / "blank.tif", tmp_path / "typo.tif", "-o", tmp_path / "out", "--checkpoint", checkpoint)
    out = capsys.readouterr().out
    assert rc == 1
    assert "segmented 1 of 2 images" in out and "1 image without cells" in out and "0 cells" in out
    assert "1 failed" in out


def test_label_files_are_uint16_by_default_and_int32_on_request(checkpoint, plane, tmp_path):
    import tifffile

    np.save(tmp_path / "p.npy", plane)
    assert run_cli(tmp_path / "p.npy", "-o", tmp_path / "a", "--checkpoint", checkpoint) == 0
    with tifffile.TiffFile(tmp_path / "a" / "p_labels.tif") as tif:
        assert tif.pages[0].dtype == np.uint16 and tif.is_imagej
    assert run_cli(tmp_path / "p.npy", "-o", tmp_path / "b", "--checkpoint", checkpoint, "--label-dtype", "int32") == 0
    with tifffile.TiffFile(tmp_path / "b" / "p_labels.tif") as tif:
        assert tif.pages[0].dtype == np.int32
        np.testing.assert_array_equal(tif.asarray(), tifffile.imread(tmp_path / "a" / "p_labels.tif"))


def test_an_output_that_cannot_be_written_fails_before_any_image(checkpoint, plane, tmp_path, capsys, monkeypatch):
    """An existing file as -o, or a folder under a file: one error line, and no session is loaded."""
    import cellsam_trt.api

    np.save(tmp_path / "p.npy", plane)
    (tmp_path / "taken").write_text("a file")
    monkeypatch.setattr(cellsam_trt.api.CellSAM, "from_checkpoint",
                        classmethod(lambda cls, *a, **k: pytest.fail("loaded the model before checking -o")))
    assert run_cli(tmp_path / "p.npy", "-o", tmp_path / "taken", "--checkpoint", checkpoint) == 1
    assert "is a file, not a folder" in capsys.readouterr().err
    assert run_cli(tmp_path / "p.npy", "-o", tmp_path / "taken" / "out", "--checkpoint", checkpoint) == 1
    assert "cannot make the output folder" in capsys.readouterr().err


def test_plain_tiffs_are_read_as_their_arrays(checkpoint, session, plane, tmp_path, capsys):
    """``tifffile.imwrite(p, image)`` without axes metadata: a (H, W, 2) image is two channels
    (``--channel-axis 2`` is taken), and three planes stored as planar RGB by the writer's
    default are read as channels with a warning naming the flags, on a line of its own."""
    two = np.stack([plane, 255 - plane], axis=-1)
    tifffile.imwrite(tmp_path / "two.tif", two)
    expected = quiet_segment(session, two, channel_axis=2)
    assert run_cli(tmp_path / "two.tif", "-o", tmp_path / "a", "--checkpoint", checkpoint, "--channel-axis", "2") == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "a" / "two_labels.tif"), expected)
    assert run_cli(tmp_path / "two.tif", "-o", tmp_path / "b", "--checkpoint", checkpoint) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "b" / "two_labels.tif"), expected)
    capsys.readouterr()

    three = np.stack([plane, 255 - plane, plane])
    with warnings.catch_warnings():  # tifffile's own notice about its planar RGB default
        warnings.simplefilter("ignore", DeprecationWarning)
        tifffile.imwrite(tmp_path / "three.tif", three, metadata=None)
    assert run_cli(tmp_path / "three.tif", "-o", tmp_path / "c", "--checkpoint", checkpoint) == 0
    lines = capsys.readouterr().err.splitlines()
    (warning,) = [line for line in lines if "read as 3 channels" in line]
    assert warning.startswith("cellsam-trt segment: ") and "--axes TYX" in warning and "--stack-axis 0" in warning
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "c" / "three_labels.tif"),
                                  quiet_segment(session, three, channel_axis=0))


def test_a_full_disk_leaves_no_half_set_and_names_the_cause(checkpoint, plane, tmp_path, capsys, monkeypatch):
    """The disk fills while an image's labels are written: its table and overlay (written
    first) are not left behind, the error says "No space left on device", and --resume
    finishes the image."""
    import errno

    np.save(tmp_path / "a.npy", plane)
    np.save(tmp_path / "b.npy", np.roll(plane, 40, axis=1))
    out = tmp_path / "out"
    write = tifffile.imwrite

    def full_disk_for_b(path, *args, **kwargs):
        if "b_labels" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write(path, *args, **kwargs)

    monkeypatch.setattr(tifffile, "imwrite", full_disk_for_b)
    flags = ("--checkpoint", checkpoint, "--csv", "--overlay")
    assert run_cli(tmp_path / "a.npy", tmp_path / "b.npy", "-o", out, *flags) == 1
    err = capsys.readouterr().err
    assert f"cannot write {out / 'b_labels.tif'}: No space left on device" in err
    assert sorted(p.name for p in out.iterdir()) == ["a_cells.csv", "a_labels.tif", "a_overlay.png"]

    monkeypatch.setattr(tifffile, "imwrite", write)
    assert run_cli(tmp_path / "a.npy", tmp_path / "b.npy", "-o", out, *flags, "--resume") == 0
    assert "segmented 1 of 2 images" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}_{kind}" for n in "ab"
                                                           for kind in ("cells.csv", "labels.tif", "overlay.png"))


def test_a_tiled_image_shows_its_tiles_progress(checkpoint, plane, tmp_path, capsys):
    np.save(tmp_path / "wide.npy", np.concatenate([plane, plane[:, :64]], axis=1))  # (256, 320): two tiles
    args = ["segment", str(tmp_path / "wide.npy"), "-o", str(tmp_path / "out"), "--checkpoint", checkpoint,
            "--device", "cpu", "--tile-size", "256", "--overlap", "64"]
    assert main(args) == 0
    bars = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert any(line.startswith("tiles:") and "2/2" in line for line in bars), bars
    assert main(args + ["--no-progress"]) == 0
    assert "tiles:" not in capsys.readouterr().err
