"""functools and operator's callable factories, as tables keyed by the callable.

In: the VT arguments of ``functools.reduce(f, xs)``, ``functools.wraps(f)(g)``,
``operator.itemgetter(1)``...  Out: the VT of the result.

``functools.lru_cache`` / ``functools.cache`` wrappers read from the caller are inlined
through their ``__wrapped__`` function (builder.py wraps them so).
NOTE: that assumes what the cache itself assumes, a pure function: the compiled region
neither reads nor fills the cache (``cache_info()`` does not count its calls).
"""
from __future__ import annotations

import functools
import operator
from typing import Any, Callable, Optional

from .base import VT, ConstantVT, unsupported
from .containers import TupleVT, iterate

_NO_INITIAL = object()


def _reduce(tx, fn: VT, seq: VT, initial: VT = None) -> VT:
    items = iterate(tx, seq).unpack(tx)
    if initial is None:
        if not items:
            unsupported("reduce() of an empty sequence with no initial value", why="eager raises TypeError")
        acc, items = items[0], items[1:]
    else:
        acc = initial
    for v in items:
        acc = fn.call(tx, [acc, v], {})
    return acc


class WrapsVT(VT):
    """``functools.wraps(wrapped, ...)``: applied to a function made in the region, it
    copies the attributes ``update_wrapper`` copies and sets ``__wrapped__``."""

    def __init__(self, wrapped: VT):
        self.wrapped = wrapped

    def call(self, tx, args: list, kwargs: dict) -> VT:
        from .callables import NestedFunctionVT

        if len(args) != 1 or kwargs or not isinstance(args[0], NestedFunctionVT):
            unsupported("functools.wraps(...) applied to something other than a function made in the region")
        fn = args[0]
        for name in functools.WRAPPER_ASSIGNMENTS:
            try:
                fn.attrs[name] = self.wrapped.getattr(tx, name)
            except (AttributeError, KeyError):
                pass
        fn.attrs["__wrapped__"] = self.wrapped
        return fn


def _wraps(tx, wrapped: VT, assigned: VT = None, updated: VT = None) -> VT:
    if assigned is not None or updated is not None:
        unsupported("functools.wraps with assigned= or updated=")
    return WrapsVT(wrapped)


class OperatorGetterVT(VT):
    """``operator.itemgetter(*keys)``, ``attrgetter(*names)``, ``methodcaller(name, ...)``."""

    def __init__(self, cls: type, args: list, kwargs: dict):
        self.cls = cls
        self.args = args
        self.kwargs = kwargs

    def python_type(self) -> type:
        return self.cls

    def call(self, tx, args: list, kwargs: dict) -> VT:
        from ..handlers_basic import _getitem

        if len(args) != 1 or kwargs:
            unsupported(f"operator.{self.cls.__name__} object called with {len(args)} arguments")
        obj = args[0]
        if self.cls is operator.itemgetter:
            got = [_getitem(tx, obj, k) for k in self.args]
        elif self.cls is operator.attrgetter:
            got = [_attr_chain(tx, obj, n.const()) for n in self.args]
        else:
            return obj.call_method(tx, self.args[0].const(), list(self.args[1:]), dict(self.kwargs))
        return got[0] if len(got) == 1 else TupleVT(got)

    def reconstruct(self, cg) -> str:
        parts = [cg.expr(a) for a in self.args] + [f"{k}={cg.expr(v)}" for k, v in self.kwargs.items()]
        return f"{cg.obj(self.cls)}({', '.join(parts)})"


def _attr_chain(tx, obj: VT, dotted: str) -> VT:
    for name in dotted.split("."):
        obj = obj.getattr(tx, name)
    return obj


def _getter(cls: type) -> Callable:
    def run(tx, *args: VT, **kwargs: VT) -> VT:
        if not args or (cls is not operator.methodcaller and kwargs):
            unsupported(f"operator.{cls.__name__}() with these arguments", why="eager raises TypeError")
        return OperatorGetterVT(cls, list(args), kwargs)

    return run


FUNCTIONS: dict[Any, Callable] = {
    functools.reduce: _reduce,
    functools.wraps: _wraps,
}
TYPES: dict[Any, Callable] = {
    operator.itemgetter: _getter(operator.itemgetter),
    operator.attrgetter: _getter(operator.attrgetter),
    operator.methodcaller: _getter(operator.methodcaller),
}


def wrap_lru_cache(tx, value: Any, source) -> VT:
    """An ``lru_cache`` / ``cache`` wrapper read from the caller: its ``__wrapped__``."""
    from .callables import UserFunctionVT

    inner = getattr(value, "__wrapped__", None)
    import types

    if not isinstance(inner, types.FunctionType):
        unsupported("call of an lru_cache wrapper of a non-Python function")
    return UserFunctionVT(inner, source.attr("__wrapped__") if source is not None else None)


__all__ = ["FUNCTIONS", "TYPES", "WrapsVT", "OperatorGetterVT", "wrap_lru_cache"]
