"""``cellsam-trt bench``: stage-by-stage latency against the number of boxes, per backend,
beside the released per-box loop, on one device.

What one run measures (a 1024x1024 3-channel generated cell image by default,
``synthetic.bench_image``):

- for every backend kind that can run here (torch fp32, torch fp16 on CUDA, ONNX Runtime
  and TensorRT when their artefacts are given) and every box count N (user boxes, so N is
  exact) plus one run with CellFinder's boxes: the whole ``CellSAM.segment`` call and its
  stages - preprocess (CPU), CellFinder graph, box selection, encoder graph, decoder graph
  (all chunks), mask postprocess + labels (painting + clean-up) - as median and spread over
  repeats after warm-up, and the peak CUDA memory of each configuration;
- the released algorithm (``cellsam_trt.dev.reference.per_box_labels``: one decoder call per
  box, full-resolution upsampling on the CPU, numpy painting) on the same device and
  weights, and the speed-up baseline / ours per N;
- the preprocessing steps one by one (how much of it is scikit-image CLAHE);
- optionally (``--painter``) the mask painter alone against the per-box upsampling, with
  synthetic masks (no model needed), and (``--throughput SIDE``) a large synthetic slide,
  single process against dask workers.

How stages are timed: the session's backend is wrapped so that every graph call is timed
on the device (CUDA events on a GPU, the host clock on the CPU); the pipeline's own stage
timings (``SegmentationDetails.timings``, which synchronise the device at each stage end)
give the rest: mask postprocess = pipeline "decoder" stage - decoder graph time +
pipeline "postprocess" stage. ``total`` is the host wall time of the whole call.

Masks: random weights (no checkpoint given) make every mask a pattern spread over the whole
image, which no trained model produces and which would make painting cost what it never
costs with real weights. With ``--masks cells`` (the default for random weights) the
decoder graph still runs and is timed, but its mask logits are replaced by the logits of
the ellipse inscribed in each box (both for us and for the baseline); the time spent making
them is measured and subtracted. With a real checkpoint the default is ``--masks model``.

Output: ``<out>/<device-name>/<date>.json`` with every number, and a summary on stdout.
The markdown tables and the PNG plot are made from the JSON by the repository's
``bench/report.py`` (``bench/bench_latency.py`` runs this bench and renders it).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..api import CellSAM
from ..dev.synthetic import bench_image, cell_boxes
from ..engine.core import NoCellsWarning
from ..io import atomic_write
from ..modeling.config import InferenceConfig, ModelConfig
from ..runtime.base import Backend, BackendError
from .machine import device_name, machine_info
from .measure import measure_baseline, measure_pipeline, painter_bench, preprocess_breakdown
from .options import BenchOptions
from .timing import DeviceClock, TimedBackend, release_device_memory, row_failure, simulate_oom

log = logging.getLogger(__name__)

FORMAT = "cellsam-trt-bench"
VERSION = 1


def _load_network(opts: BenchOptions, image: np.ndarray, device: torch.device):
    """(network, description): the checkpoint's weights, or random weights steered on ``image``."""
    from ..dev.steering import steer_random_network
    from ..modeling.checkpoint import load_checkpoint, random_network

    if opts.checkpoint:
        network = load_checkpoint(opts.checkpoint, config=ModelConfig.named(opts.config) if opts.config else None)
        return network, {"weights": "checkpoint", "checkpoint": str(opts.checkpoint), "config": network.config.name}
    name = opts.config or ("cellsam-vit-b" if device.type == "cuda" else "tiny")
    t0 = time.perf_counter()
    network = random_network(ModelConfig.named(name), seed=opts.seed)
    if opts.smoke:
        # fewer probe boxes: steering's mask-coverage search dominates a smoke run, and
        # smoke runs replace the masks anyway
        steer_random_network(network, image, probe_boxes=2)
    else:
        steer_random_network(network, image)
    log.info("random %s weights steered in %.1f s", name, time.perf_counter() - t0)
    return network, {"weights": "random, steered on the bench image (cellsam_trt.dev.steering)", "config": name,
                     "seed": opts.seed}


def _onnx_folder(opts: BenchOptions, network) -> str | None:
    """The ONNX export to use: the given folder, or a fresh export of ``network``."""
    if opts.onnx_dir:
        return opts.onnx_dir
    if not opts.export_onnx:
        return None
    from ..graphs.onnx_export import export_checkpoint
    from ..modeling.checkpoint import write_checkpoint

    folder = Path(opts.export_onnx)
    checkpoint = write_checkpoint(network.cpu(), folder / "bench-weights.pt")
    export_checkpoint(checkpoint, folder / "onnx")
    return str(folder / "onnx")


def _make_backend(kind: str, network, device: torch.device, opts: BenchOptions, onnx_dir: str | None) -> Backend:
    """Build one backend kind; raises BackendError/ValueError/ImportError when it cannot run here."""
    from ..runtime import TorchBackend, create_backend

    if kind.startswith("torch-"):
        _, precision, *variant = kind.split("-")  # variant: [], ["eager"] (decoder) or ["flash"] (attention)
        return TorchBackend(network, device=device, precision=precision, decoder="eager" if variant == ["eager"] else "auto",
                            attention="flash" if variant == ["flash"] else "sdpa")
    if kind == "onnxruntime":
        if onnx_dir is None:
            raise BackendError("no ONNX export given (--onnx-dir DIR, or --export-onnx DIR to export the bench weights)")
        providers = list(opts.ort_providers) if opts.ort_providers else None
        if providers is None and device.type == "cuda":
            import onnxruntime

            providers = ["cuda"] if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else ["cpu"]
        return create_backend("onnxruntime", checkpoint=opts.checkpoint, onnx_dir=onnx_dir, providers=providers,
                              device=device if providers and providers != ["cpu"] else "cpu")
    if opts.engine_dir is None:
        raise BackendError("no TensorRT engines given (--engine-dir DIR from `cellsam-trt build-engines`)")
    return create_backend("tensorrt", checkpoint=opts.checkpoint, engine_dir=opts.engine_dir, device=device)


def run_bench(opts: BenchOptions, network=None) -> dict[str, Any]:
    """Measure everything ``opts`` asks for; returns the report (JSON-ready dict).

    Args:
        opts: what to measure.
        network: a ``CellSAMNetwork`` to use instead of loading/steering one (tests).
    """
    from ..runtime import resolve_device

    opts.validate()
    device = resolve_device(opts.device)
    t_start = time.perf_counter()
    image = bench_image(opts.image_size, opts.cells, seed=opts.seed)
    if network is None:
        network, weights = _load_network(opts, image, device)
    else:
        weights = {"weights": "given network", "config": network.config.name}
    masks = opts.masks if opts.masks != "auto" else ("model" if opts.checkpoint else "cells")
    cell_masks = masks == "cells"
    inference = InferenceConfig(bbox_threshold=opts.bbox_threshold)
    if opts.chunk_size is not None:
        inference = replace(inference, chunk_size=opts.chunk_size)
    height, width = image.shape[:2]
    box_sets: list[tuple[str, int | None, np.ndarray | None]] = [
        ("user", n, cell_boxes(n, height, width, seed=opts.seed + 1)) for n in opts.ns]
    if opts.cellfinder:
        box_sets.append(("cellfinder", None, None))

    report: dict[str, Any] = {
        "format": FORMAT, "version": VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "device_name": opts.name or device_name(device),
        "config": {
            "model": network.config.name, "weights": weights, "masks": masks, "image_shape": list(image.shape),
            "image": f"cellsam_trt.dev.synthetic.bench_image(size={opts.image_size}, n_cells={opts.cells}, seed={opts.seed})",
            "boxes": f"cellsam_trt.dev.synthetic.cell_boxes(n, {height}, {width}, seed={opts.seed + 1})",
            "ns": list(opts.ns), "cellfinder_run": opts.cellfinder, "warmup": opts.warmup, "repeats": opts.repeats,
            "baseline_repeats": opts.baseline_repeats, "caps": dict(opts.caps), "inference": asdict(inference),
            "smoke": opts.smoke,
        },
        "backends": {}, "runs": [], "baseline": [], "skipped": [], "preprocess": None, "painter": None, "precision": None,
        "throughput": None,
        "comparisons": [],
    }

    log.info("preprocessing breakdown")
    report["preprocess"] = preprocess_breakdown(image, network.config.image_size, network.uses_model_cp,
                                                opts.preprocess_repeats)
    clahe_seconds = report["preprocess"]["steps"]["clahe"]["median"]
    network = network.eval().to(device)

    onnx_dir = None
    if "onnxruntime" in opts.backends:
        try:
            onnx_dir = _onnx_folder(opts, network)
        except Exception as err:  # export failures are reported, the rest of the bench goes on
            report["skipped"].append({"what": "onnxruntime", "reason": f"export failed: {type(err).__name__}: {err}"})
        network = network.to(device)
    ours_labels: dict[tuple[str, str, int | None], np.ndarray] = {}
    finder_n: int | None = None  # boxes CellFinder keeps on this image (the baseline's cap applies to it)
    for kind in opts.backends:
        try:
            backend = _make_backend(kind, network, device, opts, onnx_dir)
        except (BackendError, ValueError, ImportError, OSError) as err:
            report["backends"][kind] = {"status": "skipped", "reason": str(err)}
            log.info("%s skipped: %s", kind, err)
            continue
        report["backends"][kind] = {"status": "ok", "describe": backend.describe()}
        clock = DeviceClock(backend.device)
        session = CellSAM(TimedBackend(backend, clock, cell_masks), inference)
        cap = opts.caps.get(kind)
        for source, n, boxes in box_sets:
            if cap is not None and n is not None and n > cap:
                report["skipped"].append({"what": kind, "boxes": source, "n": n, "reason": f"capped at N <= {cap}"})
                continue
            log.info("%s, %s boxes, N=%s", kind, source, n)
            failure = None
            try:
                simulate_oom(f"{kind}/{source}/{n}")
                record, labels = measure_pipeline(session, clock, image, boxes, opts.warmup, opts.repeats, clahe_seconds)
            except Exception as err:  # one failed row (out of memory, say) must not end the bench
                failure = row_failure(err)
                if failure is None:
                    raise
            if failure is not None:
                clock.collect()  # drop the failed row's pending events
                release_device_memory(device)
                log.warning("%s, %s boxes, N=%s failed: %s", kind, source, n, failure)
                report["skipped"].append({"what": kind, "boxes": source, "n": n, "reason": failure})
                continue
            record.update(backend=kind, boxes=source)
            report["runs"].append(record)
            ours_labels[(kind, source, n)] = labels
            if source == "cellfinder" and finder_n is None:
                finder_n = record["n"]
        del session, backend
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if opts.baseline:
        network = network.to(device)
        cap = opts.caps.get("baseline")
        for source, n, boxes in box_sets:
            count = finder_n if source == "cellfinder" else n
            if cap is not None and count is not None and count > cap:
                report["skipped"].append({"what": "baseline", "boxes": source, "n": count, "reason": f"capped at N <= {cap}"})
                continue
            log.info("baseline, %s boxes, N=%s", source, count)
            failure = None
            try:
                simulate_oom(f"baseline/{source}/{n}")
                record, reference = measure_baseline(network, image, boxes, device, min(opts.warmup, 1),
                                                     opts.baseline_repeats, cell_masks, inference)
            except Exception as err:
                failure = row_failure(err)
                if failure is None:
                    raise
            if failure is not None:
                release_device_memory(device)
                log.warning("baseline, %s boxes, N=%s failed: %s", source, count, failure)
                report["skipped"].append({"what": "baseline", "boxes": source, "n": count, "reason": failure})
                continue
            record["boxes"] = source
            report["baseline"].append(record)
            for (kind, src, requested), labels in ours_labels.items():
                if (src, requested) == (source, n):
                    report["comparisons"].append({
                        "backend": kind, "boxes": source, "n": record["n"],
                        "differing_pixels": int((reference != labels).sum()),
                        "cells": int(labels.max()), "baseline_cells": int(reference.max()),
                    })

    report["speedup"] = speedups(report)
    # the sections after the timed rows: one that runs out of memory is listed under
    # "skipped" and the report is still written
    if opts.painter:
        log.info("painter micro-benchmark")
        report["painter"] = _section(report, "painter", device, lambda: {
            "out_shape": [1024, 1024], "low_res": 256, "device": str(device),
            "rows": painter_bench(opts.painter_ns, device, per_box_max_n=opts.caps.get("baseline", 200),
                                  repeats=opts.preprocess_repeats),
        })
    if device.type == "cuda" and "torch-fp16" in opts.backends:
        log.info("fp16 accuracy against fp32")
        report["precision"] = _section(report, "precision", device,
                                       lambda: fp16_accuracy(network, image, inference, device, opts.seed))
    if opts.throughput:
        log.info("large-image throughput, single process vs 2 dask workers")
        report["throughput"] = _section(report, "throughput", device, lambda: large_image_throughput(opts, device))
    report["bench_seconds"] = time.perf_counter() - t_start
    return report


def _section(report: dict[str, Any], what: str, device: torch.device, measure):
    """``measure()``, or None with the reason under report["skipped"] when it fails as a
    bench row may (``row_failure``)."""
    failure = None
    try:
        simulate_oom(what)
        return measure()
    except Exception as err:
        failure = row_failure(err)
        if failure is None:
            raise
    release_device_memory(device)
    log.warning("%s failed: %s", what, failure)
    report["skipped"].append({"what": what, "reason": failure})
    return None


def fp16_accuracy(network, image: np.ndarray, inference: InferenceConfig, device: torch.device,
                  seed: int = 0) -> dict[str, Any]:
    """torch fp16 (autocast) against fp32 on the same weights, with the model's own masks:
    CellFinder's boxes, and 500 given boxes (``accuracy.precision_agreement``)."""
    from ..dev.accuracy import precision_agreement
    from ..runtime import TorchBackend

    fp32 = CellSAM(TorchBackend(network, device=device), inference)
    fp16 = CellSAM(TorchBackend(network, device=device, precision="fp16"), inference)
    height, width = image.shape[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoCellsWarning)
        return {"cellfinder": precision_agreement(fp32, fp16, image),
                "user_500": precision_agreement(fp32, fp16, image, cell_boxes(500, height, width, seed=seed + 1))}


def large_image_throughput(opts: BenchOptions, device: torch.device) -> dict[str, Any]:
    """``scale.throughput_report`` on a ``opts.throughput``-sided synthetic slide.

    With a checkpoint, CellFinder finds the cells; with random weights the slide's own cell
    boxes are decoded (random CellFinder weights keep an arbitrary number of boxes).
    """
    from .throughput import throughput_report

    settings = dict(tile_size=1024, overlap=128, batch_size=4, n_workers=2)
    settings.update(opts.throughput_options)
    if opts.checkpoint is None:
        settings.setdefault("use_cellfinder", False)
    try:
        return throughput_report(opts.checkpoint, height=opts.throughput, width=opts.throughput,
                                 device=str(device), seed=opts.seed, **settings)
    except ImportError as err:  # dask / zarr are an optional extra
        return {"skipped": f"needs the dask extra (pip install 'cellsam-trt[dask]'): {err}"}


def speedups(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per run with a baseline at the same boxes: baseline / ours for the total and for decoder + masks."""
    base = {(b["boxes"], b["n"]): b for b in report["baseline"]}
    out = []
    for run in report["runs"]:
        b = base.get((run["boxes"], run["n"]))
        if b is None:
            continue
        ours_masks = run["stages"]["decoder_and_masks"]["median"]
        out.append({
            "backend": run["backend"], "boxes": run["boxes"], "n": run["n"],
            "total": b["stages"]["total"]["median"] / run["stages"]["total"]["median"],
            "decoder_and_masks": b["stages"]["decoder_and_masks"]["median"] / ours_masks if ours_masks > 0 else None,
        })
    return out


def write_report(report: dict[str, Any], out_dir: str | os.PathLike = "bench/results") -> Path:
    """Write ``<out_dir>/<device_name>/<date>.json`` (never over an earlier report); returns its path."""
    folder = Path(out_dir) / report["device_name"]
    folder.mkdir(parents=True, exist_ok=True)
    stem = report["created"][:10]
    if report["config"].get("smoke"):
        stem += "-smoke"
    path, k = folder / f"{stem}.json", 2
    while path.exists():
        path, k = folder / f"{stem}-{k}.json", k + 1
    text = json.dumps(report, indent=1) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def summary_lines(report: dict[str, Any]) -> list[str]:
    """One line per timed row (total median; the baseline's and the speed-up where measured),
    then what was not measured and why."""
    base = {(b["boxes"], b["n"]): b["stages"]["total"]["median"] for b in report["baseline"]}
    lines = []
    for run in report["runs"]:
        total = run["stages"]["total"]["median"]
        line = f"{run['backend']} {run['boxes']} N={run['n']}: {total * 1e3:.4g} ms"
        if (run["boxes"], run["n"]) in base:
            baseline = base[(run["boxes"], run["n"])]
            line += f", baseline {baseline * 1e3:.4g} ms ({baseline / total:.1f}x)"
        lines.append(line)
    lines += [f"not measured: {k}: {v['reason']}" for k, v in report["backends"].items() if v["status"] != "ok"]
    return lines + [f"not measured: {s['what']} {s.get('boxes', '')} N={s.get('n')}: {s['reason']}"
                    for s in report["skipped"]]
