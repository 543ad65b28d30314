"""dict, OrderedDict and defaultdict (built in the region or passed in), and their views.

A ``DictVT`` holds ``{hash key: value VT}`` (hashing.py): constant keys are their own
key; other keys (tensors, modules, objects) also keep the VT that stands for them in
``key_vts``, so that iteration hands back the key itself and generated code can
rebuild it.  Methods are one table keyed by name (``_METHODS``); OrderedDict adds
``move_to_end`` and ``popitem(last=)``; a defaultdict calls its factory on a missing key.
"""
from __future__ import annotations

import collections
import operator
from typing import Any, Callable, Optional

from ..sources import Source
from .base import VT, ConstantVT, const_vt, unsupported
from .hashing import hash_key


class DictVT(VT):
    """A dict (or OrderedDict / defaultdict); ``items`` maps hash keys to value VTs."""

    def __init__(self, items: dict, source: Optional[Source] = None, pytype: type = dict,
                 key_vts: Optional[dict] = None, default_factory: Optional[VT] = None):
        self.items = dict(items)
        self.key_vts: dict = dict(key_vts or {})
        self.source = source
        self.pytype = pytype
        self.default_factory = default_factory
        self.mutated = False
        from .containers import running_generator

        self.gen_owner = running_generator()

    # ------------------------------------------------------------ keys
    def key_vt(self, k: Any) -> VT:
        """The VT of the key whose hash key is ``k``."""
        vt = self.key_vts.get(k)
        return vt if vt is not None else const_vt(k)

    def put(self, key: VT, value: VT) -> None:
        """``d[key] = value`` without side-effect bookkeeping (builders, copies)."""
        k = hash_key(key)
        # NOTE: as in a real dict, the first key object of equal keys stays the key.
        if k not in self.items and not isinstance(key, ConstantVT):
            self.key_vts[k] = key
        self.items[k] = value

    def keys(self) -> list:
        return [self.key_vt(k) for k in self.items]

    # ------------------------------------------------------------ queries
    def python_type(self) -> type:
        return self.pytype

    def truthy(self, tx) -> bool:
        return bool(self.items)

    def unpack(self, tx) -> list:
        return self.keys()

    def contains(self, tx, item: VT) -> bool:
        return hash_key(item) in self.items

    def getitem(self, tx, key: VT) -> VT:
        k = hash_key(key)
        if k in self.items:
            return self.items[k]
        if self.pytype is collections.Counter:
            return ConstantVT(0)
        if self.default_factory is not None and not (isinstance(self.default_factory, ConstantVT)
                                                     and self.default_factory.value is None):
            value = self.default_factory.call(tx, [], {})
            self.setitem(tx, key, value)
            return value
        from .exceptions import raise_new

        raise_new(KeyError, key)  # NOTE: as eager: an except block in the region may catch it

    def setitem(self, tx, key: VT, value: VT) -> None:
        self._mutated(tx)
        self.put(key, value)

    def _mutated(self, tx) -> None:
        from .containers import no_mutation_in_generator

        no_mutation_in_generator(tx, self)
        if self.source is not None:
            self.mutated = True
            tx.output.side_effects.track(self)

    def getattr(self, tx, name: str) -> VT:
        from .callables import BoundMethodVT, ClassVT

        if name == "__class__":
            return ClassVT(self.pytype)
        if name == "default_factory" and self.pytype is collections.defaultdict:
            return self.default_factory or ConstantVT(None)
        if name in _METHODS or name in TYPE_METHODS.get(self.pytype, {}) or hasattr(self.pytype, name):
            # NOTE: a method the tables lack breaks when called (call_method), not here.
            return BoundMethodVT(self, name)
        raise AttributeError(f"'{self.pytype.__name__}' object has no attribute '{name}'")

    def call_method(self, tx, name: str, args: list, kwargs: dict) -> VT:
        fn = TYPE_METHODS.get(self.pytype, {}).get(name) or _METHODS.get(name)
        if fn is None:
            unsupported(f"method {self.pytype.__name__}.{name}")
        out = fn(tx, self, *args, **kwargs)
        return ConstantVT(None) if out is None else out

    def binop(self, tx, op: Callable, other: VT) -> Optional[VT]:
        """``d | other`` (a new dict) and ``d |= other``."""
        if not isinstance(other, DictVT):
            return None
        if op is operator.or_:
            out = _copy(tx, self)
            _merge(out, other)
            return out
        if op is operator.ior:
            _update(tx, self, other)
            return self
        if op in (operator.eq, operator.ne) and self.is_const_dict() and other.is_const_dict():
            return ConstantVT(op(self.const(), other.const()))
        return None

    def is_const_dict(self) -> bool:
        return not self.key_vts and all(v.is_const() for v in self.items.values())

    def is_const(self) -> bool:
        return False

    def const(self) -> Any:
        if not self.is_const_dict():
            unsupported(f"{self} used where a Python constant is required")
        return {k: v.const() for k, v in self.items.items()}

    # ------------------------------------------------------------ code
    def replay_value(self, cg) -> str:
        return "{" + ", ".join(f"{cg.expr(self.key_vt(k))}: {cg.expr(v)}" for k, v in self.items.items()) + "}"

    @staticmethod
    def replay_apply(target: str, new: str) -> str:
        return f"{target}.clear(); {target}.update({new})"

    def reconstruct(self, cg) -> str:
        if self.source is not None:
            return self.source.code()
        body = self.replay_value(cg)
        if self.pytype is collections.defaultdict:
            factory = cg.expr(self.default_factory) if self.default_factory is not None else "None"
            body = f"{cg.obj(self.pytype)}({factory}, {body})"
        elif self.pytype is not dict:
            body = f"{cg.obj(self.pytype)}({body})"
        return cg.container(self, body)

    def __repr__(self) -> str:
        return f"DictVT({self.pytype.__name__}, {list(self.items)})"


class DictViewVT(VT):
    """``d.keys()`` / ``d.values()`` / ``d.items()``: a live view of a DictVT."""

    _TYPES = {"keys": type({}.keys()), "values": type({}.values()), "items": type({}.items())}

    def __init__(self, d: DictVT, kind: str):
        self.d = d
        self.kind = kind

    def python_type(self) -> type:
        return self._TYPES[self.kind]

    def unpack(self, tx) -> list:
        from .containers import TupleVT

        if self.kind == "keys":
            return self.d.keys()
        if self.kind == "values":
            return list(self.d.items.values())
        return [TupleVT([self.d.key_vt(k), v]) for k, v in self.d.items.items()]

    def truthy(self, tx) -> bool:
        return bool(self.d.items)

    def contains(self, tx, item: VT) -> bool:
        if self.kind == "keys":
            return self.d.contains(tx, item)
        from ..operators import contains

        return contains(tx, item, _as_list(self.unpack(tx)))

    def getattr(self, tx, name: str) -> VT:
        from .callables import BoundMethodVT

        if name in ("__len__", "__contains__", "__iter__", "isdisjoint"):
            return BoundMethodVT(self, name)
        raise AttributeError(f"'{self.python_type().__name__}' object has no attribute '{name}'")

    def call_method(self, tx, name: str, args: list, kwargs: dict) -> VT:
        from .containers import IteratorVT

        if name == "__len__":
            return ConstantVT(len(self.d.items))
        if name == "__contains__":
            return ConstantVT(self.contains(tx, args[0]))
        if name == "__iter__":
            return IteratorVT(self.unpack(tx))
        if name == "isdisjoint" and self.kind == "keys":
            from .sets import SetVT

            return SetVT(self.unpack(tx)).call_method(tx, name, args, kwargs)
        unsupported(f"method {self.kind}.{name} of a dict view")

    def binop(self, tx, op: Callable, other: VT) -> Optional[VT]:
        """Key views are set-like: ``a.keys() | b.keys()`` is a set."""
        from .sets import SetVT, is_set_like

        if self.kind != "keys" or not is_set_like(other):
            return None
        return SetVT(self.unpack(tx)).binop(tx, op, other)

    def reconstruct(self, cg) -> str:
        return f"({cg.expr(self.d)}).{self.kind}()"

    def __repr__(self) -> str:
        return f"DictViewVT({self.kind}, {self.d})"


def _as_list(items: list) -> VT:
    from .containers import ListVT

    return ListVT(items)


# ---------------------------------------------------------------- methods
def _pairs(tx, other: VT) -> list:
    """(key VT, value VT) pairs of a mapping or an iterable of pairs."""
    if isinstance(other, DictVT):
        return [(other.key_vt(k), v) for k, v in other.items.items()]
    if hasattr(other, "obj") and isinstance(other.obj, dict):
        keys = other.call_method(tx, "keys", [], {}).unpack(tx)
        return [(k, other.call_method(tx, "__getitem__", [k], {})) for k in keys]
    out = []
    for pair in other.unpack(tx):
        kv = pair.unpack(tx)
        if len(kv) != 2:
            unsupported("dict update from a sequence whose items are not pairs", why="eager raises ValueError")
        out.append((kv[0], kv[1]))
    return out


def _merge(d: DictVT, other: VT, tx=None, kwargs: Optional[dict] = None) -> None:
    for k, v in _pairs(tx, other) if other is not None else []:
        d.put(k, v)
    for k, v in (kwargs or {}).items():
        d.put(ConstantVT(k), v)


def _update(tx, d: DictVT, other: VT = None, **kwargs: VT) -> None:
    d._mutated(tx)
    _merge(d, other, tx, kwargs)


def _get(tx, d: DictVT, key: VT, default: VT = None) -> VT:
    k = hash_key(key)
    if k in d.items:
        return d.items[k]
    return default if default is not None else ConstantVT(None)


def _pop(tx, d: DictVT, key: VT, *default: VT) -> VT:
    k = hash_key(key)
    if k in d.items:
        d._mutated(tx)
        d.key_vts.pop(k, None)
        return d.items.pop(k)
    if default:
        return default[0]
    unsupported(f"dict.pop of a missing key {key}", why="eager raises KeyError")


def _popitem(tx, d: DictVT, last: VT = None) -> VT:
    from .containers import TupleVT

    if not d.items:
        unsupported("popitem() of an empty dict", why="eager raises KeyError")
    keys = list(d.items)
    k = keys[0] if (last is not None and not last.const()) else keys[-1]
    d._mutated(tx)
    kv = d.key_vt(k)
    d.key_vts.pop(k, None)
    return TupleVT([kv, d.items.pop(k)])


def _setdefault(tx, d: DictVT, key: VT, default: VT = None) -> VT:
    k = hash_key(key)
    if k not in d.items:
        d.setitem(tx, key, default if default is not None else ConstantVT(None))
    return d.items[k]


def _copy(tx, d: DictVT) -> DictVT:
    return DictVT(d.items, pytype=d.pytype, key_vts=d.key_vts, default_factory=d.default_factory)


def _delitem(tx, d: DictVT, key: VT) -> None:
    _pop(tx, d, key)


def _clear(tx, d: DictVT) -> None:
    d._mutated(tx)
    d.items.clear()
    d.key_vts.clear()


def _move_to_end(tx, d: DictVT, key: VT, last: VT = None) -> None:
    k = hash_key(key)
    if k not in d.items:
        unsupported(f"move_to_end of a missing key {key}", why="eager raises KeyError")
    d._mutated(tx)
    v = d.items.pop(k)
    if last is None or last.const():
        d.items[k] = v
    else:
        d.items = {k: v, **d.items}


_METHODS: dict[str, Callable] = {
    "__getitem__": lambda tx, d, k: d.getitem(tx, k),
    "__setitem__": lambda tx, d, k, v: d.setitem(tx, k, v),
    "__delitem__": _delitem,
    "__contains__": lambda tx, d, k: ConstantVT(d.contains(tx, k)),
    "__len__": lambda tx, d: ConstantVT(len(d.items)),
    "__iter__": lambda tx, d: _iter_keys(d),
    "get": _get,
    "keys": lambda tx, d: DictViewVT(d, "keys"),
    "values": lambda tx, d: DictViewVT(d, "values"),
    "items": lambda tx, d: DictViewVT(d, "items"),
    "update": _update,
    "pop": _pop,
    "popitem": lambda tx, d: _popitem(tx, d),
    "setdefault": _setdefault,
    "copy": _copy,
    "clear": _clear,
    "fromkeys": lambda tx, d, *a: fromkeys(d.pytype)(tx, *a),
}
_ORDERED_METHODS: dict[str, Callable] = {
    "move_to_end": _move_to_end,
    "popitem": _popitem,
}
# NOTE: methods a dict subclass adds or changes, by class (collections_vt.py adds Counter's).
TYPE_METHODS: dict[type, dict] = {collections.OrderedDict: _ORDERED_METHODS}


def _iter_keys(d: DictVT) -> VT:
    from .containers import IteratorVT

    return IteratorVT(d.keys())


# ---------------------------------------------------------------- construction
def build_dict(tx, cls: type, *args: VT, **kwargs: VT) -> DictVT:
    """``dict(...)``, ``OrderedDict(...)``, ``defaultdict(factory, ...)``."""
    factory = None
    if cls is collections.defaultdict:
        factory = args[0] if args else ConstantVT(None)
        args = args[1:]
    if len(args) > 1:
        unsupported(f"{cls.__name__}() with {len(args)} positional arguments", why="eager raises TypeError")
    d = DictVT({}, pytype=cls, default_factory=factory)
    _merge(d, args[0] if args else None, tx, kwargs)
    return d


def fromkeys(cls: type) -> Callable:
    """``dict.fromkeys(keys, value=None)`` (and of OrderedDict / defaultdict)."""
    def run(tx, keys: VT, value: VT = None) -> DictVT:
        d = DictVT({}, pytype=cls)
        for k in keys.unpack(tx):
            d.put(k, value if value is not None else ConstantVT(None))
        return d

    return run


__all__ = ["DictVT", "DictViewVT", "build_dict", "fromkeys"]
