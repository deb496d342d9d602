"""``io.read_image``: the array and the axes the file records (OME / ImageJ / tifffile TIFF, OME-Zarr)."""
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellsam_trt.engine.source import open_image
from cellsam_trt.io import read_image, write_label_stack_tiff


@pytest.mark.parametrize("shape, kwargs, axes", [
    ((3, 32, 40), {"ome": True, "metadata": {"axes": "TYX"}}, "TYX"),
    ((2, 32, 40), {"ome": True, "metadata": {"axes": "ZYX"}}, "ZYX"),
    ((2, 3, 32, 40), {"ome": True, "metadata": {"axes": "TCYX"}}, "TCYX"),
    ((2, 32, 40), {"ome": True, "metadata": {"axes": "CYX"}}, "CYX"),
    ((3, 32, 40), {"imagej": True, "metadata": {"axes": "TYX"}}, "TYX"),
    ((2, 32, 40), {"imagej": True, "metadata": {"axes": "ZYX"}}, "ZYX"),
    ((3, 32, 40), {"metadata": {"axes": "TYX"}, "photometric": "minisblack"}, "TYX"),  # tifffile's own description
    ((1, 3, 32, 40), {"ome": True, "metadata": {"axes": "TCYX"}}, "CYX"),  # singleton T dropped with its letter
    ((3, 32, 40), {"photometric": "minisblack"}, "???"),  # no axes written: pages say nothing
    # tifffile's old default for 3 planes: planar RGB samples, a layout rather than a statement
    ((3, 32, 40), {"photometric": "rgb", "planarconfig": "separate"}, "???"),
    ((3, 32, 40), {"metadata": None}, "???"),  # the same planar RGB, without tifffile's description
    ((10, 32, 40), {}, "???"),
    # a plain multi-channel image: 32 pages of 40 x 2 pixels, whose "Y" and "X" are not the plane's
    ((32, 40, 2), {}, "???"),
    ((32, 40, 2), {"metadata": None}, "???"),
    ((32, 40, 3), {"photometric": "rgb"}, "YXC"),  # interleaved RGB samples are colour channels
    ((32, 40, 3), {"metadata": None}, "YXC"),
    ((32, 40), {}, "YX"),
    ((32, 40), {"metadata": None}, "YX"),
])
@pytest.mark.parametrize("lazy", [False, True])
def test_tiff_axes(tmp_path, shape, kwargs, axes, lazy):
    data = np.arange(np.prod(shape), dtype=np.uint16).reshape(shape)
    with warnings.catch_warnings():  # tifffile's notice that it stores 3 planes as planar RGB by default
        warnings.simplefilter("ignore", DeprecationWarning)
        tifffile.imwrite(tmp_path / "a.tif", data, **kwargs)
    image = read_image(tmp_path / "a.tif", lazy=lazy)
    try:
        assert image.axes == axes
        np.testing.assert_array_equal(np.asarray(image.array[...]), data.squeeze())
        assert open_image(tmp_path / "a.tif").shape == image.shape  # the old name reads the same array
    finally:
        image.close()


def test_plain_tiffs_are_read_as_plain_arrays_are(tmp_path):
    """``tifffile.imwrite(p, image)`` without axes: the same layout as the array itself, and the
    caller's channel or stack axis is taken, not refused as "the file labels that axis X"."""
    from cellsam_trt.axes import resolve_layout

    image = np.arange(192 * 192 * 2, dtype=np.uint16).reshape(192, 192, 2)
    tifffile.imwrite(tmp_path / "x.tif", image)
    read = read_image(tmp_path / "x.tif")
    assert read.shape == image.shape
    assert resolve_layout(read.shape, read.axes).axes == resolve_layout(image.shape, None).axes == "YXC"
    assert resolve_layout(read.shape, read.axes, channel_axis=2).axes == "YXC"
    assert resolve_layout(read.shape, read.axes, stack_axis=2).axes == "YXT"

    stack = np.arange(3 * 64 * 80, dtype=np.uint16).reshape(3, 64, 80)
    with warnings.catch_warnings():  # tifffile stores 3 planes as planar RGB by default, and says so
        warnings.simplefilter("ignore", DeprecationWarning)
        tifffile.imwrite(tmp_path / "s.tif", stack, metadata=None)
    read = read_image(tmp_path / "s.tif")
    layout = resolve_layout(read.shape, read.axes)
    assert layout.axes == "CYX" and layout.channels_guessed and "axis 0 (length 3)" in layout.guessed[0]


def test_ome_zarr_axes_and_plain_files(tmp_path):
    zarr = pytest.importorskip("zarr")
    data = np.arange(2 * 3 * 16 * 20, dtype=np.uint16).reshape(2, 1, 3, 16, 20)
    group = zarr.open_group(str(tmp_path / "img.zarr"), mode="w", zarr_format=2)
    level = group.create_array("0", shape=data.shape, dtype=data.dtype, chunks=(1, 1, 1, 16, 20))
    level[...] = data
    group.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}, {"name": "z", "type": "space"},
                 {"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
        "datasets": [{"path": "0"}],
    }]
    image = read_image(tmp_path / "img.zarr")
    assert image.axes == "TZYX" and image.shape == (2, 3, 16, 20)
    np.testing.assert_array_equal(np.asarray(image.array[...]), data[:, 0])

    np.save(tmp_path / "plain.npy", data[:, 0])
    assert read_image(tmp_path / "plain.npy").axes is None  # .npy records no axes


def test_label_stack_tiff_keeps_its_axes(tmp_path):
    frames = [np.full((16, 20), k, np.int32) for k in range(6)]
    write_label_stack_tiff(tmp_path / "l.tif", iter(frames), (2, 3, 16, 20), "TZYX")
    with tifffile.TiffFile(tmp_path / "l.tif") as tif:
        assert tif.series[0].axes == "TZYX"
        np.testing.assert_array_equal(tif.asarray(), np.stack(frames).reshape(2, 3, 16, 20))
    assert read_image(tmp_path / "l.tif").axes == "TZYX"


def test_label_tiffs_are_the_smallest_unsigned_type_fiji_reads(tmp_path):
    import tifffile

    from cellsam_trt.io import label_file_dtype, write_labels_tiff

    labels = np.zeros((40, 50), np.int32)
    labels[5:10, 5:10], labels[20:30, 20:40] = 1, 300
    path = write_labels_tiff(tmp_path / "few.tif", labels)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_imagej and tif.pages[0].dtype == np.uint16  # ImageJ metadata: Fiji opens it as 16-bit labels
        np.testing.assert_array_equal(tif.asarray(), labels)
    many = labels.copy()
    many[0, 0] = 70000
    with tifffile.TiffFile(write_labels_tiff(tmp_path / "many.tif", many)) as tif:
        assert tif.pages[0].dtype == np.uint32
        np.testing.assert_array_equal(tif.asarray(), many)
    with tifffile.TiffFile(write_labels_tiff(tmp_path / "signed.tif", labels, "int32")) as tif:
        assert tif.pages[0].dtype == np.int32  # for those who need it
    with pytest.raises(ValueError, match="do not fit in uint16"):
        label_file_dtype(70000, "uint16")
    with pytest.raises(ValueError, match="label dtype"):
        label_file_dtype(3, "float32")


def test_damaged_image_files_are_errors_naming_the_file(tmp_path):
    """A TIFF header without pages, a TIFF cut short, an empty file: a ValueError that names
    the file and the problem (not an array of shape (0,) that fails later)."""
    tifffile.imwrite(tmp_path / "whole.tif", np.arange(256 * 256, dtype=np.uint16).reshape(256, 256))
    data = (tmp_path / "whole.tif").read_bytes()
    (tmp_path / "half.tif").write_bytes(data[:len(data) // 2])
    (tmp_path / "header.tif").write_bytes(b"II*\x00 this is not a tiff" + bytes(range(256)))
    (tmp_path / "empty.tif").write_bytes(b"")
    for name, match in [("half.tif", "truncated or damaged"), ("header.tif", "holds no image"),
                        ("empty.tif", r"empty \(0 bytes\)")]:
        with pytest.raises(ValueError, match=match) as err:
            read_image(tmp_path / name)
        assert str(err.value).startswith(f"cannot read image {tmp_path / name}: ")
        assert "\n" not in str(err.value)


def test_files_written_together_are_all_or_nothing(tmp_path):
    """``write_together``: nothing is renamed into place until every file is written; a failure
    removes the set's temp files and leaves the files of an earlier set as they were."""
    import errno

    from cellsam_trt.io import atomic_write, write_together

    def text(content):
        return lambda tmp: Path(tmp).write_text(content)

    with write_together():
        atomic_write(tmp_path / "table.csv", text("one"))
        assert not (tmp_path / "table.csv").exists()  # not before the set is complete
        atomic_write(tmp_path / "labels.tif", text("one"))
    assert (tmp_path / "table.csv").read_text() == (tmp_path / "labels.tif").read_text() == "one"

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device", tmp)

    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'labels.tif'}: No space left on device") as err:
        with write_together():
            atomic_write(tmp_path / "table.csv", text("two"))
            atomic_write(tmp_path / "labels.tif", full)
    assert err.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tif", "table.csv"]  # no temp files
    assert (tmp_path / "table.csv").read_text() == "one"
