"""The preprocessing of one call on the host (numpy, scikit-image, as released) against its
torch port on the model's device (``cellsam_trt.engine.device_preprocess``), and cuCIM's
CLAHE where cuCIM is installed: time per step, how close each is to the host path, and the
labels of a whole call with each.

    python bench/bench_preprocess.py --device cuda --sizes 512,1024,2048 --labels
    python bench/bench_preprocess.py --device cpu --sizes 512 --repeats 3      # a check here

Side by side in one process, alternating per repeat. The host path's time is on the CPU
whatever ``--device`` is (that is where it runs); the device path's includes the upload of
the formatted image and ends with a device synchronisation. With ``--labels``, ViT-B random
weights steered on the first image segment each bench image with ``normalize="skimage"``
and with the device path (CellFinder path), and ``dev.accuracy.label_agreement`` compares
them (F1 of cells matched at IoU > 0.5, foreground agreement).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections import defaultdict

import numpy as np
import torch

from cellsam_trt import CellSAM
from cellsam_trt.dev.accuracy import label_agreement
from cellsam_trt.dev.steering import steer_random_network
from cellsam_trt.dev.synthetic import bench_image
from cellsam_trt.engine import device_preprocess as dp
from cellsam_trt.engine import preprocess as pre
from cellsam_trt.engine.core import synchronized_stage
from cellsam_trt.modeling.checkpoint import random_network
from cellsam_trt.modeling.config import ModelConfig


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_path(formatted: np.ndarray, size: int, method: str, times: dict[str, list[float]]) -> None:
    t0 = time.perf_counter()
    clipped = pre.percentile_clip(formatted)
    t1 = time.perf_counter()
    normalized = pre.clahe(clipped, method=method)
    t2 = time.perf_counter()
    tensor = pre.to_tensor(normalized)
    pre.embedding_input(tensor, size, True)
    pre.cellfinder_input(tensor, size, True)
    t3 = time.perf_counter()
    prefix = f"host-{method}"
    times[f"{prefix}.clip"].append(t1 - t0)
    times[f"{prefix}.clahe"].append(t2 - t1)
    times[f"{prefix}.inputs"].append(t3 - t2)
    times[f"{prefix}.total"].append(t3 - t0)


def device_path(formatted: np.ndarray, device: torch.device, size: int, times: dict[str, list[float]]) -> None:
    def step(name: str):
        return synchronized_stage(lambda: sync(device), times[f"device-torch.{name}"].append)

    sync(device)
    t0 = time.perf_counter()
    dp.model_inputs(formatted, device, size, True, stage=step)
    sync(device)
    times["device-torch.total"].append(time.perf_counter() - t0)


def cucim_clahe(formatted: np.ndarray, times: dict[str, list[float]] | None = None) -> np.ndarray | str:
    """cuCIM's ``equalize_adapthist`` on the clipped, rescaled channels (the CLAHE step
    alone, the planes already on the GPU) -> (H, W, 3) float64 on the host, or why not."""
    try:
        import cupy
        from cucim.skimage.exposure import equalize_adapthist
    except ImportError as err:
        return f"cuCIM not installed ({err})"
    clipped = pre.percentile_clip(formatted)
    out = np.zeros_like(clipped)
    for channel in range(3):
        plane = clipped[..., channel]
        if (plane == plane[0, 0]).all():
            continue
        on_gpu = cupy.asarray((plane - plane.min()) / (plane.max() - plane.min()))
        cupy.cuda.runtime.deviceSynchronize()
        t0 = time.perf_counter()
        result = equalize_adapthist(on_gpu, kernel_size=pre.CLAHE_KERNEL)
        cupy.cuda.runtime.deviceSynchronize()
        if times is not None:
            times["device-cucim.clahe"].append(time.perf_counter() - t0)
        out[..., channel] = cupy.asnumpy(result)
    return out


def summary(samples: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(samples) * 1e3, 3), "min_ms": round(min(samples) * 1e3, 3),
            "n": len(samples)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="1024", help="comma-separated sides of the synthetic bench images")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--labels", action="store_true", help="also compare the labels of whole calls (ViT-B)")
    parser.add_argument("--config", choices=["tiny", "cellsam-vit-b"], default="cellsam-vit-b")
    parser.add_argument("--out", help="write the report as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    size = 1024
    report: dict = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "tolerance": dp.DEVICE_TOLERANCE, "rows": [], "labels": []}
    images = {side: bench_image(size=side, n_cells=max(40, side * side // 1300), seed=0)
              for side in (int(s) for s in args.sizes.split(","))}
    for side, image in images.items():
        formatted = pre.format_image(image)
        times: dict[str, list[float]] = defaultdict(list)
        device_path(formatted, device, size, defaultdict(list))  # warm-up: kernels, allocator
        for _ in range(args.repeats):
            host_path(formatted, size, "skimage", times)
            host_path(formatted, size, "opencv", times)
            device_path(formatted, device, size, times)
        row = {"side": side, "times": {k: summary(v) for k, v in sorted(times.items())},
               "agreement": dp.agreement(formatted, device, size, True)}
        if device.type == "cuda":
            cucim_times: dict[str, list[float]] = defaultdict(list)
            result = cucim_clahe(formatted)  # warm-up
            if isinstance(result, str):
                row["cucim"] = result
            else:
                for _ in range(args.repeats):
                    cucim_clahe(formatted, cucim_times)
                host = pre.normalize_image(formatted.copy())
                row["cucim"] = {"clahe": summary(cucim_times["device-cucim.clahe"]),
                                "max_abs_vs_skimage": float(np.abs(result - host).max()),
                                "mean_abs_vs_skimage": float(np.abs(result - host).mean())}
        report["rows"].append(row)
        host_ms = row["times"]["host-skimage.total"]["median_ms"]
        device_ms = row["times"]["device-torch.total"]["median_ms"]
        print(f"{side} x {side}: host (scikit-image) {host_ms} ms, device (torch port) {device_ms} ms "
              f"({host_ms / device_ms:.1f}x); agreement {row['agreement']}", flush=True)
        if "cucim" in row:
            print(f"  cuCIM CLAHE: {row['cucim']}", flush=True)

    if args.labels:
        first = next(iter(images.values()))
        network = steer_random_network(random_network(ModelConfig.named(args.config), seed=0), first)
        session = CellSAM.from_network(network, device=device)
        print(f"device preprocessing by default: {session.core.normalization(True) == 'torch'}", flush=True)
        for side, image in images.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                host = session.segment(image, normalize="skimage", tile_size=None)
                on_device = session.segment(image, normalize="torch", tile_size=None)
            agreement = label_agreement(host, on_device)
            report["labels"].append({"side": side, **agreement})
            print(f"labels {side} x {side}: F1 {agreement['f1']:.4f}, foreground agreement "
                  f"{agreement['foreground_agreement']:.5f}, cells {agreement['reference_cells']} / "
                  f"{agreement['test_cells']}, differing pixels {agreement['differing_pixels']}", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
