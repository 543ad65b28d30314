"""kiln: a readable compiler for PyTorch programs.

The public API lives here and in each stage's ``__init__`` (see DESIGN.md).
Stages are imported lazily, so ``import kiln`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute)
_LAZY = {
    # tracing
    "make_fx": ("kiln.tracing", "make_fx"),
    # capture
    "compile": ("kiln.capture", "compile"),
    "optimize": ("kiln.capture", "optimize"),
    "optimize_assert": ("kiln.capture", "optimize_assert"),
    "disable": ("kiln.capture", "disable"),
    "reset": ("kiln.capture", "reset"),
    "graph_break": ("kiln.capture", "graph_break"),
    "explain": ("kiln.capture", "explain"),
    "mark_dynamic": ("kiln.capture", "mark_dynamic"),
    "maybe_mark_dynamic": ("kiln.capture", "maybe_mark_dynamic"),
    "mark_static": ("kiln.capture", "mark_static"),
    # backends
    "list_backends": ("kiln.backends", "list_backends"),
    "register_backend": ("kiln.backends", "register_backend"),
    "lookup_backend": ("kiln.backends", "lookup_backend"),
}

_SUBMODULES = {
    "aot", "backends", "capture", "codegen", "compiled_autograd", "exc", "export",
    "functionalize", "ops", "testing", "tracing",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"kiln.{name}")
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)


__all__ = sorted(_LAZY) + ["__version__"]

# NOTE: compiled autograd must see the hooks of non-leaf tensors, which autograd nodes do
# not expose to Python: the wrappers that note them (kiln/compiled_autograd/hooks.py, a few
# attribute assignments; it imports torch and nothing of kiln's stages) go in now, before
# user code registers any.
from kiln.compiled_autograd import hooks as _ca_hooks  # noqa: E402,F401
