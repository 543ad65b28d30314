"""The OpInfo sweep: PyTorch's op_db samples through kiln.aot.aot_function vs eager.

Used by tests/aot/test_opinfo_sweep.py and runnable directly:

    python tests/aot/sweep_lib.py [--limit N] [--samples K] [--decomp-mincut] [--out report.json]
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.utils._pytree as pytree

from kiln import fallbacks
from kiln.aot import aot_function, nop

SAMPLES_PER_OP = 2
# NOTE: ``KILN_SWEEP_DEVICE=cuda`` runs the samples on the GPU (same tolerances); the
# GPU machine's OpInfo figure comes from that.
DEVICE = os.environ.get("KILN_SWEEP_DEVICE", "cpu")
# NOTE: these ops draw random numbers (or read uninitialised memory); only
# shapes and dtypes can be compared with eager.
RANDOM_WORDS = ("rand", "dropout", "normal", "bernoulli", "multinomial", "uniform", "empty",
                "exponential", "geometric", "cauchy", "log_normal", "randint", "poisson", "rrelu",
                "fractional_max_pool", "multi_head_attention_forward")


@dataclass
class SampleResult:
    op: str
    index: int
    status: str  # "match" | "mismatch" | "error" | "eager_error"
    reason: str = ""
    fallback: bool = False  # kiln ran the op eagerly (data-dependent / untraceable)


@dataclass
class SweepReport:
    results: list = field(default_factory=list)

    @property
    def eager_ran(self) -> list:
        return [r for r in self.results if r.status != "eager_error"]

    @property
    def matched(self) -> list:
        return [r for r in self.results if r.status == "match"]

    def rate(self) -> float:
        n = len(self.eager_ran)
        return len(self.matched) / n if n else 1.0

    def fallback_ops(self) -> dict:
        """Ops kiln ran eagerly (with the first reason)."""
        out: dict = {}
        for r in self.results:
            if r.fallback:
                out.setdefault(r.op, r.reason)
        return out

    def failing_ops(self) -> dict:
        out: dict = {}
        for r in self.results:
            if r.status in ("mismatch", "error"):
                out.setdefault(r.op, r.reason)
        return out


def op_name(op) -> str:
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


def float32_ops() -> list:
    from torch.testing._internal.common_methods_invocations import op_db

    return [op for op in op_db if op.supports_dtype(torch.float32, DEVICE)]


def _clone(tree: Any) -> Any:
    def c(t):
        if isinstance(t, torch.Tensor):
            return t.detach().clone().requires_grad_(t.requires_grad)
        return t

    return pytree.tree_map(c, tree)


def _is_random(name: str) -> bool:
    return any(w in name for w in RANDOM_WORDS)


def _grads(out: Any, inputs: list) -> Optional[list]:
    leaves = [o for o in pytree.tree_leaves(out)
              if isinstance(o, torch.Tensor) and o.requires_grad and o.dtype.is_floating_point]
    want = [t for t in inputs if t.requires_grad]
    if not leaves or not want:
        return None
    loss = sum((o.float() * _cotangent(o)).sum() for o in leaves)
    return list(torch.autograd.grad(loss, want, allow_unused=True))


def _cotangent(o: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(o.numel())
    return torch.randn(o.shape, generator=g, dtype=torch.float32)


def _same(a: Any, b: Any, structure_only: bool) -> Optional[str]:
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    if len(la) != len(lb):
        return f"{len(la)} vs {len(lb)} outputs"
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return f"output types differ: {type(x).__name__} vs {type(y).__name__}"
        if not isinstance(x, torch.Tensor):
            if x != y and not (isinstance(x, float) and math.isnan(x) and math.isnan(y)):
                return f"value {x!r} vs {y!r}"
            continue
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"shape/dtype {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}"
        if structure_only:
            continue
        if x.layout != torch.strided or y.layout != torch.strided:
            x, y = x.to_dense(), y.to_dense()
        if not torch.allclose(x.detach(), y.detach(), rtol=1e-4, atol=1e-4, equal_nan=True):
            return "values differ"
    return None


# aot_function keyword arguments used by the sweep (the CLI's --decomp-mincut changes it)
AOT_KWARGS: dict = {}


def run_sample(op, sample, index: int) -> SampleResult:
    name = op_name(op)
    fn = op.op
    args = (sample.input, *sample.args)
    kwargs = dict(sample.kwargs)

    def call(*a, **k):
        return fn(*a, **k)

    e_args, e_kwargs = _clone((args, kwargs))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            e_out = call(*e_args, **e_kwargs)
    except Exception as e:  # noqa: BLE001
        return SampleResult(name, index, "eager_error", f"{type(e).__name__}: {e}"[:200])
    e_inputs = [t for t in pytree.tree_leaves((e_args, e_kwargs)) if isinstance(t, torch.Tensor)]
    try:
        e_grads = _grads(e_out, e_inputs)
    except Exception:  # noqa: BLE001 - eager backward fails: compare forward only
        e_grads = None
    c_args, c_kwargs = _clone((args, kwargs))
    try:
        # NOTE: the sweep checks its own fallbacks (EAGER_FALLBACK_OPS in test_opinfo_sweep.py),
        # so it takes them out of kiln's record, which the test suite fails on otherwise.
        with warnings.catch_warnings(), fallbacks.taken():
            warnings.simplefilter("ignore")
            compiled = aot_function(call, nop, **AOT_KWARGS)
            c_out = compiled(*c_args, **c_kwargs)
            fallback_reasons = [e.reason for e in compiled._kiln_cache.values() if e.art is None]
            fallback = bool(fallback_reasons)
            c_inputs = [t for t in pytree.tree_leaves((c_args, c_kwargs)) if isinstance(t, torch.Tensor)]
            c_grads = _grads(c_out, c_inputs) if e_grads is not None else None
    except Exception as e:  # noqa: BLE001
        return SampleResult(name, index, "error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
    random = _is_random(name)
    try:
        why = _compare(e_out, c_out, e_args, c_args, e_grads, c_grads, random)
    except Exception as e:  # noqa: BLE001
        why = f"comparison failed: {type(e).__name__}: {e}"[:200]
    if why is None and fallback:
        why_fallback = (fallback_reasons[0].splitlines() or ["?"])[0][:200]
        return SampleResult(name, index, "match", why_fallback, True)
    return SampleResult(name, index, "match" if why is None else "mismatch", why or "", fallback)


def _compare(e_out, c_out, e_args, c_args, e_grads, c_grads, random) -> Optional[str]:
    why = _same(e_out, c_out, random) or _same(e_args, c_args, random)
    if why is None and e_grads is not None:
        why = _same([g for g in e_grads if g is not None], [g for g in (c_grads or []) if g is not None],
                    random)
        why = f"grad: {why}" if why else None
    return why


def decomp_mincut_kwargs() -> dict:
    """aot_function arguments of the "decompositions + min-cut" setup."""
    from torch._decomp import core_aten_decompositions

    from kiln.aot import min_cut_rematerialization_partition

    return dict(decompositions=dict(core_aten_decompositions()),
                partition_fn=min_cut_rematerialization_partition)


def sweep(ops: list, samples_per_op: int = SAMPLES_PER_OP, verbose: bool = False,
          aot_kwargs: Optional[dict] = None) -> SweepReport:
    if aot_kwargs is not None:
        AOT_KWARGS.clear()
        AOT_KWARGS.update(aot_kwargs)
    report = SweepReport()
    for op in ops:
        try:
            samples = op.sample_inputs(DEVICE, torch.float32, requires_grad=op.supports_autograd)
            samples = [s for _, s in zip(range(samples_per_op), samples)]
        except Exception as e:  # noqa: BLE001
            report.results.append(SampleResult(op_name(op), 0, "eager_error", f"samples: {e}"[:200]))
            continue
        for i, s in enumerate(samples):
            t0 = time.time()
            r = run_sample(op, s, i)
            report.results.append(r)
            if verbose and r.status in ("mismatch", "error"):
                print(f"{r.op}[{r.index}] {r.status}: {r.reason} ({time.time() - t0:.2f}s)",
                      file=sys.stderr)
    return report


def main(argv: list) -> None:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--samples", type=int, default=SAMPLES_PER_OP)
    p.add_argument("--only", default="")
    p.add_argument("--out", default="")
    p.add_argument("--decomp-mincut", action="store_true",
                   help="core ATen decompositions + min-cut partitioner")
    a = p.parse_args(argv)
    if a.decomp_mincut:
        AOT_KWARGS.update(decomp_mincut_kwargs())
    ops = float32_ops()
    if a.only:
        ops = [o for o in ops if op_name(o) in a.only.split(",") or o.name in a.only.split(",")]
    ops = ops[a.start:]
    if a.limit:
        ops = ops[: a.limit]
    t0 = time.time()
    rep = sweep(ops, a.samples, verbose=True)
    print(f"{len(ops)} ops, {len(rep.results)} samples, eager ran {len(rep.eager_ran)}, "
          f"matched {len(rep.matched)} = {rep.rate():.1%} "
          f"({sum(r.fallback for r in rep.matched)} of them run eagerly) in {time.time() - t0:.0f}s")
    if a.out:
        with open(a.out, "w") as f:
            json.dump([r.__dict__ for r in rep.results], f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
