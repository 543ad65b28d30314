"""``obj.__dict__`` of an object built in the compiled region: a live view.

In: a ``NewObjectVT`` (new_objects.py).  Out: a VT whose reads and writes go straight to
that object's attribute table (``attrs``), as the real ``__dict__`` would: ``get``,
``in``, ``[k]``, ``keys`` / ``values`` / ``items``, ``len``, iteration, and the writes
``[k] = v``, ``update``, ``pop``, ``setdefault``, ``del d[k]``.  Methods are one table
keyed by name.
"""
from __future__ import annotations

from typing import Any, Callable

from .base import VT, ConstantVT, unsupported


class InstanceDictVT(VT):
    """The ``__dict__`` of ``obj`` (a ``NewObjectVT``)."""

    def __init__(self, obj: VT):
        self.obj = obj

    def _table(self) -> dict:
        return {k: v for k, v in self.obj.attrs.items() if k not in self.obj.slots}

    def python_type(self) -> type:
        return dict

    def truthy(self, tx) -> bool:
        return bool(self._table())

    def unpack(self, tx) -> list:
        return [ConstantVT(k) for k in self._table()]

    def contains(self, tx, item: VT) -> bool:
        return item.const() in self._table()

    def getattr(self, tx, name: str) -> VT:
        from .callables import BoundMethodVT

        if name in _METHODS:
            return BoundMethodVT(self, name)
        raise AttributeError(f"'dict' object has no attribute '{name}'")

    def call_method(self, tx, name: str, args: list, kwargs: dict) -> VT:
        fn = _METHODS.get(name)
        if fn is None or kwargs and name != "update":
            unsupported(f"method {name} of the __dict__ of an object built in the compiled region")
        out = fn(tx, self, *args, **kwargs)
        return ConstantVT(None) if out is None else out

    def getitem(self, tx, key: VT) -> VT:
        return _getitem(tx, self, key)

    def setitem(self, tx, key: VT, value: VT) -> None:
        _setitem(tx, self, key, value)

    def reconstruct(self, cg) -> str:
        return f"({cg.expr(self.obj)}).__dict__"

    def __repr__(self) -> str:
        return f"InstanceDictVT({self.obj})"


def _key(key: VT) -> str:
    k = key.const() if key.is_const() else None
    if not isinstance(k, str):
        unsupported("a __dict__ key that is not a constant string")
    return k


def _getitem(tx, d: InstanceDictVT, key: VT) -> VT:
    k = _key(key)
    if k not in d._table():
        unsupported(f"__dict__[{k!r}] of a missing attribute", why="eager raises KeyError")
    return d.obj.attrs[k]


def _setitem(tx, d: InstanceDictVT, key: VT, value: VT) -> None:
    d.obj._check_generator(tx)
    d.obj.attrs[_key(key)] = value


def _get(tx, d: InstanceDictVT, key: VT, default: VT = None) -> VT:
    k = _key(key)
    if k in d._table():
        return d.obj.attrs[k]
    return default if default is not None else ConstantVT(None)


def _pop(tx, d: InstanceDictVT, key: VT, *default: VT) -> VT:
    k = _key(key)
    if k not in d._table():
        if default:
            return default[0]
        unsupported(f"__dict__.pop({k!r}) of a missing attribute", why="eager raises KeyError")
    d.obj._check_generator(tx)
    return d.obj.attrs.pop(k)


def _update(tx, d: InstanceDictVT, other: VT = None, **kwargs: VT) -> None:
    from .dicts import DictVT

    pairs: list = []
    if other is not None:
        if not isinstance(other, DictVT) or other.key_vts:
            unsupported("__dict__.update() from something that is not a dict of string keys")
        pairs += list(other.items.items())
    pairs += list(kwargs.items())
    for k, v in pairs:
        _setitem(tx, d, ConstantVT(k), v)


def _setdefault(tx, d: InstanceDictVT, key: VT, default: VT = None) -> VT:
    k = _key(key)
    if k not in d._table():
        _setitem(tx, d, key, default if default is not None else ConstantVT(None))
    return d.obj.attrs[k]


def _items(kind: str) -> Callable:
    def run(tx, d: InstanceDictVT) -> VT:
        from .containers import ListVT, TupleVT

        table = d._table()
        if kind == "keys":
            return ListVT([ConstantVT(k) for k in table])
        if kind == "values":
            return ListVT(list(table.values()))
        return ListVT([TupleVT([ConstantVT(k), v]) for k, v in table.items()])

    return run


def _delitem(tx, d: InstanceDictVT, key: VT) -> None:
    _pop(tx, d, key)


_METHODS: dict[str, Any] = {
    "get": _get, "pop": _pop, "update": _update, "setdefault": _setdefault,
    "keys": _items("keys"), "values": _items("values"), "items": _items("items"),
    "__getitem__": _getitem, "__setitem__": _setitem, "__delitem__": _delitem,
    "__contains__": lambda tx, d, k: ConstantVT(_key(k) in d._table()),
    "__len__": lambda tx, d: ConstantVT(len(d._table())),
    "copy": lambda tx, d: _copy(d),
}


def _copy(d: InstanceDictVT) -> VT:
    from .dicts import DictVT

    return DictVT(dict(d._table()))


__all__ = ["InstanceDictVT"]
