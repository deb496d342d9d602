"""Host memory and time against image side: default ``segment()`` and ``cellsam-trt segment``.

Each measurement runs in its own process (peak resident memory, VmHWM, is the process's
own), with tiny-config random weights steered so that CellFinder finds nothing (scores far
below its threshold): the model's size and the decoder are not what is measured here, the
pipeline's memory per pixel and per tile is, and without boxes a 40000 x 40000 image runs
in minutes on two cores instead of hours::

    python bench/bench_memory.py --sides 1000,4000,8000,20000 --cli-sides 8000,40000

Rows:
    model      load the session and segment a 256 x 256 image: the loaded-model baseline
    segment    ``cellsam_trt.segment(image, model=session)`` on an in-memory (side, side)
               uint8 image (the default path: tiled above the tile size)
    cli        ``cellsam-trt segment FILE.tif`` on a (side, side) uint16 TIFF on disk, labels
               written beside it; the labels file is read back for its shape

The image is all zeros (as a new user's first try was): no cells, so the time is the
pipeline's fixed work per pixel and per tile (normalisation, encoder, CellFinder,
stitching); the memory is what the image size costs.
The JSON report goes to ``bench/results/<device>/memory-<date>.json`` with a markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def worker(args: argparse.Namespace) -> int:
    import warnings

    import cellsam_trt
    from cellsam_trt.cli.main import main as cli_main
    from cellsam_trt.engine.memory import process_status_gib as _status_gib

    record: dict = {"mode": args.mode, "side": args.side}
    warnings.simplefilter("ignore")
    if args.mode == "cli":
        t0 = time.perf_counter()
        rc = cli_main(["segment", args.file, "-o", args.out, "--checkpoint", args.checkpoint, "--device", "cpu",
                       "--no-progress"])
        record["seconds"] = time.perf_counter() - t0
        record["exit_status"] = rc
        import tifffile

        labels = Path(args.out) / (Path(args.file).stem + "_labels.tif")
        with tifffile.TiffFile(labels) as tif:
            record["labels_shape"] = list(tif.series[0].shape)
            record["labels_dtype"] = str(tif.series[0].dtype)
        record["labels_bytes_on_disk"] = labels.stat().st_size
    else:
        session = cellsam_trt.CellSAM.from_checkpoint(args.checkpoint, device="cpu")
        session.segment(np.zeros((256, 256), np.uint8))
        record["model_rss_gib"] = _status_gib("VmRSS")
        if args.mode == "segment":
            image = np.zeros((args.side, args.side), np.uint8)
            record["image_gib"] = image.nbytes / 2**30
            t0 = time.perf_counter()
            labels, details = cellsam_trt.segment(image, model=session, return_details=True)
            record["seconds"] = time.perf_counter() - t0
            record["path"] = details.path
            record["tiles"] = getattr(details, "num_tiles", 1)
            record["labels_shape"] = list(labels.shape)
    record["peak_rss_gib"] = _status_gib("VmHWM")
    Path(args.result).write_text(json.dumps(record))
    return 0


def run(mode: str, side: int, files: dict, work: Path, timeout: float) -> dict:
    result = work / f"{mode}-{side}.json"
    argv = [sys.executable, __file__, "worker", mode, "--side", str(side), "--checkpoint", files["checkpoint"],
               "--result", str(result)]
    if mode == "cli":
        argv += ["--file", files[f"tiff-{side}"], "--out", str(work / f"out-{side}")]
    print(f"  {mode} {side}...", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "side": side, "error": f"stopped after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"mode": mode, "side": side, "error": f"exit status {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    return json.loads(result.read_text())


def write_tiff(path: Path, side: int) -> None:
    """A (side, side) uint16 zero TIFF, written in strips without holding the image."""
    import tifffile

    rows = 256
    strip = np.zeros((rows, side), np.uint16)

    def strips():
        for y in range(0, side, rows):
            yield strip[:min(rows, side - y)].tobytes()

    tifffile.imwrite(path, strips(), shape=(side, side), dtype=np.uint16, bigtiff=True, rowsperstrip=rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    w = sub.add_parser("worker")
    w.add_argument("mode", choices=["model", "segment", "cli"])
    for name in ("--checkpoint", "--result", "--file", "--out"):
        w.add_argument(name)
    w.add_argument("--side", type=int, default=0)
    parser.add_argument("--sides", default="1000,4000,8000,20000", help="sides for segment(), comma-separated")
    parser.add_argument("--cli-sides", default="8000", help="sides for the CLI on a TIFF, comma-separated")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per measurement")
    parser.add_argument("--out", help="JSON report (default: bench/results/<device>/memory-<date>.json)")
    args = parser.parse_args()
    if args.command == "worker":
        return worker(args)

    import torch
    from report import machine_record, save_report

    from cellsam_trt.dev.steering import steer_random_network
    from cellsam_trt.dev.synthetic import synthetic_cells
    from cellsam_trt.modeling.checkpoint import random_network, write_checkpoint
    from cellsam_trt.modeling.config import ModelConfig

    work = Path(tempfile.mkdtemp(prefix="cellsam-bench-memory-"))
    network = steer_random_network(random_network(ModelConfig.tiny(), seed=0), synthetic_cells(300, 400, seed=1),
                                   score_shift=-30.0)
    files = {"checkpoint": str(write_checkpoint(network, work / "tiny.pt"))}
    os.environ.setdefault("CELLSAM_TRT_CACHE", str(work / "cache"))
    rows = [run("model", 0, files, work, args.timeout)]
    for side in [int(s) for s in args.sides.split(",") if s]:
        rows.append(run("segment", side, files, work, args.timeout))
    for side in [int(s) for s in args.cli_sides.split(",") if s]:
        files[f"tiff-{side}"] = str(work / f"zeros-{side}.tif")
        print(f"  writing a {side} x {side} uint16 TIFF...", file=sys.stderr, flush=True)
        write_tiff(Path(files[f"tiff-{side}"]), side)
        rows.append(run("cli", side, files, work, args.timeout))
        os.unlink(files[f"tiff-{side}"])
    report = {
        "what": "peak host memory and time against image side (tiny config, all-zero images)",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_record(torch.device("cpu")),
        "rows": rows,
    }
    save_report(report, args.out, "memory", torch.device("cpu"), markdown)
    return 0


def markdown(report: dict) -> str:
    model = next((r for r in report["rows"] if r["mode"] == "model" and "error" not in r), None)
    base = model["model_rss_gib"] if model else float("nan")
    lines = [f"# Host memory against image side ({report['created']})", "",
             f"Tiny config (CellFinder steered to find nothing), all-zero images, CPU "
             f"({report['machine'].get('cpu')}); each row in its own process. Loaded model (load + one "
             f"256 x 256 call): {base:.2f} GiB resident, {model['peak_rss_gib'] if model else float('nan'):.2f} GiB "
             "peak. 'Above the loaded model' is the row's peak minus the resident memory of the loaded model "
             "(the row's own where it loads the model itself).", "",
             "| what | side | path | tiles | time (s) | peak RSS (GiB) | above the loaded model (GiB) | image (GiB) | labels |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if r["mode"] == "model":
            continue
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['side']} | failed: {r['error'][:200]} | | | | | | |")
            continue
        image = r.get("image_gib", r["side"] ** 2 * 2 / 2**30)
        lines.append(f"| {r['mode']} | {r['side']} | {r.get('path', 'tiled')} | {r.get('tiles', '')} | "
                     f"{r['seconds']:.1f} | {r['peak_rss_gib']:.2f} | {r['peak_rss_gib'] - r.get('model_rss_gib', base):.2f} | "
                     f"{image:.2f} | "
                     f"{tuple(r['labels_shape'])} |")
    return "\n".join([*lines, ""])


if __name__ == "__main__":
    sys.exit(main())
