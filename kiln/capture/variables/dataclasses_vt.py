"""dataclasses' module functions, as a table keyed by the function.

In: the VT of a dataclass instance (built in the region: ``DataclassVT``; read from the
caller: a guarded ``UserObjectVT``) or class.  Out: ``fields()`` as the real Field
objects (the class is fixed by the guards), ``replace()`` as a new ``DataclassVT``,
``asdict()`` / ``astuple()`` of constant fields, ``is_dataclass()`` as a constant.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from .base import VT, ConstantVT, unsupported


def _cls_of(vt: VT) -> type:
    from .callables import ClassVT

    if isinstance(vt, ClassVT):
        return vt.cls
    return vt.python_type()


def _fields(tx, obj: VT) -> VT:
    cls = _cls_of(obj)
    if not dataclasses.is_dataclass(cls):
        unsupported(f"dataclasses.fields() of {cls.__name__}", why="eager raises TypeError")
    return tx.wrap_static(dataclasses.fields(cls))


def _is_dataclass(tx, obj: VT) -> VT:
    return ConstantVT(dataclasses.is_dataclass(_cls_of(obj)))


def _replace(tx, obj: VT, **changes: VT) -> VT:
    from .builtins import call_builtin_type

    cls = _cls_of(obj)
    if not dataclasses.is_dataclass(cls) or isinstance(obj, type):
        unsupported(f"dataclasses.replace() of {cls.__name__}", why="eager raises TypeError")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            if f.name in changes:
                unsupported(f"dataclasses.replace() of the init=False field {f.name}", why="eager raises ValueError")
            continue
        kwargs[f.name] = changes[f.name] if f.name in changes else obj.getattr(tx, f.name)
    if set(changes) - set(kwargs):
        unsupported("dataclasses.replace() with an unknown field", why="eager raises TypeError")
    return call_builtin_type(tx, cls, [], kwargs)


def _as(container: str) -> Callable:
    def run(tx, obj: VT) -> VT:
        from .containers import TupleVT
        from .dicts import DictVT

        cls = _cls_of(obj)
        values = {f.name: obj.getattr(tx, f.name) for f in dataclasses.fields(cls)}
        if not all(v.is_const() for v in values.values()):
            # NOTE: asdict/astuple deep-copy every field value (a tensor becomes a copy).
            unsupported(f"dataclasses.{container}() of fields that are not constants",
                        why="it deep-copies the field values")
        if container == "asdict":
            return DictVT(dict(values))
        return TupleVT(list(values.values()))

    return run


FUNCTIONS: dict[Any, Callable] = {
    dataclasses.fields: _fields,
    dataclasses.is_dataclass: _is_dataclass,
    dataclasses.replace: _replace,
    dataclasses.asdict: _as("asdict"),
    dataclasses.astuple: _as("astuple"),
}

__all__ = ["FUNCTIONS"]
