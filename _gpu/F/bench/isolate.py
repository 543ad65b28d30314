"""Running the rows in a child process, so a hard crash costs one compiler on one row, not the run.

In (parent, :func:`run_rows`): the plan (case, mode pairs), the compilers and the
settings. Out: the rows, yielded as they finish. The child (``python -m
bench.isolate SPEC``) runs rows one after another in one process (no start-up cost
per row), appends each finished row to a JSON-lines file, and keeps a status file
saying which compiler and phase it is in. If the child dies (segfault, abort, OOM
kill), the parent records that compiler as failed on that row with the reason, and
starts a new child for the rest, running the crashed row again without it.
"""
from __future__ import annotations

import dataclasses
import faulthandler
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

from bench.compilers import Compiler

_ROOT = Path(__file__).resolve().parent.parent


def run_rows(plan: list[tuple[str, str]], comps: list[Compiler], settings: Any) -> Iterator[dict[str, Any]]:
    """Yield one finished row per (case, mode) in ``plan``, crash-isolated."""
    tmp = Path(settings.tmp)
    remaining = list(plan)
    excluded: dict[str, dict[str, str]] = {}
    attempt = 0
    while remaining:
        attempt += 1
        rows_file, status_file, log_file = (tmp / f"child{attempt}.{x}" for x in ("jsonl", "status", "log"))
        spec = {"plan": remaining, "compilers": [dataclasses.asdict(c) for c in comps],
                "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(settings).items()},
                "excluded": excluded, "rows_file": str(rows_file), "status_file": str(status_file)}
        spec_file = tmp / f"child{attempt}.json"
        spec_file.write_text(json.dumps(spec))
        env = dict(os.environ, PYTHONPATH=str(_ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
        with open(log_file, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "bench.isolate", str(spec_file)], cwd=_ROOT, env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
            done = 0
            while True:
                try:
                    proc.wait(timeout=0.5)
                    finished = True
                except subprocess.TimeoutExpired:
                    finished = False
                for row in _read_rows(rows_file)[done:]:
                    done += 1
                    remaining.remove((row["case"], row["mode"]))
                    yield row
                if finished:
                    break
        if proc.returncode == 0 or not remaining:
            if remaining:  # NOTE: exited cleanly yet left rows: should not happen; never loop forever
                raise RuntimeError(f"benchmark child exited early; log: {_tail(log_file)}")
            return
        yield from _after_crash(remaining, excluded, status_file, log_file, proc.returncode)


def _after_crash(remaining: list[tuple[str, str]], excluded: dict[str, dict[str, str]], status_file: Path,
                 log_file: Path, rc: int) -> Iterator[dict[str, Any]]:
    """Record the crash against the compiler in flight; drop the row if the crash was outside any compiler."""
    status = json.loads(status_file.read_text()) if status_file.exists() else {}
    how = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
    case, mode = status.get("case"), status.get("mode")
    why = f"process crashed ({how}) during {status.get('phase', '?')}; last output: {_tail(log_file)}"
    key = f"{case}/{mode}"
    comp = status.get("compiler")
    if (case, mode) in remaining and comp and comp not in excluded.get(key, {}):
        excluded.setdefault(key, {})[comp] = why
        return
    row_key = (case, mode) if (case, mode) in remaining else remaining[0]
    remaining.remove(row_key)
    yield {"case": row_key[0], "mode": row_key[1], "status": "failed", "reason": why, "compilers": {}}


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip().endswith("}")]


def _tail(path: Path) -> str:
    """The crash in a line: faulthandler's "Fatal Python error" and innermost frame, else the last lines."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "none"
    fatal = next((i for i, ln in enumerate(lines) if ln.startswith("Fatal Python error")), None)
    if fatal is not None:
        frames = [ln for ln in lines[fatal:] if ln.startswith("File ")]
        return " / ".join([lines[fatal]] + frames[:2])[:400]
    return " / ".join(lines[-3:])[-400:] or "none"


def _child(spec_file: str) -> None:
    from bench import runner, setup_torch

    faulthandler.enable()  # NOTE: a segfault then leaves the Python stack in the log
    spec = json.loads(Path(spec_file).read_text())
    st = spec["settings"]
    settings = runner.Settings(**{**st, "tmp": Path(st["tmp"]),
                                  "cold_rows": tuple(st["cold_rows"]) if st["cold_rows"] is not None else None,
                                  "cold_backends": tuple(st["cold_backends"]) if st["cold_backends"] is not None else None})
    setup_torch(settings.device)
    runner.set_inprocess_caches(settings.tmp)
    comps = [Compiler(**c) for c in spec["compilers"]]
    status_path = Path(spec["status_file"])
    for case, mode in spec["plan"]:
        def hook(comp: str, phase: str, case: str = case, mode: str = mode) -> None:
            status_path.write_text(json.dumps({"case": case, "mode": mode, "compiler": comp, "phase": phase}))

        runner.STATUS_HOOK = hook
        row = runner.run_case(case, mode, comps, settings, spec["excluded"].get(f"{case}/{mode}"))
        with open(spec["rows_file"], "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
    sys.stdout.flush()
    os._exit(0)  # NOTE: skip teardown of compile pools and CUDA


if __name__ == "__main__":
    _child(sys.argv[1])
