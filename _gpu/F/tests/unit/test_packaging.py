"""The package's set-up: pyproject, README's two commands, .ci/run, the demo."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_pyproject_declares_dependencies_and_test_extra():
    project = _pyproject()["project"]
    deps = " ".join(project["dependencies"])
    assert "torch>=2.5" in deps.replace(" ", "") and "numpy" in deps
    test_extra = " ".join(project["optional-dependencies"]["test"])
    for pkg in ("pytest", "pytest-xdist", "expecttest"):
        assert pkg in test_extra
    assert project["scripts"]["kiln-demo"] == "kiln.demo:main"


def test_readme_has_exactly_two_commands_demo_and_tests():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    demo, tests = commands
    for cmd in commands:
        assert "torch==2.13.0" in cmd  # NOTE: unpinned `pip install torch` pulls a multi-GB CUDA build
    assert demo.endswith("-m kiln.demo")
    assert "'.[test]'" in tests and "-m pytest" in tests


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.startswith("#!/usr/bin/env bash")
    assert "set -euo pipefail" in ci
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
    tests_cmd = _readme_commands()[1]
    for part in tests_cmd.split(" && "):
        assert part in ci, f"README step {part!r} not in .ci/run"
    assert '"$rc" -eq 5' in ci  # no tests collected must fail CI


def test_ci_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / ".ci" / "run")], check=True)


def test_no_machine_specific_paths_in_repo_text():
    bad = re.compile(r"/work/|/opt/wheels|/root/")
    files = [ROOT / "README.md", ROOT / "pyproject.toml", ROOT / ".ci" / "run"]
    files += sorted((ROOT / "kiln").rglob("*.py"))
    offenders = [str(p.relative_to(ROOT)) for p in files if bad.search(p.read_text(encoding="utf-8"))]
    assert not offenders, offenders


def test_demo_help():
    out = subprocess.run(
        [sys.executable, "-m", "kiln.demo", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "kiln.demo" in out.stdout


def test_demo_runs_and_traces_the_model():
    out = subprocess.run(
        [sys.executable, "-m", "kiln.demo", "--iters", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    text = out.stdout + out.stderr
    assert "Traceback" not in text, text[-3000:]
    assert "aten.addmm.default" in text and "graph vs eager" in text
    assert "sections:" in text
    assert out.returncode == 0, text[-3000:]


@pytest.mark.parametrize("name", ["make_fx", "list_backends", "lookup_backend", "register_backend"])
def test_public_api_names(name):
    import kiln

    assert callable(getattr(kiln, name))
