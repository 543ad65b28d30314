"""set and frozenset (built in the region or passed in), and dict key views.

A ``SetVT`` holds its members as ``{hash key: VT}`` (hashing.py): constants by value,
tensors and plain objects by identity.  Methods and operators are tables keyed by
name; every result is computed on the keys, so ``{1, True}`` has one member and
``{x, x}`` of one tensor has one, exactly as eager.

NOTE: the order of iteration.  A set of constants iterates in the order the real set
of those values has (computed while tracing, the same process runs the entry); a set
that holds tensors or objects (whose real order follows their ids, which change from
call to call) iterates in insertion order, as PyTorch's capture does.  ``pop()`` takes
the first member in that order.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Optional

from ..sources import Source
from .base import VT, ConstantVT, unsupported
from .hashing import hash_key, is_const_key


class SetVT(VT):
    """A set or frozenset of VTs."""

    def __init__(self, items, source: Optional[Source] = None, pytype: type = set):
        self.items: dict = {}
        for v in items:
            self.items.setdefault(hash_key(v), v)
        self.source = source
        self.pytype = pytype
        self.mutated = False
        from .containers import running_generator

        self.gen_owner = running_generator()

    # ------------------------------------------------------------ queries
    def python_type(self) -> type:
        return self.pytype

    def is_const(self) -> bool:
        return all(v.is_const() for v in self.items.values())

    def const(self) -> Any:
        return self.pytype(v.const() for v in self.items.values())

    def truthy(self, tx) -> bool:
        return bool(self.items)

    def ordered(self) -> list:
        """The members in iteration order (see the module's NOTE)."""
        keys = list(self.items)
        if all(is_const_key(k) for k in keys):
            return [self.items[k] for k in set(keys)]
        return list(self.items.values())

    def unpack(self, tx) -> list:
        return self.ordered()

    def contains(self, tx, item: VT) -> bool:
        return hash_key(item) in self.items

    def getattr(self, tx, name: str) -> VT:
        from .callables import BoundMethodVT

        if name == "__class__":
            from .callables import ClassVT

            return ClassVT(self.pytype)
        if name in _READS or (self.pytype is set and name in _WRITES) or hasattr(self.pytype, name):
            return BoundMethodVT(self, name)
        raise AttributeError(f"'{self.pytype.__name__}' object has no attribute '{name}'")

    def call_method(self, tx, name: str, args: list, kwargs: dict) -> VT:
        if kwargs:
            unsupported(f"{self.pytype.__name__}.{name}() with keyword arguments")
        if name in _READS:
            return _READS[name](tx, self, *args)
        if self.pytype is set and name in _WRITES:
            self._mutated(tx)
            out = _WRITES[name](tx, self, *args)
            return ConstantVT(None) if out is None else out
        unsupported(f"method {self.pytype.__name__}.{name}")

    def _mutated(self, tx) -> None:
        from .containers import no_mutation_in_generator

        no_mutation_in_generator(tx, self)
        if self.source is not None:
            self.mutated = True
            tx.output.side_effects.track(self)

    # ------------------------------------------------------------ operators
    def binop(self, tx, op: Callable, other: VT) -> Optional[VT]:
        """``self <op> other`` for the set operators, or None when ``op`` is not one."""
        if not is_set_like(other):
            return None
        if op in _INPLACE_OPS:
            method, plain = _INPLACE_OPS[op]
            if self.pytype is set:
                self.call_method(tx, method, [other], {})
                return self
            op = plain
        if op in _SET_OPS:
            return _READS[_SET_OPS[op]](tx, self, other)
        if op in _COMPARISONS:
            return ConstantVT(_COMPARISONS[op](set(self.items), set(keys_of(other))))
        return None

    def rbinop(self, tx, op: Callable, other: VT) -> Optional[VT]:
        """``other <op> self`` where ``other`` is a dict key view (views are set-like too)."""
        if is_set_like(other) and op in _SET_OPS:
            return SetVT(other.unpack(tx)).binop(tx, op, self)
        return None

    # ------------------------------------------------------------ code
    def reconstruct(self, cg) -> str:
        if self.source is not None:
            return self.source.code()
        return cg.container(self, self.replay_value(cg) if self.pytype is set
                            else f"frozenset({self.replay_value(cg)})")

    def replay_value(self, cg) -> str:
        """The members as a Python expression (a set display, or ``set()``)."""
        members = self.ordered()
        if not members:
            return "set()"
        return "{" + ", ".join(cg.expr(v) for v in members) + "}"

    @staticmethod
    def replay_apply(target: str, new: str) -> str:
        return f"{target}.clear(); {target}.update({new})"

    def __repr__(self) -> str:
        return f"SetVT({self.pytype.__name__}, {list(self.items.values())})"


def keys_of(vt: VT) -> list:
    """The hash keys of a set-like VT (a set, or a dict's keys view)."""
    if isinstance(vt, SetVT):
        return list(vt.items)
    return [hash_key(k) for k in vt.unpack(None)]


def is_set_like(vt: VT) -> bool:
    from .containers import DictViewVT

    return isinstance(vt, SetVT) or (isinstance(vt, DictViewVT) and vt.kind == "keys")


def _members(tx, it: VT) -> dict:
    """{key: VT} of any iterable VT."""
    if isinstance(it, SetVT):
        return dict(it.items)
    out: dict = {}
    for v in it.unpack(tx):
        out.setdefault(hash_key(v), v)
    return out


def _new(s: SetVT, items: dict) -> SetVT:
    out = SetVT([], pytype=s.pytype)
    out.items = items
    return out


def _union(tx, s: SetVT, *others: VT) -> SetVT:
    items = dict(s.items)
    for o in others:
        for k, v in _members(tx, o).items():
            items.setdefault(k, v)
    return _new(s, items)


def _intersection(tx, s: SetVT, *others: VT) -> SetVT:
    items = dict(s.items)
    for o in others:
        keep = _members(tx, o)
        items = {k: v for k, v in items.items() if k in keep}
    return _new(s, items)


def _difference(tx, s: SetVT, *others: VT) -> SetVT:
    items = dict(s.items)
    for o in others:
        drop = _members(tx, o)
        items = {k: v for k, v in items.items() if k not in drop}
    return _new(s, items)


def _symmetric_difference(tx, s: SetVT, other: VT) -> SetVT:
    o = _members(tx, other)
    items = {k: v for k, v in s.items.items() if k not in o}
    items.update({k: v for k, v in o.items() if k not in s.items})
    return _new(s, items)


def _keys_cmp(op: Callable) -> Callable:
    def run(tx, s: SetVT, other: VT) -> VT:
        return ConstantVT(op(set(s.items), set(_members(tx, other))))

    return run


def _copy(tx, s: SetVT) -> SetVT:
    return _new(s, dict(s.items))


_READS: dict[str, Callable] = {
    "union": _union,
    "intersection": _intersection,
    "difference": _difference,
    "symmetric_difference": _symmetric_difference,
    "issubset": _keys_cmp(operator.le),
    "issuperset": _keys_cmp(operator.ge),
    "isdisjoint": _keys_cmp(lambda a, b: a.isdisjoint(b)),
    "copy": _copy,
    "__contains__": lambda tx, s, v: ConstantVT(s.contains(tx, v)),
    "__len__": lambda tx, s: ConstantVT(len(s.items)),
    "__iter__": lambda tx, s: _iter(s),
}


def _iter(s: SetVT) -> VT:
    from .containers import IteratorVT

    return IteratorVT(s.ordered())


def _add(tx, s: SetVT, v: VT) -> None:
    s.items.setdefault(hash_key(v), v)


def _remove(tx, s: SetVT, v: VT) -> None:
    k = hash_key(v)
    if k not in s.items:
        unsupported("set.remove() of a missing member", why="eager raises KeyError")
    del s.items[k]


def _discard(s: SetVT, v: VT) -> None:
    s.items.pop(hash_key(v), None)


def _pop(tx, s: SetVT) -> VT:
    if not s.items:
        unsupported("pop from an empty set", why="eager raises KeyError")
    first = s.ordered()[0]
    del s.items[hash_key(first)]
    return first


def _replace(op: Callable) -> Callable:
    def run(tx, s: SetVT, *others: VT) -> None:
        s.items = op(tx, s, *others).items

    return run


_WRITES: dict[str, Callable] = {
    "add": _add,
    "discard": lambda tx, s, v: _discard(s, v),
    "remove": _remove,
    "pop": _pop,
    "clear": lambda tx, s: s.items.clear(),
    "update": _replace(_union),
    "intersection_update": _replace(_intersection),
    "difference_update": _replace(_difference),
    "symmetric_difference_update": _replace(_symmetric_difference),
}

_SET_OPS = {operator.or_: "union", operator.and_: "intersection", operator.sub: "difference",
            operator.xor: "symmetric_difference"}
_INPLACE_OPS = {operator.ior: ("update", operator.or_), operator.iand: ("intersection_update", operator.and_),
                operator.isub: ("difference_update", operator.sub),
                operator.ixor: ("symmetric_difference_update", operator.xor)}
_COMPARISONS = {operator.le: operator.le, operator.lt: operator.lt, operator.ge: operator.ge,
                operator.gt: operator.gt, operator.eq: operator.eq, operator.ne: operator.ne}


def build_set(tx, cls: type, iterable: Optional[VT] = None) -> SetVT:
    """``set(it)`` / ``frozenset(it)``."""
    return SetVT([] if iterable is None else iterable.unpack(tx), pytype=cls)


def wrap_set(tx, value: Any, source: Source, guard: bool) -> VT:
    """A set or frozenset read from the caller: its members must be constants or objects
    with an identity hash (functions, modules, classes); the guard compares the whole set
    with a snapshot of it, so any change of contents recompiles."""
    from .hashing import has_identity_hash
    from .base import is_const_value

    def plain(m: Any) -> bool:
        if type(m) is tuple:
            return all(plain(i) for i in m)
        return is_const_value(m) or (has_identity_hash(m) and not _is_tensor(m))

    members = []
    for m in value:
        if not plain(m):
            unsupported(f"a {type(value).__name__} holding a {type(m).__name__} passed to the compiled region",
                        why="only sets of constants and of plain objects are captured from the caller")
        members.append(tx.wrap_static(m))
    if guard:
        tx.output.guards.set_contents(source, value)
    return SetVT(members, source, pytype=type(value))


def _is_tensor(v: Any) -> bool:
    import torch

    return isinstance(v, torch.Tensor)


__all__ = ["SetVT", "build_set", "wrap_set", "is_set_like", "keys_of"]
