"""The latency bench: smoke mode end to end (JSON, markdown, PNG), and its building blocks.

Speed itself is not asserted here (that is what the reports are for); these tests check
that the bench measures every stage it claims, compares like with like, and keeps working.
"""
import copy
import json

import numpy as np
import pytest
import torch

from cellsam_trt import bench
from cellsam_trt.cli import main as cli_main
from cellsam_trt.postprocess import MaskPainter

USER_STAGES = ("preprocess", "encoder", "decoder", "paint", "cleanup", "masks", "decoder_and_masks", "total",
               "total_excl_clahe")
FINDER_STAGES = USER_STAGES + ("cellfinder", "boxes")
BASELINE_USER_STAGES = ("preprocess", "encoder", "per_box", "cleanup", "decoder_and_masks", "total")


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory, steered_tiny):
    """One smoke run (on a copy of the session's steered tiny network, to skip re-steering)."""
    out = tmp_path_factory.mktemp("bench")
    opts = bench.smoke_options(str(out))
    report = bench.run_bench(opts, network=copy.deepcopy(steered_tiny))
    paths = bench.write_report(report, out)
    return report, paths


def test_smoke_report_has_every_stage_backend_and_n(smoke_report):
    report, paths = smoke_report
    saved = json.loads(paths["json"].read_text())
    assert saved["format"] == bench.FORMAT and saved["config"]["smoke"]
    # every backend kind is either measured or skipped with a reason
    assert set(saved["backends"]) == set(bench.BACKEND_KINDS)
    for kind, entry in saved["backends"].items():
        assert entry["status"] in ("ok", "skipped")
        if entry["status"] == "skipped":
            assert entry["reason"]
    assert saved["backends"]["torch-fp32"]["status"] == "ok"
    if not torch.cuda.is_available():
        assert "CUDA" in saved["backends"]["torch-fp16"]["reason"]

    runs = {(r["backend"], r["boxes"], r["n"] if r["boxes"] == "user" else None): r for r in saved["runs"]}
    for n in bench.SMOKE_NS:
        run = runs[("torch-fp32", "user", n)]
        assert run["n"] == n  # user boxes control N exactly
        assert set(USER_STAGES) <= set(run["stages"])
        for stage in USER_STAGES:
            stats = run["stages"][stage]
            assert stats["n"] == 1 and stats["median"] > 0, (stage, stats)
            assert stats["min"] <= stats["q1"] <= stats["median"] <= stats["q3"] <= stats["max"]
        # stages add up to (no more than) the whole call
        parts = sum(run["stages"][s]["median"] for s in ("preprocess", "encoder", "decoder", "masks"))
        assert parts <= run["stages"]["total"]["median"] * 1.01
        assert run["decoder_calls"] == 1
    finder = runs[("torch-fp32", "cellfinder", None)]
    assert set(FINDER_STAGES) <= set(finder["stages"])
    for stage in ("preprocess", "encoder", "cellfinder", "boxes", "total"):
        assert finder["stages"][stage]["median"] > 0, stage

    base = {(b["boxes"], b["n"]): b for b in saved["baseline"]}
    for n in bench.SMOKE_NS:
        stages = base[("user", n)]["stages"]
        assert all(stages[s]["median"] > 0 for s in BASELINE_USER_STAGES)
    # the CellFinder run decodes more boxes than the smoke cap allows the baseline
    if finder["n"] > max(bench.SMOKE_NS):
        assert any(s["what"] == "baseline" and s["boxes"] == "cellfinder" for s in saved["skipped"])
    speed = {(s["backend"], s["n"]) for s in saved["speedup"] if s["boxes"] == "user"}
    assert speed == {("torch-fp32", n) for n in bench.SMOKE_NS}
    assert all(s["total"] > 0 for s in saved["speedup"])

    steps = saved["preprocess"]["steps"]
    assert steps["clahe"]["median"] > 0 and saved["preprocess"]["clahe_channels"] == 2
    assert [row["n"] for row in saved["painter"]["rows"]] == list(bench.SMOKE_NS)
    assert all(row["identical"] for row in saved["painter"]["rows"])
    assert saved["machine"]["libraries"]["torch"] == torch.__version__.split("+")[0] or saved["machine"]["libraries"]["torch"]


def test_smoke_bench_compares_the_same_labels_as_the_baseline(smoke_report):
    report, _ = smoke_report
    comparisons = {c["n"]: c for c in report["comparisons"] if c["backend"] == "torch-fp32" and c["boxes"] == "user"}
    assert set(comparisons) == set(bench.SMOKE_NS)
    for c in comparisons.values():
        assert c["differing_pixels"] <= 10, c


def test_markdown_and_png_are_written_and_regenerated(smoke_report, capsys):
    report, paths = smoke_report
    md = paths["markdown"].read_text()
    assert "| torch-fp32 | user | 10 |" in md and "clahe" in md and "Not measured" in md
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    paths["markdown"].unlink()
    paths["png"].unlink()
    assert cli_main(["bench", "--render", str(paths["json"])]) == 0
    assert paths["markdown"].read_text() == md
    assert paths["png"].exists()


def test_second_report_does_not_overwrite_the_first(smoke_report, tmp_path):
    report, _ = smoke_report
    first = bench.write_report(report, tmp_path)["json"]
    second = bench.write_report(report, tmp_path)["json"]
    assert first != second and first.exists() and second.exists()


def test_render_refuses_other_json(tmp_path, capsys):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"format": "something-else"}))
    assert cli_main(["bench", "--render", str(path)]) == 1
    assert "not a cellsam-trt-bench report" in capsys.readouterr().err


@pytest.mark.parametrize("n", [1, 7, 100, 3500])
def test_bench_boxes_are_exact_valid_and_spread(n):
    boxes = bench.bench_boxes(n, 1024, 768, seed=3)
    assert boxes.shape == (n, 4) and boxes.dtype == np.float32
    x1, y1, x2, y2 = boxes.T
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= 768).all() and (y2 <= 1024).all()
    assert (x2 - x1 >= 3).all() and (y2 - y1 >= 3).all()
    if n >= 100:
        centres = np.stack([(x1 + x2) / 2, (y1 + y2) / 2], 1)
        # spread over the whole image, not clustered: every quadrant holds about a quarter
        quadrant = (centres[:, 0] > 384).astype(int) + 2 * (centres[:, 1] > 512)
        assert np.bincount(quadrant, minlength=4).min() > 0.15 * n
    assert np.array_equal(boxes, bench.bench_boxes(n, 1024, 768, seed=3))


def test_cell_logits_paint_the_ellipse_inside_each_box():
    boxes = torch.tensor([[100.0, 200.0, 140.0, 260.0], [500.0, 500.0, 530.0, 520.0]])
    logits = bench.cell_logits(boxes, 256, 1024)
    assert logits.shape == (2, 256, 256)
    painter = MaskPainter((1024, 1024), low_res=256, model_size=1024)
    painter.paint(logits, 1)
    labels = painter.result().numpy()
    for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist(), start=1):
        ys, xs = np.nonzero(labels == k)
        assert len(ys) > 0.5 * np.pi / 4 * (x2 - x1) * (y2 - y1)  # most of the inscribed ellipse
        assert xs.min() >= x1 - 4 and xs.max() <= x2 + 4 and ys.min() >= y1 - 4 and ys.max() <= y2 + 4


def test_bench_image_is_a_three_channel_cell_image():
    image = bench.bench_image(128, n_cells=20, seed=1)
    assert image.shape == (128, 128, 3) and image.dtype == np.uint16
    assert image[..., 0].max() == 0 and image[..., 1].max() > 0 and image[..., 2].max() > 0


def test_summarize_reports_median_and_spread():
    stats = bench.summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (stats["median"], stats["q1"], stats["q3"], stats["min"], stats["max"], stats["n"]) == (3, 2, 4, 1, 5, 5)
    with pytest.raises(ValueError, match="samples"):
        bench.summarize([])


@pytest.mark.parametrize("changes, message", [
    ({"ns": ()}, "n:"),
    ({"ns": (10, 0)}, "n:"),
    ({"backends": ("torch-fp32", "tensorflow")}, "backends"),
    ({"masks": "some"}, "masks"),
    ({"caps": {"encoder": 3}}, "cap"),
    ({"repeats": 0}, "repeats"),
    ({"onnx_dir": "a", "export_onnx": "b"}, "onnx_dir"),
])
def test_bad_options_are_refused(changes, message):
    opts = bench.BenchOptions(**changes)
    with pytest.raises(ValueError, match=message):
        opts.validate()


def test_bad_command_line_values_are_refused(capsys):
    with pytest.raises(SystemExit):
        cli_main(["bench", "--cap", "decoder=10"])
    assert "NAME=N" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["bench", "--n", "1,x"])
