"""The base variable tracker, constants, and the Unsupported helper.

A variable tracker (VT) is the interpreter's symbolic stand-in for one Python
value.  It knows its Python type, how to answer attribute reads and calls
symbolically, and how to be rebuilt in generated code (``reconstruct``).
"""
from __future__ import annotations

import enum
import types
from typing import Any, Optional

from kiln.exc import Unsupported

from ..sources import Source

CONST_TYPES = (int, float, bool, str, bytes, complex, type(None), type(Ellipsis), type(NotImplemented))


def unsupported(what: str, why: str = "", hint: str = "") -> "NoReturn":  # noqa: F821
    """Raise the graph-break signal (kiln.exc.Unsupported); `where` is filled in later."""
    raise Unsupported(
        what,
        why=why or "the capture interpreter cannot put this into a graph",
        hint=hint or "move it out of the compiled region, or accept the graph break",
    )


class VT:
    """Base variable tracker."""

    source: Optional[Source] = None

    def python_type(self) -> type:
        unsupported(f"type() of {self}")

    def is_const(self) -> bool:
        return False

    def const(self) -> Any:
        unsupported(f"{self} used where a Python constant is required")

    def getattr(self, tx, name: str) -> "VT":
        unsupported(f"attribute '{name}' of {self}")

    def setattr(self, tx, name: str, value: "VT") -> None:
        unsupported(f"setting attribute '{name}' on {self}")

    def delattr(self, tx, name: str) -> None:
        unsupported(f"deleting attribute '{name}' of {self}")

    def call(self, tx, args: list, kwargs: dict) -> "VT":
        unsupported(f"call to {self}")

    def call_method(self, tx, name: str, args: list, kwargs: dict) -> "VT":
        return self.getattr(tx, name).call(tx, args, kwargs)

    def truthy(self, tx) -> bool:
        unsupported(f"truth value of {self}")

    def unpack(self, tx) -> list:
        unsupported(f"iteration over {self}")

    def reconstruct(self, cg) -> str:
        if self.source is not None:
            return self.source.code()
        unsupported(f"cannot rebuild {self} in generated code")

    def __repr__(self) -> str:
        return type(self).__name__


class ConstantVT(VT):
    """An immutable Python constant (int, float, str, None, dtype, device...)."""

    def __init__(self, value: Any, source: Optional[Source] = None):
        self.value = value
        self.source = source

    def python_type(self) -> type:
        return type(self.value)

    def is_const(self) -> bool:
        return True

    def const(self) -> Any:
        return self.value

    def truthy(self, tx) -> bool:
        return bool(self.value)

    def getattr(self, tx, name: str) -> VT:
        from .callables import ConstMethodVT, UserMethodVT

        if isinstance(self.value, enum.Enum):
            import inspect

            # NOTE: an enum's own methods are user code: inlined, never run while tracing.
            static = inspect.getattr_static(type(self.value), name, None)
            if isinstance(static, types.FunctionType):
                return UserMethodVT(static, self)
        attr = getattr(self.value, name)
        if callable(attr):
            return ConstMethodVT(self.value, name)
        return const_vt(attr)

    def unpack(self, tx) -> list:
        if isinstance(self.value, (str, bytes, tuple, frozenset, range)):
            return [const_vt(v) for v in self.value]
        return super().unpack(tx)

    def reconstruct(self, cg) -> str:
        return cg.const_expr(self.value)

    def __repr__(self) -> str:
        return f"ConstantVT({self.value!r})"


class DeletedVT(VT):
    """The pending value of an attribute deleted while tracing (``del obj.name``):
    replayed as ``delattr``."""

    def reconstruct(self, cg) -> str:
        return "None"

    def __repr__(self) -> str:
        return "DELETED"


class NullVT(VT):
    """The NULL that CPython pushes below a callable."""

    def __repr__(self) -> str:
        return "NULL"


def is_const_value(v: Any) -> bool:
    import torch

    if isinstance(v, CONST_TYPES) or isinstance(v, (torch.dtype, torch.device, torch.layout, torch.memory_format,
                                                    types.CodeType, enum.Enum)):
        return True
    return is_numpy_scalar(v)


def is_numpy_scalar(v: Any) -> bool:
    """A NumPy scalar (``np.float32(1.5)``, ``np.int64(3)``): immutable, a constant."""
    import sys

    np = sys.modules.get("numpy")
    return np is not None and isinstance(v, np.generic) and type(v).__module__ == "numpy"


def const_vt(v: Any, source: Optional[Source] = None) -> VT:
    """A VT for a plain value produced during tracing (no guards)."""
    from .containers import ListVT, SliceVT, TupleVT

    if isinstance(v, tuple):
        return TupleVT([const_vt(x) for x in v], pytype=type(v))
    if isinstance(v, list):
        return ListVT([const_vt(x) for x in v])
    if isinstance(v, slice):
        return SliceVT(const_vt(v.start), const_vt(v.stop), const_vt(v.step))
    if type(v) in (set, frozenset):
        from .sets import SetVT

        return SetVT([const_vt(x) for x in v], pytype=type(v))
    if is_const_value(v):
        return ConstantVT(v, source)
    unsupported(f"value of type {type(v).__name__} produced during capture")


def consts(vts) -> list:
    return [v.const() for v in vts]
