"""Named tuples: ``collections.namedtuple`` / ``typing.NamedTuple`` classes and the
struct sequences of C code (``torch.return_types.max``, ``os.stat_result``...).

Both are held as a ``TupleVT`` whose ``pytype`` is the class: indexing, unpacking and
length are the tuple's; this module answers what the class adds (field names as
attributes, ``_replace``, ``_asdict``, ``_fields``, methods of a user subclass) and
how to build and rebuild one.
"""
from __future__ import annotations

import inspect
import types
from typing import Any, Optional

from .base import VT, ConstantVT, unsupported


def is_namedtuple_class(cls: Any) -> bool:
    """A class made by ``collections.namedtuple`` (or a subclass of one)."""
    return isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields") and hasattr(cls, "_make")


def is_structseq_class(cls: Any) -> bool:
    """A C struct sequence (``torch.return_types.*``): a tuple subclass with ``n_fields``."""
    return isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "n_sequence_fields")


def field_names(cls: type) -> tuple:
    """The names of the fields of a named tuple class, in order ('' when it has none)."""
    if is_namedtuple_class(cls):
        return tuple(cls._fields)
    if is_structseq_class(cls):
        return tuple(getattr(cls, "__match_args__", ()))[: cls.n_sequence_fields]
    return ()


def tuple_attr(tx, vt, name: str) -> Optional[VT]:
    """``vt.name`` for a named tuple VT, or None when the class adds no such attribute."""
    from .callables import BoundMethodVT, ClassVT

    cls = vt.pytype
    names = field_names(cls)
    if name in names:
        return vt.items[names.index(name)]
    if name == "__class__":
        return ClassVT(cls)
    if not names:
        return None
    if name == "_fields":
        return _const_tuple(names)
    if name in ("_replace", "_asdict"):
        return BoundMethodVT(vt, name)
    try:
        attr = inspect.getattr_static(cls, name)
    except AttributeError:
        return None
    if isinstance(attr, types.FunctionType) and not _is_tuple_own(name):
        from .callables import UserMethodVT

        return UserMethodVT(attr, vt)
    if isinstance(attr, property) and isinstance(attr.fget, types.FunctionType):
        return tx.inline_function(attr.fget, [vt], {})
    if isinstance(attr, (staticmethod, classmethod)):
        return tx.wrap_static(getattr(cls, name))
    if not callable(attr) and not isinstance(attr, (types.MemberDescriptorType, types.GetSetDescriptorType)):
        return tx.wrap_static(getattr(cls, name))
    return None


def _const_tuple(names: tuple) -> VT:
    from .base import const_vt

    return const_vt(names)


def _is_tuple_own(name: str) -> bool:
    return name in vars(tuple) or name in ("_make",)


def namedtuple_method(tx, vt, name: str, args: list, kwargs: dict) -> Optional[VT]:
    """``_replace(**kw)`` and ``_asdict()`` of a namedtuple VT (None for other names)."""
    from .containers import TupleVT
    from .dicts import DictVT

    names = field_names(vt.pytype)
    if name == "_replace" and is_namedtuple_class(vt.pytype):
        if args or any(k not in names for k in kwargs):
            unsupported(f"{vt.pytype.__name__}._replace() with unknown fields", why="eager raises ValueError")
        items = [kwargs.get(n, v) for n, v in zip(names, vt.items)]
        return TupleVT(items, pytype=vt.pytype)
    if name == "_asdict" and is_namedtuple_class(vt.pytype) and not args and not kwargs:
        return DictVT(dict(zip(names, vt.items)))
    return None


def build_namedtuple(tx, cls: type, args: list, kwargs: dict) -> VT:
    """``cls(*args, **kwargs)`` for a namedtuple class whose ``__new__`` is the generated one,
    or ``cls(sequence)`` for a struct sequence."""
    from .containers import TupleVT

    if is_structseq_class(cls):
        if len(args) != 1 or kwargs:
            unsupported(f"{cls.__name__}() with these arguments")
        items = args[0].unpack(tx)
        if len(items) != cls.n_sequence_fields:
            unsupported(f"{cls.__name__}() of {len(items)} items", why="eager raises TypeError")
        return TupleVT(items, pytype=cls)
    new = cls.__new__
    names = field_names(cls)
    # NOTE: the generated __new__ takes exactly the fields; a class with its own __new__
    # or __init__ runs code of its own and is not built here.
    if not (isinstance(new, types.FunctionType) and new.__code__.co_argcount == len(names) + 1
            and new.__code__.co_varnames[1:len(names) + 1] == names) or cls.__init__ is not object.__init__:
        unsupported(f"constructing {cls.__qualname__}, a named tuple with its own __new__")
    defaults = getattr(cls, "_field_defaults", {})
    bound: dict = dict(zip(names, args))
    if len(args) > len(names):
        unsupported(f"{cls.__name__}() takes {len(names)} arguments", why="eager raises TypeError")
    for k, v in kwargs.items():
        if k not in names or k in bound:
            unsupported(f"{cls.__name__}() got an unexpected or repeated argument '{k}'", why="eager raises TypeError")
        bound[k] = v
    items = []
    for n in names:
        if n in bound:
            items.append(bound[n])
        elif n in defaults:
            items.append(tx.wrap_static(defaults[n]))
        else:
            unsupported(f"{cls.__name__}() missing argument '{n}'", why="eager raises TypeError")
    return TupleVT(items, pytype=cls)


def rebuild_expr(cls: type, cls_expr: str, body: str) -> str:
    """Python source that builds an instance of the tuple class ``cls`` from a tuple display."""
    if is_namedtuple_class(cls):
        return f"{cls_expr}._make({body})"
    return f"{cls_expr}({body})"


def const_value(cls: type, vals: list) -> Any:
    """An instance of the tuple class ``cls`` holding ``vals``."""
    if cls is list:
        return vals
    if is_namedtuple_class(cls):
        return cls._make(vals)
    return cls(vals)


__all__ = ["is_namedtuple_class", "is_structseq_class", "field_names", "tuple_attr", "namedtuple_method",
           "build_namedtuple", "rebuild_expr", "const_value"]
