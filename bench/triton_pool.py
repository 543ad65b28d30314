"""First-call compile time of a model's Triton kernels: serial vs the compile pool (GPU).

    python3 -m bench.triton_pool [--case gpt2] [--mode train] [--threads 8]

Runs fresh processes, each compiling the bench case with kiln's code generator and
timing its first call (forward, and backward when training; profitability check off):

* ``serial cold``: ``KILN_COMPILE_THREADS=1``, empty kiln and Triton caches;
* ``pool cold``: the pool (``--threads`` workers), empty caches;
* ``pool warm``: a second process on the caches ``pool cold`` left.

Each line says the seconds, kernels generated, pool jobs sent / skipped (an earlier
process's) / failed, and the Triton compiles of the main process: ``misses`` compiled
there (with the pool: jobs it took back, or a key the pool did not predict), ``hits``
loaded from Triton's cache.  Expect ``pool cold`` well under ``serial cold`` with few
misses, and ``pool warm`` under 1 s with 0 jobs sent and 0 misses.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def child(case: str, mode: str) -> None:
    """One fresh process: compile, time the first call, print one JSON line."""
    import torch

    import kiln
    from bench.cases import build
    from bench.measure import make_step
    from kiln.codegen import config, metrics

    from triton import knobs

    hits: list = []
    knobs.compilation.listener = lambda **kw: hits.append(bool(kw["cache_hit"]))
    wl = build(case, mode, "gpu", "cuda")
    config.profitability_check = False
    step = make_step(kiln.compile(wl.model), wl, mode == "train")
    torch.cuda.synchronize()
    t = time.perf_counter()
    step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    print(json.dumps({"first_call_s": dt, "kernels": metrics.generated_kernel_count,
                      "sent": metrics.triton_compiles_submitted, "skipped": metrics.triton_compiles_skipped,
                      "failed": metrics.triton_pool_failures, "misses": hits.count(False),
                      "hits": hits.count(True)}))


def _run(label: str, case: str, mode: str, threads: int, caches: str) -> dict:
    env = dict(os.environ, KILN_COMPILE_THREADS=str(threads), KILN_CACHE_DIR=os.path.join(caches, "kiln"),
               TRITON_CACHE_DIR=os.path.join(caches, "triton"))
    p = subprocess.run([sys.executable, "-m", "bench.triton_pool", "--child", case, mode], env=env,
                       capture_output=True, text=True)
    if p.returncode != 0:
        print(f"{label}: failed\n{p.stderr[-3000:]}")
        return {}
    r = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"{label:<12} {r['first_call_s']:7.2f} s  kernels {r['kernels']:3d}  jobs sent {r['sent']:3d} "
          f"skipped {r['skipped']:3d} failed {r['failed']:2d}  main-process Triton compiles: "
          f"misses {r['misses']:3d} hits {r['hits']:3d}")
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", default="gpt2")
    ap.add_argument("--mode", default="train", choices=("infer", "train"))
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 8))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    with tempfile.TemporaryDirectory() as serial, tempfile.TemporaryDirectory() as pooled:
        _run("serial cold", args.case, args.mode, 1, serial)
        _run("pool cold", args.case, args.mode, args.threads, pooled)
        _run("pool warm", args.case, args.mode, args.threads, pooled)


if __name__ == "__main__":
    main()
