"""Measuring one call: the step that is timed, timers, memory, and matching against eager.

In: a compiled callable, a :class:`~bench.cases.Workload` and a mode. Out: seconds
per call, peak memory in MiB, and a match record (relative errors of outputs and
gradients against eager, and whether they are within tolerance).

A training step is: clear grads, ``out = fn(*inputs)``, ``loss = mean(out * R)`` with
``R`` a fixed seeded random tensor (the same in every process), ``loss.backward()``; no optimizer step, so weights stay fixed and every compiler
sees the same model. An inference step runs under ``torch.no_grad()``.
"""
from __future__ import annotations

import contextlib

import resource
import time
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from bench.cases import Workload

# NOTE: relative L2 error ||got - ref|| / ||ref|| per tensor. fp32 on CPU keeps ~1e-6;
# on CUDA with TF32 matmuls (the GPU run's setting) both sides round to 10-bit mantissas
# in different orders, so the bound is looser.
TOLERANCE = {"cpu": 1e-4, "cuda": 1e-2}


def sync(device: str) -> None:
    """Wait for queued GPU work, so wall-clock timers see it."""
    if device == "cuda":
        torch.cuda.synchronize()


def make_step(fn: Callable[..., Any], wl: Workload, train: bool) -> Callable[[], Any]:
    """The zero-argument callable that is timed: one inference call, or one forward+backward."""
    inputs = wl.inputs
    if not train:
        def infer() -> Any:
            with torch.no_grad():
                return fn(*inputs)
        return infer

    params = [p for p in wl.model.parameters() if p.requires_grad]
    grad_leaves = params + [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]

    # NOTE: a compiler may capture the backward too (kiln+ca: compiled autograd)
    backward_context = getattr(fn, "backward_context", contextlib.nullcontext)

    def train_step() -> Any:
        for t in grad_leaves:
            t.grad = None
        out = fn(*inputs)
        loss = sum((o * _probe(o)).mean() for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor))
        with backward_context():
            loss.backward()
        return out

    return train_step


_PROBES: dict[tuple[Any, ...], torch.Tensor] = {}


def _probe(out: torch.Tensor) -> torch.Tensor:
    """The fixed random weights of the loss for an output of this shape.

    # NOTE: not mean(out**2): after a final LayerNorm that loss is nearly constant, so its
    # true gradients are ~0 and any two implementations "differ" by 100% of nothing.
    """
    key = (tuple(out.shape), out.dtype, str(out.device))
    if key not in _PROBES:
        g = torch.Generator().manual_seed(1234)
        _PROBES[key] = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    return _PROBES[key]


def grads_of(wl: Workload) -> list[torch.Tensor | None]:
    """Current grads of the model's parameters and of inputs that need them, in a fixed order."""
    leaves = [p for p in wl.model.parameters() if p.requires_grad]
    leaves += [x for x in wl.inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    return [None if t.grad is None else t.grad.detach().clone() for t in leaves]


def time_calls(step: Callable[[], Any], n: int, device: str) -> float:
    """Seconds per call, averaged over ``n`` back-to-back calls (one sync before and after)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - t0) / n


def cuda_peak_mib(step: Callable[[], Any]) -> float:
    """Peak CUDA memory allocated (MiB) during one call, weights and inputs included."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def process_peak_rss_mib() -> float:
    """This process's peak resident set size (MiB) so far.

    # NOTE: VmHWM, not getrusage's ru_maxrss: on Linux a child's ru_maxrss starts at the
    # parent's size at fork, so every subprocess would report the benchmark's own size.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rel_err(got: Any, ref: Any, floor: float = 1e-12) -> float:
    """Relative L2 error ``||got - ref|| / max(||ref||, floor)`` (inf on shape mismatch or NaN)."""
    if ref is None or got is None:
        return 0.0 if ref is None and got is None else float("inf")
    if not isinstance(ref, torch.Tensor):
        return 0.0 if got == ref else float("inf")
    if not isinstance(got, torch.Tensor) or got.shape != ref.shape:
        return float("inf")
    # NOTE: computed where the tensors live: copying GPT-2's logits (200M floats) to the
    # host as float64 took seconds per compiler on the GPU machine.
    g, r = got.detach(), ref.detach().to(got.device)
    if bool(torch.isnan(g).any()) and not bool(torch.isnan(r).any()):
        return float("inf")
    denom = max(float(torch.linalg.vector_norm(r, dtype=torch.float64)), floor)
    diff = torch.nan_to_num(g).to(torch.float64) - torch.nan_to_num(r).to(torch.float64)
    err = float(torch.linalg.vector_norm(diff)) / denom
    return err


def compare(got_out: Any, got_grads: list[Any] | None, ref_out: Any, ref_grads: list[Any] | None, device: str) -> dict[str, Any]:
    """Match record: worst output error, worst grad error, tolerance, ok."""
    gl, rl = pytree.tree_leaves(got_out), pytree.tree_leaves(ref_out)
    out_err = max((rel_err(g, r) for g, r in zip(gl, rl)), default=0.0) if len(gl) == len(rl) else float("inf")
    rec: dict[str, Any] = {"out_rel_err": out_err, "tol": TOLERANCE[device]}
    if ref_grads is not None:
        grads = got_grads or []
        # NOTE: some grads are zero in exact arithmetic (e.g. the key bias of attention, by softmax's
        # shift invariance) and hold only rounding noise; errors are measured against at least
        # 1e-3 of the largest grad's norm so noise against noise does not count as a mismatch.
        floor = 1e-3 * max((float(torch.linalg.vector_norm(r, dtype=torch.float64)) for r in ref_grads
                            if isinstance(r, torch.Tensor)), default=0.0)
        ok_len = len(grads) == len(ref_grads)
        rec["grad_rel_err"] = (max((rel_err(g, r, max(floor, 1e-12)) for g, r in zip(grads, ref_grads)), default=0.0)
                               if ok_len else float("inf"))
    rec["ok"] = all(v <= rec["tol"] for k, v in rec.items() if k.endswith("_rel_err"))
    return rec
