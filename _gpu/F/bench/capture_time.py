"""Capture time of a 2-layer GPT-2: torch.compile (dynamo) against kiln.compile.

Run ``python -m bench.capture_time`` (or ``python bench/capture_time.py``) from the
repository root. In: ``--repeats`` (fresh processes per compiler), ``--seq`` (tokens),
``--out`` (JSON path). Out: a table on stdout and ``bench/results/capture_time.json``.

What is measured: the first call of ``compile(model, backend=<eager>)`` on a
transformers ``GPT2LMHeadModel`` with ``n_layer=2`` and GPT-2's default widths
(n_embd 768, 12 heads, vocab 50257), random weights, eval mode. The backend is
``eager`` (the captured graph runs as is) plus a count of graphs and ops, so the first
call's time minus one eager call is bytecode capture (tracing, guards, code
generation), and a compiler that captured nothing is reported as such, not as fast. Each repeat runs in a fresh
subprocess, so nothing is cached; imports and the model build happen before the
clock starts. ``cold`` is the first capture in a process (includes one-time lazy
initialisation of the compiler); ``warm`` is a second capture after ``reset()`` in
the same process. The compiled output is checked against eager's.

kiln need not be ready: a missing or failing ``kiln.compile`` is reported as
``kiln: unavailable: <reason>`` and the script still exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
COMPILERS = ("torch", "kiln")


def build_model(seq: int) -> tuple[Any, Any]:
    """The 2-layer GPT-2 and one batch of token ids (seeded: every process builds the same)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                     attn_implementation="sdpa")
    model = GPT2LMHeadModel(cfg).eval()
    return model, torch.randint(0, cfg.vocab_size, (1, seq))


class CountingEager:
    """The ``eager`` backend (run the captured graph as is) that also counts graphs and ops."""

    def __init__(self) -> None:
        self.graphs = 0
        self.ops = 0

    def __call__(self, gm: Any, example_inputs: list) -> Callable:
        self.graphs += 1
        self.ops += sum(n.op in ("call_function", "call_method", "call_module") for n in gm.graph.nodes)
        return gm.forward


def _compiler(name: str, backend: CountingEager) -> tuple[Callable, Callable]:
    """(compile_fn, reset_fn) for a compiler name; raises if it cannot be had."""
    if name == "torch":
        import torch
        import torch._dynamo

        return (lambda m: torch.compile(m, backend=backend)), torch._dynamo.reset
    import kiln

    compile_fn, reset_fn = kiln.compile, kiln.reset  # AttributeError while capture is missing
    return (lambda m: compile_fn(m, backend=backend)), reset_fn


def _timed_first_call(compile_fn: Callable, model: Any, ids: Any) -> tuple[float, Any]:
    compiled = compile_fn(model)
    t0 = time.perf_counter()
    out = compiled(ids)
    return time.perf_counter() - t0, out


def worker(name: str, seq: int) -> dict[str, Any]:
    """Runs in a fresh process: one cold and one warm capture, in seconds."""
    import torch

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    counter = CountingEager()
    try:
        compile_fn, reset_fn = _compiler(name, counter)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return {"status": "unavailable", "reason": f"{type(e).__name__}: {e}"}
    model, ids = build_model(seq)
    with torch.no_grad():
        model(ids)  # warm eager kernels and transformers' lazy setup
        t0 = time.perf_counter()
        want = model(ids).logits
        eager_s = time.perf_counter() - t0
        try:
            cold, out = _timed_first_call(compile_fn, model, ids)
            graphs, ops = counter.graphs, counter.ops
            reset_fn()
            warm, _ = _timed_first_call(compile_fn, model, ids)
            warm_graphs = counter.graphs - graphs  # 0: reset() did not drop the cache
        except Exception as e:  # noqa: BLE001
            return {"status": "unavailable", "reason": f"compile failed: {type(e).__name__}: {str(e)[:300]}"}
    got = getattr(out, "logits", out)
    ok = isinstance(got, torch.Tensor) and torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    status = "ok" if ok and graphs else ("wrong output" if not ok else "no graph captured (ran eagerly)")
    return {"status": status, "graphs": graphs, "ops": ops, "warm_graphs": warm_graphs, "eager_call_s": eager_s,
            "cold_first_call_s": cold, "warm_first_call_s": warm,
            "cold_capture_s": max(cold - eager_s, 0.0), "warm_capture_s": max(warm - eager_s, 0.0)}


def run_worker(name: str, seq: int, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.capture_time", "--worker", name, "--seq", str(seq)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "unavailable", "reason": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        how = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
               else f"exited {proc.returncode}")
        return {"status": "unavailable", "reason": f"worker {how}: {tail}"}
    return json.loads(lines[-1])


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r["status"] == "ok"]
    if len(ok) < len(runs):
        bad = next(r for r in runs if r["status"] != "ok")
        return {"status": bad["status"], "reason": bad.get("reason", bad["status"]), "runs": runs}
    keys = ("cold_capture_s", "warm_capture_s", "cold_first_call_s", "eager_call_s")
    return {"status": "ok", "graphs": ok[0]["graphs"], "ops": ok[0]["ops"], "warm_graphs": ok[0]["warm_graphs"],
            **{k: statistics.median(r[k] for r in ok) for k in keys}, "runs": runs}


def table(results: dict[str, dict[str, Any]]) -> str:
    most_ops = max((r["ops"] for r in results.values() if r["status"] == "ok"), default=0)
    lines = [f"{'compiler':<16}{'capture cold (s)':>18}{'capture warm (s)':>18}{'first call (s)':>16}"
             f"{'graphs':>8}{'ops':>6}", "-" * 82]
    for name, r in results.items():
        label = "torch.compile" if name == "torch" else "kiln.compile"
        if r["status"] != "ok":
            lines.append(f"{name}: unavailable: {r['reason']}" if r["status"] == "unavailable"
                         else f"{name}: {r['status']}")
            continue
        lines.append(f"{label:<16}{r['cold_capture_s']:>18.3f}{r['warm_capture_s']:>18.3f}"
                     f"{r['cold_first_call_s']:>16.3f}{r['graphs']:>8}{r['ops']:>6}"
                     + (f"  partial capture: {r['ops']} of {most_ops} ops" if 2 * r["ops"] < most_ops else "")
                     + ("  warm: nothing recaptured after reset()" if not r["warm_graphs"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per compiler (median reported)")
    ap.add_argument("--seq", type=int, default=64, help="tokens in the batch of one")
    ap.add_argument("--compilers", default=",".join(COMPILERS), help="comma-separated: torch,kiln")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per worker process")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "capture_time.json"))
    ap.add_argument("--worker", choices=COMPILERS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.seq)), flush=True)
        return

    import torch
    import transformers

    results = {}
    for name in args.compilers.split(","):
        runs = [run_worker(name, args.seq, args.timeout) for _ in range(args.repeats)]
        results[name] = summarise(runs)
    print(f"GPT-2 n_layer=2 (n_embd 768, vocab 50257), batch 1 x {args.seq} tokens, backend='eager', "
          f"median of {args.repeats} fresh processes")
    print(table(results))
    meta = {"model": "transformers GPT2LMHeadModel n_layer=2 (default widths), eval, sdpa", "seq": args.seq,
            "backend": "eager", "repeats": args.repeats, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(ROOT))
    main()
