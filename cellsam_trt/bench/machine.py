"""Where benchmark numbers come from: CPU, GPU, driver and library versions, and the
folder name of a device's reports."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
from typing import Any

import torch


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    """Physical memory of the host (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the numbers come from: CPU, GPU, driver, library versions."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": _memory_bytes(),
        "device": str(device),
        "gpu": None,
        "libraries": {name: _version(name) for name in (
            "torch", "torchvision", "numpy", "scipy", "scikit-image", "scikit-learn", "segment-anything",
            "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "matplotlib", "cellsam-trt")},
    }
    info["libraries"]["torch_cuda"] = torch.version.cuda
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = {"name": props.name, "memory_bytes": int(props.total_memory),
               "compute_capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
               "cudnn": torch.backends.cudnn.version(), "driver": None}
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20, check=True).stdout.split()
            gpu["driver"] = out[0] if out else None
        except (OSError, subprocess.SubprocessError):
            pass
        info["gpu"] = gpu
    return info


def device_name(device: torch.device) -> str:
    """Folder name of a device's reports: the GPU's name, or "cpu-" + the CPU's."""
    if device.type == "cuda":
        return _slug(torch.cuda.get_device_name(device))
    return "cpu-" + _slug(_cpu_name())


