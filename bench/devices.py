"""The device a benchmark runs on: its name, a file-name tag, software versions and vendor peaks.

    from devices import device_name, device_peaks, environment
    peaks = device_peaks()          # {"bf16_tflops": 989.0, "fp32_tflops": 67.0, "memory_gbs": 3350.0, ...} or None

Shared by every script in bench/ (run as ``python bench/<script>.py``, which puts bench/ on sys.path).
"""
from __future__ import annotations

import json
import platform
import re
import time
from pathlib import Path

import torch

from starfish_fast.checkpoint import atomic_path

# Vendor data-sheet peaks by device-name fragment (first match wins, so the specific names come first):
# dense bf16 tensor-core TFLOP/s, fp32 (non-tensor) TFLOP/s, memory GB/s.
PEAKS = {
    "H200": (989.0, 67.0, 4800.0),
    "H100 NVL": (835.0, 60.0, 3900.0),
    "H100 PCIe": (756.0, 51.0, 2000.0),
    "H100": (989.0, 67.0, 3350.0),          # SXM5 80 GB (HBM3)
    "A100 80GB PCIe": (312.0, 19.5, 1935.0),
    "A100-SXM4-80GB": (312.0, 19.5, 2039.0),
    "A100": (312.0, 19.5, 1555.0),          # 40 GB
    "A10G": (70.0, 31.2, 600.0),
    "A10": (125.0, 31.2, 600.0),
}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), model)
    except OSError:
        pass
    return f"cpu ({model}, {torch.get_num_threads()} threads)"


def device_tag() -> str:
    """A file-name-safe short name: ``nvidia_h100_80gb_hbm3``, ``cpu``."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


def device_peaks() -> dict | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for fragment, (bf16, fp32, gbs) in PEAKS.items():
        if fragment in name:
            return {"match": fragment, "bf16_tflops": bf16, "fp32_tflops": fp32, "memory_gbs": gbs}
    return None


def environment() -> dict:
    """Device, versions and peaks, for the JSON of every benchmark."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # pragma: no cover - triton is Linux-only
        triton_version = None
    info = {"device": device_name(), "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "python": platform.python_version(), "cpu_threads": torch.get_num_threads(), "peaks": device_peaks(),
            "time": time.strftime("%Y-%m-%d %H:%M")}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        info["capability"] = f"sm{major}{minor}"
        info["cusparselt"] = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
    return info


def save_report(report: dict, output: str | Path) -> Path:
    """Write a benchmark's JSON report atomically (a temporary file, then renamed)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2) + "\n")
    return output
