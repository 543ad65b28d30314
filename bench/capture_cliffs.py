"""Compile-time cliffs of capture: kiln against torch.compile (dynamo) on programs whose
compile time grew much faster than their size.

Run ``python -m bench.capture_cliffs`` from the repository root. Out: a table on stdout
and ``bench/results/cpu/capture_cliffs.json``.

Cases (each: first call of the compiled function, frames compiled, output checked):
- ``loop_break``: a 100-iteration loop with a graph break in its body (backend eager).
- ``aliased_views``: a function of 100 overlapping views of one tensor (backend eager).
- ``lstm``: a 2-layer ``nn.LSTM`` forward and backward under ``aot_eager``.
Each case runs in a fresh subprocess per compiler, so nothing is cached between them.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
CASES = ("loop_break", "aliased_views", "lstm")


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

    base = torch.randn(200)

    def f(*views):
        return sum(v.sum() for v in views)

    return f, tuple(base[i:i + 100] for i in range(100))


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


def worker(compiler: str, case: str) -> dict[str, Any]:
    """One measurement in this process: {seconds, frames, ok}."""
    import torch

    backend = "aot_eager" if case == "lstm" else "eager"
    if compiler == "torch":
        import torch._dynamo
        from torch._dynamo.testing import CompileCounterWithBackend

        brk = torch._dynamo.graph_break
        cnt = CompileCounterWithBackend(backend)
        compile_fn = lambda f: torch.compile(f, backend=cnt)  # noqa: E731
    else:
        import kiln
        from kiln.testing import CompileCounterWithBackend as KCounter

        brk = kiln.graph_break
        cnt = KCounter(backend)
        compile_fn = lambda f: kiln.compile(f, backend=cnt)  # noqa: E731
    fn, args = {"loop_break": _loop_break, "aliased_views": _aliased_views, "lstm": _lstm}[case](brk)
    ref = fn(*args)
    ref = ref.clone() if isinstance(ref, torch.Tensor) else ref
    if case == "lstm":
        args[0].grad = None
    t0 = time.perf_counter()
    out = compile_fn(fn)(*args)
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 3), "frames": cnt.frame_count, "ok": bool(torch.allclose(out, ref, rtol=1e-4, atol=1e-6))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu" / "capture_cliffs.json"))
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(*a.worker)))
        return
    rows = {}
    for case in a.cases.split(","):
        rows[case] = {}
        for comp in ("torch", "kiln"):
            try:
                p = subprocess.run([sys.executable, "-m", "bench.capture_cliffs", "--worker", comp, case],
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
