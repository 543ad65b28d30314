"""``copy.deepcopy`` inside the compiled region, as a table entry keyed by the function.

In: the VT of the value to copy (a constant, a container, a plain Python object read
from the caller or built in the region).  Out: a VT of the copy: containers are new
containers of copied items, a plain object becomes a ``NewObjectVT`` of the same class
whose attributes are copies of the original's ``__dict__`` (read, and guarded, through
its source), exactly what ``copy._reconstruct`` does for an object that keeps
``object``'s ``__reduce_ex__``.  Values shared inside the original stay shared in the
copy (the memo), and atomic values (constants, classes, functions) are not copied.

Anything else (a tensor, an object with its own ``__deepcopy__`` / ``__reduce_ex__`` /
``__getstate__`` / ``__setstate__``, a class in ``copyreg.dispatch_table``) breaks the
graph: its copy is user or C code capture does not model.
"""
from __future__ import annotations

import copy
import copyreg
import inspect
import types
from typing import Any

from .base import VT, ConstantVT, unsupported

_ATOMIC_TYPES = (type, types.FunctionType, types.BuiltinFunctionType, property, types.CodeType)


def _copyable_class(cls: type) -> bool:
    """Instances of ``cls`` are copied by object's own reduce: new instance + ``__dict__``."""
    from .new_objects import build_refusal

    if cls in copyreg.dispatch_table or cls in copy._deepcopy_dispatch or build_refusal(cls) is not None:
        return False
    defaults = {"__reduce_ex__": object.__reduce_ex__, "__reduce__": object.__reduce__,
                "__getstate__": getattr(object, "__getstate__", None)}
    for name, default in defaults.items():
        if inspect.getattr_static(cls, name, None) is not default:
            return False
    return all(inspect.getattr_static(cls, n, None) is None for n in ("__deepcopy__", "__setstate__"))


def _copy_object(tx, vt: VT, cls: type, state: dict, memo: dict) -> VT:
    from .new_objects import NewObjectVT

    if not _copyable_class(cls):
        unsupported(f"copy.deepcopy of a {cls.__qualname__}",
                    why="its copy runs code of its own (__deepcopy__, __reduce_ex__, __getstate__ ...) or C code")
    out = NewObjectVT(cls)
    memo[id(vt)] = out
    for k, v in state.items():
        out.attrs[k] = deep_copy(tx, v, memo)
    return out


def deep_copy(tx, vt: VT, memo: dict) -> VT:
    """The VT of ``copy.deepcopy`` of the value ``vt`` stands for (``memo``: id(VT) -> copy)."""
    from .containers import ListVT, TupleVT
    from .dicts import DictVT
    from .instance_dict import InstanceDictVT
    from .new_objects import NewObjectVT
    from .objects import UserObjectVT
    from .sets import SetVT
    from .tensor import TensorVT

    if id(vt) in memo:
        return memo[id(vt)]
    if isinstance(vt, ConstantVT) or isinstance(getattr(vt, "cls", getattr(vt, "fn", None)), _ATOMIC_TYPES):
        return vt
    if isinstance(vt, TensorVT):
        unsupported("copy.deepcopy of a tensor", why="a tensor's copy (a clone with its autograd state) is not modelled")
    if isinstance(vt, TupleVT) and type(vt) is TupleVT:
        items = [deep_copy(tx, i, memo) for i in vt.items]
        # NOTE: as copy._deepcopy_tuple: a tuple of atomic items is itself.
        out = vt if all(a is b for a, b in zip(items, vt.items)) else TupleVT(items, pytype=vt.pytype)
    elif isinstance(vt, ListVT):
        out = ListVT([])
        memo[id(vt)] = out
        out.items = [deep_copy(tx, i, memo) for i in vt.items]
    elif isinstance(vt, DictVT) and vt.pytype is dict and not vt.key_vts:
        out = DictVT({}, pytype=dict)
        memo[id(vt)] = out
        for k, v in vt.items.items():
            out.items[k] = deep_copy(tx, v, memo)
    elif isinstance(vt, SetVT) and all(i.is_const() for i in vt.items.values()):
        out = SetVT(list(vt.items.values()), pytype=vt.pytype)
    elif isinstance(vt, InstanceDictVT):
        out = DictVT({}, pytype=dict)
        memo[id(vt)] = out
        for k, v in vt._table().items():
            out.items[k] = deep_copy(tx, v, memo)
    elif isinstance(vt, NewObjectVT):
        out = _copy_object(tx, vt, vt.pytype, dict(vt.attrs), memo)
    elif isinstance(vt, UserObjectVT) and vt.source is not None and type(vt.obj).__module__ != "builtins":
        state = tx.wrap(vars(vt.obj), vt.source.attr("__dict__"))
        if not isinstance(state, DictVT):
            unsupported(f"copy.deepcopy of a {type(vt.obj).__qualname__} whose __dict__ capture cannot read")
        fields = {k: v for k, v in state.items.items()}
        fields.update(vt._pending())  # NOTE: attributes the trace already wrote (replayed after the graph)
        out = _copy_object(tx, vt, type(vt.obj), fields, memo)
    else:
        unsupported(f"copy.deepcopy of {vt}", why="capture models deepcopy of constants, containers and plain objects")
    memo[id(vt)] = out
    return out


def _deepcopy(tx, x: VT, memo: VT = None, *rest: VT) -> VT:
    if rest or not (memo is None or (isinstance(memo, ConstantVT) and memo.value is None)):
        unsupported("copy.deepcopy with a memo argument")
    return deep_copy(tx, x, {})


FUNCTIONS: dict[Any, Any] = {copy.deepcopy: _deepcopy}

__all__ = ["FUNCTIONS", "deep_copy"]
