"""One ``patch`` for every stage's config module.

A stage's config is a module of plain attributes (bool, int, float, str, None).
``make_patch(__name__)`` gives it ``patch(...)``: a context manager and decorator that
sets options for its duration and rejects unknown names with the list of known ones.

    patch = make_patch(__name__)            # at the bottom of a config module
    with config.patch(cache_size_limit=2): ...
    @config.patch("debug_assert", True)
    def test(): ...
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable


def options_of(module_name: str) -> dict[str, Any]:
    """The module's option names and current values (public, plain-typed attributes)."""
    mod = sys.modules[module_name]
    return {k: v for k, v in vars(mod).items()
            if not k.startswith("_") and (v is None or isinstance(v, (bool, int, float, str, tuple)))}


class _Patch(contextlib.ContextDecorator):
    def __init__(self, module_name: str, known: frozenset, changes: dict):
        self.module_name = module_name
        self.known = known
        self.changes = changes
        self.saved: list = []

    def __enter__(self):
        mod = sys.modules[self.module_name]
        unknown = sorted(set(self.changes) - self.known)
        if unknown:
            raise AttributeError(f"{self.module_name} has no option {', '.join(map(repr, unknown))}; "
                                 f"options: {sorted(self.known)}")
        for k, v in self.changes.items():
            self.saved.append((k, getattr(mod, k)))
            setattr(mod, k, v)
        return self

    def __exit__(self, *exc: Any):
        mod = sys.modules[self.module_name]
        for k, v in reversed(self.saved):
            setattr(mod, k, v)
        self.saved.clear()
        return False


def make_patch(module_name: str) -> Callable[..., _Patch]:
    """``patch`` for the config module ``module_name`` (call at the module's end)."""
    known = frozenset(options_of(module_name))

    def patch(arg: Any = None, value: Any = None, **kwargs: Any) -> _Patch:
        """Temporarily change options: ``patch(x=1)``, ``patch("x", 1)`` or ``patch({"x": 1})``."""
        changes = dict(kwargs)
        if isinstance(arg, dict):
            changes.update(arg)
        elif isinstance(arg, str):
            changes[arg] = value
        return _Patch(module_name, known, changes)

    return patch


__all__ = ["make_patch", "options_of"]
