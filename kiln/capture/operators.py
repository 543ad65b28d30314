"""Binary, comparison and identity operations on variable trackers."""
from __future__ import annotations

import dis
import operator
from typing import Callable

from .variables.base import VT, ConstantVT, const_vt, unsupported
from .variables.containers import DictVT, ListVT, SequenceVT, TupleVT
from .variables.symbolic import SymNodeVT
from .variables.tensor import TensorVT


def _int_valued(op: Callable, a: VT, b: VT) -> bool:
    """Size arithmetic that stays an integer (symbolic floats are specialised instead:
    the graph stays free of SymFloat expressions backends cannot rebuild)."""
    if op in (operator.truediv, operator.itruediv, operator.pow, operator.ipow):
        return False
    return all(isinstance(v, SymNodeVT) and v.python_type() is int
               or (isinstance(v, ConstantVT) and type(v.value) in (int, bool)) for v in (a, b))


def _on_float_input(a: VT, b: VT) -> bool:
    """Arithmetic or a comparison on an unspecialized float input (a SymFloat graph input
    or an expression of one) and a number: a graph node, so the float stays dynamic."""
    return any(isinstance(v, SymNodeVT) and v.python_type() is float for v in (a, b)) and all(
        isinstance(v, SymNodeVT) or (isinstance(v, ConstantVT) and type(v.value) in (int, float, bool))
        for v in (a, b))


def _numpy_int_as_python(v: VT) -> VT:
    """A NumPy integer scalar next to a symbolic int, as the Python int (so ``n % np.int64(8)``
    stays symbolic instead of specialising ``n``).

    NOTE: the result is a Python int where eager gives an np.int64 (PyTorch's capture too:
    it passes such scalars as 0-d tensors and reads results back with ``.item()``)."""
    from .variables.base import is_numpy_scalar

    if isinstance(v, ConstantVT) and is_numpy_scalar(v.value):
        import numpy as np

        if isinstance(v.value, np.integer):
            return ConstantVT(int(v.value))
    return v


def _on_data(a: VT, b: VT) -> bool:
    """Arithmetic or a comparison on a value read from tensor data (an unbacked SymFloat
    too: it has no value to specialise on) and a number: a graph node."""
    from .variables.symbolic import has_unbacked

    return any(isinstance(v, SymNodeVT) and has_unbacked(v.sym) for v in (a, b)) and all(
        isinstance(v, SymNodeVT) or (isinstance(v, ConstantVT) and type(v.value) in (int, float, bool))
        for v in (a, b))


_SYMBOLS: dict[str, Callable] = {
    "+": operator.add, "&": operator.and_, "//": operator.floordiv, "<<": operator.lshift,
    "@": operator.matmul, "*": operator.mul, "%": operator.mod, "|": operator.or_,
    "**": operator.pow, ">>": operator.rshift, "-": operator.sub, "/": operator.truediv,
    "^": operator.xor,
    "+=": operator.iadd, "&=": operator.iand, "//=": operator.ifloordiv, "<<=": operator.ilshift,
    "@=": operator.imatmul, "*=": operator.imul, "%=": operator.imod, "|=": operator.ior,
    "**=": operator.ipow, ">>=": operator.irshift, "-=": operator.isub, "/=": operator.itruediv,
    "^=": operator.ixor,
}
# BINARY_OP's argument indexes dis._nb_ops (same table on 3.11 and 3.12).
NB_OPS = [_SYMBOLS[sym] for _, sym in dis._nb_ops]

COMPARE = {"<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
           ">": operator.gt, ">=": operator.ge}

_INPLACE_TO_PLAIN = {operator.iadd: operator.add, operator.imul: operator.mul, operator.isub: operator.sub}


def _sequence_op(tx, op: Callable, a: VT, b: VT) -> VT:
    # NOTE: containers with operators of their own (sets, dict views, dicts) answer first.
    for x, y, name in ((a, b, "binop"), (b, a, "rbinop")):
        method = getattr(x, name, None)
        if method is not None:
            out = method(tx, op, y)
            if out is not None:
                return out
    if op in COMPARE.values() and a.is_const() and b.is_const():
        return ConstantVT(op(a.const(), b.const()))
    if op is operator.iadd and isinstance(a, ListVT) and isinstance(b, SequenceVT):
        a.mutate(tx, "extend", [b], {})
        return a
    plain = _INPLACE_TO_PLAIN.get(op, op)
    if plain is operator.add and isinstance(a, SequenceVT) and isinstance(b, SequenceVT):
        if isinstance(a, ListVT) != isinstance(b, ListVT) or type(a) is not type(b):
            unsupported("adding a list and a tuple", why="eager raises TypeError")
        if isinstance(a, ListVT):
            return ListVT(a.items + b.items)
        import torch

        # NOTE: torch.Size + tuple is a torch.Size; any other tuple sum is a plain tuple.
        return TupleVT(a.items + b.items, pytype=torch.Size if a.pytype is torch.Size else None)
    if plain is operator.mul and isinstance(b, SequenceVT) and not isinstance(a, SequenceVT) and a.is_const():
        a, b = b, a
    if plain is operator.mul and isinstance(a, SequenceVT) and (b.is_const() or isinstance(b, SymNodeVT)):
        items = a.items * b.const()
        if op is operator.imul and isinstance(a, ListVT):
            a.mutate(tx, "__setitem__", [ConstantVT(slice(None)), ListVT(items)], {})
            return a
        return ListVT(items) if isinstance(a, ListVT) else TupleVT(items)
    if plain is operator.eq and a.is_const() and b.is_const():
        return ConstantVT(a.const() == b.const())
    unsupported(f"operator {op.__name__} on {a} and {b}")


_INPLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
            operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
            operator.imod: operator.mod, operator.ipow: operator.pow, operator.imatmul: operator.matmul,
            operator.iand: operator.and_, operator.ior: operator.or_, operator.ixor: operator.xor,
            operator.ilshift: operator.lshift, operator.irshift: operator.rshift}


def _python_scalar(v: VT) -> VT:
    """A NumPy int or float scalar next to a tensor in an operator, as the Python number.

    NOTE: torch's operators treat those exactly as Python numbers (same result dtype);
    np.bool_ differs (it promotes an int tensor to float), so it stays and breaks."""
    from .variables.base import is_numpy_scalar

    if isinstance(v, ConstantVT) and is_numpy_scalar(v.value):
        import numpy as np

        if isinstance(v.value, (np.integer, np.floating)):
            return ConstantVT(v.value.item())
    return v


def binary_op(tx, op: Callable, a: VT, b: VT) -> VT:
    from .variables.numpy_vt import NdarrayVT, numpy_op

    if isinstance(a, NdarrayVT) or isinstance(b, NdarrayVT):
        return numpy_op(tx, op, [a, b])
    if isinstance(a, TensorVT) or isinstance(b, TensorVT):
        a, b = _python_scalar(a), _python_scalar(b)
        if not isinstance(a, TensorVT) and op in _INPLACE:
            op = _INPLACE[op]  # NOTE: `n += t` with a Python number rebinds n: a plain op
        return tx.output.call_graph("call_function", op, [a, b], {})
    if isinstance(a, SymNodeVT) or isinstance(b, SymNodeVT):
        a, b = _numpy_int_as_python(a), _numpy_int_as_python(b)
    if (isinstance(a, SymNodeVT) or isinstance(b, SymNodeVT)) and (_int_valued(op, a, b) or _on_data(a, b)
                                                                 or _on_float_input(a, b)):
        # NOTE: size arithmetic stays symbolic; comparisons are decided (and guarded) by the ShapeEnv.
        return tx.output.call_graph("call_function", _INPLACE.get(op, op), [a, b], {})
    if isinstance(a, SymNodeVT) or isinstance(b, SymNodeVT):
        a, b = (ConstantVT(v.const()) if isinstance(v, SymNodeVT) else v for v in (a, b))
        return binary_op(tx, op, a, b)
    if isinstance(a, ConstantVT) and isinstance(b, ConstantVT):
        try:
            return const_vt(op(a.value, b.value))
        except Exception as e:  # noqa: BLE001 - the user's own error: let eager raise it
            unsupported(f"{op.__name__} raised {type(e).__name__}", why=str(e))
    return _sequence_op(tx, op, a, b)


def underlying(v: VT):
    for attr in ("mod", "obj", "fn", "cls"):
        if hasattr(v, attr):
            return getattr(v, attr)
    return v


def is_same(a: VT, b: VT) -> bool:
    if a is b:
        return True
    if isinstance(a, ConstantVT) and isinstance(b, ConstantVT):
        return a.value is b.value
    if isinstance(a, ConstantVT) or isinstance(b, ConstantVT):
        c = a if isinstance(a, ConstantVT) else b
        other = b if c is a else a
        # NOTE: a non-constant VT never stands for a Python constant object.
        return False
    if isinstance(a, TensorVT) and isinstance(b, TensorVT):
        return a.fake is b.fake
    if isinstance(a, SymNodeVT) or isinstance(b, SymNodeVT):
        unsupported("identity test on a symbolic size")
    if getattr(a, "built_in_region", False) or getattr(b, "built_in_region", False):
        return False  # NOTE: an object built in the region is only itself (``a is b`` above)
    ua, ub = underlying(a), underlying(b)
    if ua is a or ub is b:
        if type(a) is not type(b):
            return False
        unsupported(f"identity test between {a} and {b}")
    return ua is ub


def contains(tx, item: VT, seq: VT) -> bool:
    method = getattr(seq, "contains", None)
    if method is not None:
        return method(tx, item)
    if seq.is_const() and item.is_const():
        return item.const() in seq.const()
    return seq.call_method(tx, "__contains__", [item], {}).truthy(tx)


def unary_op(tx, op: Callable, a: VT) -> VT:
    from .variables.numpy_vt import NdarrayVT, numpy_op

    if isinstance(a, NdarrayVT):
        return numpy_op(tx, op, [a])
    if isinstance(a, (TensorVT, SymNodeVT)):
        return tx.output.call_graph("call_function", op, [a], {})
    if a.is_const():
        return const_vt(op(a.const()))
    unsupported(f"unary {op.__name__} on {a}")
