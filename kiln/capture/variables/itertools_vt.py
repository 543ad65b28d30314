"""itertools, as one table keyed by the itertools callable.

In: the VT arguments of a call such as ``itertools.product(a, b)``.  Out: an iterator VT.

Most itertools functions only rearrange the items they are given: those run the real
itertools function on the lists of item VTs (the VTs are opaque values to it), so the
result has exactly CPython's order and length.  Those that call a user function
(``accumulate``, ``groupby``, ``starmap``, ``takewhile``...) call it symbolically, in the
order the lazy iterator would; the ones that may be endless (``count``, ``cycle``,
``repeat`` without a count) make their items lazily.

NOTE: the finite ones are unrolled when called, not when consumed.  That is only the
same as lazy iteration when the user functions have no side effects, so a call whose
callbacks mutate Python state breaks the graph (as generators do).
"""
from __future__ import annotations

import itertools
from typing import Any, Callable

from .base import VT, ConstantVT, unsupported
from .containers import IteratorVT, LazyIteratorVT, TupleVT, iterate


def _items(tx, v: VT) -> list:
    return iterate(tx, v).unpack(tx)


def _tuples(rows) -> IteratorVT:
    return IteratorVT([TupleVT(list(r)) for r in rows])


def _consts(*vs: VT) -> list:
    return [None if v is None else v.const() for v in vs]


def _no_side_effects(tx, what: str, run: Callable) -> Any:
    before = tx.output.side_effects.size()
    out = run()
    if tx.output.side_effects.size() != before:
        unsupported(f"{what} with a function that has side effects", why="it is unrolled while tracing")
    return out


def _chain(tx, *its: VT) -> VT:
    return IteratorVT([v for it in its for v in _items(tx, it)])


def _from_iterable(tx, its: VT) -> VT:
    return _chain(tx, *_items(tx, its))


def _product(tx, *its: VT, repeat: VT = None) -> VT:
    r = 1 if repeat is None else repeat.const()
    return _tuples(itertools.product(*[_items(tx, i) for i in its], repeat=r))


def _combinatoric(fn: Callable) -> Callable:
    def run(tx, it: VT, r: VT = None) -> VT:
        items = _items(tx, it)
        return _tuples(fn(items) if r is None else fn(items, r.const()))

    return run


def _zip_longest(tx, *its: VT, fillvalue: VT = None) -> VT:
    fill = fillvalue if fillvalue is not None else ConstantVT(None)
    return _tuples(itertools.zip_longest(*[_items(tx, i) for i in its], fillvalue=fill))


def _islice(tx, it: VT, *args: VT) -> VT:
    bounds = _consts(*args)
    src = iterate(tx, it)
    if isinstance(src, LazyIteratorVT):
        sl = slice(*bounds)
        if sl.stop is None:
            unsupported("islice() of an endless iterator without a stop")
        # NOTE: take exactly the items islice would consume, no more.
        taken = [src.next(tx) for _ in range(sl.stop)]
        return IteratorVT([v for v in taken if v is not None][sl])
    return IteratorVT(list(itertools.islice(src.unpack(tx), *bounds)))


def _pairwise(tx, it: VT) -> VT:
    items = _items(tx, it)
    return _tuples(zip(items, items[1:]))


def _compress(tx, data: VT, selectors: VT) -> VT:
    return IteratorVT([d for d, s in zip(_items(tx, data), _items(tx, selectors)) if s.truthy(tx)])


def _accumulate(tx, it: VT, func: VT = None, *, initial: VT = None) -> VT:
    from ..operators import binary_op
    import operator

    items = _items(tx, it)
    if initial is not None and not (isinstance(initial, ConstantVT) and initial.value is None):
        items = [initial] + items

    def run() -> list:
        out = []
        for v in items:
            if not out:
                out.append(v)
            elif func is None or (isinstance(func, ConstantVT) and func.value is None):
                out.append(binary_op(tx, operator.add, out[-1], v))
            else:
                out.append(func.call(tx, [out[-1], v], {}))
        return out

    return IteratorVT(_no_side_effects(tx, "itertools.accumulate", run))


def _groupby(tx, it: VT, key: VT = None) -> VT:
    items = _items(tx, it)

    def run() -> list:
        groups: list = []
        for v in items:
            k = v if key is None or (isinstance(key, ConstantVT) and key.value is None) else key.call(tx, [v], {})
            kc = k.const()
            if groups and groups[-1][0] == kc:
                groups[-1][2].append(v)
            else:
                groups.append((kc, k, [v]))
        return groups

    groups = _no_side_effects(tx, "itertools.groupby", run)
    return IteratorVT([TupleVT([k, IteratorVT(vs)]) for _, k, vs in groups])


def _starmap(tx, fn: VT, it: VT) -> VT:
    items = _items(tx, it)
    return IteratorVT(_no_side_effects(tx, "itertools.starmap",
                                       lambda: [fn.call(tx, a.unpack(tx), {}) for a in items]))


def _while(take: bool) -> Callable:
    def run(tx, pred: VT, it: VT) -> VT:
        items = _items(tx, it)

        def go() -> list:
            for i, v in enumerate(items):
                if not pred.call(tx, [v], {}).truthy(tx):
                    return items[:i] if take else items[i:]
            return items if take else []

        return IteratorVT(_no_side_effects(tx, "itertools.takewhile/dropwhile", go))

    return run


def _filterfalse(tx, pred: VT, it: VT) -> VT:
    items = _items(tx, it)
    if isinstance(pred, ConstantVT) and pred.value is None:
        return IteratorVT([v for v in items if not v.truthy(tx)])
    return IteratorVT(_no_side_effects(tx, "itertools.filterfalse",
                                       lambda: [v for v in items if not pred.call(tx, [v], {}).truthy(tx)]))


def _count(tx, start: VT = None, step: VT = None) -> VT:
    from ..operators import binary_op
    import operator

    state = {"next": start if start is not None else ConstantVT(0)}
    inc = step if step is not None else ConstantVT(1)

    def gen():
        while True:
            v = state["next"]
            state["next"] = binary_op(tx, operator.add, v, inc)
            yield v

    def rebuild(cg) -> str:
        # NOTE: the generator computes the next value before yielding the current one.
        return f"{cg.obj(itertools.count)}({cg.expr(state['next'])}, {cg.expr(inc)})"

    return LazyIteratorVT(gen(), "itertools.count()", rebuild)


def _repeat(tx, obj: VT, times: VT = None) -> VT:
    if times is not None:
        return IteratorVT([obj] * max(times.const(), 0))

    def gen():
        while True:
            yield obj

    return LazyIteratorVT(gen(), "itertools.repeat() without a count",
                          lambda cg: f"{cg.obj(itertools.repeat)}({cg.expr(obj)})")


def _cycle(tx, it: VT) -> VT:
    items = _items(tx, it)

    def gen():
        while items:
            yield from items

    return LazyIteratorVT(gen(), "itertools.cycle()")


def _tee(tx, it: VT, n: VT = None) -> VT:
    items = _items(tx, it)
    return TupleVT([IteratorVT(items) for _ in range(2 if n is None else n.const())])


ITERTOOLS: dict[Any, Callable] = {
    itertools.chain: _chain,
    itertools.chain.from_iterable: _from_iterable,
    itertools.product: _product,
    itertools.combinations: _combinatoric(itertools.combinations),
    itertools.combinations_with_replacement: _combinatoric(itertools.combinations_with_replacement),
    itertools.permutations: _combinatoric(itertools.permutations),
    itertools.zip_longest: _zip_longest,
    itertools.islice: _islice,
    itertools.compress: _compress,
    itertools.accumulate: _accumulate,
    itertools.groupby: _groupby,
    itertools.starmap: _starmap,
    itertools.takewhile: _while(True),
    itertools.dropwhile: _while(False),
    itertools.filterfalse: _filterfalse,
    itertools.count: _count,
    itertools.repeat: _repeat,
    itertools.cycle: _cycle,
    itertools.tee: _tee,
}
if hasattr(itertools, "pairwise"):
    ITERTOOLS[itertools.pairwise] = _pairwise

__all__ = ["ITERTOOLS"]
