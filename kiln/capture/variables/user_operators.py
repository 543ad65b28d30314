"""Operators on instances of user classes: their Python dunder methods, inlined.

In: an operator (``operator.eq``, ``operator.add`` ...) and the VTs of an instance of a
user class (built in the region, or read from the caller) and the other operand.  Out:
the VT of ``a.__op__(b)`` (or ``b.__rop__(a)`` when that gives ``NotImplemented``), as
CPython's ``==`` / ``+`` do, or None when the class has no Python method for it (the
caller then tries the other operand, or breaks the graph).  ``==`` / ``!=`` of classes
that keep ``object``'s own comparisons are identity tests, and ``!=`` falls back to
inverting a Python ``__eq__``, as ``object.__ne__`` does.
"""
from __future__ import annotations

import inspect
import operator
import types
from typing import Callable, Optional

from .base import VT, ConstantVT

# NOTE: operator -> (method, reflected method), by function.
DUNDERS: dict[Callable, tuple[str, str]] = {
    operator.eq: ("__eq__", "__eq__"), operator.ne: ("__ne__", "__ne__"),
    operator.lt: ("__lt__", "__gt__"), operator.le: ("__le__", "__ge__"),
    operator.gt: ("__gt__", "__lt__"), operator.ge: ("__ge__", "__le__"),
    operator.add: ("__add__", "__radd__"), operator.sub: ("__sub__", "__rsub__"),
    operator.mul: ("__mul__", "__rmul__"), operator.truediv: ("__truediv__", "__rtruediv__"),
    operator.floordiv: ("__floordiv__", "__rfloordiv__"), operator.mod: ("__mod__", "__rmod__"),
    operator.matmul: ("__matmul__", "__rmatmul__"), operator.pow: ("__pow__", "__rpow__"),
    operator.and_: ("__and__", "__rand__"), operator.or_: ("__or__", "__ror__"),
    operator.xor: ("__xor__", "__rxor__"),
}


def _is_not_implemented(vt: VT) -> bool:
    return isinstance(vt, ConstantVT) and vt.value is NotImplemented


def user_binop(tx, obj: VT, cls: type, op: Callable, other: VT, reflected: bool) -> Optional[VT]:
    """``obj <op> other`` (``other <op> obj`` when ``reflected``) through ``cls``'s methods."""
    from ..operators import is_same

    names = DUNDERS.get(op)
    if names is None:
        return None
    name = names[1] if reflected else names[0]
    method = inspect.getattr_static(cls, name, None)
    if isinstance(method, types.FunctionType):
        out = tx.inline_function(method, [obj, other], {})
        return None if _is_not_implemented(out) else out
    if op is operator.ne and method is object.__ne__:
        eq = inspect.getattr_static(cls, "__eq__", None)
        if isinstance(eq, types.FunctionType):
            out = tx.inline_function(eq, [obj, other], {})
            if _is_not_implemented(out):
                return None
            return ConstantVT(not out.truthy(tx))
    if op in (operator.eq, operator.ne) and method in (object.__eq__, object.__ne__):
        same = is_same(obj, other)
        return ConstantVT(same if op is operator.eq else not same)
    return None


__all__ = ["DUNDERS", "user_binop"]
