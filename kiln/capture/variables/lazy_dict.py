"""The values of a dict read from the caller, wrapped on first use.

In:  a dict / OrderedDict / defaultdict of the caller (builder.py ``_wrap_dict``): its keys are
     read (and guarded) when it is loaded, each value is kept as a :class:`Pending` read.
Out: ``DictVT.items`` as a :class:`LazyValues`, a dict whose values become VTs (wrapped and
     guarded through ``src[key]``) the first time anything reads them.

NOTE: as PyTorch's capture reads a dict argument's values lazily: what the code reads first
names a graph input (``functional_call`` reads the module's own tensors before the dict's, so
they are ``L['model']._parameters['weight']`` as in PyTorch), and values never read are never
guarded.  Every way of reading values goes through the methods below: C code that copies a
dict (``dict(d)``, ``{**d}``, ``d.update(other)``) takes the generic mapping path, by
keys and ``__getitem__``, because the class defines its own ``__iter__``.
"""
from __future__ import annotations

from typing import Any

_MISSING = object()


class Pending:
    """A value not read yet: ``wrap(tx, value, source, guard)`` when first read."""

    __slots__ = ("tx", "value", "source", "guard")

    def __init__(self, tx, value: Any, source, guard: bool):
        self.tx = tx
        self.value = value
        self.source = source
        self.guard = guard

    def realize(self):
        from .builder import wrap

        return wrap(self.tx, self.value, self.source, self.guard)

    def __repr__(self) -> str:
        return f"Pending({self.source.name() if self.source is not None else type(self.value).__name__})"


class LazyValues(dict):
    """``{hash key: VT or Pending}``; every read hands back VTs (see the module docstring)."""

    def _value(self, k: Any, v: Any) -> Any:
        if type(v) is Pending:
            v = v.realize()
            dict.__setitem__(self, k, v)
        return v

    def realize_all(self) -> None:
        for k, v in list(dict.items(self)):
            self._value(k, v)

    def is_pending(self, k: Any) -> bool:
        """Whether the value of ``k`` was never read."""
        return type(dict.get(self, k)) is Pending

    def peek(self, k: Any) -> Any:
        """The caller's object under ``k`` if it was never read (reading nothing), else _MISSING."""
        v = dict.get(self, k)
        return v.value if type(v) is Pending else _MISSING

    # ---------------------------------------------------------- reads of one value
    def __getitem__(self, k: Any) -> Any:
        return self._value(k, dict.__getitem__(self, k))

    def get(self, k: Any, default: Any = None) -> Any:
        v = dict.get(self, k, _MISSING)
        return default if v is _MISSING else self._value(k, v)

    def pop(self, k: Any, *default: Any) -> Any:
        if k in self:
            v = self[k]
            dict.pop(self, k)
            return v
        if default:
            return default[0]
        raise KeyError(k)

    def popitem(self) -> tuple:
        if not self:
            raise KeyError("popitem(): dictionary is empty")
        k = next(reversed(dict.keys(self)))
        return k, self.pop(k)

    def setdefault(self, k: Any, default: Any = None) -> Any:
        if k not in self:
            dict.__setitem__(self, k, default)
        return self[k]

    # ---------------------------------------------------------- reads of every value
    def values(self):
        self.realize_all()
        return dict.values(self)

    def items(self):
        self.realize_all()
        return dict.items(self)

    def copy(self) -> dict:
        self.realize_all()
        return dict(dict.items(self))

    def __iter__(self):
        # NOTE: defined so that C copies of this dict read values through __getitem__.
        return dict.__iter__(self)

    def __eq__(self, other: Any) -> bool:
        self.realize_all()
        if isinstance(other, LazyValues):
            other.realize_all()
        return dict.__eq__(self, other)

    def __ne__(self, other: Any) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None  # type: ignore[assignment]

    def __or__(self, other: Any) -> dict:
        out = self.copy()
        out.update(other)
        return out

    def __ror__(self, other: Any) -> dict:
        out = dict(other)
        out.update(self)
        return out

    def __reduce__(self):
        self.realize_all()
        return dict, (dict(dict.items(self)),)


__all__ = ["Pending", "LazyValues"]
