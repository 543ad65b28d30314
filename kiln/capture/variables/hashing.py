"""Hash keys of variable trackers: how sets and dicts built while tracing find their members.

In: a VT used as a set member or a dict key.  Out: a hashable Python key with the
equality Python itself would use for the value the VT stands for:

- a constant (int, str, dtype, an enum member, a tuple of constants) is its own key,
  so ``1``, ``1.0`` and ``True`` are one key, as in a real set;
- a tensor is keyed by identity (``Tensor.__hash__`` is ``id``): two VTs of the same
  input tensor share one fake tensor, hence one key;
- an object with ``object``'s identity hash (a module, a function, a class, a user
  object without ``__hash__``/``__eq__``) is keyed by the object itself.

Anything else (an object with its own ``__hash__``, a symbolic size whose hash would
specialise it, a list) is a graph break.
"""
from __future__ import annotations

import enum
import types
from typing import Any

from .base import VT, ConstantVT, unsupported


class Ident:
    """A key that compares by the identity of ``obj`` (a fake tensor)."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Ident) and other.obj is self.obj

    def __repr__(self) -> str:
        return f"Ident({type(self.obj).__name__}@{id(self.obj):x})"


# NOTE: hashes Python computes from the object's identity (or, for these types, from
# immutable state that equality also uses), so the real object is a faithful key.
_IDENTITY_HASH_TYPES = (type, types.FunctionType, types.BuiltinFunctionType, types.ModuleType,
                        types.MethodDescriptorType, types.WrapperDescriptorType, enum.Enum)


def has_identity_hash(obj: Any) -> bool:
    """``obj`` hashes and compares as Python's default (by identity), or is one of the
    types whose hash is as stable as that (classes, functions, modules, enum members)."""
    if isinstance(obj, _IDENTITY_HASH_TYPES):
        return True
    t = type(obj)
    return getattr(t, "__hash__", None) is object.__hash__ and t.__eq__ is object.__eq__


def real_object(vt: VT) -> Any:
    """The real Python object a VT wraps (a module, a function, a class...), or None."""
    for attr in ("mod", "obj", "fn", "cls"):
        if attr in getattr(vt, "__dict__", {}):
            obj = getattr(vt, attr)
            # NOTE: a bound method's `obj` is a VT, not the object it stands for.
            return None if isinstance(obj, VT) else obj
    return None


def hash_key(vt: VT) -> Any:
    """The key of ``vt`` as a set member or dict key (see the module docstring)."""
    from .containers import TupleVT
    from .tensor import TensorVT

    if isinstance(vt, ConstantVT):
        try:
            hash(vt.value)
        except TypeError:
            unsupported(f"unhashable {type(vt.value).__name__} used as a set member or dict key")
        return vt.value
    if isinstance(vt, TensorVT):
        return Ident(vt.fake)
    if isinstance(vt, TupleVT):
        return tuple(hash_key(i) for i in vt.items)
    if getattr(vt, "built_in_region", False):
        return vt.hash_key()  # NOTE: an object built in the region (new_objects.py)
    if hasattr(vt, "sym"):
        unsupported("a symbolic size used as a set member or dict key",
                    why="hashing it would specialise the size")
    obj = real_object(vt)
    if obj is not None and has_identity_hash(obj):
        return obj
    if vt.is_const():
        return vt.const()
    unsupported(f"{vt} used as a set member or dict key",
                why="capture only hashes constants, tensors and objects with the default identity hash")


def is_const_key(key: Any) -> bool:
    """A key that stands for a Python constant (no tensor or object inside)."""
    from .base import is_const_value

    if isinstance(key, tuple):
        return all(is_const_key(k) for k in key)
    return not isinstance(key, Ident) and is_const_value(key)


__all__ = ["Ident", "hash_key", "has_identity_hash", "real_object", "is_const_key"]
