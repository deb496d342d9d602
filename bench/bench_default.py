"""What default ``cellsam_trt.segment(image)`` gives, against the released per-box loop.

Each configuration runs in its own process (so peak resident memory is its own), the
processes interleaved round by round, and each process makes ``--calls`` calls on the
same image:

    released      the released CellSAM code (``segment_cellular_image``, model loaded once)
    torch         ``CellSAM.from_checkpoint(..., backend="torch").segment``
    default-cold  ``cellsam_trt.segment(image)`` with an empty artifact cache (the first call
                  exports the ONNX graphs), once
    default       ``cellsam_trt.segment(image)`` with the cache filled (a new process)
    torch-VARIANT with ``--torch-variants``: the torch backend with other switches
                  (``eager`` attention, ``bf16`` precision, ``compile``, or dash-joined
                  combinations such as ``bf16-compile``), labels compared with ``torch``'s

For each: load seconds, first call and later calls (seconds), peak RSS, RSS after each
call (growth), cells; labels are compared with the released code's (matched-cell F1,
foreground agreement). Needs a checkout of https://github.com/vanvalenlab/cellSAM (not part
of this project) and ``pip install requests dask-image pyyaml``::

    python bench/bench_default.py --released ~/src/cellSAM --rounds 3
    python bench/bench_default.py --released ~/src/cellSAM --user-boxes 100
    python bench/bench_default.py --released ~/src/cellSAM --torch-variants eager,bf16,compile

Without ``--checkpoint`` it writes random ViT-B weights in the official layout, steered on
the bench image (``cellsam_trt.dev.steering``). The default image is a 512 x 512 crop of the
tissue sample image shipped with the released code (``sample_imgs/tissuenet.png``).
The JSON report goes to ``bench/results/<device>/default-<date>.json`` with a markdown
table beside it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

MODES = ("released", "torch", "default")
STARTED = time.monotonic()


def _status_gib(field: str) -> float:
    from cellsam_trt.engine.memory import process_status_gib

    return process_status_gib(field)


def _rss_gib() -> float:
    return _status_gib("VmRSS")


def _peak_gib() -> float:
    # VmHWM, not getrusage's ru_maxrss: on Linux a child's ru_maxrss starts at its parent's
    # peak (kept across fork and exec), which would credit every configuration with the
    # memory this script used to make the weights.
    return _status_gib("VmHWM")


def worker(args: argparse.Namespace) -> int:
    """One configuration in this process: load, then ``--calls`` calls; JSON to ``--result``."""
    import torch

    torch.set_grad_enabled(False)
    image = np.load(args.image)
    boxes = np.load(args.boxes) if args.boxes else None
    t0 = time.perf_counter()
    if args.mode == "released":
        import yaml

        _import_released_package(Path(args.released).expanduser())
        from cellSAM.model import segment_cellular_image
        from cellSAM.sam_inference import CellSAM as ReleasedCellSAM

        from cellsam_trt.modeling.checkpoint import read_state_dict

        config = yaml.safe_load((Path(args.released).expanduser() / "cellSAM" / "modelconfig.yaml").read_text())
        model = ReleasedCellSAM(config)
        model.load_state_dict(read_state_dict(args.checkpoint), strict=True)
        model.eval()

        def call():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return segment_cellular_image(image, model, normalize=True, device=args.device,
                                              bounding_boxes=None if boxes is None else boxes.tolist())[0], "released"
    elif args.mode.startswith("torch"):
        import cellsam_trt

        options = torch_options(args.mode)
        session = cellsam_trt.CellSAM.from_checkpoint(args.checkpoint, backend="torch", device=args.device, **options)

        def call():
            return session.segment(image, boxes=boxes), args.mode
    else:
        import cellsam_trt

        def call():
            labels, details = cellsam_trt.segment(image, checkpoint=args.checkpoint, boxes=boxes, return_details=True,
                                                  device=args.device)
            return labels, details.backend
    _synchronize(args.device)
    load = time.perf_counter() - t0
    record = {"mode": args.mode, "load_seconds": load, "calls": []}
    labels = None
    for _ in range(args.calls):
        t0 = time.perf_counter()
        labels, backend = call()
        _synchronize(args.device)
        record["calls"].append({"seconds": time.perf_counter() - t0, "rss_gib": _rss_gib(), "backend": backend})
    record["peak_rss_gib"] = _peak_gib()
    if args.device.startswith("cuda"):
        record["peak_device_gib"] = torch.cuda.max_memory_allocated() / 2**30
    record["cells"] = int(np.asarray(labels).max())
    np.save(args.result.replace(".json", ".npy"), np.asarray(labels))
    Path(args.result).write_text(json.dumps(record))
    return 0


def _import_released_package(folder: Path) -> None:
    """Make ``cellSAM`` importable from a released checkout without running its ``__init__``.

    The released package's ``__init__`` also imports its whole-slide pipeline (dask.distributed,
    dask-image), which this bench never calls; its submodules import what they need.
    """
    import types

    package = types.ModuleType("cellSAM")
    package.__path__ = [str(folder / "cellSAM")]
    sys.modules.setdefault("cellSAM", package)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


TORCH_VARIANTS = {"eager": {"attention": "eager"}, "bf16": {"precision": "bf16"}, "fp16": {"precision": "fp16"},
                  "compile": {"compile": True}, "cudagraphs": {"cuda_graphs": True}}


def torch_options(mode: str) -> dict:
    """"torch" -> {} (the backend's defaults); "torch-bf16-compile" -> those variants' options."""
    options: dict = {}
    for variant in mode.split("-")[1:]:
        options.update(TORCH_VARIANTS[variant])
    return options


def run_worker(mode: str, args: argparse.Namespace, files: dict[str, str], result: str, calls: int,
               env: dict[str, str]) -> dict:
    timeout = args.worker_timeout
    if args.budget is not None:
        left = args.budget - (time.monotonic() - STARTED)
        if left < 10:
            print(f"  {mode}: not run, the --budget of {args.budget:.0f} s is spent", file=sys.stderr, flush=True)
            return {"mode": mode, "error": f"not run: the --budget of {args.budget:.0f} s was spent"}
        timeout = left if timeout is None else min(timeout, left)
    argv = [sys.executable, __file__, "worker", mode, "--checkpoint", files["checkpoint"], "--image", files["image"],
               "--calls", str(calls), "--result", result, "--released", str(args.released), "--device", args.device]
    if files.get("boxes"):
        argv += ["--boxes", files["boxes"]]
    print(f"  {mode} ({calls} calls)...", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        print(f"  {mode}: stopped after {timeout:.0f} s", file=sys.stderr, flush=True)
        return {"mode": mode, "error": f"stopped after {timeout:.0f} s"}
    if proc.returncode != 0:
        # one configuration failing (out of memory, a switch this GPU lacks) is a row of the
        # report, not the end of the run
        print(f"  {mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
        return {"mode": mode, "error": f"exit status {proc.returncode}: {proc.stderr.strip().splitlines()[-1][:300]}"
                if proc.stderr.strip() else f"exit status {proc.returncode}"}
    record = json.loads(Path(result).read_text())
    record["labels"] = np.load(result.replace(".json", ".npy"))
    return record


def bench_image(args: argparse.Namespace) -> np.ndarray:
    from skimage.io import imread

    path = Path(args.image).expanduser() if args.image else Path(args.released).expanduser() / "sample_imgs" / "tissuenet.png"
    image = np.load(path) if path.suffix == ".npy" else imread(path)
    if args.crop:
        image = image[:args.crop, :args.crop]
    return np.ascontiguousarray(image)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    w = sub.add_parser("worker")
    w.add_argument("mode")
    for name in ("--checkpoint", "--image", "--result", "--released", "--boxes"):
        w.add_argument(name)
    w.add_argument("--calls", type=int, default=2)
    w.add_argument("--device", default="cpu")
    parser.add_argument("--released", help="folder of a vanvalenlab/cellSAM checkout (holds cellSAM/)")
    parser.add_argument("--checkpoint", help="weights in the released format (default: steered random ViT-B)")
    parser.add_argument("--image", help="image file (.png/.tif/.npy; default: the released tissuenet sample)")
    parser.add_argument("--crop", type=int, default=512, help="top-left crop side (default 512; 0: whole image)")
    parser.add_argument("--user-boxes", type=int, default=0, help="segment N random boxes instead of CellFinder's")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of released / torch / default")
    parser.add_argument("--no-cold", action="store_true", help="skip the first call with an empty cache")
    parser.add_argument("--torch-variants", default="",
                        help="also run the torch backend with these switches, comma-separated, each a dash-joined "
                             f"combination of {', '.join(TORCH_VARIANTS)} (e.g. eager,bf16,bf16-compile); "
                             "their labels are compared with the default torch backend's")
    parser.add_argument("--calls", type=int, default=2, help="calls per process (the first includes warm-up)")
    parser.add_argument("--device", default="cpu", help="torch device of every configuration (cpu, cuda)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"base configurations, comma-separated, from {', '.join(MODES)} (released is needed)")
    parser.add_argument("--worker-timeout", type=float, default=None,
                        help="seconds one configuration's process may run; a slower one becomes a failed row")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run: configurations that would start later are failed rows, "
                             "so a report is written inside an outer time limit")
    parser.add_argument("--out", help="JSON report (default: bench/results/<device>/default-<date>.json)")
    args = parser.parse_args()
    if args.command == "worker":
        return worker(args)
    if not args.released or not (Path(args.released).expanduser() / "cellSAM" / "sam_inference.py").is_file():
        parser.error("--released: a vanvalenlab/cellSAM checkout is needed (the folder holding cellSAM/)")

    import torch
    from report import machine_record, save_report

    from cellsam_trt.dev.accuracy import label_agreement

    image = bench_image(args)
    work = Path(tempfile.mkdtemp(prefix="cellsam-bench-default-"))
    files = {"image": str(work / "image.npy")}
    np.save(files["image"], image)
    if args.checkpoint:
        files["checkpoint"] = str(Path(args.checkpoint).expanduser())
    else:
        from cellsam_trt.dev.steering import steer_random_network
        from cellsam_trt.modeling.checkpoint import random_network, write_checkpoint
        from cellsam_trt.modeling.config import ModelConfig

        print("steering random ViT-B weights on the bench image...", file=sys.stderr, flush=True)
        network = steer_random_network(random_network(ModelConfig.cellsam(), seed=11), image)
        files["checkpoint"] = str(write_checkpoint(network, work / "steered.pt"))
        del network
    if args.user_boxes:
        rng = np.random.default_rng(1)
        h, w = image.shape[:2]
        corner = rng.uniform(0, [w - 40, h - 40], size=(args.user_boxes, 2))
        boxes = np.concatenate([corner, corner + rng.uniform(8, 40, size=(args.user_boxes, 2))], 1).astype(np.float32)
        files["boxes"] = str(work / "boxes.npy")
        np.save(files["boxes"], boxes)
    env = dict(os.environ, CELLSAM_TRT_CACHE=str(work / "cache"), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", ""))
    if not env["OMP_NUM_THREADS"]:
        env.pop("OMP_NUM_THREADS")

    variants = [f"torch-{v}" for v in args.torch_variants.split(",") if v]
    for mode in variants:
        torch_options(mode)  # unknown switches fail here, before hours of running
    base = [m for m in args.modes.split(",") if m]
    if "released" not in base or set(base) - set(MODES):
        parser.error(f"--modes: a comma-separated subset of {', '.join(MODES)} that includes released")
    if variants and "torch" not in base:
        parser.error("--torch-variants: their labels are compared with the torch configuration's; add torch to --modes")
    modes = (*base, *variants)
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    cold = None
    if not args.no_cold and "default" in base:
        print("default-cold: empty cache, the first call exports", file=sys.stderr)
        cold = run_worker("default", args, files, str(work / "cold.json"), 1, env)
    for r in range(args.rounds):
        print(f"round {r + 1} of {args.rounds}", file=sys.stderr)
        for mode in modes:
            runs[mode].append(run_worker(mode, args, files, str(work / f"{mode}-{r}.json"), args.calls, env))

    # a configuration whose every process failed is reported with its error
    failed = {m: records[0]["error"] for m, records in runs.items() if all("error" in rec for rec in records)}
    runs = {m: [rec for rec in records if "error" not in rec] for m, records in runs.items() if m not in failed}
    if not runs:
        raise SystemExit(f"no configuration ran: {failed}")
    # labels and speed-ups against the released code, or against the first configuration
    # that ran when the released code did not (its failure is a row of the report)
    baseline = "released" if "released" in runs else next(iter(runs))
    reference = runs[baseline][0]["labels"]

    def summary(records: list[dict]) -> dict:
        first = [rec["calls"][0]["seconds"] for rec in records]
        later = [c["seconds"] for rec in records for c in rec["calls"][1:]]
        peaks_device = [rec["peak_device_gib"] for rec in records if "peak_device_gib" in rec]
        return {
            "backend": records[0]["calls"][-1]["backend"],
            "load_seconds": statistics.median(rec["load_seconds"] for rec in records),
            "first_call_seconds": statistics.median(first),
            "later_call_seconds": statistics.median(later) if later else None,
            "peak_rss_gib": max(rec["peak_rss_gib"] for rec in records),
            "peak_device_gib": max(peaks_device) if peaks_device else None,
            "rss_after_calls_gib": [[round(c["rss_gib"], 2) for c in rec["calls"]] for rec in records],
            "cells": records[0]["cells"],
            "agreement_with_released": {k: v for k, v in label_agreement(reference, records[0]["labels"]).items()
                                        if k in ("f1", "foreground_agreement", "iou_p5", "differing_pixels")},
        }

    device = torch.device(args.device)
    report = {
        "what": "default cellsam_trt.segment(image) vs the released per-box loop, each in its own process",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_record(device),
        "device": str(device),
        "image": {"shape": list(image.shape), "source": args.image or "released sample_imgs/tissuenet.png",
                  "crop": args.crop},
        "weights": "given" if args.checkpoint else "random ViT-B, steered on the image",
        "boxes": f"{args.user_boxes} user boxes" if args.user_boxes else "CellFinder",
        "rounds": args.rounds, "calls_per_process": args.calls,
        "results": {mode: summary(records) for mode, records in runs.items()},
        "baseline": baseline,
        "failed": failed,
        "default_cold": None if cold is None or "error" in cold else {
            "first_call_seconds": cold["calls"][0]["seconds"], "load_seconds": cold["load_seconds"],
            "peak_rss_gib": cold["peak_rss_gib"], "backend": cold["calls"][0]["backend"]},
    }
    if "torch" in runs:
        for mode in [m for m in ("default", *variants) if m in runs]:
            report["results"][mode]["agreement_with_torch"] = {
                k: v for k, v in label_agreement(runs["torch"][0]["labels"], runs[mode][0]["labels"]).items()
                if k in ("f1", "foreground_agreement", "iou_min", "iou_p5", "differing_pixels")}
    base = report["results"][baseline]
    for mode in [m for m in runs if m != baseline]:
        res = report["results"][mode]
        res["speedup_later_calls"] = ((base["later_call_seconds"] or base["first_call_seconds"])
                                      / (res["later_call_seconds"] or res["first_call_seconds"]))
        res["speedup_first_call"] = base["first_call_seconds"] / res["first_call_seconds"]
    save_report(report, args.out, "default", device, markdown)
    return 3 if failed else 0


def markdown(report: dict) -> str:
    res = report["results"]
    baseline = report.get("baseline", "released")
    lines = [
        f"# default `segment(image)` against the released per-box loop ({report['created']})",
        "",
        f"Image {tuple(report['image']['shape'])} ({report['image']['source']}), {report['weights']}, "
        f"{report['boxes']}; each configuration in its own process, {report['rounds']} interleaved rounds, "
        f"{report['calls_per_process']} calls per process (medians). "
        f"Device {report.get('device', 'cpu')}; machine: {(report['machine'].get('gpu') or {}).get('name') or report['machine'].get('cpu')}.",
        "",
        f"| configuration | backend | load (s) | first call (s) | later calls (s) | speed-up (later calls) | peak RSS (GiB) | peak device memory (GiB) | RSS after each call (GiB) | cells | F1 vs {baseline} | foreground agreement |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in res:
        r = res[mode]
        speed = f"{r['speedup_later_calls']:.2f}x" if "speedup_later_calls" in r else "1.00x"
        later = _seconds(r["later_call_seconds"]) if r["later_call_seconds"] is not None else "-"
        agree = r["agreement_with_released"]
        lines.append(f"| {mode} | {r['backend']} | {r['load_seconds']:.1f} | {_seconds(r['first_call_seconds'])} | {later} | "
                     f"{speed} | {r['peak_rss_gib']:.2f} | {_gib(r.get('peak_device_gib'))} | {r['rss_after_calls_gib'][0]} | {r['cells']} | "
                     f"{agree['f1']:.3f} | {agree['foreground_agreement']:.5f} |")
    for mode, reason in report.get("failed", {}).items():
        lines.append(f"| {mode} | failed: {reason} |" + " |" * 10)
    compared = [mode for mode in res if res[mode].get("agreement_with_torch")]
    if compared:
        lines += ["", "Against the torch backend's labels (default options):", "",
                  "| configuration | matched-cell F1 | per-cell IoU min | foreground agreement | differing pixels |",
                  "|---|---|---|---|---|"]
        for mode in compared:
            a = res[mode]["agreement_with_torch"]
            iou_min = "-" if a["iou_min"] is None else f"{a['iou_min']:.3f}"
            lines.append(f"| {mode} | {a['f1']:.3f} | {iou_min} | {a['foreground_agreement']:.5f} | {a['differing_pixels']} |")
    cold = report["default_cold"]
    if cold is None:
        return "\n".join([*lines, ""])
    lines += ["", f"First call with an empty cache (exports the graphs, in a child process): "
                  f"{cold['first_call_seconds']:.1f} s, backend {cold['backend']}, peak RSS of the calling process "
                  f"{cold['peak_rss_gib']:.2f} GiB.", ""]
    return "\n".join(lines)


def _seconds(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    sys.exit(main())
