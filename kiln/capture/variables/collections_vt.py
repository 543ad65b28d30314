"""collections: deque and Counter (OrderedDict and defaultdict are DictVTs, dicts.py;
namedtuple classes are tuples, namedtuples.py).

In: constructor arguments or a deque read from the caller.  Out: VTs whose methods are
tables keyed by name.  A deque passed in is read item by item (guarded on its type,
length and ``maxlen``); its mutations are replayed after the graph like a list's.
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Optional

from ..sources import Source
from .base import VT, ConstantVT, const_vt, unsupported
from .containers import IteratorVT, ListVT, iterate
from .dicts import TYPE_METHODS, DictVT, build_dict
from .hashing import hash_key


class DequeVT(ListVT):
    """A ``collections.deque`` (``maxlen`` a Python int or None)."""

    def __init__(self, items: list, source: Optional[Source] = None, maxlen: Optional[int] = None):
        super().__init__(items, source)
        self.pytype = collections.deque
        self.maxlen = maxlen
        self._trim(left=True)

    def _trim(self, left: bool) -> None:
        """Drop items past ``maxlen`` from the end opposite to where they were added."""
        if self.maxlen is not None and len(self.items) > self.maxlen:
            extra = len(self.items) - self.maxlen
            if left:
                del self.items[:extra]
            else:
                del self.items[len(self.items) - extra:]

    def getitem(self, tx, key: VT) -> VT:
        if isinstance(key.const(), slice):
            unsupported("slicing a deque", why="eager raises TypeError")
        return super().getitem(tx, key)

    def getattr(self, tx, name: str) -> VT:
        if name == "maxlen":
            return ConstantVT(self.maxlen)
        return super().getattr(tx, name)

    def mutate(self, tx, name: str, args: list, kwargs: dict) -> VT:
        if name == "copy":
            return DequeVT(self.items, maxlen=self.maxlen)
        op = _DEQUE_METHODS.get(name)
        if op is None:
            if name in ("sort",) or kwargs:
                unsupported(f"method deque.{name}")
            return super().mutate(tx, name, args, kwargs)
        from .containers import no_mutation_in_generator

        no_mutation_in_generator(tx, self)
        if self.source is not None:
            self.mutated = True
            tx.output.side_effects.track(self)
        out = op(tx, self, *args)
        return ConstantVT(None) if out is None else out

    def replay_value(self, cg) -> str:
        return "[" + ", ".join(cg.expr(i) for i in self.items) + "]"

    @staticmethod
    def replay_apply(target: str, new: str) -> str:
        return f"{target}.clear(); {target}.extend({new})"

    def reconstruct(self, cg) -> str:
        if self.source is not None:
            return self.source.code()
        return cg.container(self, f"{cg.obj(collections.deque)}({self.replay_value(cg)}, maxlen={self.maxlen!r})")

    def __repr__(self) -> str:
        return f"DequeVT({self.items})"


def _append(right: bool) -> Callable:
    def run(tx, d: DequeVT, v: VT) -> None:
        if right:
            d.items.append(v)
        else:
            d.items.insert(0, v)
        d._trim(left=right)

    return run


def _extend(right: bool) -> Callable:
    def run(tx, d: DequeVT, it: VT) -> None:
        for v in iterate(tx, it).unpack(tx):
            _append(right)(tx, d, v)

    return run


def _pop(right: bool) -> Callable:
    def run(tx, d: DequeVT) -> VT:
        if not d.items:
            unsupported("pop from an empty deque", why="eager raises IndexError")
        return d.items.pop(-1 if right else 0)

    return run


def _rotate(tx, d: DequeVT, n: VT = None) -> None:
    k = 1 if n is None else n.const()
    if d.items:
        k %= len(d.items)
        d.items[:] = d.items[-k:] + d.items[:-k] if k else d.items


_DEQUE_METHODS: dict[str, Callable] = {
    "append": _append(True),
    "appendleft": _append(False),
    "pop": _pop(True),
    "popleft": _pop(False),
    "extend": _extend(True),
    "extendleft": _extend(False),
    "rotate": _rotate,
    "clear": lambda tx, d: d.items.clear(),
}


def _deque(tx, iterable: VT = None, maxlen: VT = None) -> VT:
    items = [] if iterable is None else iterate(tx, iterable).unpack(tx)
    return DequeVT(items, maxlen=None if maxlen is None else maxlen.const())


def wrap_deque(tx, value: collections.deque, source: Source, guard: bool) -> VT:
    """A deque read from the caller: items read as ``src[i]``."""
    from .builder import wrap

    if guard:
        tx.output.guards.length(source, value)
        tx.output.guards.const(source.attr("maxlen"), value.maxlen)
    items = [wrap(tx, v, source.item(i), guard) for i, v in enumerate(value)]
    return DequeVT(items, source, value.maxlen)


# ---------------------------------------------------------------- Counter
def _count_into(tx, c: DictVT, it: VT) -> None:
    if isinstance(it, DictVT):
        for k, v in it.items.items():
            old = c.items.get(k, ConstantVT(0))
            c.put(it.key_vt(k), ConstantVT(old.const() + v.const()))
        return
    for v in iterate(tx, it).unpack(tx):
        k = hash_key(v)
        c.put(v, ConstantVT(c.items[k].const() + 1 if k in c.items else 1))


def _counter(tx, iterable: VT = None, **kwargs: VT) -> VT:
    c = DictVT({}, pytype=collections.Counter)
    if iterable is not None:
        _count_into(tx, c, iterable)
    for k, v in kwargs.items():
        c.put(ConstantVT(k), v)
    return c


def _counter_update(tx, c: DictVT, iterable: VT = None, **kwargs: VT) -> None:
    c._mutated(tx)
    if iterable is not None:
        _count_into(tx, c, iterable)
    if kwargs:
        _count_into(tx, c, DictVT({k: v for k, v in kwargs.items()}))


def _most_common(tx, c: DictVT, n: VT = None) -> VT:
    from .containers import TupleVT

    pairs = sorted(c.items.items(), key=lambda kv: kv[1].const(), reverse=True)
    if n is not None and n.const() is not None:
        pairs = pairs[: n.const()]
    return ListVT([TupleVT([c.key_vt(k), v]) for k, v in pairs])


def _total(tx, c: DictVT) -> VT:
    return ConstantVT(sum(v.const() for v in c.items.values()))


def _elements(tx, c: DictVT) -> VT:
    return IteratorVT([c.key_vt(k) for k, v in c.items.items() for _ in range(max(v.const(), 0))])


TYPE_METHODS[collections.Counter] = {
    "update": _counter_update,
    "most_common": _most_common,
    "total": _total,
    "elements": _elements,
}


def _chainmap(tx, *maps: VT) -> VT:
    unsupported("constructing a collections.ChainMap", why="ChainMap is not modelled by capture",
                hint="merge the dicts ({**a, **b}) or build the ChainMap outside the compiled region")


TYPES: dict[Any, Callable] = {
    collections.deque: _deque,
    collections.OrderedDict: lambda tx, *a, **k: build_dict(tx, collections.OrderedDict, *a, **k),
    collections.defaultdict: lambda tx, *a, **k: build_dict(tx, collections.defaultdict, *a, **k),
    collections.Counter: _counter,
    collections.ChainMap: _chainmap,
}

__all__ = ["DequeVT", "TYPES", "wrap_deque"]
