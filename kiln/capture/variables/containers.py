"""Tuples, lists, dicts, slices and iterators of variable trackers."""
from __future__ import annotations

from typing import Any, Optional

from ..sources import Source
from .base import VT, ConstantVT, const_vt, unsupported


# NOTE: the generators being unrolled right now (innermost last), as tokens; a container
# made while one runs records it (``gen_owner``), so the generator may mutate its own
# containers (a `seen = set()` inside it): nobody outside can observe those early.
_RUNNING_GENERATORS: list = [None]


def running_generator():
    """The token of the innermost generator being unrolled (None outside generators)."""
    return _RUNNING_GENERATORS[-1]


class generator_scope:
    """``with generator_scope():`` around unrolling one generator."""

    def __enter__(self):
        _RUNNING_GENERATORS.append(object())

    def __exit__(self, *exc):
        _RUNNING_GENERATORS.pop()


def no_mutation_in_generator(tx, container: Optional[VT] = None) -> None:
    """Generators are unrolled while tracing: mutating a container made outside the generator
    could be observed in a different order than lazy iteration gives."""
    # NOTE: any generator being unrolled may mutate what one of them made (a `memo` set
    # handed down through `yield from`, as nn.Module.named_modules does): all of them run
    # to completion before the outermost consumer sees a value.
    owner = getattr(container, "gen_owner", None)
    if owner is not None and any(owner is g for g in _RUNNING_GENERATORS):
        return None
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
        self.gen_owner = running_generator()
        if pytype is not None:
            self.pytype = pytype

    def python_type(self) -> type:
        return self.pytype

    def is_const(self) -> bool:
        return all(i.is_const() for i in self.items)

    def const(self) -> Any:
        from .namedtuples import const_value

        return const_value(self.pytype, [i.const() for i in self.items])

    def truthy(self, tx) -> bool:
        return bool(self.items)

    def unpack(self, tx) -> list:
        return list(self.items)

    def getitem(self, tx, key: VT) -> VT:
        k = key.const()
        if isinstance(k, slice):
            import torch

            # NOTE: a slice of a named tuple is a plain tuple; of a torch.Size, a torch.Size.
            keep = self.pytype if self.pytype in (tuple, list, torch.Size) else None
            return type(self)(self.items[k], pytype=keep)
        if not isinstance(k, int):
            unsupported(f"{self.pytype.__name__} index of type {type(k).__name__}", why="eager raises TypeError")
        if not -len(self.items) <= k < len(self.items):
            unsupported(f"{self.pytype.__name__} index {k} out of range", why="eager raises IndexError")
        return self.items[k]

    def getattr(self, tx, name: str) -> VT:
        from .callables import BoundMethodVT, ClassVT
        from .namedtuples import tuple_attr

        if self.pytype not in (tuple, list):
            found = tuple_attr(tx, self, name)
            if found is not None:
                return found
        if name == "__class__":
            return ClassVT(self.pytype)
        if not hasattr(self.pytype, name):
            raise AttributeError(f"'{self.pytype.__name__}' object has no attribute '{name}'")
        return BoundMethodVT(self, name)

    def contains(self, tx, item: VT) -> bool:
        return bool(_matches(self, item))

    def call_method(self, tx, name: str, args: list, kwargs: dict) -> VT:
        from .namedtuples import namedtuple_method

        if name == "__getitem__":
            return self.getitem(tx, args[0])
        if name == "__len__":
            return ConstantVT(len(self.items))
        if name == "__contains__":
            return ConstantVT(self.contains(tx, args[0]))
        if name == "__iter__":
            return IteratorVT(self.items)
        if name in ("index", "count"):
            return _index_count(tx, self, name, *args)
        if name == "numel" and not args and not kwargs and _is_size(self.pytype):
            from ..operators import binary_op
            import operator

            acc = ConstantVT(1)
            for item in self.items:
                acc = binary_op(tx, operator.mul, acc, item)
            return acc
        if name in ("_replace", "_asdict"):
            out = namedtuple_method(tx, self, name, args, kwargs)
            if out is not None:
                return out
        return self.mutate(tx, name, args, kwargs)

    def mutate(self, tx, name: str, args: list, kwargs: dict) -> VT:
        unsupported(f"method {self.pytype.__name__}.{name}")


def _is_size(cls: type) -> bool:
    import torch

    return cls is torch.Size


def _matches(seq: SequenceVT, value: VT, first_only: bool = True, lo: int = 0, hi: Optional[int] = None) -> list:
    """Indexes of the items equal to ``value`` as CPython finds them (``x is v or x == v``,
    in order, stopping at the first hit when ``first_only``): a comparison that would ask a
    tensor for its truth value (eager raises or reads data) breaks the graph."""
    from ..operators import is_same

    from .tensor import TensorVT

    hits = []
    for i, x in enumerate(seq.items):
        if i < lo or (hi is not None and i >= hi):
            continue
        if isinstance(x, TensorVT) and isinstance(value, TensorVT) and x.fake is value.fake:
            hit = True
        elif isinstance(x, TensorVT) or isinstance(value, TensorVT):
            unsupported("comparing a tensor with == in a list search",
                        why="`in`, index(), count() and remove() compare items by value")
        elif x.is_const() and value.is_const():
            hit = x.const() == value.const()
        else:
            hit = is_same(x, value)
        if hit:
            hits.append(i)
            if first_only:
                break
    return hits


def _index_count(tx, seq: SequenceVT, name: str, value: VT, *bounds: VT) -> VT:
    """``seq.index(v[, start[, stop]])`` / ``seq.count(v)``."""
    if name == "count":
        return ConstantVT(len(_matches(seq, value, first_only=False)))
    lo, hi = (slice(*[b.const() for b in bounds]).indices(len(seq.items))[:2] if bounds else (0, len(seq.items)))
    hits = _matches(seq, value, True, lo, hi)
    if not hits:
        unsupported(f"{seq.pytype.__name__}.index of a value not present", why="eager raises ValueError")
    return ConstantVT(hits[0])


class TupleVT(SequenceVT):
    pytype = tuple

    def reconstruct(self, cg) -> str:
        if self.source is not None:
            return self.source.code()
        inner = ", ".join(cg.expr(i) for i in self.items)
        body = f"({inner},)" if len(self.items) == 1 else f"({inner})"
        if self.pytype is not tuple:
            from .namedtuples import rebuild_expr

            return rebuild_expr(self.pytype, cg.obj(self.pytype), body)
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
        if name == "copy" and not args and not kwargs:
            return ListVT(self.items)
        op = _LIST_MUTATORS.get(name)
        if op is None or (kwargs and name != "sort"):
            unsupported(f"method list.{name}")
        no_mutation_in_generator(tx, self)
        if self.source is not None:
            self.mutated = True
            tx.output.side_effects.track(self)
        return op(self, tx, *args, **kwargs) or ConstantVT(None)

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


def _remove(lst: ListVT, tx, v: VT) -> None:
    del lst.items[_index_count(tx, lst, "index", v).const()]


def _sort(lst: ListVT, tx, key: VT = None, reverse: VT = None) -> None:
    from .builtins import sort_items

    lst.items[:] = sort_items(tx, lst.items, key, reverse)


def _pop(lst: ListVT, tx, i: VT = None) -> VT:
    if not lst.items:
        unsupported("pop from an empty list", why="eager raises IndexError")
    k = -1 if i is None else i.const()
    if not -len(lst.items) <= k < len(lst.items):
        unsupported("pop index out of range", why="eager raises IndexError")
    return lst.items.pop(k)


_LIST_MUTATORS = {
    "append": lambda l, tx, v: l.items.append(v),
    "extend": lambda l, tx, v: l.items.extend(v.unpack(tx)),
    "insert": lambda l, tx, i, v: l.items.insert(i.const(), v),
    "pop": _pop,
    "remove": _remove,
    "sort": _sort,
    "clear": lambda l, tx: l.items.clear(),
    "reverse": lambda l, tx: l.items.reverse(),
    "__setitem__": _set_item,
    "__delitem__": lambda l, tx, k: l.items.__delitem__(k.const()),
}


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


# NOTE: a lazily produced iterator stops being unrolled after this many items.
MAX_LAZY_ITEMS = 10_000


class LazyIteratorVT(IteratorVT):
    """An iterator whose items are made on demand (``itertools.count()``, ``cycle``, an
    unbounded ``repeat``): ``gen`` is a Python generator of VTs, possibly endless."""

    def __init__(self, gen, what: str, rebuild=None):
        super().__init__([])
        self.gen = gen
        self.what = what
        self.done = False
        self.rebuild = rebuild  # rebuild(cg) -> source of an equal iterator from here on, or None

    def next(self, tx) -> Optional[VT]:
        if self.pos < len(self.items):
            return super().next(tx)
        if self.done:
            return None
        try:
            v = next(self.gen)
        except StopIteration:
            self.done = True
            return None
        self.items.append(v)
        self.pos += 1
        return v

    def unpack(self, tx) -> list:
        out = []
        while True:
            v = self.next(tx)
            if v is None:
                return out
            out.append(v)
            if len(out) > MAX_LAZY_ITEMS:
                unsupported(f"unrolling {self.what}", why=f"it yields more than {MAX_LAZY_ITEMS} items (endless?)")

    def reconstruct(self, cg) -> str:
        if self.rebuild is not None and self.pos == len(self.items):
            return self.rebuild(cg)
        unsupported(f"cannot rebuild {self.what} in generated code", why="its remaining items are made lazily")


def iterate(tx, v: VT) -> IteratorVT:
    """An iterator VT over ``v`` (itself if it is one)."""
    if isinstance(v, IteratorVT):
        return v
    return IteratorVT(v.unpack(tx))


from .dicts import DictVT, DictViewVT  # noqa: E402  (dicts.py builds on the sequences above)
