"""Compile-time cliffs of capture: kiln against torch.compile (dynamo) on programs whose
compile time grew much faster than their size.

Run ``python -m bench.capture_cliffs`` from the repository root. Out: a table on stdout
and ``bench/results/cpu/capture_cliffs.json``.

Cases (each: first call of the compiled function, frames compiled, output checked):
- ``loop_break``: a 100-iteration loop with a graph break in its body (backend eager). Both
  compilers run that frame eagerly (0 frames: a break inside a loop skips the frame); the
  time is the one attempt to trace it.
- ``aliased_views``: 100 views of one tensor (``x.split(10)``), each written in place, with
  ``dynamic=True`` under torch's own AOT autograd (``aot_autograd(fw_compiler=...)``: kiln's
  AOT runs graphs that mutate aliased inputs eagerly), as PyTorch's
  ``test_many_overlapping_inputs_does_not_explode_guards``. The cliff: a shape guard per
  pair of views (14,652 for 100). ``shape_guards``: the ShapeEnv guards of the compile.
- ``lstm``: a 2-layer ``nn.LSTM`` forward and backward under ``aot_eager``.
- ``lstm_long``: PyTorch's ``test_LSTM`` (2-layer bidirectional ``nn.LSTM(64, 64)``,
  92 steps, forward) under ``aot_eager``.
PyTorch's capture skips RNN modules unless ``torch._dynamo.config.allow_rnn`` (then nothing
is compiled: 0 frames, eager time); the torch rows set it, so both compilers compile the
LSTM, and ``torch_default`` is the time with PyTorch's default (the module run eagerly).
Each case runs in a fresh subprocess per compiler, so nothing is cached between them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
CASES = ("loop_break", "aliased_views", "lstm", "lstm_long")


def _loop_break(brk: Callable) -> tuple[Callable, tuple]:
    import torch

    def f(x):
        x = x.sin()
        for _ in range(100):
            x = x + 1
            brk()
            x = x * 0.5
        return x

    return f, (torch.randn(8),)


def _aliased_views(brk: Callable) -> tuple[Callable, tuple]:
    import torch

    def f(*views):
        for v in views:
            v.add_(1)
        return views[0]

    x = torch.ones(1000)
    return f, tuple(x.split(10))


def _lstm(brk: Callable) -> tuple[Callable, tuple]:
    import torch

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(16, 32, num_layers=2)
    x = torch.randn(10, 4, 16, requires_grad=True)

    def f(x):
        out, _ = lstm(x)
        out.sum().backward()
        return x.grad

    return f, (x,)


def _lstm_long(brk: Callable) -> tuple[Callable, tuple]:
    import torch

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(64, 64, num_layers=2, bidirectional=True)
    x = torch.randn(92, 4, 64)

    def f(x):
        return lstm(x)[0]

    return f, (x,)


def worker(compiler: str, case: str, variant: str = "") -> dict[str, Any]:
    """One measurement in this process: {seconds, frames, ok} (and shape_guards)."""
    import torch

    backend: Any = "aot_eager" if case.startswith("lstm") else "eager"
    guards: list = []
    if case == "aliased_views":
        from torch._dynamo.backends.common import aot_autograd

        def fw(gm, *_):
            ctx = torch._guards.TracingContext.try_get()
            if ctx is not None and ctx.fake_mode.shape_env is not None:
                guards.append(len(ctx.fake_mode.shape_env.guards))
            return gm

        backend = aot_autograd(fw_compiler=fw)
    if compiler == "torch":
        import torch._dynamo
        from torch._dynamo.testing import CompileCounterWithBackend

        # NOTE: PyTorch's capture runs RNN modules eagerly (0 frames) unless allow_rnn.
        torch._dynamo.config.allow_rnn = variant != "default"
        brk = torch._dynamo.graph_break
        cnt = CompileCounterWithBackend(backend)
        kw = {"dynamic": True} if case == "aliased_views" else {}
        compile_fn = lambda f: torch.compile(f, backend=cnt, **kw)  # noqa: E731
    else:
        import kiln
        from kiln.testing import CompileCounterWithBackend as KCounter

        brk = kiln.graph_break
        cnt = KCounter(backend)
        kw = {"dynamic": True} if case == "aliased_views" else {}
        compile_fn = lambda f: kiln.compile(f, backend=cnt, **kw)  # noqa: E731
    make = {"loop_break": _loop_break, "aliased_views": _aliased_views, "lstm": _lstm, "lstm_long": _lstm_long}[case]
    fn, args = make(brk)
    ref_args = make(brk)[1] if case == "aliased_views" else args
    with torch.no_grad() if case == "aliased_views" else contextlib.nullcontext():
        ref = fn(*ref_args)
        ref = ref.clone() if isinstance(ref, torch.Tensor) else ref
        if case == "lstm":
            args[0].grad = None
        t0 = time.perf_counter()
        out = compile_fn(fn)(*args)
        seconds = time.perf_counter() - t0
    row = {"seconds": round(seconds, 3), "frames": cnt.frame_count,
           "ok": bool(torch.allclose(out, ref, rtol=1e-4, atol=1e-5))}
    if case == "aliased_views":
        row["shape_guards"] = guards[0] if guards else _kiln_shape_guards() if compiler == "kiln" else None
    return row


def _kiln_shape_guards() -> Optional[int]:
    import gc

    from kiln.capture.guards import GuardKind

    n = None
    for o in gc.get_objects():
        gs = getattr(o, "__kiln_guards__", None) if callable(o) else None
        if isinstance(gs, list):
            n = (n or 0) + sum(1 for g in gs if getattr(g, "kind", None) == GuardKind.SHAPE_ENV)
    return n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu" / "capture_cliffs.json"))
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(*a.worker)))
        return
    rows = {}
    for case in a.cases.split(","):
        rows[case] = {}
        runs = [("torch", "torch", "")] + ([("torch_default", "torch", "default")] if case.startswith("lstm") else [])
        for comp, who, variant in runs + [("kiln", "kiln", "")]:
            try:
                p = subprocess.run([sys.executable, "-m", "bench.capture_cliffs", "--worker", who, case]
                                   + ([variant] if variant else []),
                                   cwd=ROOT, capture_output=True, text=True, timeout=a.timeout)
                rows[case][comp] = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 \
                    else {"failed": (p.stderr.strip().splitlines() or ["?"])[-1][:200]}
            except subprocess.TimeoutExpired:
                rows[case][comp] = {"failed": f"timed out after {a.timeout:.0f} s"}
            print(f"{case:14s} {comp:6s} {rows[case][comp]}", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                       "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
