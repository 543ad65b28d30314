"""Per-call overhead of a compiled ``x + 1`` on a small CPU tensor: kiln vs eager vs torch.compile.

Run from the repository root: ``python -m bench.overhead [--device cpu|cuda] [--iters N]``.  Prints microseconds per
call and the overhead each compiler adds over eager (a benchmark, not a test).
"""
from __future__ import annotations

import argparse
import importlib
import time

import torch

import kiln


def f(x):
    return x + 1


def per_call_us(fn, x, iters: int, sync) -> float:
    for _ in range(200):
        fn(x)
    sync()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn(x)
        sync()
        best = min(best, (time.perf_counter() - t0) / iters * 1e6)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--iters", type=int, default=20000)
    p.add_argument("--no-torch-compile", action="store_true")
    a = p.parse_args()
    x = torch.randn(8, device=a.device)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    rows = {"eager": per_call_us(f, x, a.iters, sync)}
    rows["kiln (eager backend)"] = per_call_us(kiln.compile(f, backend="eager"), x, a.iters, sync)
    if not a.no_torch_compile:
        importlib.import_module("torch._dynamo").reset()
        rows["torch.compile (eager backend)"] = per_call_us(torch.compile(f, backend="eager"), x, a.iters, sync)
    base = rows["eager"]
    print(f"device={a.device} torch={torch.__version__}")
    for name, us in rows.items():
        print(f"{name:32s} {us:8.2f} us/call   overhead {us - base:+7.2f} us")
    if "torch.compile (eager backend)" in rows:
        ko = rows["kiln (eager backend)"] - base
        to = rows["torch.compile (eager backend)"] - base
        print(f"kiln overhead / torch.compile overhead = {ko / to:.2f} (target <= 0.5)")


if __name__ == "__main__":
    main()
