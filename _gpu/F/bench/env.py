"""What machine and software a run used: date, cores, CPU/GPU model, versions.

Out: a plain dict for ``results.json``. No paths, no host names.
"""
from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import os
import platform
from typing import Any

import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    # NOTE: package metadata, not imports: importing transformers alone takes seconds.
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return getattr(importlib.import_module(dist), "__version__", "unknown")
    except Exception:
        return None


def machine(device: str) -> dict[str, Any]:
    """Cores, CPU model, memory, OS and (on CUDA) the GPU."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_model": _cpu_model(),
        "system": f"{platform.system()} {platform.machine()}",
    }
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = p.name
        info["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def versions() -> dict[str, Any]:
    """Python, torch and the optional packages the cases use (None when missing)."""
    return {
        "python": platform.python_version(),
        **{m: _version(m) for m in ("torch", "kiln", "transformers", "torchvision", "timm", "triton", "numpy")},
    }


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
