"""Smoke test of the benchmark harness: the tiny case, eager only, no compile subprocesses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run_bench(out: Path, *extra: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bench", "--cases", "tiny", "--no-cold", "--reps", "2", "--warmup", "0",
           "--min-sample-ms", "1", "--out", str(out), *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env_extra or {}))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_tiny_eager_writes_json_and_markdown(tmp_path: Path) -> None:
    p = _run_bench(tmp_path, "--backends", "eager")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "tiny/infer" in p.stdout
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["compilers"] == ["eager"]
    assert data["meta"]["versions"]["torch"]
    row = data["rows"][0]
    assert (row["case"], row["mode"], row["status"]) == ("tiny", "infer", "ok")
    entry = row["compilers"]["eager"]
    assert entry["status"] == "ok" and entry["match"]["ok"]
    assert 0 < entry["time_s"]["min"] <= entry["time_s"]["median"] <= entry["time_s"]["max"]
    md = (tmp_path / "results.md").read_text()
    assert "| tiny | infer |" in md and "Per-call overhead" in md


def test_failing_and_crashing_compilers_are_shown_not_dropped(tmp_path: Path) -> None:
    # a kiln backend that cannot exist fails with a reason; a compiler that kills the process
    # (test hook: abort() before compiling) fails too, and the rest of the row still runs
    p = _run_bench(tmp_path, "--backends", "eager,kiln:no_such_backend,torch.compile:crash_test",
                   env_extra={"KILN_BENCH_CRASH_TEST": "torch.compile:crash_test"})
    assert p.returncode == 0, p.stderr[-2000:]
    comps = json.loads((tmp_path / "results.json").read_text())["rows"][0]["compilers"]
    assert comps["eager"]["status"] == "ok"
    assert comps["kiln:no_such_backend"]["status"] == "failed" and comps["kiln:no_such_backend"]["reason"]
    assert comps["torch.compile:crash_test"]["status"] == "failed"
    assert "crashed" in comps["torch.compile:crash_test"]["reason"]
    md = (tmp_path / "results.md").read_text()
    assert "kiln:no_such_backend" in md and "torch.compile:crash_test" in md


def test_resume_keeps_finished_rows_and_runs_the_rest(tmp_path: Path) -> None:
    """--resume: a run cut off after some rows is finished by running only the missing rows."""
    p = _run_bench(tmp_path, "--backends", "eager", "--quick")
    assert p.returncode == 0, p.stderr[-2000:]
    first = json.loads((tmp_path / "results.json").read_text())
    kept = first["rows"][0]
    p = subprocess.run([sys.executable, "-m", "bench", "--cases", "tiny,softmax_ln", "--modes", "infer", "--no-cold",
                        "--reps", "2", "--warmup", "0", "--min-sample-ms", "1", "--backends", "eager", "--quick",
                        "--out", str(tmp_path), "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "kept 1 rows" in p.stdout and "1 to run" in p.stdout
    data = json.loads((tmp_path / "results.json").read_text())
    assert [(r["case"], r["mode"]) for r in data["rows"]] == [("tiny", "infer"), ("softmax_ln", "infer")]
    assert data["rows"][0] == kept
    assert data["meta"]["resumed_from"] == [first["meta"]["date"]]
    assert "resumed (`--resume`)" in (tmp_path / "results.md").read_text()


def test_mode_columns_parse() -> None:
    """``<column>@<mode>``: the same compiler with a mode, as a column of its own."""
    sys.path.insert(0, str(ROOT))
    from bench.compilers import by_name, parse

    cols, _ = parse("eager,kiln:inductor,kiln:inductor@reduce-overhead,torch.compile@max-autotune", "cuda")
    assert [(c.name, c.kind, c.backend, c.mode) for c in cols] == [
        ("eager", "eager", None, None), ("kiln:inductor", "kiln", "inductor", None),
        ("kiln:inductor@reduce-overhead", "kiln", "inductor", "reduce-overhead"),
        ("torch.compile@max-autotune", "torch", "inductor", "max-autotune")]
    assert by_name("kiln:inductor@reduce-overhead", "cuda").mode == "reduce-overhead"
