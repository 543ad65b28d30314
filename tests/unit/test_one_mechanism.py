"""One mechanism per job: one config patch, one default backend, no import hedges
between stages, no tracing <-> ops import cycle."""
from __future__ import annotations

import ast
import inspect
import pathlib
import subprocess
import sys

import pytest
import torch

import kiln
from kiln.backends.registry import DEFAULT_BACKEND

KILN = pathlib.Path(kiln.__file__).parent
README = KILN.parent / "README.md"


# ---------------------------------------------------------------------------- config.patch
@pytest.mark.parametrize("name", ["kiln.capture.config", "kiln.aot.config", "kiln.codegen.config"])
def test_every_config_patch_rejects_unknown_options(name):
    import importlib

    config = importlib.import_module(name)
    assert config.patch.__module__ == "kiln.settings"  # the one implementation
    with pytest.raises(AttributeError, match=r"has no option 'no_such_option'; options: \["):
        with config.patch(no_such_option=1):
            pass


def test_capture_config_patch_restores_and_decorates():
    from kiln.capture import config

    before = config.cache_size_limit
    with config.patch(cache_size_limit=before + 1):
        assert config.cache_size_limit == before + 1
        assert config.get_config_copy()["cache_size_limit"] == before + 1
    assert config.cache_size_limit == before

    @config.patch("automatic_dynamic_shapes", False)
    def inner():
        return config.automatic_dynamic_shapes

    assert inner() is False and config.automatic_dynamic_shapes is True


# ---------------------------------------------------------------------------- default backend
def test_compile_and_optimize_default_to_the_same_backend():
    for fn in (kiln.compile, kiln.optimize):
        assert inspect.signature(fn).parameters["backend"].default == DEFAULT_BACKEND
    assert kiln.backends.DEFAULT_BACKEND == DEFAULT_BACKEND
    kiln.lookup_backend(DEFAULT_BACKEND)  # a registered name
    assert f'`"{DEFAULT_BACKEND}"`' in README.read_text() and "DEFAULT_BACKEND" in README.read_text()


# ---------------------------------------------------------------------------- import hedges
def _hedged_kiln_imports(path: pathlib.Path) -> list[str]:
    """`try: import kiln.x ... except ImportError` blocks in one file."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        catches = [h for h in node.handlers if isinstance(h.type, ast.Name) and h.type.id == "ImportError"]
        if not catches:
            continue
        for stmt in ast.walk(ast.Module(body=node.body, type_ignores=[])):
            mod = stmt.module if isinstance(stmt, ast.ImportFrom) else None
            names = [a.name for a in stmt.names] if isinstance(stmt, ast.Import) else []
            if (mod or "").startswith("kiln") or any(n.startswith("kiln") for n in names):
                found.append(f"{path.relative_to(KILN)}:{stmt.lineno}")
    return found


def test_no_stage_hedges_its_import_of_another_stage():
    hedges = [h for p in sorted(KILN.rglob("*.py")) for h in _hedged_kiln_imports(p)]
    assert hedges == [], f"try/except ImportError around kiln imports: {hedges}"


def test_tracing_does_not_import_ops():
    for path in (KILN / "tracing").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert not any(m == "kiln.ops" or m.startswith("kiln.ops.") for m in mods), path.name
    code = ("import sys, torch, kiln.tracing as t; t.make_fx(lambda x: x.sin())(torch.ones(2)); "
            "print('kiln.ops' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_dce_asks_the_effect_registry_kiln_ops_registers_into():
    from kiln.ops import register_effectful_op, unregister_effectful_op
    from kiln.tracing import make_fx

    with torch.library._scoped_library("kilnfx_dce", "FRAGMENT") as lib:
        torch.library.define("kilnfx_dce::note", "(Tensor x) -> Tensor", lib=lib)
        lib.impl("note", lambda x: x.clone(), "CompositeExplicitAutograd")
        op = torch.ops.kilnfx_dce.note.default

        def f(x):
            op(x)  # result unused
            return x + 1

        def traced_ops():
            gm = make_fx(f)(torch.ones(2))
            return [n.target for n in gm.graph.nodes if n.op == "call_function"]

        assert op not in traced_ops()  # pure and unused: dropped
        register_effectful_op(op)
        try:
            assert op in traced_ops()  # effectful: kept
        finally:
            unregister_effectful_op(op)
