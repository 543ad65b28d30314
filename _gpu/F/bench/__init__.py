"""kiln's benchmark suite: kiln against eager PyTorch and torch.compile.

Run ``python -m bench --help``. In: case names, compiler names, a device. Out: a
results folder with ``results.json`` (every number), ``results.md`` (tables made
from that JSON) and ``results.png`` (charts from the same JSON). This package may
import torch.compile to compare against; the kiln package itself never does.
"""
from __future__ import annotations

import torch


def setup_torch(device: str) -> None:
    """Numerics settings shared by the main process and the compile-time subprocesses."""
    if device == "cuda":
        # NOTE: the GPU run measures fp32 models with TF32 matmuls/convs, the usual setting.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = False
