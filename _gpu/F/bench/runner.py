"""Running one case under every compiler, interleaved, and collecting its row of results.

In: a case name, a mode, the compilers and the run's settings. Out: a dict (one row
of ``results.json``) with, per compiler: status (``ok``, ``mismatch``, ``failed``,
``skipped``) and reason, steady-state seconds per call (median, min, max, samples),
speedup over eager, first call in this process, cold/warm compile time from fresh
subprocesses, peak memory, graph/break counts and the match record.

Timing is interleaved: every repetition times each compiler once, in an order that
rotates, so drift on a noisy machine hits all compilers alike.
"""
from __future__ import annotations

import gc
import importlib
import math
import os
import statistics
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from bench import cases, measure
from bench.compilers import Compiler, DynamoCounters, graph_stats
from bench.worker import run_worker


@dataclass
class Settings:
    """What the command line chose."""

    device: str
    profile: str
    warmup: int
    reps: int
    min_sample_s: float  # each timed sample loops the call until it lasts at least this long
    max_inner: int
    cold: bool
    worker_timeout_s: float
    tmp: Path
    cold_rows: tuple[str, ...] | None = None  # None: every row gets compile-time subprocesses
    cold_backends: tuple[str, ...] | None = None  # None: every compiler (eager only on CPU)

    def wants_cold(self, case: str, mode: str) -> bool:
        return self.cold and (self.cold_rows is None or case in self.cold_rows or f"{case}/{mode}" in self.cold_rows)


# NOTE: set by the isolating child process (bench.isolate): called with (compiler, phase)
# before each risky step, so a hard crash (segfault, abort) can be pinned on a compiler.
STATUS_HOOK: Callable[[str, str], None] | None = None


def _status(comp: str, phase: str) -> None:
    if STATUS_HOOK is not None:
        STATUS_HOOK(comp, phase)


def _reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:240]


def _detail(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__))[-2000:]


class _Live:
    """A compiler that is still standing in this case: its step and its numbers."""

    def __init__(self, comp: Compiler, step: Callable[[], Any], entry: dict[str, Any]) -> None:
        self.comp, self.step, self.entry = comp, step, entry
        self.inner = 1
        self.samples: list[float] = []


def _fail(entry: dict[str, Any], e: BaseException, where: str) -> None:
    entry.update(status="failed", reason=f"{where}: {_reason(e)}", detail=_detail(e))


def _first_call(comp: Compiler, wl: cases.Workload, train: bool, ref: tuple[Any, Any], s: Settings,
                entry: dict[str, Any]) -> _Live | None:
    """Compile, run once (timed, compile included), check against eager; None when it failed."""
    _status(comp.name, "compile")
    if os.environ.get("KILN_BENCH_CRASH_TEST") == comp.name:  # NOTE: lets the tests check crash isolation
        os.abort()
    t0 = time.perf_counter()
    try:
        fn = comp.wrap(wl.model)
    except Exception as e:
        _fail(entry, e, "compile")
        return None
    wrap_s = time.perf_counter() - t0
    step = measure.make_step(fn, wl, train)
    _status(comp.name, "first call")
    try:
        # NOTE: warnings of the first call (e.g. "backend failed; running the graph eagerly")
        # are recorded: a compiler that silently fell back must not pass for a fast one.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if comp.kind == "torch":
                with DynamoCounters() as counters:
                    entry["first_call_s"] = measure.time_calls(step, 1, s.device)
                entry.update(counters.stats)
            else:
                entry["first_call_s"] = measure.time_calls(step, 1, s.device)
            out = step()
    except Exception as e:
        _fail(entry, e, "first call")
        return None
    entry["first_call_s"] += wrap_s
    msgs = list(dict.fromkeys(str(w.message).splitlines()[0][:240] for w in caught if _relevant(w)))
    if msgs:
        entry["warnings"] = msgs[:5]
    entry["match"] = measure.compare(out, measure.grads_of(wl) if train else None, ref[0], ref[1], s.device)
    entry["status"] = "ok" if entry["match"]["ok"] else "mismatch"
    if not entry["match"]["ok"]:
        m = entry["match"]
        entry["reason"] = f"differs from eager: out err {m['out_rel_err']:.2g}, grad err {m.get('grad_rel_err', 0):.2g} > tol {m['tol']:g}"
    _status(comp.name, "explain")
    t0 = time.perf_counter()
    try:
        entry.update(graph_stats(comp, wl.model, wl.inputs, train))
    except Exception as e:
        entry["graph_stats_error"] = _reason(e)
    entry["explain_s"] = time.perf_counter() - t0
    return _Live(comp, step, entry)


def _relevant(w: warnings.WarningMessage) -> bool:
    """Warnings from the compilers (kiln, torch._dynamo/_inductor), not from model code."""
    f = w.filename.replace("\\", "/")
    return "/kiln/" in f or "torch/_dynamo" in f or "torch/_inductor" in f


def _timed_loop(live: list[_Live], s: Settings) -> None:
    """Warm-up, calibrate the inner loop, then interleaved repetitions (rotating order)."""
    for _ in range(s.warmup):
        for lv in list(live):
            _guarded(lv, live, lambda: lv.step(), "warm-up")
    for lv in list(live):
        t = _guarded(lv, live, lambda: measure.time_calls(lv.step, 1, s.device), "calibration")
        if t is not None:
            lv.inner = max(1, min(s.max_inner, math.ceil(s.min_sample_s / max(t, 1e-9))))
    for r in range(s.reps):
        order = live[r % len(live):] + live[: r % len(live)] if live else []
        for lv in order:
            t = _guarded(lv, live, lambda: measure.time_calls(lv.step, lv.inner, s.device), "timing")
            if t is not None:
                lv.samples.append(t)


def _guarded(lv: _Live, live: list[_Live], fn: Callable[[], Any], where: str) -> Any:
    if lv not in live:
        return None
    _status(lv.comp.name, where)
    try:
        return fn()
    except Exception as e:
        _fail(lv.entry, e, where)
        live.remove(lv)
        return None


def _summarise(lv: _Live) -> None:
    xs = lv.samples
    if xs:
        lv.entry["time_s"] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs),
                              "samples": xs, "inner": lv.inner}


def _compile_times(case: str, mode: str, entry: dict[str, Any], comp: Compiler, s: Settings) -> None:
    """Cold (empty caches) and warm (same caches again) first-call times from fresh subprocesses."""
    cache_dir = Path(tempfile.mkdtemp(prefix=f"{case}-{mode}-{comp.name.replace(':', '_')}-", dir=s.tmp))
    # NOTE: eager compiles nothing; its one subprocess only gives the CPU memory baseline.
    for label in ("cold",) if comp.kind == "eager" else ("cold", "warm"):
        rec = run_worker(case, mode, comp.name, s.device, s.profile, cache_dir, s.worker_timeout_s)
        entry[f"{label}_worker"] = rec
        if "error" in rec:
            entry[f"{label}_error"] = rec["error"]
            return
        entry[f"{label}_s"] = rec["first_call_s"]
    if s.device == "cpu":
        last = entry["cold_worker" if comp.kind == "eager" else "warm_worker"]
        entry["peak_mem_mib"] = last.get("peak_rss_mib")


def _reset_compilers() -> None:
    """Drop compiled code between cases so memory and caches don't pile up."""
    torch._dynamo.reset()
    try:
        importlib.import_module("kiln").reset()
    except Exception:
        pass
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_case(case: str, mode: str, comps: list[Compiler], s: Settings,
             excluded: dict[str, str] | None = None) -> dict[str, Any]:
    """One row of the results: every compiler on one case and mode.

    ``excluded`` maps compiler names to a failure reason recorded without running them
    (a compiler that crashed the process on this row before).
    """
    excluded = excluded or {}
    row: dict[str, Any] = {"case": case, "mode": mode, "about": cases.CASES[case].about, "compilers": {}}
    t0 = time.perf_counter()
    train = mode == "train"
    _status("", "build")
    try:
        wl = cases.build(case, mode, s.profile, s.device)
    except cases.CaseSkipped as e:
        row.update(status="skipped", reason=str(e))
        return row
    except Exception as e:
        row.update(status="failed", reason=f"build: {_reason(e)}", detail=_detail(e))
        return row
    row["config"], row["status"], row["build_s"] = wl.config, "ok", time.perf_counter() - t0
    # NOTE: the eager reference is always computed, even when eager is not a selected column.
    ref_step = measure.make_step(wl.model, wl, train)
    ref = (ref_step(), measure.grads_of(wl) if train else None)
    phases = row["phase_s"] = {"build+reference": time.perf_counter() - t0}
    live: list[_Live] = []
    for comp in comps:
        entry: dict[str, Any] = {"status": "failed"}
        row["compilers"][comp.name] = entry
        if comp.name in excluded:
            entry["reason"] = excluded[comp.name]
            continue
        lv = _first_call(comp, wl, train, ref, s, entry)
        if lv is not None:
            live.append(lv)
    phases["first calls"] = time.perf_counter() - t0 - sum(phases.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NOTE: the first call's warnings are already recorded
        _timed_loop(live, s)
    phases["timing"] = time.perf_counter() - t0 - sum(phases.values())
    for lv in live:
        _summarise(lv)
        if s.device == "cuda":
            _status(lv.comp.name, "memory")
            try:
                lv.entry["peak_mem_mib"] = measure.cuda_peak_mib(lv.step)
            except Exception as e:
                lv.entry["peak_mem_error"] = _reason(e)
    _speedups(row)
    phases["memory"] = time.perf_counter() - t0 - sum(phases.values())
    del live, ref, ref_step, wl
    _reset_compilers()
    if s.wants_cold(case, mode):
        for comp in comps:
            entry = row["compilers"][comp.name]
            wanted = (comp.kind != "eager" or s.device == "cpu") and (
                s.cold_backends is None or comp.name in s.cold_backends)
            if wanted and entry["status"] in ("ok", "mismatch"):
                _status(comp.name, "compile-time subprocess")
                _compile_times(case, mode, entry, comp, s)
    phases["reset + compile subprocesses"] = time.perf_counter() - t0 - sum(phases.values())
    row["wall_s"] = time.perf_counter() - t0
    return row


def _speedups(row: dict[str, Any]) -> None:
    base = row["compilers"].get("eager", {}).get("time_s", {}).get("median")
    for entry in row["compilers"].values():
        med = entry.get("time_s", {}).get("median")
        if base and med:
            entry["speedup"] = base / med


def set_inprocess_caches(tmp: Path) -> None:
    """Point this process's compiler caches at a private folder (never the user's caches)."""
    from bench.worker import cache_env

    os.environ.update(cache_env(tmp / "main-process"))
