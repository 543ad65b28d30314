"""``nn.Module`` subclasses built inside the compiled region (a ``NewObjectVT``).

In: a ``NewObjectVT`` whose class subclasses ``torch.nn.Module``.  Out: models of the
module machinery its inlined ``__init__`` and ``forward`` meet, keyed by the function
they replace: ``Module.__init__`` (the standard tables as new dicts and sets),
``Module.__setattr__`` (submodules go into ``_modules``, plain values into the instance
``__dict__``), ``Module.__delattr__``, attribute lookup through the tables, and calling
the module (no hooks can be registered on it yet: ``forward`` is inlined).

Parameters and buffers assigned to a module built in the region break the graph: their
registration (and the random initialisation of layers like ``nn.Linear``) is not modelled.
"""
from __future__ import annotations

import collections
import inspect
import types
from typing import Any, Callable, Optional

import torch

from .base import VT, ConstantVT, unsupported

# NOTE: the attributes torch.nn.Module.__init__ sets, in its order, and the container
# each starts as (dict tables, OrderedDict hook tables, one set, one None).
_TABLES = (
    ("_parameters", dict), ("_buffers", dict), ("_non_persistent_buffers_set", set),
    ("_backward_pre_hooks", collections.OrderedDict), ("_backward_hooks", collections.OrderedDict),
    ("_is_full_backward_hook", None),
    ("_forward_hooks", collections.OrderedDict), ("_forward_hooks_with_kwargs", collections.OrderedDict),
    ("_forward_hooks_always_called", collections.OrderedDict),
    ("_forward_pre_hooks", collections.OrderedDict), ("_forward_pre_hooks_with_kwargs", collections.OrderedDict),
    ("_state_dict_hooks", collections.OrderedDict), ("_state_dict_pre_hooks", collections.OrderedDict),
    ("_load_state_dict_pre_hooks", collections.OrderedDict),
    ("_load_state_dict_post_hooks", collections.OrderedDict),
    ("_modules", dict),
)
_HOOK_TABLES = ("_backward_pre_hooks", "_backward_hooks", "_forward_hooks", "_forward_pre_hooks")


def _empty(kind: Optional[type]) -> VT:
    from .dicts import DictVT
    from .sets import SetVT

    if kind is None:
        return ConstantVT(None)
    if kind is set:
        return SetVT([])
    return DictVT({}, pytype=kind)


def _module_init(tx, obj: VT, *args: VT, **kwargs: VT) -> VT:
    """``torch.nn.Module.__init__(self)`` on a module built in the region."""
    from .new_objects import NewObjectVT

    if not isinstance(obj, NewObjectVT):
        unsupported("nn.Module.__init__ on a module that already exists")
    if getattr(obj.pytype, "call_super_init", False):
        unsupported(f"{obj.pytype.__qualname__}.__init__ with call_super_init=True")
    if args or kwargs:
        unsupported(f"{obj.pytype.__qualname__}.__init__() with extra arguments to nn.Module.__init__",
                    why="eager raises TypeError")
    obj.store(tx, "training", ConstantVT(True))
    for name, kind in _TABLES:
        obj.store(tx, name, _empty(kind))
    return ConstantVT(None)


def _table(obj, name: str):
    return obj.attrs.get(name)


def module_table_attr(obj, name: str) -> Optional[VT]:
    """``Module.__getattr__``: the parameter, buffer or submodule called ``name``."""
    for table in ("_parameters", "_buffers", "_modules"):
        d = _table(obj, table)
        if d is not None and hasattr(d, "items") and isinstance(d.items, dict) and name in d.items:
            return d.items[name]
    return None


def is_module_getattr(fn: Any) -> bool:
    """``fn`` is ``torch.nn.Module.__getattr__`` itself (not a subclass's own)."""
    return fn is torch.nn.Module.__getattr__


def _is_module_vt(v: VT) -> bool:
    from .objects import NNModuleVT

    t = v.python_type() if not isinstance(v, ConstantVT) else type(v.value)
    return isinstance(v, NNModuleVT) or (isinstance(t, type) and issubclass(t, torch.nn.Module))


def _module_setattr(tx, obj: VT, name: VT, value: VT) -> VT:
    """``torch.nn.Module.__setattr__`` on a module built in the region."""
    from torch.nn.modules import module as module_mod

    from .new_objects import NewObjectVT
    from .tensor import TensorVT

    if not isinstance(obj, NewObjectVT):
        unsupported("nn.Module.__setattr__ on a module that already exists")
    n = name.const()
    if _table(obj, "_parameters") is None:
        unsupported(f"setting {n} before nn.Module.__init__() ran", why="eager raises AttributeError")
    if isinstance(value, TensorVT) and issubclass(value.python_type(), (torch.nn.Parameter, torch.nn.Buffer)):
        unsupported(f"assigning a parameter or buffer '{n}' to a module built in the compiled region",
                    why="registering parameters and buffers of new modules is not modelled")
    for table in ("_parameters", "_buffers"):
        if n in _table(obj, table).items:
            unsupported(f"assigning '{n}' of a module built in the compiled region (a {table[1:-1]})")
    modules = _table(obj, "_modules")
    if _is_module_vt(value) or n in modules.items:
        if module_mod._global_module_registration_hooks:
            unsupported("assigning a submodule while global module registration hooks are set")
        if not (_is_module_vt(value) or (isinstance(value, ConstantVT) and value.value is None)):
            unsupported(f"assigning a non-module to the child module '{n}'", why="eager raises TypeError")
        obj.attrs.pop(n, None)
        modules.setitem(tx, ConstantVT(n), value)
        return ConstantVT(None)
    obj.store(tx, n, value)
    return ConstantVT(None)


def _module_delattr(tx, obj: VT, name: VT) -> VT:
    from .new_objects import NewObjectVT

    if not isinstance(obj, NewObjectVT):
        unsupported("nn.Module.__delattr__ on a module that already exists")
    n = name.const()
    for table in ("_parameters", "_buffers", "_modules"):
        d = _table(obj, table)
        if d is not None and n in d.items:
            if table != "_modules":
                unsupported(f"deleting the {table[1:-1]} '{n}' of a module built in the compiled region")
            d._mutated(tx)
            del d.items[n]
            return ConstantVT(None)
    obj.delete(tx, n)
    return ConstantVT(None)


def call_module(tx, obj, args: list, kwargs: dict) -> VT:
    """``mod(*args)`` for a module built in the region: hooks are checked, ``forward`` inlined."""
    from .objects import _global_hooks

    call = inspect.getattr_static(obj.pytype, "__call__")
    if call is not torch.nn.Module.__call__:
        if isinstance(call, types.FunctionType):
            return tx.inline_function(call, [obj] + list(args), kwargs)
        unsupported(f"call to {obj.pytype.__qualname__} (a __call__ that is not Python code)")
    if _global_hooks() or any(_table(obj, t) is not None and _table(obj, t).items for t in _HOOK_TABLES):
        unsupported(f"call to module {obj.pytype.__qualname__} with hooks")
    return obj.getattr(tx, "forward").call(tx, list(args), kwargs)


MODULE_FUNCTIONS: dict[Any, Callable] = {
    torch.nn.Module.__delattr__: _module_delattr,
}


def _module_method(fn: Any) -> bool:
    code = getattr(fn, "__code__", None)
    return code is not None and code.co_filename == torch.nn.modules.module.__file__


def unpatched(fn: Any) -> Any:
    """``fn`` itself, or, where ``fn`` is a wrapper some library installed around one of
    ``nn.Module``'s own methods, the method it wraps.

    NOTE: once imported, PyTorch's own capture wraps ``Module.__init__`` (and the
    ``__setattr__`` of classes it compiled) to tag modules for its own bookkeeping; that
    tag is no part of the program, so such a wrapper stands for the function it wraps.
    It is found by what it wraps (a function of torch/nn/modules/module.py, as
    ``__wrapped__`` or in a closure cell), not by who installed it."""
    if _module_method(fn) or not callable(fn):
        return fn
    wrapped = getattr(fn, "__wrapped__", None)
    if _module_method(wrapped):
        return wrapped
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            inner = cell.cell_contents
        except ValueError:   # NOTE: an empty cell
            continue
        if _module_method(inner):
            return inner
    return fn
    wrapped = getattr(fn, "__wrapped__", None)
    if wrapped is not None:
        return wrapped
    cells = dict(zip(fn.__code__.co_freevars, fn.__closure__ or ()))
    for name in ("init", "setstate"):
        if name in cells:
            return cells[name].cell_contents
    return fn


def register(inits: dict, setattrs: dict) -> None:
    """Add nn.Module's models to new_objects' tables."""
    inits[unpatched(torch.nn.Module.__init__)] = _module_init
    setattrs[unpatched(torch.nn.Module.__setattr__)] = _module_setattr


__all__ = ["call_module", "module_table_attr", "register", "MODULE_FUNCTIONS"]
