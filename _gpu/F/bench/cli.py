"""``python -m bench``: parse the command line, run the cases, write the results folder.

In: command-line flags (see ``--help``). Out: ``<out>/results.json``, ``results.md``,
``results.png``; one progress line per case and mode on stdout as it goes.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench import cases, compilers, env, isolate, measure, report, setup_torch
from bench.runner import Settings, run_case, set_inprocess_caches

# NOTE: cold compile in a fresh process costs ~30 s per row for torch.compile on 2 cores,
# so a quick CPU run measures it on a few representative rows only.
QUICK_COLD = ("tiny/infer", "mlp/train")
# NOTE: on the GPU machine a fresh process costs ~10 s before compiling anything (start-up,
# importing transformers) and a cold+warm pair ~45-70 s per model row; measured on an H200
# (2026-11-22): ~6.5 min for all rows without subprocesses, so the default keeps three.
GPU_COLD = ("tiny/infer", "gpt2/train", "resnet50/infer")
# NOTE: compile-time subprocesses by default only for the two full compilers (and eager on
# CPU, whose subprocess is the memory baseline); --cold-backends all gives every column.
COLD_BACKENDS = ("torch.compile", "kiln:inductor", "eager")
# (warmup, reps, min_sample_s) per profile
_TIMING = {"quick": (1, 5, 0.01), "cpu": (2, 7, 0.02), "gpu": (2, 8, 0.02), "gpu-quick": (1, 5, 0.01)}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench", description="kiln against eager and torch.compile.")
    ap.add_argument("--cases", default=None, help=f"comma list (default: all): {','.join(cases.CASES)}")
    ap.add_argument("--modes", default="infer,train", help="comma list of infer,train (default both where the case has them)")
    ap.add_argument("--backends", default="eager,torch.compile,kiln",
                    help="comma list: eager, torch.compile[:<torch backend>], kiln (every kiln backend), kiln:<name>")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes and few repetitions (CPU: a few minutes on 2 cores)")
    ap.add_argument("--out", default=None, help="results folder (default bench/results/<device>)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per compiler (interleaved)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per compiler after the first")
    ap.add_argument("--min-sample-ms", type=float, default=None, help="each repetition loops calls for at least this long")
    ap.add_argument("--no-cold", action="store_true", help="skip cold/warm compile-time subprocesses (fast, no CPU memory)")
    ap.add_argument("--cold-cases", default=None,
                    help="comma list of case or case/mode that get cold/warm compile subprocesses "
                         f"(default: all on CPU; CPU --quick: {','.join(QUICK_COLD)}; CUDA: {','.join(GPU_COLD)})")
    ap.add_argument("--cold-backends", default=",".join(COLD_BACKENDS),
                    help="comma list of compilers that get compile-time subprocesses, or 'all' (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch and generated kernels (OMP_NUM_THREADS; subprocesses inherit it)")
    ap.add_argument("--no-isolate", action="store_true",
                    help="run rows in this process (default: in a child process, so a crash fails one compiler, not the run)")
    ap.add_argument("--worker-timeout", type=float, default=300.0, help="seconds per compile-time subprocess")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in <out>/results.json (same device and profile) and run only "
                         "the missing ones: finishes a run cut off by a time limit")
    return ap


def _resumed_rows(out_dir: Path, s: Settings, plan: list[tuple[str, str]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows of an earlier run of the same device/profile that are in ``plan``, its meta); empty if none."""
    path = out_dir / "results.json"
    if not path.exists():
        return [], {}
    old = json.loads(path.read_text())
    meta = old.get("meta", {})
    if (meta.get("device"), meta.get("profile")) != (s.device, s.profile):
        raise SystemExit(f"--resume: {path} holds a {meta.get('device')}/{meta.get('profile')} run, "
                         f"not {s.device}/{s.profile}")
    wanted = set(plan)
    return [r for r in old.get("rows", []) if (r["case"], r["mode"]) in wanted], meta


def _settings(args: argparse.Namespace, tmp: Path) -> Settings:
    profile = "gpu" if args.device == "cuda" else ("quick" if args.quick else "cpu")
    warmup, reps, min_s = _TIMING["gpu-quick" if (args.device == "cuda" and args.quick) else profile]
    return Settings(
        device=args.device, profile=profile,
        warmup=args.warmup if args.warmup is not None else warmup,
        reps=args.reps if args.reps is not None else reps,
        min_sample_s=args.min_sample_ms / 1e3 if args.min_sample_ms is not None else min_s,
        max_inner=10000, cold=not args.no_cold, worker_timeout_s=args.worker_timeout, tmp=tmp,
        cold_rows=_cold_rows(args, profile),
        cold_backends=None if args.cold_backends == "all" else tuple(b.strip() for b in args.cold_backends.split(",")),
    )


def _cold_rows(args: argparse.Namespace, profile: str) -> tuple[str, ...] | None:
    """Which rows get compile-time subprocesses: None = all; entries are ``case`` or ``case/mode``."""
    if args.cold_cases:
        return tuple(c.strip() for c in args.cold_cases.split(",") if c.strip())
    if args.cold_cases == "all":
        return None
    return {"quick": QUICK_COLD, "gpu": GPU_COLD}.get(profile)


def _plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    names = [c.strip() for c in args.cases.split(",")] if args.cases else list(cases.CASES)
    bad = [n for n in names if n not in cases.CASES]
    if bad:
        raise SystemExit(f"unknown case(s) {bad}; known: {', '.join(cases.CASES)}")
    modes = [m.strip() for m in args.modes.split(",")]
    return [(n, m) for n in names for m in cases.CASES[n].modes if m in modes]


def _progress(i: int, n: int, t0: float, row: dict[str, Any]) -> str:
    head = f"[{i:>2}/{n} {time.perf_counter() - t0:5.0f}s] {row['case'] + '/' + row['mode']:<16}"
    if row.get("status") != "ok":
        return f"{head} {row.get('status', '?').upper()}: {row.get('reason')}"
    parts, failed = [], {}
    for name, e in row["compilers"].items():
        med = e.get("time_s", {}).get("median")
        if med is None:
            failed.setdefault((e.get("reason") or "")[:70], []).append(name)
            continue
        p = f"{name} {med * 1e3:.3g}ms"
        if "speedup" in e and name != "eager":
            p += f" {e['speedup']:.2f}x"
        if e.get("cold_s") is not None and name != "eager":
            p += f" cold {e['cold_s']:.1f}s"
        if e["status"] == "mismatch":
            p += " MISMATCH"
        if e.get("warnings"):
            p += " (warned)"
        parts.append(p)
    parts += [f"{','.join(names)} FAILED ({why})" for why, names in failed.items()]
    return f"{head} " + " | ".join(parts)


def _command(argv: list[str]) -> str:
    keep, skip = [], False
    for a in argv:  # NOTE: --out is left out: it may hold a machine-specific path.
        if skip:
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        if not a.startswith("--out="):
            keep.append(a)
    return "python -m bench " + " ".join(shlex.quote(a) for a in keep)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    out_dir = Path(args.out or f"bench/results/{args.device}")
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    s = _settings(args, tmp)
    if args.threads:
        # NOTE: set before any kernel runs; the compile subprocesses read OMP_NUM_THREADS at start.
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    setup_torch(s.device)
    set_inprocess_caches(tmp)
    comps, notes = compilers.parse(args.backends, s.device)
    plan = _plan(args)
    meta: dict[str, Any] = {
        "date": env.now_utc(), "device": s.device, "profile": s.profile, "command": _command(argv),
        "machine": env.machine(s.device), "versions": env.versions(), "compilers": [c.name for c in comps],
        "settings": {"warmup": s.warmup, "reps": s.reps, "min_sample_s": s.min_sample_s, "cold": s.cold,
                     "cold_rows": "all" if s.cold_rows is None else list(s.cold_rows),
                     "cold_backends": "all" if s.cold_backends is None else list(s.cold_backends),
                     "tolerance": measure.TOLERANCE[s.device], "loss": "mean(out * fixed random tensor), no optimizer step",
                     "dtype": "float32" + (" (TF32 matmul/conv)" if s.device == "cuda" else "")},
        "notes": notes,
    }
    print(f"bench: {len(plan)} case/mode rows x {len(comps)} compilers ({', '.join(meta['compilers'])}) on {s.device}, "
          f"profile {s.profile}; results -> {out_dir}", flush=True)
    for n in notes:
        print(f"note: {n}", flush=True)
    results: dict[str, Any] = {"meta": meta, "rows": []}
    prior_wall = 0.0
    if args.resume:
        kept, old_meta = _resumed_rows(out_dir, s, plan)
        results["rows"] = kept
        prior_wall = float(old_meta.get("wall_s", 0.0))
        meta["resumed_from"] = old_meta.get("resumed_from", []) + [old_meta.get("date")] if kept else []
        done = {(r["case"], r["mode"]) for r in kept}
        plan = [p for p in plan if p not in done]
        print(f"--resume: kept {len(kept)} rows of the run of {old_meta.get('date')}; {len(plan)} to run", flush=True)
    t0 = time.perf_counter()
    rows = (run_case(case, mode, comps, s) for case, mode in plan) if args.no_isolate else isolate.run_rows(plan, comps, s)
    n_before = len(results["rows"])
    try:
        for i, row in enumerate(rows, 1):
            results["rows"].append(row)
            print(_progress(n_before + i, n_before + len(plan), t0, row), flush=True)
            meta["wall_s"] = prior_wall + time.perf_counter() - t0
            report.write_all(results, out_dir)  # NOTE: rewritten after each row, so a cut-off run leaves its numbers
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"done in {time.perf_counter() - t0:.0f} s: {out_dir}/results.md", flush=True)
    return results
