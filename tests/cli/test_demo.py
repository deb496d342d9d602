"""``cellsam-trt demo``: the pipeline on a generated image; ``--write-weights`` saves its random weights."""
import warnings

import numpy as np
import tifffile

from cellsam_trt import NoCellsWarning, load_checkpoint, segment
from cellsam_trt.cli.main import main
from cellsam_trt.dev.synthetic import synthetic_cells
from cellsam_trt.modeling.config import ModelConfig


def test_demo_writes_random_weights_that_segment_takes(tmp_path, capsys):
    weights = tmp_path / "weights" / "tiny.pt"
    rc = main(["demo", "--config", "tiny", "--size", "192", "--cells", "8", "--device", "cpu",
               "--out", str(tmp_path / "demo"), "--write-weights", str(weights)])
    out = capsys.readouterr().out
    assert rc == 0 and f"to {weights}" in out and "not a real segmentation" in out
    assert (tmp_path / "demo" / "demo_labels.tif").exists()
    timing_lines = out.split("stage timings:")[1].split("wrote")[0]
    assert [line.split()[0] for line in timing_lines.splitlines() if line.strip()].count("total") == 1

    assert load_checkpoint(weights).config == ModelConfig.tiny()
    image = synthetic_cells(192, 192, n_cells=8, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoCellsWarning)
        labels = segment(image, checkpoint=weights, backend="torch", device="cpu")
    np.testing.assert_array_equal(labels, tifffile.imread(tmp_path / "demo" / "demo_labels.tif"))
