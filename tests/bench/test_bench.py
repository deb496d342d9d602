"""The latency bench: smoke mode end to end (JSON, and the markdown and PNG that
bench/report.py makes of it), its options, and its building blocks.

Speed itself is not asserted here (that is what the reports are for); these tests check
that the bench measures every stage it claims, compares like with like, and keeps working.
"""
import copy
import importlib
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from cellsam_trt.api import CellSAM
from cellsam_trt.bench import latency, measure, options, timing
from cellsam_trt.cli.main import main as cli_main
from cellsam_trt.dev.synthetic import bench_image, cell_logits
from cellsam_trt.modeling.config import ModelConfig
from cellsam_trt.runtime.base import Backend

USER_STAGES = ("preprocess", "encoder", "decoder", "paint", "cleanup", "masks", "decoder_and_masks", "total",
               "total_excl_clahe")
FINDER_STAGES = USER_STAGES + ("cellfinder", "boxes")
BASELINE_USER_STAGES = ("preprocess", "encoder", "per_box", "cleanup", "decoder_and_masks", "total")


BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def bench_script(name: str):
    """A module of the repository's bench/ folder, imported as its scripts import each other."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory, steered_tiny):
    """One smoke run (on a copy of the session's steered tiny network, to skip re-steering),
    its JSON and the markdown and PNG rendered from it."""
    out = tmp_path_factory.mktemp("bench")
    opts = options.smoke_options(str(out))
    report = latency.run_bench(opts, network=copy.deepcopy(steered_tiny))
    path = latency.write_report(report, out)
    markdown, png = bench_script("report").render_report(path)
    return report, {"json": path, "markdown": markdown, "png": png}


def test_smoke_report_has_every_stage_backend_and_n(smoke_report):
    report, paths = smoke_report
    saved = json.loads(paths["json"].read_text())
    assert saved["format"] == latency.FORMAT and saved["config"]["smoke"]
    # every backend kind is either measured or skipped with a reason
    assert set(saved["backends"]) == set(options.BACKEND_KINDS)
    for entry in saved["backends"].values():
        assert entry["status"] in ("ok", "skipped")
        if entry["status"] == "skipped":
            assert entry["reason"]
    assert saved["backends"]["torch-fp32"]["status"] == "ok"
    if not torch.cuda.is_available():
        assert "CUDA" in saved["backends"]["torch-fp16"]["reason"]

    runs = {(r["backend"], r["boxes"], r["n"] if r["boxes"] == "user" else None): r for r in saved["runs"]}
    for n in options.SMOKE_NS:
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
    assert not saved["config"]["cellfinder_run"] and ("torch-fp32", "cellfinder", None) not in runs

    base = {(b["boxes"], b["n"]): b for b in saved["baseline"]}
    for n in options.SMOKE_NS:
        stages = base[("user", n)]["stages"]
        assert all(stages[s]["median"] > 0 for s in BASELINE_USER_STAGES)
    speed = {(s["backend"], s["n"]) for s in saved["speedup"] if s["boxes"] == "user"}
    measured = {kind for kind, entry in saved["backends"].items() if entry["status"] == "ok"}
    assert "torch-fp32" in measured and speed == {(kind, n) for kind in measured for n in options.SMOKE_NS}
    assert all(s["total"] > 0 for s in saved["speedup"])

    steps = saved["preprocess"]["steps"]
    assert steps["clahe"]["median"] > 0 and saved["preprocess"]["clahe_channels"] == 2
    assert saved["preprocess"]["clahe_opencv"]["median"] > 0
    deviation = saved["preprocess"]["opencv_deviation"]
    assert set(deviation) == {"normalized", "embedding_input", "cellfinder_input"}
    assert 0 < deviation["normalized"]["mean"] <= deviation["normalized"]["p999"] <= deviation["normalized"]["max"] < 0.1
    assert [row["n"] for row in saved["painter"]["rows"]] == list(options.SMOKE_NS)
    assert all(row["identical"] for row in saved["painter"]["rows"])
    assert saved["machine"]["libraries"]["torch"] == torch.__version__.split("+")[0] or saved["machine"]["libraries"]["torch"]


def test_smoke_bench_compares_the_same_labels_as_the_baseline(smoke_report):
    report, _ = smoke_report
    comparisons = {c["n"]: c for c in report["comparisons"] if c["backend"] == "torch-fp32" and c["boxes"] == "user"}
    assert set(comparisons) == set(options.SMOKE_NS)
    for c in comparisons.values():
        assert c["differing_pixels"] <= 10, c


def test_markdown_and_png_are_written_and_regenerated(smoke_report, capsys):
    report, paths = smoke_report
    md = paths["markdown"].read_text()
    assert "| torch-fp32 | user | 10 |" in md and "clahe" in md and "Not measured" in md
    assert "--clahe opencv" in md and "| embedding_input |" in md
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    paths["markdown"].unlink()
    paths["png"].unlink()
    assert bench_script("report").main([str(paths["json"])]) == 0
    assert paths["markdown"].read_text() == md
    assert paths["png"].exists()


def test_second_report_does_not_overwrite_the_first(smoke_report, tmp_path):
    report, paths = smoke_report
    earlier = tmp_path / report["device_name"] / paths["json"].name
    earlier.parent.mkdir()
    earlier.write_text("earlier report")
    second = latency.write_report(report, tmp_path)
    assert second != earlier and second.name.endswith("-2.json")
    assert earlier.read_text() == "earlier report" and json.loads(second.read_text())["format"] == latency.FORMAT


def test_render_refuses_other_json(tmp_path, capsys):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"format": "something-else"}))
    assert bench_script("report").main([str(path)]) == 1
    assert "not a cellsam-trt-bench report" in capsys.readouterr().err


def test_summarize_reports_median_and_spread():
    stats = timing.summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (stats["median"], stats["q1"], stats["q3"], stats["min"], stats["max"], stats["n"]) == (3, 2, 4, 1, 5, 5)
    with pytest.raises(ValueError, match="samples"):
        timing.summarize([])


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
    opts = options.BenchOptions(**changes)
    with pytest.raises(ValueError, match=message):
        opts.validate()


def test_bad_command_line_values_are_refused(capsys):
    with pytest.raises(SystemExit):
        cli_main(["bench", "--cap", "decoder=10"])
    assert "NAME=N" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["bench", "--n", "1,x"])


class _ScriptedBackend(Backend):
    """Graphs without a model: a few confident CellFinder detections, ellipse masks, fixed delays.

    Lets the bench's CellFinder-run bookkeeping be checked in milliseconds.
    """

    name = "scripted"

    def __init__(self, delay: float = 0.002) -> None:
        self.device = torch.device("cpu")
        self.config = ModelConfig.tiny()
        self.delay = delay
        self.decoder_boxes = []

    def encoder(self, images):
        time.sleep(self.delay)
        return torch.ones(len(images), self.config.sam.prompt_embed_dim, 64, 64)

    def cellfinder(self, images):
        time.sleep(2 * self.delay)
        q = self.config.cellfinder.num_queries
        logits = torch.full((len(images), q, 2), -8.0)
        logits[:, :5, 0] = 4.0  # five confident detections, well apart
        boxes = torch.full((len(images), q, 4), 0.5)
        boxes[:, :5, 0] = torch.linspace(0.1, 0.9, 5)
        boxes[:, :, 2:] = 0.05
        return logits, boxes

    def decoder(self, embedding, boxes, *, keep_iou=None, last_call=False):
        time.sleep(self.delay)
        self.decoder_boxes.append(len(boxes))
        return cell_logits(boxes)[:, None], torch.ones(len(boxes), 1)  # every box passes


def test_cellfinder_run_bookkeeping_splits_graph_and_selection_time():
    scripted = _ScriptedBackend()
    clock = timing.DeviceClock(scripted.device)
    session = CellSAM(timing.TimedBackend(scripted, clock, cell_masks=False))
    image = bench_image(256, n_cells=5)
    record, labels = measure.measure_pipeline(session, clock, image, None, warmup=1, repeats=2, clahe_seconds=0.0)
    assert record["n"] == 5 and record["kept"] == 5 and record["decoder_calls"] == 1
    assert labels.max() == 5
    stages = record["stages"]
    assert set(FINDER_STAGES) <= set(stages)
    assert all(stages[s]["n"] == 2 for s in FINDER_STAGES)
    # graph times are the backend calls alone (the sleeps), selection is the rest of the stage
    assert 0.004 <= stages["cellfinder"]["median"] < 0.004 + 0.05
    assert 0.002 <= stages["encoder"]["median"] < 0.002 + 0.05
    assert 0.002 <= stages["decoder"]["median"] < 0.002 + 0.05
    assert stages["boxes"]["median"] > 0
    timings = record["pipeline_timings"]
    assert stages["cellfinder"]["median"] + stages["boxes"]["median"] == pytest.approx(
        timings["cellfinder"]["median"] + timings["boxes"]["median"])
    assert stages["total"]["median"] >= sum(stages[s]["median"] for s in ("preprocess", "cellfinder", "boxes",
                                                                             "encoder", "decoder", "masks"))
    assert scripted.decoder_boxes == [5, 5, 5]  # warm-up + 2 repeats, one chunk each


def test_cell_masks_replace_the_decoder_output_and_are_subtracted():
    scripted = _ScriptedBackend(delay=0.0)
    clock = timing.DeviceClock(scripted.device)
    timed = timing.TimedBackend(scripted, clock, cell_masks=True)
    boxes = torch.tensor([[10.0, 10.0, 50.0, 40.0]])
    masks, _ = timed.decoder(torch.ones(1, 32, 64, 64), boxes)
    assert torch.equal(masks, cell_logits(boxes)[:, None])
    times = clock.collect()
    assert set(times) == {"decoder", "synthetic_masks"} and times["synthetic_masks"] > 0


def test_smoke_report_has_large_image_throughput(smoke_report):
    report, paths = smoke_report
    result = json.loads(paths["json"].read_text())["throughput"]
    assert result["image"] == {"height": 640, "width": 640, "megapixels": 0.41}
    assert result["tiles"] == 4 and result["dask"]["workers"] == 2
    assert result["identical_labels"]  # the dask path gives the single-process labels
    for path in ("single", "dask"):
        r = result[path]
        assert r["cells"] >= 2 and r["megapixels_per_s"] > 0
        assert r["megapixels_per_s"] == pytest.approx(0.4096 / r["seconds"], rel=0.01, abs=1e-4)
    assert result["single"]["cells"] == result["dask"]["cells"]
    text = paths["markdown"].read_text()
    assert "## Large image: single process vs dask workers" in text and "dask, 2 workers" in text


def test_precision_section_lists_each_box_source(steered_tiny, cell_image):
    from cellsam_trt.dev.accuracy import precision_agreement

    session = CellSAM.from_network(steered_tiny, device="cpu")
    same = precision_agreement(session, session, cell_image)
    lines = bench_script("report").precision_markdown({"cellfinder": same})
    row = next(line for line in lines if line.startswith("| cellfinder"))
    cells = same["labels"]["reference_cells"]
    assert f"| {cells} / {cells} | 1.0000 | 1.0000 | 1.0000 | 1.0000 |" in row
    assert bench_script("report").precision_markdown(None) == []


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
])
def test_a_row_out_of_device_memory_is_reported_and_the_bench_goes_on(steered_tiny, tmp_path, monkeypatch, error):
    from dataclasses import replace

    measure_pipeline = latency.measure_pipeline

    def failing_at_ten(session, clock, image, boxes, *args, **kwargs):
        if boxes is not None and len(boxes) == 10:
            raise error
        return measure_pipeline(session, clock, image, boxes, *args, **kwargs)

    monkeypatch.setattr(latency, "measure_pipeline", failing_at_ten)
    opts = replace(options.smoke_options(str(tmp_path)), backends=("torch-fp32",), throughput=None, painter=False)
    report = latency.run_bench(opts, network=copy.deepcopy(steered_tiny))
    assert [(r["backend"], r["n"]) for r in report["runs"]] == [("torch-fp32", 1)]
    failed = [s for s in report["skipped"] if s["what"] == "torch-fp32"]
    assert len(failed) == 1 and failed[0]["n"] == 10 and failed[0]["reason"].startswith("out of memory")
    assert {b["n"] for b in report["baseline"]} == {1, 10}  # the rows after it still ran
    assert "torch-fp32 user N=10: out of memory" in bench_script("report").markdown_report(report)


def test_a_row_failing_for_another_reason_stops_the_bench(steered_tiny, tmp_path, monkeypatch):
    """Only out-of-memory and backend errors are row failures: a bug must not hide in the report."""
    from dataclasses import replace

    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x4)")

    monkeypatch.setattr(latency, "measure_pipeline", broken)
    opts = replace(options.smoke_options(str(tmp_path)), backends=("torch-fp32",), throughput=None, painter=False,
                   baseline=False)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        latency.run_bench(opts, network=copy.deepcopy(steered_tiny))


def test_simulated_out_of_memory_names_rows(monkeypatch):
    monkeypatch.setenv(timing.SIMULATE_OOM_ENV, "decoder/sam_repeat/16, torch-fp32/user/10")
    with pytest.raises(torch.cuda.OutOfMemoryError, match="simulated"):
        timing.simulate_oom("torch-fp32/user/10")
    timing.simulate_oom("torch-fp32/user/1")  # not listed: nothing happens
    monkeypatch.delenv(timing.SIMULATE_OOM_ENV)
    timing.simulate_oom("torch-fp32/user/10")


def test_decoder_bench_reports_an_out_of_memory_row_and_goes_on(monkeypatch, capsys):
    """bench/bench_decoder.py: SAM's call at N = 3500 does not fit an 80 GB GPU; the rows
    after it must still be measured."""
    from cellsam_trt.modeling import BoxDecoder

    module = bench_script("bench_decoder")
    repeat = BoxDecoder.forward_per_box_repeat

    def out_of_memory_at_16(self, embedding, boxes):
        if len(boxes) == 16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 70.00 GiB")
        return repeat(self, embedding, boxes)

    monkeypatch.setattr(BoxDecoder, "forward_per_box_repeat", out_of_memory_at_16)
    monkeypatch.setattr("sys.argv", ["bench_decoder.py", "--config", "tiny", "--n", "4,16", "--repeats", "1",
                                     "--device", "cpu"])
    assert module.main() == 3
    rows = {(r["formulation"], r["n"]): r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(rows) == {(f, n) for f in ("sam_repeat", "shared") for n in (4, 16)}
    assert rows[("sam_repeat", 16)]["error"].startswith("out of memory: OutOfMemoryError")
    assert all(rows[key]["ms_per_call"] > 0 for key in rows if key != ("sam_repeat", 16))


def test_command_line_defaults_are_the_options_defaults():
    import argparse

    parser = argparse.ArgumentParser()
    options.add_arguments(parser)
    assert options.options_from_args(parser.parse_args([])) == options.BenchOptions()
    parsed = options.options_from_args(parser.parse_args([
        "--n", "1,5", "--no-baseline", "--no-cellfinder", "--cap", "baseline=10", "--cap", "torch-fp32=5",
        "--backends", "torch-fp32,onnxruntime", "--masks", "model", "--repeats", "2", "--bbox-threshold", "0.3"]))
    assert parsed == options.BenchOptions(ns=(1, 5), baseline=False, cellfinder=False,
                                          caps={"baseline": 10, "torch-fp32": 5},
                                          backends=("torch-fp32", "onnxruntime"), masks="model", repeats=2,
                                          bbox_threshold=0.3)
    smoke = options.options_from_args(parser.parse_args(["--smoke", "--device", "cuda", "--out-dir", "x"]))
    assert smoke == options.smoke_options("x", device="cuda") and smoke.ns == options.SMOKE_NS
    assert "user-box counts, comma-separated (default 1,10,100,500,1000,2000,3500)" in " ".join(parser.format_help().split())


def test_bench_command_writes_the_json_and_a_summary(smoke_report, tmp_path, monkeypatch, capsys):
    report, _ = smoke_report
    monkeypatch.setattr(latency, "run_bench", lambda opts: report)  # the command imports it when it runs
    assert cli_main(["bench", "--smoke", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    written = sorted(tmp_path.glob("*/*"))
    assert [p.suffix for p in written] == [".json"]  # tables and plots are the repository's bench/report.py
    assert json.loads(written[0].read_text())["runs"] == json.loads(json.dumps(report["runs"]))
    assert "torch-fp32 user N=10: " in out and "baseline " in out and "not measured: torch-fp16" in out
    assert "bench/report.py" in out


def test_bench_latency_script_records_the_commit_and_renders(smoke_report, tmp_path, monkeypatch, capsys):
    report, _ = smoke_report
    script = bench_script("bench_latency")
    monkeypatch.setattr(script, "run_bench", lambda opts: copy.deepcopy(report))
    assert script.main(["--smoke", "--out-dir", str(tmp_path)]) == 0
    path = next(tmp_path.glob("*/*.json"))
    saved = json.loads(path.read_text())
    assert "git" in saved["machine"] and "git" not in report["machine"]  # the package itself looks up no git
    assert path.with_suffix(".md").read_text().startswith("# CellSAM latency")
    assert path.with_suffix(".png").exists()
    assert "| torch-fp32 | user | 10 |" in capsys.readouterr().out
