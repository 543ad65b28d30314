"""nn.Modules, user objects, grad-mode context managers and hook handles."""
from __future__ import annotations

import collections
import contextlib
import inspect
import os
import types
from typing import Any, Optional

import torch
from kiln.exc import Unsupported

from ..sources import DictItemSource, Source
from .base import VT, ConstantVT, DeletedVT, unsupported

_NO_ATTR = object()
from .callables import ClassVT, UserFunctionVT, UserMethodVT


def _class_attr(tx, obj_vt: VT, cls: type, name: str) -> Optional[VT]:
    """Attributes found on the class: methods bind, properties run inline."""
    try:
        attr = inspect.getattr_static(cls, name)
    except AttributeError:
        return None
    if isinstance(attr, types.FunctionType):
        return UserMethodVT(attr, obj_vt)
    if isinstance(attr, staticmethod):
        return tx.wrap_static(attr.__func__)
    if isinstance(attr, classmethod):
        return UserMethodVT(attr.__func__, ClassVT(cls))
    if isinstance(attr, property) and isinstance(attr.fget, types.FunctionType):
        return tx.inline_function(attr.fget, [obj_vt], {})
    return None


class PendingAttrs:
    """Attribute writes seen during capture (replayed after the graph)."""

    def _pending(self) -> dict:
        if not hasattr(self, "_attrs"):
            self._attrs = {}
        return self._attrs

    def setattr(self, tx, name: str, value: VT) -> None:
        if self.source is None:
            unsupported(f"setting attribute '{name}' on an object created in the compiled region")
        self._pending()[name] = value
        tx.output.side_effects.track_attr(self, name, value)

    def delattr(self, tx, name: str) -> None:
        """``del obj.name`` of an instance attribute of an object from outside the region
        (``object.__delattr__``; replayed after the graph, like a write)."""
        obj = getattr(self, "obj", None)
        cls = type(obj)
        if self.source is None or not isinstance(self, UserObjectVT):
            unsupported(f"deleting attribute '{name}' of {self}")
        if cls.__delattr__ is not object.__delattr__ or _custom_getattr(cls) \
                or inspect.getattr_static(cls, name, _NO_ATTR) is not _NO_ATTR:
            unsupported(f"deleting attribute '{name}' of a {cls.__name__}",
                        why="the class defines it, or customizes attribute access")
        pend = self._pending()
        if name in pend:
            present = not isinstance(pend[name], DeletedVT)
        else:
            present = name in getattr(obj, "__dict__", {})
            tx.output.guards.attr_presence(self.source, name, present)
        if not present:
            unsupported(f"deleting the missing attribute {name}", why="eager raises AttributeError")
        pend[name] = DeletedVT()
        tx.output.side_effects.track_attr(self, name, pend[name])


class NNModuleVT(PendingAttrs, VT):
    def __init__(self, mod: torch.nn.Module, source: Optional[Source]):
        self.mod = mod
        self.source = source

    def python_type(self) -> type:
        return type(self.mod)

    def getattr(self, tx, name: str) -> VT:
        pend = self._pending()
        if name in pend:
            return pend[name]
        d = self.mod.__dict__
        cls = type(self.mod)
        # NOTE: Python's lookup order: data descriptors of the class (properties), the instance
        # dict, other class attributes (methods), and only then Module.__getattr__'s tables; a
        # method named like a submodule shadows it.
        static = inspect.getattr_static(cls, name, _NO_ATTR)
        in_class = static is not _NO_ATTR
        if in_class and _is_data_descriptor(static):
            return self._class_attr(tx, name)
        if name in d:
            return tx.wrap(d[name], self.source.attr(name))
        if in_class:
            return self._class_attr(tx, name)
        for table in ("_parameters", "_buffers", "_modules"):
            if name in d.get(table, {}):
                return tx.wrap(d[table][name], self.source.module_entry(table, name))
        if type(self.mod).__getattr__ is torch.nn.Module.__getattr__:
            raise AttributeError(f"'{type(self.mod).__name__}' object has no attribute '{name}'")
        unsupported(f"attribute '{name}' of module {type(self.mod).__name__}")

    def _class_attr(self, tx, name: str) -> VT:
        found = _class_attr(tx, self, type(self.mod), name)
        if found is not None:
            return found
        return tx.wrap(getattr(self.mod, name), self.source.attr(name))

    def children(self, tx) -> list:
        # NOTE: through wrap's table of objects already read: one VT per module, so that an
        # attribute written through one read (``self.layers[0].calls += 1``) is seen by the next.
        from .builder import wrap

        return [(k, wrap(tx, m, self.source.attr("_modules").item(k), guard=False))
                for k, m in self.mod._modules.items()]

    def call(self, tx, args: list, kwargs: dict) -> VT:
        from torch.nn.modules.lazy import LazyModuleMixin

        from .module_hooks import call_with_hooks, has_forward_hooks, init_lazy

        m = self.mod
        if isinstance(m, LazyModuleMixin) and hasattr(m, "_initialize_hook"):
            init_lazy(tx, self, args, kwargs)
        if _global_hooks():
            unsupported(f"call to module {type(m).__name__} with global module hooks")
        if has_forward_hooks(m) or m._backward_hooks or m._backward_pre_hooks:
            return call_with_hooks(tx, self, list(args), kwargs, lambda a, k: self._forward(tx, a, k))
        return self._forward(tx, args, kwargs)

    def _forward(self, tx, args: list, kwargs: dict) -> VT:
        m = self.mod
        if type(m) is torch.nn.Sequential:
            out = args[0]
            for _, child in self.children(tx):
                out = child.call(tx, [out], {})
            return out
        if "forward" in m.__dict__:
            # NOTE: ``mod.forward = ...`` on the instance (monkeypatching) is what ``mod(x)`` calls.
            if self.source is None:
                unsupported(f"call to module {type(m).__name__} whose forward is set on the instance")
            return tx.wrap(m.__dict__["forward"], self.source.attr("forward")).call(tx, list(args), kwargs)
        if self.source is not None:
            tx.output.guards.not_in_instance_dict(self.source, "forward")
        fwd = inspect.getattr_static(type(m), "forward")
        if isinstance(fwd, staticmethod) and isinstance(fwd.__func__, types.FunctionType):
            return tx.inline_function(fwd.__func__, list(args), kwargs)
        if not isinstance(fwd, types.FunctionType):
            unsupported(f"module {type(m).__name__} without a Python forward")
        if getattr(fwd, "_kiln_disable", False) or getattr(fwd, "_torchdynamo_disable", False):
            unsupported(f"call to module {type(m).__name__} whose forward is disabled (kiln.disable / "
                        "torch.compiler.disable)")
        return tx.inline_function(fwd, [self] + list(args), kwargs)

    def unpack(self, tx) -> list:
        if isinstance(self.mod, (torch.nn.Sequential, torch.nn.ModuleList)):
            return [c for _, c in self.children(tx)]
        if isinstance(self.mod, torch.nn.ModuleDict):
            return [ConstantVT(k) for k in self.mod._modules]
        return super().unpack(tx)

    def call_method(self, tx, name: str, args: list, kwargs: dict) -> VT:
        if name == "__getitem__" and isinstance(self.mod, (torch.nn.Sequential, torch.nn.ModuleList,
                                                           torch.nn.ModuleDict)):
            k = args[0].const()
            kids = self.children(tx)
            if isinstance(self.mod, torch.nn.ModuleDict):
                return dict(kids)[k]
            if isinstance(k, slice):
                from .containers import ListVT

                # NOTE: a slice of a ModuleList/Sequential is iterated like a list of its children.
                return ListVT([c for _, c in kids[k]])
            return kids[k][1]
        if name == "__len__":
            return ConstantVT(len(self.mod))
        return super().call_method(tx, name, args, kwargs)

    def __repr__(self) -> str:
        return f"NNModuleVT({type(self.mod).__name__})"


def _is_data_descriptor(attr: Any) -> bool:
    t = type(attr)
    return hasattr(t, "__get__") and (hasattr(t, "__set__") or hasattr(t, "__delete__"))


def _global_hooks() -> bool:
    from torch.nn.modules import module as m

    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks)


class UserObjectVT(PendingAttrs, VT):
    """An instance of a user class, read through its attributes."""

    def __init__(self, obj: Any, source: Optional[Source]):
        self.obj = obj
        self.source = source

    def python_type(self) -> type:
        return type(self.obj)

    def getattr(self, tx, name: str) -> VT:
        pend = self._pending()
        if name in pend:
            if isinstance(pend[name], DeletedVT):
                # NOTE: delattr only deletes names the class does not define (see delattr).
                raise AttributeError(f"'{type(self.obj).__name__}' object has no attribute '{name}'")
            return pend[name]
        cls = type(self.obj)
        py_getattr = _python_getattr_only(cls)
        if _custom_getattr(cls) and py_getattr is None:
            # NOTE: read through the real getattr (assumed side-effect free, like config
            # objects); the guard re-reads the same expression on every call.
            return tx.wrap(getattr(self.obj, name), self.source.attr(name))
        d = getattr(self.obj, "__dict__", {})
        if name in d:
            return tx.wrap(d[name], self.source.attr(name))
        from .callables import pending_class_attr

        written = pending_class_attr(tx, cls, name)
        if written is not None:
            return written
        if (self.obj is os.environ and name in ("get", "__getitem__", "__contains__")) or _dict_read(self.obj, name):
            from .callables import BoundMethodVT

            return BoundMethodVT(self, name)
        found = _class_attr(tx, self, cls, name)
        if found is not None:
            return found
        if py_getattr is not None and name not in d \
                and inspect.getattr_static(cls, name, _NO_ATTR) is _NO_ATTR:
            return self._inline_getattr(tx, py_getattr, name)
        try:
            value = getattr(self.obj, name)
        except AttributeError:
            raise
        return tx.wrap(value, self.source.attr(name))

    def _inline_getattr(self, tx, hook, name: str) -> VT:
        """A miss on a class whose ``__getattr__`` is Python: the hook inlined, as PyTorch's
        capture does (under capture ``torch.compiler.is_dynamo_compiling()`` is true there).
        Where it cannot be traced and left no trace, the value is read with the real getattr."""
        before = (len(tx.output.graph.nodes), tx.output.side_effects.size())
        try:
            return tx.inline_function(hook, [self, ConstantVT(name)], {})
        except Unsupported:
            if (len(tx.output.graph.nodes), tx.output.side_effects.size()) != before:
                raise
        return tx.wrap(getattr(self.obj, name), self.source.attr(name))

    def setattr(self, tx, name: str, value: VT) -> None:
        """``obj.name = value``: the class's Python ``__setattr__`` inlined (its
        ``object.__setattr__`` is the write replayed), else a write replayed with setattr."""
        hook = inspect.getattr_static(type(self.obj), "__setattr__", None)
        if self.source is None or not isinstance(hook, types.FunctionType):
            return super().setattr(tx, name, value)
        before = (len(tx.output.graph.nodes), tx.output.side_effects.size())
        try:
            tx.inline_function(hook, [self, ConstantVT(name), value], {})
            return
        except Unsupported:
            if (len(tx.output.graph.nodes), tx.output.side_effects.size()) != before:
                raise
        super().setattr(tx, name, value)

    def raw_store(self, tx, name: str, value: VT) -> None:
        """``object.__setattr__(obj, name, value)`` on an object from outside the region."""
        static = inspect.getattr_static(type(self.obj), name, _NO_ATTR)
        if self.source is None or (static is not _NO_ATTR and hasattr(type(static), "__set__")):
            unsupported(f"object.__setattr__ of '{name}' on {self}",
                        why="a descriptor's setter, or an object without a source")
        self._pending()[name] = value
        tx.output.side_effects.track_attr(self, name, value, raw=True)

    def call_method(self, tx, name: str, args: list, kwargs: dict) -> VT:
        if self.obj is os.environ and self.source is not None and not kwargs \
                and name in ("get", "__getitem__", "__contains__"):
            return environ_call(tx, self, name, args)
        if isinstance(self.obj, dict) and self.source is not None and name in ("keys", "values", "items") \
                and getattr(type(self.obj), name) in (getattr(dict, name), getattr(collections.OrderedDict, name)):
            from .containers import ListVT, TupleVT

            keys = dict_keys(tx, self)
            if name == "keys":
                return ListVT([ConstantVT(k) for k in keys])
            vals = [dict_item(tx, self, k) for k in keys]
            if name == "values":
                return ListVT(vals)
            return ListVT([TupleVT([ConstantVT(k), v]) for k, v in zip(keys, vals)])
        if _plain_dict(self.obj) and self.source is not None:
            if name == "get" and type(self.obj).get is dict.get:
                k = args[0].const()
                if k in dict_keys(tx, self):
                    return dict_item(tx, self, k)
                return args[1] if len(args) > 1 else ConstantVT(None)
            if name == "__contains__":
                return ConstantVT(args[0].const() in dict_keys(tx, self))
            if name == "__getitem__":
                k = args[0].const()
                if k in dict_keys(tx, self):
                    return dict_item(tx, self, k)
                unsupported(f"{self.source.name}[{k!r}] of a missing key",
                            why="the lookup raises KeyError, which capture does not raise in the graph")
        if _dict_read(self.obj, name) and not _custom_getattr(type(self.obj)):
            # NOTE: getattr hands dict's own reads back to call_method; one not handled above
            # must break the graph here, not ask getattr again (endless recursion).
            unsupported(f"{type(self.obj).__name__}.{name} on {self}")
        return super().call_method(tx, name, args, kwargs)

    def call(self, tx, args: list, kwargs: dict) -> VT:
        call = inspect.getattr_static(type(self.obj), "__call__", None)
        if isinstance(call, types.FunctionType):
            return tx.inline_function(call, [self] + list(args), kwargs)
        unsupported(f"call to object of {type(self.obj).__name__}")

    def binop(self, tx, op, other: VT) -> Optional[VT]:
        """``self <op> other`` through the class's Python operator methods (user_operators.py)."""
        from .user_operators import user_binop

        return user_binop(tx, self, type(self.obj), op, other, reflected=False)

    def rbinop(self, tx, op, other: VT) -> Optional[VT]:
        from .user_operators import user_binop

        return user_binop(tx, self, type(self.obj), op, other, reflected=True)

    def truthy(self, tx) -> bool:
        cls = type(self.obj)
        if not hasattr(cls, "__bool__") and not hasattr(cls, "__len__"):
            return True
        # NOTE: as CPython: the class's __bool__, else its __len__ (instance attributes of
        # those names do not count); Python ones are inlined.
        for name in ("__bool__", "__len__"):
            method = inspect.getattr_static(cls, name, None)
            if method is None:
                continue
            if not isinstance(method, types.FunctionType):
                break
            out = tx.inline_function(method, [self], {})
            return out.truthy(tx) if name == "__bool__" else bool(out.const())
        unsupported(f"truth value of {cls.__name__} object")

    def unpack(self, tx) -> list:
        """Iteration through a Python ``__iter__`` of the class (inlined)."""
        from .containers import iterate
        from .new_objects import ITER_MODELS

        method = inspect.getattr_static(type(self.obj), "__iter__", None)
        if method in ITER_MODELS:
            return ITER_MODELS[method](tx, self)
        if isinstance(method, types.FunctionType):
            out = tx.inline_function(method, [self], {})
            if isinstance(out, UserObjectVT):
                unsupported(f"iteration over {type(self.obj).__name__} through an iterator object of its own")
            return iterate(tx, out).unpack(tx)
        return super().unpack(tx)

    def __repr__(self) -> str:
        return f"UserObjectVT({type(self.obj).__name__})"


class GradModeVT(VT):
    """torch.no_grad() / enable_grad() / set_grad_enabled(b) objects."""

    def __init__(self, mode: bool):
        self.mode = mode
        self.prev: Optional[bool] = None
        self.called = False  # made by calling set_grad_enabled(mode) (which switches at once)

    @classmethod
    def entered_now(cls, tx, mode: bool) -> "GradModeVT":
        vt = cls(mode)
        vt.called = True
        vt.prev = tx.output.grad_enabled
        tx.output.set_grad_enabled(mode)
        return vt

    def python_type(self) -> type:
        return torch.set_grad_enabled if self.prev is not None else torch.no_grad

    def call_method(self, tx, name: str, args: list, kwargs: dict) -> VT:
        if name == "__enter__":
            if self.prev is None:
                self.prev = tx.output.grad_enabled
                tx.output.set_grad_enabled(self.mode)
            return ConstantVT(None)
        if name == "__exit__":
            return self.getattr(tx, "__exit__").call(tx, args, kwargs)
        unsupported(f"method {name} of a grad-mode context manager")

    def getattr(self, tx, name: str) -> VT:
        if name == "__exit__":
            return GradExitVT(self.prev if self.prev is not None else tx.output.grad_enabled)
        unsupported(f"attribute {name} of a grad-mode context manager")

    def reconstruct(self, cg) -> str:
        # NOTE: a ``set_grad_enabled(mode)`` object (already switched: its __exit__ goes back to
        # ``prev``), or a fresh no_grad() / enable_grad() (switching only when entered).
        if self.called:
            return f"{cg.obj(_made_set_grad_enabled)}({self.mode}, {self.prev})"
        return f"{cg.obj(torch.enable_grad if self.mode else torch.no_grad)}()"


class NullContextVT(VT):
    """A context manager with no effect on the graph: ``contextlib.nullcontext(x)``, and
    ``torch.autocast(..., enabled=False)`` while autocast is off (every entry guards the
    autocast state, so that stays true whenever the entry runs)."""

    def __init__(self, enter_result: VT):
        self.enter_result = enter_result

    def python_type(self) -> type:
        return contextlib.nullcontext

    def call_method(self, tx, name: str, args: list, kwargs: dict) -> VT:
        if name == "__enter__":
            return self.enter_result
        if name == "__exit__":
            return ConstantVT(None)
        unsupported(f"method {name} of a no-op context manager")

    def getattr(self, tx, name: str) -> VT:
        if name == "__exit__":
            return NullExitVT()
        unsupported(f"attribute {name} of a no-op context manager")

    def reconstruct(self, cg) -> str:
        return f"{cg.obj(contextlib.nullcontext)}({cg.expr(self.enter_result)})"


def _null_exit(*exc) -> None:
    return None


def _make_exit(prev: bool):
    # NOTE: one function per mode: a resume function receiving it is guarded on its identity,
    # which a new closure per call would fail every time (a recompile per call).
    return _GRAD_EXITS[bool(prev)]


def _grad_exit(prev: bool):
    def __exit__(*exc) -> None:
        torch._C._set_grad_enabled(prev)

    return __exit__


_GRAD_EXITS = {False: _grad_exit(False), True: _grad_exit(True)}


class GradReentry:
    """A grad-mode with-block a resume function enters again (its prologue's BEFORE_WITH):
    ``__enter__`` switches to ``mode``, ``__exit__`` back to the mode it found."""

    __slots__ = ("mode", "prev")

    def __init__(self, mode: bool):
        self.mode = bool(mode)
        self.prev: Optional[bool] = None

    def __enter__(self) -> None:
        self.prev = torch.is_grad_enabled()
        torch._C._set_grad_enabled(self.mode)

    def __exit__(self, *exc) -> None:
        torch._C._set_grad_enabled(self.prev)


def wrap_grad_reentry(tx, value: GradReentry, source, guard: bool) -> VT:
    """A GradReentry a resume function receives: a grad-mode context not entered yet
    (guarded by its mode: the graph sets it)."""
    if value.prev is not None:
        unsupported("a grad-mode re-entry object that was already entered")
    if guard:
        tx.output.guards.type_of(source, value)
        tx.output.guards.const(source.attr("mode"), value.mode)
    return GradModeVT(value.mode)


class ReplayableExitVT(VT):
    """The ``__exit__`` of a with-block kiln can replay from generated code: a graph break
    inside such a block keeps compiling the rest of the frame (see convert.break_at)."""


class NullExitVT(ReplayableExitVT):
    def call(self, tx, args: list, kwargs: dict) -> VT:
        return ConstantVT(None)

    def reconstruct(self, cg) -> str:
        return cg.obj(_null_exit)


class GradExitVT(ReplayableExitVT):
    def __init__(self, prev: bool):
        self.prev = prev

    def call(self, tx, args: list, kwargs: dict) -> VT:
        tx.output.set_grad_enabled(self.prev)
        return ConstantVT(None)

    def reconstruct(self, cg) -> str:
        return f"{cg.obj(_make_exit)}({self.prev})"


def _made_set_grad_enabled(mode: bool, prev: bool) -> torch.set_grad_enabled:
    """The ``torch.set_grad_enabled(mode)`` object a traced call made, grad mode ``prev`` before it."""
    ctx = torch.set_grad_enabled(mode)
    ctx.prev = prev
    return ctx


class HandleVT(VT):
    """The RemovableHandle of a register_hook replayed after the graph."""

    def __init__(self, name: str):
        self.name = name

    def reconstruct(self, cg) -> str:
        return self.name


__all__ = ["NNModuleVT", "UserObjectVT", "GradModeVT", "GradExitVT", "NullContextVT", "NullExitVT",
           "ReplayableExitVT", "HandleVT", "UserFunctionVT", "GradReentry", "wrap_grad_reentry"]


_DICT_READS = ("keys", "values", "items", "get", "__contains__", "__getitem__")
_MAPPING_METHODS = _DICT_READS + ("to_tuple", "__len__", "__iter__")


def _set_fields_method(tx, vt: "DataclassVT", name: str, args: list, kwargs: dict) -> VT:
    """A mapping read of a ``SetFieldsMapping`` (library_types.py) built in the region."""
    from .containers import ListVT, TupleVT

    if kwargs:
        unsupported(f"{vt.cls.__name__}.{name}() with keyword arguments")
    present = vt._set_fields()
    values = TupleVT([v for _, v in present])
    keys = [n for n, _ in present]
    if name == "to_tuple":
        return values
    if name == "__len__":
        return ConstantVT(len(present))
    if name == "keys" or name == "__iter__":
        return ListVT([ConstantVT(k) for k in keys])
    if name == "values":
        return ListVT(list(values.items))
    if name == "items":
        return ListVT([TupleVT([ConstantVT(k), v]) for k, v in present])
    k = args[0].const()
    if name == "__contains__":
        return ConstantVT(k in keys)
    if name == "get":
        return dict(present)[k] if k in keys else (args[1] if len(args) > 1 else ConstantVT(None))
    if isinstance(k, str):
        if k not in keys:
            unsupported(f"{vt.cls.__name__}[{k!r}]: not a field that is set", why="eager raises KeyError")
        return dict(present)[k]
    return values.getitem(tx, args[0])


def _python_getattr_only(cls: type):
    """``cls.__getattr__`` when it is a Python function and attribute lookup is otherwise
    object's own (no custom ``__getattribute__``), else None."""
    if not isinstance(inspect.getattr_static(cls, "__getattribute__"), types.WrapperDescriptorType):
        return None
    hook = inspect.getattr_static(cls, "__getattr__", None)
    return hook if isinstance(hook, types.FunctionType) else None


def _custom_getattr(cls: type) -> bool:
    """``cls`` overrides attribute lookup (``__getattribute__`` or ``__getattr__``)."""
    custom = not isinstance(inspect.getattr_static(cls, "__getattribute__"), types.WrapperDescriptorType)
    return custom or "__getattr__" in dir(cls)


def _dict_read(obj: Any, name: str) -> bool:
    """``obj.name`` is one of dict's own reads (getattr hands it to call_method)."""
    return isinstance(obj, dict) and name in _DICT_READS and getattr(type(obj), name) in (
        getattr(dict, name), getattr(collections.OrderedDict, name, None))


def _plain_dict(obj: Any) -> bool:
    """A dict subclass that keeps dict's own lookups (a registry or mapping object)."""
    t = type(obj)
    return isinstance(obj, dict) and t.__contains__ is dict.__contains__ and t.__getitem__ is dict.__getitem__


def dict_keys(tx, vt: "UserObjectVT") -> list:
    """The real keys of a dict-like user object, guarded."""
    keys = list(dict.keys(vt.obj))
    tx.output.guards.mapping_keys(vt.source, keys)
    return keys


def environ_call(tx, vt: "UserObjectVT", name: str, args: list) -> VT:
    """os.environ.get(k[, d]) / [k] / `k in`: read now, guarded on the value read."""
    vals = [a.const() for a in args]
    value = getattr(os.environ, name)(*vals)
    return tx.wrap(value, vt.source.method_call(name, *vals))


def dict_item(tx, vt: "UserObjectVT", key: Any) -> VT:
    src = vt.source
    return tx.wrap(dict.__getitem__(vt.obj, key),
                   DictItemSource(src, key))


class DataclassVT(VT):
    """A dataclass instance built in the compiled region (e.g. a model output): its
    fields are the VTs passed in; the object itself is built after the graph runs.

    Methods of the class are inlined like any user method.  A dataclass that is also a
    dict has mapping contents only its own code knows: those of the types in
    ``library_types.KNOWN_LIBRARY_TYPES`` are modelled, other mapping reads break."""

    def __init__(self, cls: type, args: list, kwargs: dict):
        import dataclasses

        from .library_types import library_model

        self.cls = cls
        self.args = args
        self.kwargs = kwargs
        names = [f.name for f in dataclasses.fields(cls)]
        self.fields: dict = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                self.fields[f.name] = f.default
        self.fields.update(zip(names, args))
        self.fields.update(kwargs)
        self.order = names
        self.model = library_model(cls)

    def python_type(self) -> type:
        return self.cls

    def _field(self, name: str) -> VT:
        v = self.fields[name]
        if isinstance(v, VT):
            return v
        from .base import const_vt

        return const_vt(v)

    def getattr(self, tx, name: str) -> VT:
        if name in self.fields:
            return self._field(name)
        if self.model is not None and name in _MAPPING_METHODS:
            from .callables import BoundMethodVT

            return BoundMethodVT(self, name)
        found = _class_attr(tx, self, self.cls, name)
        if found is not None:
            return found
        if not _custom_getattr(self.cls) and name not in self.order:
            static = inspect.getattr_static(self.cls, name, _NO_ATTR)
            if static is _NO_ATTR:
                # NOTE: neither a field it was built with nor a class attribute (hasattr false)
                raise AttributeError(f"'{self.cls.__name__}' object has no attribute '{name}'")
            from .base import is_const_value

            if is_const_value(static):
                return tx.wrap(static, tx.output.objects.source(self.cls).attr(name))
        unsupported(f"attribute '{name}' of a {self.cls.__name__} built in the compiled region")

    def setattr(self, tx, name: str, value: VT) -> None:
        if type(self.cls).__setattr__ is not type.__setattr__ \
                or inspect.getattr_static(self.cls, "__setattr__") is not object.__setattr__:
            unsupported(f"setting attribute '{name}' on a {self.cls.__name__} built in the compiled region",
                        why="its class defines __setattr__ (a frozen dataclass raises FrozenInstanceError)")
        self.store(tx, name, value)

    def store(self, tx, name: str, value: VT) -> None:
        """``object.__setattr__(obj, name, value)``: the field (or a new attribute) takes the
        value; the object is rebuilt from its arguments, then given the values written."""
        static = inspect.getattr_static(self.cls, name, _NO_ATTR)
        if static is not _NO_ATTR and hasattr(type(static), "__set__"):
            unsupported(f"setting {self.cls.__name__}.{name} (a descriptor) on an object built in the region")
        self.fields[name] = value
        self.__dict__.setdefault("written", {})[name] = value

    def _set_fields(self) -> list:
        """(name, VT) of the fields that are not None, in field order."""
        out = []
        for n in self.order:
            if n in self.fields:
                v = self._field(n)
                if not (isinstance(v, ConstantVT) and v.value is None):
                    out.append((n, v))
        return out

    def call_method(self, tx, name: str, args: list, kwargs: dict) -> VT:
        from .library_types import SetFieldsMapping

        if self.model is SetFieldsMapping and name in _MAPPING_METHODS:
            return _set_fields_method(tx, self, name, args, kwargs)
        if isinstance(self.cls, type) and issubclass(self.cls, dict) and self.model is None \
                and name in _MAPPING_METHODS:
            unsupported(f"{self.cls.__name__}.{name}() of a dict dataclass built in the compiled region",
                        why="its mapping contents depend on its own construction code")
        return super().call_method(tx, name, args, kwargs)

    def reconstruct(self, cg) -> str:
        done = cg.built(self)
        if done is not None:
            return done
        parts = [cg.expr(a) for a in self.args] + [f"{k}={cg.expr(v)}" for k, v in self.kwargs.items()]
        name = cg.container(self, f"{cg.obj(self.cls)}({', '.join(parts)})")
        for k, v in self.__dict__.get("written", {}).items():
            cg.line(f"{cg.obj(object.__setattr__)}({name}, {k!r}, {cg.expr(v)})")
        return name
