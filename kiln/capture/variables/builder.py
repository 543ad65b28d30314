"""Wrapping real Python values into variable trackers, installing guards."""
from __future__ import annotations

import functools
import types
import weakref
from typing import Any, Optional

import torch

from ..sources import Source
from .base import ConstantVT, VT, is_const_value
from .callables import BuiltinVT, ClassVT, PartialVT, WeakRefVT, PyModuleVT, TorchFnVT, UserFunctionVT, UserMethodVT
from .containers import DictVT, ListVT, TupleVT
from .objects import NNModuleVT, UserObjectVT


# NOTE: Python functions from these modules never call back into user code, so a
# call runs whole on fake tensors and becomes one graph node; other torch Python
# functions (decorators, checkpoint, ...) are inlined like user code.
_GRAPH_PY_MODULES = ("torch.nn.functional", "torch.functional", "torch._tensor", "torch.random",
                     "torch.nn.init", "torch._refs", "torch._decomp", "torch.fft", "torch.linalg",
                     "torch.special")


def _is_library_function(fn: Any) -> bool:
    mod = getattr(fn, "__module__", None) or ""
    root = mod.split(".")[0]
    if root not in ("torch", "math", "operator", "_operator", "functorch"):
        return False
    if isinstance(fn, types.FunctionType):
        return mod.startswith(_GRAPH_PY_MODULES)
    return True


def _is_torch_callable(v: Any) -> bool:
    from kiln.capture.api import graph_break

    if v is graph_break:
        return True
    from .torch_fns import is_special

    if is_special(v):
        return True
    if isinstance(v, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):
        return True
    if isinstance(v, (types.BuiltinFunctionType, types.BuiltinMethodType, types.FunctionType,
                      types.MethodDescriptorType, types.WrapperDescriptorType, types.MethodWrapperType)):
        return _is_library_function(v) or getattr(v, "__objclass__", None) is torch._C.TensorBase
    return False


def wrap(tx, value: Any, source: Optional[Source], guard: bool = True) -> VT:
    """A VT for ``value``; with ``guard``, record the guards that keep it valid."""
    out = tx.output
    g = out.guards if guard else None
    if source is None:
        source = out.objects.source(value)
    if isinstance(value, torch.Tensor):
        return out.add_tensor_input(value, source, from_module=isinstance(value, torch.nn.Parameter))
    if is_const_value(value):
        if g:
            g.const(source, value)
        return ConstantVT(value, source)
    if type(value) in (list, tuple, torch.Size):
        if g:
            g.length(source, value)
        items = [wrap(tx, v, source.item(i), guard) for i, v in enumerate(value)]
        if type(value) is list:
            return ListVT(items, source)
        return TupleVT(items, source, pytype=type(value))
    if type(value) is dict and all(is_const_value(k) for k in value):
        if g:
            g.dict_keys(source, value)
        return DictVT({k: wrap(tx, v, source.item(k), guard) for k, v in value.items()}, source)
    if g:
        _identity_guard(g, source, value)
    return _wrap_object(tx, value, source)


def _identity_guard(g, source: Source, value: Any) -> None:
    if isinstance(value, (torch.nn.Module, types.ModuleType, type, types.FunctionType,
                          types.BuiltinFunctionType)) or _is_torch_callable(value):
        g.ident(source, value)
    elif isinstance(value, types.MethodType):
        g.ident(source.attr("__func__"), value.__func__)
        g.ident(source.attr("__self__"), value.__self__)
    else:
        g.type_of(source, value)


def _wrap_object(tx, value: Any, source: Source) -> VT:
    from .builtins import BUILTINS

    if isinstance(value, torch.nn.Module):
        return NNModuleVT(value, source)
    if isinstance(value, types.ModuleType):
        return PyModuleVT(value, source)
    if _is_torch_callable(value):
        return TorchFnVT(value, source)
    if isinstance(value, type):
        return ClassVT(value, source)
    if isinstance(value, types.FunctionType):
        return UserFunctionVT(value, source)
    if isinstance(value, types.MethodType) and isinstance(value.__func__, types.FunctionType):
        return UserMethodVT(value.__func__, wrap(tx, value.__self__, source.attr("__self__"), guard=False))
    if isinstance(value, functools.partial):
        return PartialVT(wrap(tx, value.func, source.attr("func"), guard=False),
                         [wrap(tx, a, source.attr("args").item(i), guard=False) for i, a in enumerate(value.args)],
                         {k: wrap(tx, v, source.attr("keywords").item(k), guard=False)
                          for k, v in value.keywords.items()}, source)
    if type(value).__name__ in ("tuple_iterator", "list_iterator") and type(value).__module__ == "builtins":
        return _wrap_iterator(tx, value, source)
    if isinstance(value, weakref.ReferenceType):
        return WeakRefVT(value, source)
    if isinstance(value, types.BuiltinFunctionType) and value in BUILTINS:
        return BuiltinVT(value, source)
    if isinstance(value, types.BuiltinFunctionType):
        return BuiltinVT(value, source)
    if callable(value) and not hasattr(value, "__dict__"):
        return BuiltinVT(value, source)
    return UserObjectVT(value, source)


def _wrap_iterator(tx, it: Any, source: Source) -> VT:
    """A live tuple/list iterator (e.g. a loop's iterator passed to a resume function):
    its remaining items, read without advancing it."""
    from .containers import IteratorVT

    _, (seq,), pos = it.__reduce__()
    tx.output.guards.iterator(source, it, pos, len(seq))
    items_src = source.method_call("__reduce__").item(1).item(0)
    items = [wrap(tx, v, items_src.item(pos + i)) for i, v in enumerate(seq[pos:])]
    return IteratorVT(items)
