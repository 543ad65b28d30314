"""Builtins and builtin types, as a table keyed by the builtin object."""
from __future__ import annotations

import builtins
import enum
import functools
import operator
from typing import Any, Callable

from .base import VT, ConstantVT, const_vt, unsupported
from .containers import DictVT, IteratorVT, LazyIteratorVT, ListVT, SequenceVT, TupleVT, iterate


def _len(tx, x: VT) -> VT:
    from .tensor import TensorVT

    if isinstance(x, (SequenceVT, DictVT)):
        return ConstantVT(len(x.items))
    if isinstance(x, TensorVT):
        if x.fake.dim() == 0:
            unsupported("len() of a 0-d tensor")
        return x.call_method(tx, "size", [ConstantVT(0)], {})
    if x.is_const():
        return ConstantVT(len(x.const()))
    return x.call_method(tx, "__len__", [], {})


def _isinstance(tx, obj: VT, cls: VT) -> VT:
    c = cls.const()
    t = obj.python_type()
    import torch

    if t is not None and issubclass(t, torch.Tensor) and _mentions(c, torch.nn.Parameter):
        return ConstantVT(issubclass(t, c))
    return ConstantVT(issubclass(t, c) if isinstance(t, type) else False)


def _mentions(c: Any, target: type) -> bool:
    return c is target or (isinstance(c, tuple) and target in c)


def _getattr(tx, obj: VT, name: VT, default: VT = None) -> VT:
    try:
        return obj.getattr(tx, name.const())
    except (AttributeError, KeyError):
        if default is None:
            raise
        from .objects import UserObjectVT

        if isinstance(obj, UserObjectVT) and obj.source is not None:
            # NOTE: the default was taken: an attribute added later must recompile (as hasattr).
            tx.output.guards.attr_presence(obj.source, name.const(), False)
        return default


def _hasattr(tx, obj: VT, name: VT) -> VT:
    from .objects import UserObjectVT

    try:
        obj.getattr(tx, name.const())
        present = True
    except AttributeError:
        present = False
    if isinstance(obj, UserObjectVT) and obj.source is not None:
        # NOTE: an attribute added to (or deleted from) the object later must recompile.
        tx.output.guards.attr_presence(obj.source, name.const(), present)
    return ConstantVT(present)


def _iter(tx, x: VT) -> VT:
    if isinstance(x, IteratorVT):
        return x
    return IteratorVT(x.unpack(tx))


def _fold(op: Callable) -> Callable:
    def run(tx, *args, **kwargs):
        return const_vt(op(*[a.const() for a in args], **{k: v.const() for k, v in kwargs.items()}))

    return run


def _minmax(op: Callable) -> Callable:
    """``max`` / ``min`` over constants, sizes and tensors (see tensor_minmax)."""
    def run(tx, *args, key: VT = None, default: VT = None):
        items = iterate(tx, args[0]).unpack(tx) if len(args) == 1 else list(args)
        if not items:
            if default is not None:
                return default
            unsupported(f"{op.__name__}() of an empty sequence", why="eager raises ValueError")
        if key is not None and not (isinstance(key, ConstantVT) and key.value is None):
            keys = [key.call(tx, [i], {}).const() for i in items]
            return items[keys.index(op(keys))]
        if all(a.is_const() for a in items):
            return const_vt(op(a.const() for a in items))
        from .tensor_values import minmax_fold

        return minmax_fold(tx, op, items)

    return run


def _sum(tx, seq: VT, start: VT = None) -> VT:
    from ..operators import binary_op

    acc = start if start is not None else ConstantVT(0)
    for item in iterate(tx, seq).unpack(tx):
        acc = binary_op(tx, operator.add, acc, item)
    return acc


def sort_items(tx, items: list, key: VT = None, reverse: VT = None) -> list:
    """``items`` (VTs) in the order ``sorted(items, key=key, reverse=reverse)`` gives:
    the keys must be Python constants (sorting tensors would compare their values)."""
    if key is not None and not (isinstance(key, ConstantVT) and key.value is None):
        keys = [key.call(tx, [i], {}) for i in items]
    else:
        keys = items
    if not all(k.is_const() or hasattr(k, "sym") for k in keys):
        unsupported("sorting values that are not Python constants",
                    why="comparing tensors or objects depends on their values or identities")
    vals = [k.const() for k in keys]
    rev = bool(reverse.const()) if reverse is not None else False
    order = sorted(range(len(items)), key=lambda i: vals[i], reverse=rev)
    return [items[i] for i in order]


def _sorted(tx, seq: VT, key: VT = None, reverse: VT = None) -> VT:
    return ListVT(sort_items(tx, iterate(tx, seq).unpack(tx), key, reverse))


def _id(tx, x: VT) -> VT:
    """``id(obj)`` of a value read from the caller: its identity is guarded (ID_MATCH)."""
    from .hashing import real_object
    from .tensor import TensorVT

    if isinstance(x, TensorVT):
        real = next((v for _, v, vt, *_ in tx.output.inputs if vt is x), None)
        if real is None or x.source is None:
            unsupported("id() of a tensor made in the compiled region")
        tx.output.guards.ident(x.source, real)
        return ConstantVT(id(real))
    obj = real_object(x)
    if obj is None and isinstance(x, ConstantVT) and (x.value is None or isinstance(x.value, bool)):
        obj = x.value
    if obj is None or x.source is None and not isinstance(x, ConstantVT):
        unsupported(f"id() of {x}", why="only objects read from the caller have an identity capture can guard")
    if x.source is not None:
        tx.output.guards.ident(x.source, obj)
    return ConstantVT(id(obj))


def _abs(tx, x: VT) -> VT:
    from .tensor import TensorVT

    if isinstance(x, TensorVT):
        return tx.output.call_graph("call_function", operator.abs, [x], {})
    return ConstantVT(abs(x.const()))


def _print(tx, *args, **kwargs):
    unsupported("call to builtin print", why="print has a side effect outside torch",
                hint="remove the print, or accept a graph break there")


def _type(tx, x: VT) -> VT:
    from .callables import ClassVT

    return ClassVT(x.python_type())


def _callable(tx, x: VT) -> VT:
    from .callables import BuiltinVT, ClassVT, NestedFunctionVT, TorchFnVT, UserFunctionVT, UserMethodVT

    return ConstantVT(isinstance(x, (BuiltinVT, ClassVT, NestedFunctionVT, TorchFnVT, UserFunctionVT, UserMethodVT)))


def _setattr(tx, obj: VT, name: VT, value: VT) -> VT:
    obj.setattr(tx, name.const(), value)
    return ConstantVT(None)


def _enumerate(tx, seq: VT, start: VT = None) -> VT:
    s = 0 if start is None else start.const()
    it = iterate(tx, seq)
    if isinstance(it, LazyIteratorVT):
        def gen():
            i = s
            while True:
                v = it.next(tx)
                if v is None:
                    return
                yield TupleVT([ConstantVT(i), v])
                i += 1

        return LazyIteratorVT(gen(), "enumerate() of a lazy iterator")
    return IteratorVT([TupleVT([ConstantVT(i + s), v]) for i, v in enumerate(it.unpack(tx))])


def _zip_rows(tx, seqs: tuple) -> list:
    """The rows zip() makes, pulling from each iterator as CPython does (endless ones too)."""
    from .containers import MAX_LAZY_ITEMS

    its = [iterate(tx, s) for s in seqs]
    rows = []
    while its:
        row = []
        for it in its:
            v = it.next(tx)
            if v is None:
                return rows
            row.append(v)
        rows.append(row)
        if len(rows) > MAX_LAZY_ITEMS:
            unsupported("zip() of endless iterators", why=f"more than {MAX_LAZY_ITEMS} items")
    return rows


def _zip(tx, *seqs: VT, strict: VT = None) -> VT:
    if strict is not None and strict.const() and len({len(iterate(tx, s).unpack(tx)) for s in seqs}) > 1:
        unsupported("zip(strict=True) over sequences of different lengths")
    return IteratorVT([TupleVT(list(t)) for t in _zip_rows(tx, seqs)])


def _reversed(tx, seq: VT) -> VT:
    return IteratorVT(list(reversed(seq.unpack(tx))))


def _next(tx, it: VT, default: VT = None) -> VT:
    if isinstance(it, IteratorVT):
        v = it.next(tx)
        if v is not None:
            return v
        if default is not None:
            return default
    unsupported("next() on an exhausted or unknown iterator")


def _all_any(op: Callable) -> Callable:
    def run(tx, seq: VT) -> VT:
        return ConstantVT(op(v.truthy(tx) for v in seq.unpack(tx)))

    return run


def _bool(tx, x: VT = None) -> VT:
    return ConstantVT(False if x is None else x.truthy(tx))


def _scalar(kind: type) -> Callable:
    def run(tx, x: VT = None, *rest) -> VT:
        if x is None:
            return ConstantVT(kind())
        return ConstantVT(kind(x.const(), *[r.const() for r in rest]))

    return run


BUILTINS: dict[Any, Callable] = {
    builtins.len: _len,
    builtins.isinstance: _isinstance,
    builtins.getattr: _getattr,
    builtins.hasattr: _hasattr,
    builtins.setattr: _setattr,
    builtins.iter: _iter,
    builtins.next: _next,
    builtins.min: _minmax(min),
    builtins.max: _minmax(max),
    builtins.sum: _sum,
    builtins.abs: _abs,
    builtins.print: _print,
    builtins.callable: _callable,
    builtins.enumerate: _enumerate,
    builtins.zip: _zip,
    builtins.reversed: _reversed,
    builtins.all: _all_any(all),
    builtins.any: _all_any(any),
    builtins.round: _fold(round),
    builtins.divmod: _fold(divmod),
    builtins.pow: _fold(pow),
    builtins.issubclass: _fold(issubclass),
    builtins.repr: _fold(repr),
    builtins.ord: _fold(ord),
    builtins.chr: _fold(chr),
    builtins.hash: _fold(hash),
    builtins.sorted: _sorted,
    builtins.id: _id,
}


def call_builtin(tx, fn: Any, args: list, kwargs: dict) -> VT:
    from .pylib import library_function

    handler = BUILTINS.get(fn) or library_function(fn)
    if handler is None:
        unsupported(f"call to builtin {getattr(fn, '__name__', fn)}")
    return handler(tx, *args, **kwargs)


def _range(tx, *args) -> VT:
    return ConstantVT(range(*[a.const() for a in args]))


def _list(tx, x: VT = None) -> VT:
    return ListVT([] if x is None else iterate(tx, x).unpack(tx))


def _tuple(tx, x: VT = None) -> VT:
    return TupleVT([] if x is None else iterate(tx, x).unpack(tx))


def _size(tx, x: VT = None) -> VT:
    import torch

    return TupleVT([] if x is None else x.unpack(tx), pytype=torch.Size)


def _filter(tx, fn: VT, seq: VT) -> VT:
    items = seq.unpack(tx)
    if isinstance(fn, ConstantVT) and fn.value is None:
        return IteratorVT([i for i in items if i.truthy(tx)])
    return IteratorVT([i for i in items if fn.call(tx, [i], {}).truthy(tx)])


def _map(tx, fn: VT, *seqs: VT) -> VT:
    return IteratorVT([fn.call(tx, list(t), {}) for t in _zip_rows(tx, seqs)])


def _static_ctor(cls: type):
    """Objects built from constants only, with plain read-only attributes (finfo...)."""
    def run(tx, *args: VT, **kwargs: VT) -> VT:
        return tx.wrap_static(cls(*[a.const() for a in args], **{k: v.const() for k, v in kwargs.items()}))

    return run


def _partial(tx, fn: VT, *args: VT, **kwargs: VT) -> VT:
    from .callables import PartialVT

    return PartialVT(fn, list(args), kwargs)


def _super(tx, cls: VT = None, obj: VT = None) -> VT:
    from .callables import SuperVT

    if cls is None:
        cls = tx.load_deref("__class__")
        obj = tx.resolve(tx.locals[tx.code.co_varnames[0]])
    return SuperVT(cls.const(), obj)


def _nullcontext(tx, enter_result: VT = None) -> VT:
    from .objects import NullContextVT

    return NullContextVT(enter_result if enter_result is not None else ConstantVT(None))


def _builtin_types() -> dict:
    import contextlib

    import torch

    from .autocast import autocast_types

    return {
        range: _range, list: _list, tuple: _tuple, bool: _bool,
        int: _scalar(int), float: _scalar(float), str: _scalar(str), type: _type,
        map: _map, filter: _filter, super: _super, functools.partial: _partial,
        torch.finfo: _static_ctor(torch.finfo), torch.iinfo: _static_ctor(torch.iinfo),
        torch.device: _static_ctor(torch.device),
        torch.Size: _size, slice: lambda tx, *a: const_vt(slice(*[x.const() for x in a])),
        contextlib.nullcontext: _nullcontext,
        **autocast_types(),
    }


def _enum_lookup(tx, cls: type, value: VT = None, *rest: VT, **kwargs: VT) -> VT:
    """``Color(2)``: the member with that value (a lookup; making a new enum class breaks)."""
    if value is None or rest or kwargs or not value.is_const():
        unsupported(f"calling the enum class {cls.__name__} with these arguments")
    try:
        member = cls._value2member_map_.get(value.const())
    except TypeError:  # an unhashable value
        member = None
    if member is None:
        # NOTE: a value that is not a member goes through the class's _missing_ (user code).
        unsupported(f"{cls.__name__}({value.const()!r}) is not a member lookup capture can answer")
    return ConstantVT(member)


def _buildable_dataclass(cls: type) -> bool:
    import dataclasses

    from .new_objects import build_refusal, prefer_inlined_init

    # NOTE: a class with its own __new__ may not be built from its fields alone; one whose
    # construction runs code of its own (__post_init__, a custom __init__) is inlined instead.
    if dataclasses.is_dataclass(cls) and prefer_inlined_init(cls) and build_refusal(cls) is None:
        return False
    return dataclasses.is_dataclass(cls) and cls.__new__ in (object.__new__, dict.__new__)


def call_builtin_type(tx, cls: type, args: list, kwargs: dict) -> VT:
    from .namedtuples import build_namedtuple, is_namedtuple_class, is_structseq_class
    from .pylib import library_type

    handler = _builtin_types().get(cls) or BUILTINS.get(cls) or library_type(cls)
    if handler is None and (is_namedtuple_class(cls) or is_structseq_class(cls)):
        return build_namedtuple(tx, cls, list(args), dict(kwargs))
    if handler is None and isinstance(cls, enum.EnumMeta):
        return _enum_lookup(tx, cls, *args, **kwargs)
    if handler is None and _buildable_dataclass(cls):
        from .objects import DataclassVT

        return DataclassVT(cls, list(args), dict(kwargs))
    if handler is None:
        from .exceptions import new_exception, plain_exception_class

        if plain_exception_class(cls):
            return new_exception(tx, cls, args, kwargs)
        from .new_objects import construct

        # NOTE: a user class: __new__ / __init__ inlined, or a graph break saying why not.
        return construct(tx, cls, args, kwargs)
    return handler(tx, *args, **kwargs)
