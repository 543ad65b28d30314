"""Compile time in a fresh process: ``python -m bench.worker --case C --mode M --compiler K``.

In: one case, mode, compiler, device and size profile, plus the cache directories in
the environment (set by :func:`run_worker`). Out: one line ``BENCH_WORKER {json}`` on
stdout with ``first_call_s`` (the first call: capture + compile + run), ``second_call_s``,
``startup_s`` (process start to model build), ``build_s`` and the process's peak memory.
``first_call_s`` includes wrapping the model (``torch.compile(model)`` imports dynamo).

The parent runs this twice per (case, mode, compiler): once with empty cache
directories ("cold") and once more with the same directories ("warm", caches filled).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MARK = "BENCH_WORKER "


def cache_env(cache_dir: Path) -> dict[str, str]:
    """Environment that points every compiler cache we know of into ``cache_dir``."""
    # NOTE: kiln's cache location is read from KILN_CACHE_DIR (falling back to
    # XDG_CACHE_HOME); torch.compile's from TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR.
    return {
        "TORCHINDUCTOR_CACHE_DIR": str(cache_dir / "inductor"),
        "TRITON_CACHE_DIR": str(cache_dir / "triton"),
        "KILN_CACHE_DIR": str(cache_dir / "kiln"),
        "XDG_CACHE_HOME": str(cache_dir / "xdg"),
        "CUDA_CACHE_PATH": str(cache_dir / "nv"),
    }


def run_worker(case: str, mode: str, compiler: str, device: str, profile: str,
               cache_dir: Path, timeout_s: float) -> dict[str, Any]:
    """Run one compile-time subprocess; returns its record, or ``{"error": ...}``."""
    env = dict(os.environ, **cache_env(cache_dir))
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "bench.worker", "--case", case, "--mode", mode, "--compiler", compiler,
           "--device", device, "--profile", profile, "--launched", repr(time.time())]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    wall = time.perf_counter() - t0
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(MARK):
            rec = json.loads(line[len(MARK):])
            rec["process_wall_s"] = wall
            return rec
    tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"subprocess exited {p.returncode}: {tail[:200]}"}


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from bench import cases, compilers, measure, setup_torch

    setup_torch(args.device)
    rec: dict[str, Any] = {"startup_s": time.time() - float(args.launched)}
    t = time.perf_counter()
    wl = cases.build(args.case, args.mode, args.profile, args.device)
    comp = compilers.by_name(args.compiler, args.device)
    measure.sync(args.device)
    rec["build_s"] = time.perf_counter() - t
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    step = measure.make_step(comp.wrap(wl.model), wl, args.mode == "train")
    step()
    measure.sync(args.device)
    rec["first_call_s"] = time.perf_counter() - t
    rec["second_call_s"] = measure.time_calls(step, 1, args.device)
    measure.time_calls(step, 2, args.device)
    rec["peak_rss_mib"] = measure.process_peak_rss_mib()
    if args.device == "cuda":
        rec["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return rec


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    for name in ("case", "mode", "compiler", "device", "profile", "launched"):
        ap.add_argument(f"--{name}", required=True)
    args = ap.parse_args(argv)
    try:
        rec = _measure(args)
    except Exception as e:  # NOTE: the parent shows this as the compile-time failure reason.
        rec = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]}
    print(MARK + json.dumps(rec), flush=True)
    # NOTE: skip interpreter teardown (compile worker pools, CUDA context): seconds per process.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
