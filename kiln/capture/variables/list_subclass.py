"""Instances of Python subclasses of ``list`` (``class Processors(list): ...``).

In: a list-subclass object read from the caller (``ListSubclassVT``) or built in the region
(``NewListSubclassVT``, from ``cls()`` / ``cls(iterable)``).  Out: a VT that is two things at
once, as PyTorch's capture models it (its ``UserDefinedListVariable``): a user object (its
own attributes, its Python methods inlined) and a list, whose items live in ``base``, a
``ListVT``.  A method the class does not override (``append``, ``extend``, ``__len__``,
iteration, ``sum(l)``, ``l[i]``) is list's own and acts on ``base``; the mutation of an
object from the caller is replayed after the graph like any list's (``obj[:] = [...]``).

Only classes whose item access is list's own are modelled (``__getitem__``, ``__setitem__``,
``__len__``, ``__iter__`` not overridden, no custom ``__getattribute__``): their guards and
the replay read and write items through list's slots.  Others stay plain user objects.
"""
from __future__ import annotations

import inspect
import types
from typing import Any

from .base import VT, ConstantVT, unsupported
from .containers import IteratorVT, ListVT
from .new_objects import NewObjectVT, fill_object
from .objects import UserObjectVT

# NOTE: the slots through which guards (``len(x)``, ``x[i]``), iteration and the replay
# (``x[:] = ...``) reach the items: they must be list's own for ``base`` to stand for them.
_ITEM_SLOTS = ("__getitem__", "__setitem__", "__len__", "__iter__", "__getattribute__")
_HEAPTYPE = 1 << 9


def list_own(cls: type, name: str) -> bool:
    """``cls.name`` resolves to list's own method (no Python class in the MRO overrides it)."""
    if name not in vars(list):
        return False
    try:
        return inspect.getattr_static(cls, name) is vars(list)[name]
    except AttributeError:
        return False


def is_modelled_list_subclass(cls: type) -> bool:
    """A Python subclass of list (and of plain Python classes), list's item slots its own."""
    if not isinstance(cls, type) or not issubclass(cls, list) or cls is list or type(cls) is not type:
        return False
    if any(k not in (list, object) and not k.__flags__ & _HEAPTYPE for k in cls.__mro__):
        return False
    return all(list_own(cls, n) for n in _ITEM_SLOTS)


class _ListPart:
    """What both VTs share: list's own methods act on ``self.base``."""

    base: ListVT

    def _shadowed(self, name: str) -> bool:
        return False

    def _is_list_method(self, name: str) -> bool:
        return list_own(self.python_type(), name) and not self._shadowed(name)

    def call_method(self, tx, name: str, args: list, kwargs: dict) -> VT:
        if self._is_list_method(name):
            if name == "__iter__":
                return IteratorVT(self.base.items)
            return self.base.call_method(tx, name, args, kwargs)
        return super().call_method(tx, name, args, kwargs)

    def getattr(self, tx, name: str) -> VT:
        if self._is_list_method(name) and callable(vars(list)[name]):
            from .callables import BoundMethodVT

            return BoundMethodVT(self, name)
        return super().getattr(tx, name)

    def unpack(self, tx) -> list:
        return list(self.base.items)

    def contains(self, tx, item: VT) -> bool:
        if self._is_list_method("__contains__"):
            return self.base.contains(tx, item)
        return super().call_method(tx, "__contains__", [item], {}).truthy(tx)

    def truthy(self, tx) -> bool:
        if inspect.getattr_static(self.python_type(), "__bool__", None) is None:
            return bool(self.base.items)
        return super().truthy(tx)

    def setitem(self, tx, key: VT, value: VT) -> None:
        self.base.setitem(tx, key, value)

    def delitem(self, tx, key: VT) -> None:
        if not self._is_list_method("__delitem__"):
            unsupported(f"del on a {self.python_type().__name__} item (its own __delitem__)")
        self.base.mutate(tx, "__delitem__", [key], {})


class ListSubclassVT(_ListPart, UserObjectVT):
    """A list-subclass object from the caller: items in ``base`` (read through its source,
    guarded by length), attributes read and written like any user object's."""

    def __init__(self, obj: Any, base: ListVT, source):
        super().__init__(obj, source)
        self.base = base

    def _shadowed(self, name: str) -> bool:
        # NOTE: an instance attribute of that name (``self.append = f``) hides the method.
        return name in self._pending() or name in getattr(self.obj, "__dict__", {})

    def __repr__(self) -> str:
        return f"ListSubclassVT({type(self.obj).__name__}, {self.base.items})"


class NewListSubclassVT(_ListPart, NewObjectVT):
    """A list-subclass object built in the region (``cls(iterable)``); rebuilt after the
    graph as ``list.__new__(cls)``, its items and its attributes (no code of its own run)."""

    def __init__(self, pytype: type):
        super().__init__(pytype)
        self.base = ListVT([])

    def _shadowed(self, name: str) -> bool:
        return name in self.attrs

    def reconstruct(self, cg) -> str:
        built = cg.built(self)
        if built is not None:
            return built
        name = cg.container(self, f"{cg.obj(list.__new__)}({cg.obj(self.pytype)})")
        if self.base.items:
            cg.line(f"{cg.obj(list.extend)}({name}, [{', '.join(cg.expr(i) for i in self.base.items)}])")
        if self.attrs:
            body = "{" + ", ".join(f"{k!r}: {cg.expr(v)}" for k, v in self.attrs.items()) + "}"
            cg.line(f"{cg.obj(fill_object)}({name}, {body}, {{}})")
        return name

    def __repr__(self) -> str:
        return f"NewListSubclassVT({self.pytype.__qualname__}, {self.base.items})"


def list_init(tx, obj: VT, iterable: VT = None, **kwargs: VT) -> VT:
    """``list.__init__(self[, iterable])`` on a list-subclass object built in the region
    (the class's own ``__init__`` calling ``super().__init__(...)``, or none at all)."""
    from .containers import iterate

    if kwargs or not isinstance(obj, NewListSubclassVT):
        unsupported("list.__init__ with keyword arguments, or on an object from outside the region")
    obj.base.items[:] = [] if iterable is None else iterate(tx, iterable).unpack(tx)
    return ConstantVT(None)


def construct_list_subclass(tx, cls: type, args: list, kwargs: dict) -> VT:
    """``cls(*args, **kwargs)``: list's ``__new__`` (an empty list of ``cls``), then the
    class's ``__init__`` inlined (or list's: the items of its one argument)."""
    if inspect.getattr_static(cls, "__new__") is not list.__new__:
        unsupported(f"constructing an instance of {cls.__qualname__}", why="its __new__ is its own")
    obj = NewListSubclassVT(cls)
    init = inspect.getattr_static(cls, "__init__")
    if init is list.__init__:
        list_init(tx, obj, *args, **kwargs)
    elif isinstance(init, types.FunctionType):
        out = tx.inline_function(init, [obj] + list(args), kwargs)
        if not (isinstance(out, ConstantVT) and out.value is None):
            unsupported(f"{cls.__qualname__}.__init__ returned a value", why="eager raises TypeError")
    else:
        unsupported(f"constructing an instance of {cls.__qualname__}",
                    why=f"its __init__ is a {type(init).__name__}, not Python code")
    return obj


def wrap_list_subclass(tx, value: list, source, guard: bool) -> VT:
    """The VT of a list-subclass object from the caller: its type and length guarded, its
    items read as ``source[i]`` (list's own slots, see ``is_modelled_list_subclass``)."""
    from .builder import wrap

    if guard:
        g = tx.output.guards
        g.type_of(source, value)
        g.length(source, value)
    items = [wrap(tx, v, source.item(i), guard) for i, v in enumerate(value)]
    return ListSubclassVT(value, ListVT(items, source), source)


__all__ = ["ListSubclassVT", "NewListSubclassVT", "construct_list_subclass", "is_modelled_list_subclass",
           "list_init", "wrap_list_subclass"]
