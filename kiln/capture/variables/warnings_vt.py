"""``warnings.catch_warnings(...)`` built in the compiled region.

As in PyTorch's capture, the context manager has no effect on the graph: the graph's
ops issue no Python warnings while it is traced, so entering and leaving it changes
nothing there, and its writes to the ``warnings`` module (``filters``, ``showwarning``)
are undone by its own ``__exit__``.  With ``record=True`` it yields a new, empty list.
The object itself is rebuilt after the graph (``warnings.catch_warnings(**kwargs)``)
where a live value reaches it.
"""
from __future__ import annotations

import warnings

from .base import VT, ConstantVT, unsupported
from .objects import NullContextVT


class CatchWarningsVT(NullContextVT):
    def __init__(self, kwargs: dict):
        from .containers import ListVT

        self.kwargs = kwargs
        super().__init__(ListVT([]) if kwargs.get("record") else ConstantVT(None))

    def python_type(self) -> type:
        return warnings.catch_warnings

    def reconstruct(self, cg) -> str:
        args = ", ".join(f"{k}={cg.const_expr(v)}" for k, v in self.kwargs.items())
        return f"{cg.obj(warnings.catch_warnings)}({args})"

    def __repr__(self) -> str:
        return f"CatchWarningsVT({self.kwargs})"


def build_catch_warnings(tx, *args: VT, **kwargs: VT) -> VT:
    if args or not all(v.is_const() for v in kwargs.values()) \
            or kwargs.get("module", ConstantVT(None)).const() is not None:
        unsupported("warnings.catch_warnings() with a module or non-constant arguments")
    kw = {k: v.const() for k, v in kwargs.items()}
    try:
        warnings.catch_warnings(**kw)  # NOTE: eager's TypeError for unknown keywords
    except TypeError as e:
        unsupported(f"warnings.catch_warnings(): {e}", why="eager raises TypeError")
    return CatchWarningsVT(kw)


TYPES = {warnings.catch_warnings: build_catch_warnings}
