"""Tuples, lists, dicts, slices and iterators of variable trackers."""
from __future__ import annotations

from typing import Any, Optional

from ..sources import Source
from .base import VT, ConstantVT, const_vt, unsupported


def no_mutation_in_generator(tx) -> None:
    """Generators are unrolled while tracing: mutations inside them could differ from lazy runs."""
    t = tx
    while t is not None:
        if getattr(t, "generator_values", None) is not None:
            unsupported("container mutation inside a generator", why="generators are unrolled while tracing")
        t = t.parent
    return None


class SequenceVT(VT):
    pytype: type = tuple

    def __init__(self, items: list, source: Optional[Source] = None, pytype: Optional[type] = None):
        self.items = list(items)
        self.source = source
        if pytype is not None:
            self.pytype = pytype

    def python_type(self) -> type:
        return self.pytype

    def is_const(self) -> bool:
        return all(i.is_const() for i in self.items)

    def const(self) -> Any:
        vals = [i.const() for i in self.items]
        return self.pytype(vals) if self.pytype is not list else vals

    def truthy(self, tx) -> bool:
        return bool(self.items)

    def unpack(self, tx) -> list:
        return list(self.items)

    def getitem(self, tx, key: VT) -> VT:
        k = key.const()
        if isinstance(k, slice):
            return type(self)(self.items[k], pytype=self.pytype if self.pytype in (tuple, list) else None)
        return self.items[k]

    def getattr(self, tx, name: str) -> VT:
        from .callables import BoundMethodVT

        return BoundMethodVT(self, name)

    def call_method(self, tx, name: str, args: list, kwargs: dict) -> VT:
        if name == "__getitem__":
            return self.getitem(tx, args[0])
        if name == "__len__":
            return ConstantVT(len(self.items))
        if name == "index":
            vals = [i.const() for i in self.items]
            return ConstantVT(vals.index(args[0].const()))
        if name == "count":
            return ConstantVT([i.const() for i in self.items].count(args[0].const()))
        return self.mutate(tx, name, args, kwargs)

    def mutate(self, tx, name: str, args: list, kwargs: dict) -> VT:
        unsupported(f"method {self.pytype.__name__}.{name}")


class TupleVT(SequenceVT):
    pytype = tuple

    def reconstruct(self, cg) -> str:
        if self.source is not None:
            return self.source.code()
        inner = ", ".join(cg.expr(i) for i in self.items)
        body = f"({inner},)" if len(self.items) == 1 else f"({inner})"
        if self.pytype is not tuple:
            return f"{cg.obj(self.pytype)}({body})"
        return body

    def __repr__(self) -> str:
        return f"TupleVT({self.items})"


class ListVT(SequenceVT):
    """A list; mutations of a list that came from the caller are replayed."""

    pytype = list

    def __init__(self, items: list, source: Optional[Source] = None, pytype: Optional[type] = None):
        super().__init__(items, source, list)
        self.mutated = False

    def mutate(self, tx, name: str, args: list, kwargs: dict) -> VT:
        op = _LIST_MUTATORS.get(name)
        if op is None or kwargs:
            unsupported(f"method list.{name}")
        no_mutation_in_generator(tx)
        if self.source is not None:
            self.mutated = True
            tx.output.side_effects.track(self)
        return op(self, tx, *args) or ConstantVT(None)

    def setitem(self, tx, key: VT, value: VT) -> None:
        self.mutate(tx, "__setitem__", [key, value], {})

    def reconstruct(self, cg) -> str:
        if self.source is not None:
            return self.source.code()
        return cg.container(self, "[" + ", ".join(cg.expr(i) for i in self.items) + "]")

    def __repr__(self) -> str:
        return f"ListVT({self.items})"


def _set_item(lst: ListVT, tx, k: VT, v: VT) -> None:
    key = k.const()
    if isinstance(key, slice):
        lst.items[key] = v.unpack(tx)
    else:
        lst.items[key] = v


_LIST_MUTATORS = {
    "append": lambda l, tx, v: l.items.append(v),
    "extend": lambda l, tx, v: l.items.extend(v.unpack(tx)),
    "insert": lambda l, tx, i, v: l.items.insert(i.const(), v),
    "pop": lambda l, tx, i=None: l.items.pop(-1 if i is None else i.const()),
    "clear": lambda l, tx: l.items.clear(),
    "reverse": lambda l, tx: l.items.reverse(),
    "__setitem__": _set_item,
    "__delitem__": lambda l, tx, k: l.items.__delitem__(k.const()),
}


class DictVT(VT):
    """A dict with constant keys."""

    def __init__(self, items: dict, source: Optional[Source] = None, pytype: type = dict):
        self.items = dict(items)
        self.source = source
        self.pytype = pytype
        self.mutated = False

    def python_type(self) -> type:
        return self.pytype

    def truthy(self, tx) -> bool:
        return bool(self.items)

    def unpack(self, tx) -> list:
        return [const_vt(k) for k in self.items]

    def getitem(self, tx, key: VT) -> VT:
        k = key.const()
        if k not in self.items:
            unsupported(f"KeyError {k!r} on a dict")
        return self.items[k]

    def setitem(self, tx, key: VT, value: VT) -> None:
        self._mutated(tx)
        self.items[key.const()] = value

    def _mutated(self, tx) -> None:
        no_mutation_in_generator(tx)
        if self.source is not None:
            self.mutated = True
            tx.output.side_effects.track(self)

    def getattr(self, tx, name: str) -> VT:
        from .callables import BoundMethodVT

        return BoundMethodVT(self, name)

    def call_method(self, tx, name: str, args: list, kwargs: dict) -> VT:
        if name == "__getitem__":
            return self.getitem(tx, args[0])
        if name == "get":
            k = args[0].const()
            return self.items.get(k, args[1] if len(args) > 1 else ConstantVT(None))
        if name == "keys":
            return ListVT([const_vt(k) for k in self.items])
        if name == "values":
            return ListVT(list(self.items.values()))
        if name == "items":
            return ListVT([TupleVT([const_vt(k), v]) for k, v in self.items.items()])
        if name == "__contains__":
            return ConstantVT(args[0].const() in self.items)
        if name == "__len__":
            return ConstantVT(len(self.items))
        if name == "__setitem__":
            self.setitem(tx, args[0], args[1])
            return ConstantVT(None)
        if name == "update" and len(args) == 1 and isinstance(args[0], DictVT):
            self._mutated(tx)
            self.items.update(args[0].items)
            self.items.update(kwargs)
            return ConstantVT(None)
        if name == "pop":
            self._mutated(tx)
            k = args[0].const()
            if k in self.items:
                return self.items.pop(k)
            if len(args) > 1:
                return args[1]
        if name == "setdefault":
            k = args[0].const()
            if k not in self.items:
                self._mutated(tx)
                self.items[k] = args[1] if len(args) > 1 else ConstantVT(None)
            return self.items[k]
        unsupported(f"method dict.{name}")

    def reconstruct(self, cg) -> str:
        if self.source is not None:
            return self.source.code()
        body = "{" + ", ".join(f"{k!r}: {cg.expr(v)}" for k, v in self.items.items()) + "}"
        if self.pytype is not dict:
            body = f"{cg.obj(self.pytype)}({body})"
        return cg.container(self, body)


class SliceVT(VT):
    def __init__(self, start: VT, stop: VT, step: VT):
        self.parts = (start, stop, step)

    def python_type(self) -> type:
        return slice

    def is_const(self) -> bool:
        return all(p.is_const() for p in self.parts)

    def const(self) -> Any:
        return slice(*(p.const() for p in self.parts))

    def reconstruct(self, cg) -> str:
        return "slice(" + ", ".join(cg.expr(p) for p in self.parts) + ")"


class IteratorVT(VT):
    """An iterator over already-known items (lists, tuples, ranges, zip...)."""

    def __init__(self, items: list):
        self.items = list(items)
        self.pos = 0

    def python_type(self) -> type:
        return type(iter([]))

    def next(self, tx) -> Optional[VT]:
        if self.pos >= len(self.items):
            return None
        self.pos += 1
        return self.items[self.pos - 1]

    def unpack(self, tx) -> list:
        rest = self.items[self.pos:]
        self.pos = len(self.items)
        return rest

    def reconstruct(self, cg) -> str:
        rest = self.items[self.pos:]
        return "iter((" + "".join(cg.expr(i) + ", " for i in rest) + "))"
