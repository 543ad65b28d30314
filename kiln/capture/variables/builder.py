"""Wrapping real Python values into variable trackers, installing guards."""
from __future__ import annotations

import collections
import functools
import types
import weakref
from typing import Any, Optional

import torch

from ..sources import Source
from .base import ConstantVT, VT, is_const_value
from .callables import BuiltinVT, ClassVT, PartialVT, WeakRefVT, PyModuleVT, TorchFnVT, UserFunctionVT, UserMethodVT
from .containers import DictVT, IteratorVT, ListVT, TupleVT
from .objects import NNModuleVT, UserObjectVT
from .pylib import wrapper_for


# NOTE: Python functions from these modules never call back into user code, so a
# call runs whole on fake tensors and becomes one graph node; other torch Python
# functions (decorators, checkpoint, ...) are inlined like user code.
_GRAPH_PY_MODULES = ("torch.nn.functional", "torch.functional", "torch._tensor", "torch.random",
                     "torch.nn.init", "torch._refs", "torch._decomp", "torch.fft", "torch.linalg",
                     "torch.special")


def _is_library_function(fn: Any) -> bool:
    mod = getattr(fn, "__module__", None) or ""
    root = mod.split(".")[0]
    if root not in ("torch", "math", "operator", "_operator", "functorch"):
        return False
    if mod.startswith("torch._C._dynamo"):
        return False  # NOTE: PyTorch's eval-frame helpers (e.g. its test helper ``unsupported``) are no ops
    if isinstance(fn, types.FunctionType):
        if mod == "torch.nn.functional" and fn.__name__.startswith("_"):
            # NOTE: F's private helpers (_canonical_mask, _none_or_dtype, _verify_batch_size,
            # ...) check and canonicalize arguments, often with no tensor at all: inlined, as
            # PyTorch's capture does (none of them is among its in-graph functions).
            return False
        return mod.startswith(_GRAPH_PY_MODULES)
    return True


def _is_torch_callable(v: Any) -> bool:
    from kiln.capture.api import graph_break

    if v is graph_break:
        return True
    from .torch_fns import is_special

    if is_special(v):
        return True
    if isinstance(v, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):
        return True
    if isinstance(v, (types.BuiltinFunctionType, types.BuiltinMethodType, types.FunctionType,
                      types.MethodDescriptorType, types.WrapperDescriptorType, types.MethodWrapperType)):
        return _is_library_function(v) or getattr(v, "__objclass__", None) is torch._C.TensorBase
    return False


def wrap(tx, value: Any, source: Optional[Source], guard: bool = True) -> VT:
    """A VT for ``value``; with ``guard``, record the guards that keep it valid.

    A mutable object (list, dict, set, user object) read twice in one frame is one VT,
    so that what the trace did to it through one read (``a.steps.append``) is seen by the
    next (``len(a.steps)``); a second source of the same object is guarded to alias the first.
    """
    out = tx.output
    known = out.wrapped_objects.get(id(value)) \
        if type(value) in _SHARED_TYPES or isinstance(value, (torch.nn.Module, types.ModuleType, type)) \
        or _is_user_object(value) else None
    if known is not None and known[0] is value:
        vt = known[1]
        if guard and source is not None and vt.source is not None and vt.source.name() != source.name():
            out.guards.alias(vt.source, source)
        return vt
    vt = _wrap_value(tx, value, source, guard)
    if isinstance(vt, (ListVT, DictVT, UserObjectVT, NNModuleVT)) or type(vt).__name__ == "SetVT":
        out.wrapped_objects[id(value)] = (value, vt)
    return vt


_SHARED_TYPES = (list, dict, collections.OrderedDict, collections.defaultdict, set)


def _is_user_object(value: Any) -> bool:
    return hasattr(value, "__dict__") and not isinstance(value, (type, types.ModuleType, types.FunctionType,
                                                                 torch.nn.Module, torch.Tensor))


def _wrap_value(tx, value: Any, source: Optional[Source], guard: bool) -> VT:
    out = tx.output
    g = out.guards if guard else None
    if source is None:
        source = out.objects.source(value)
    if isinstance(value, torch.Tensor):
        return out.add_tensor_input(value, source, from_module=isinstance(value, torch.nn.Parameter))
    if type(value) is int and g:
        # NOTE: automatic dynamic for ints: a symbolic graph input once its value changed.
        sym = out.add_int_input(value, source)
        if sym is not None:
            return sym
    if type(value) is float and g:
        # NOTE: unspecialized floats: a SymFloat graph input once its value changed.
        sym = out.add_float_input(value, source)
        if sym is not None:
            return sym
    if is_const_value(value):
        if g:
            g.const(source, value)
        return ConstantVT(value, source)
    if _is_named_tuple(value) and not hasattr(type(value), "_make") and all(is_const_value(v) for v in value):
        # NOTE: a struct sequence of constants (sys.version_info, os.stat_result) is one
        # constant: immutable, and C code makes it (it cannot be rebuilt from its items).
        if g:
            g.const(source, value)
        return ConstantVT(value, source)
    if type(value) in (list, tuple, torch.Size) or _is_named_tuple(value):
        if g:
            g.length(source, value)
        items = [wrap(tx, v, source.item(i), guard) for i, v in enumerate(value)]
        if type(value) is list:
            return ListVT(items, source)
        return TupleVT(items, source, pytype=type(value))
    if isinstance(value, list) and type(value) is not list and source is not None:
        from .list_subclass import is_modelled_list_subclass, wrap_list_subclass

        if is_modelled_list_subclass(type(value)):
            return wrap_list_subclass(tx, value, source, guard)
    if type(value) in _DICT_TYPES and all(_plain_key(k) for k in value):
        return _wrap_dict(tx, value, source, guard)
    special = wrapper_for(value)
    if special is not None:
        if g and type(value) is functools._lru_cache_wrapper:
            g.ident(source, value)
        return special(tx, value, source, guard)
    from .numpy_vt import NumpyFnVT, NumpyStaticFnVT, numpy_function

    tnp_fn = numpy_function(value)
    if tnp_fn is not None:
        if g:
            g.ident(source, value)
        if tnp_fn is NumpyStaticFnVT:
            return NumpyStaticFnVT(value, source)
        return NumpyFnVT(value, tnp_fn, source)
    if g:
        _identity_guard(g, source, value)
    return _wrap_object(tx, value, source)


_DICT_TYPES = (dict, collections.OrderedDict, collections.defaultdict)


def _is_named_tuple(value: Any) -> bool:
    from .namedtuples import is_namedtuple_class, is_structseq_class

    t = type(value)
    # NOTE: an instance with attributes of its own (a subclass without __slots__) stays a
    # user object: reading it as a tuple would lose them.
    return issubclass(t, tuple) and (is_namedtuple_class(t) or is_structseq_class(t)) \
        and not getattr(value, "__dict__", None)


def _plain_key(k: Any) -> bool:
    """A dict key capture can read from the caller: a constant, or an object with an identity
    hash (a module, a function, an enum member); never a tensor (keys are not inputs)."""
    from .hashing import has_identity_hash

    if type(k) is tuple:
        return all(_plain_key(i) and not isinstance(i, torch.Tensor) for i in k)
    return is_const_value(k) or has_identity_hash(k) or type(k) in (torch.Tensor, torch.nn.Parameter)


def _wrap_dict(tx, value: dict, source: Source, guard: bool) -> VT:
    """A dict / OrderedDict / defaultdict: keys guarded (in order), values read as ``src[k]``
    on first use (lazy_dict.py: what the code reads first names a graph input)."""
    from ..sources import DictKeySource, key_source
    from .lazy_dict import LazyValues, Pending

    if guard:
        tx.output.guards.dict_keys(source, value)
    d = DictVT({}, source, pytype=type(value))
    d.items = LazyValues()
    for i, (k, v) in enumerate(value.items()):
        if is_const_value(k):
            kvt = ConstantVT(k)
        elif isinstance(k, torch.Tensor):
            # NOTE: a tensor key is a graph input too (the keys guard pins its identity).
            kvt = wrap(tx, k, DictKeySource(source, i), guard)
        else:
            kvt = wrap(tx, k, None, guard=False)
        d.put(kvt, Pending(tx, v, key_source(tx.output.objects, source, k), guard))
    if type(value) is collections.defaultdict:
        d.default_factory = wrap(tx, value.default_factory, source.attr("default_factory"), guard)
    return d


def _identity_guard(g, source: Source, value: Any) -> None:
    if _guarded_by_code(value):
        g.closure_match(source, value)
    elif isinstance(value, (torch.nn.Module, types.ModuleType, type, types.FunctionType,
                            types.BuiltinFunctionType)) or _is_torch_callable(value):
        g.ident(source, value)
    elif isinstance(value, types.MethodType):
        g.ident(source.attr("__func__"), value.__func__)
        g.ident(source.attr("__self__"), value.__self__)
    else:
        g.type_of(source, value)


def _guarded_by_code(value: Any) -> bool:
    """A user's function (a closure made anew on each call of its maker, say) is guarded by its
    code object, as PyTorch's CLOSURE_MATCH does; its cells and defaults are read through its
    source when inlined (interpreter.inline_function), so they are guarded as what they hold."""
    from ..cache import is_library_code
    from .pylib import library_function

    if type(value) is not types.FunctionType or is_library_code(value.__code__) or _is_torch_callable(value):
        return False
    if any(hasattr(value, a) for a in ("_kiln_disable", "_kiln_orig", "_torchdynamo_disable", "__wrapped__")):
        return False
    from .callables import _py_special
    from .generator_cm import CODE_MODELS

    return _py_special().get(value) is None and library_function(value) is None \
        and CODE_MODELS.get(value.__code__) is None


def _wrap_object(tx, value: Any, source: Source) -> VT:
    from .builtins import BUILTINS
    from .hops import hop_vt

    # NOTE: higher-order entry points (torch.cond, wrap, checkpoint, ...) by qualified name.
    hop = hop_vt(value, source)
    if hop is not None:
        return hop

    if isinstance(value, torch.nn.Module):
        tx.output.module_sources.add(source.name())  # NOTE: its int attributes stay constants
        return NNModuleVT(value, source)
    if isinstance(value, types.ModuleType):
        return PyModuleVT(value, source)
    if _is_torch_callable(value):
        return TorchFnVT(value, source)
    if isinstance(value, type):
        return ClassVT(value, source)
    if isinstance(value, types.FunctionType):
        vt = UserFunctionVT(value, source)
        vt.by_code = source is not None and _guarded_by_code(value)
        return vt
    from .autograd_fn import AutogradApplyVT, is_function_apply

    if is_function_apply(value):
        return AutogradApplyVT(value.__self__)
    if isinstance(value, types.MethodType) and isinstance(value.__func__, types.FunctionType):
        return UserMethodVT(value.__func__, wrap(tx, value.__self__, source.attr("__self__"), guard=False))
    if isinstance(value, functools.partial):
        return PartialVT(wrap(tx, value.func, source.attr("func"), guard=False),
                         [wrap(tx, a, source.attr("args").item(i), guard=False) for i, a in enumerate(value.args)],
                         {k: wrap(tx, v, source.attr("keywords").item(k), guard=False)
                          for k, v in value.keywords.items()}, source)
    if type(value).__name__ in ("tuple_iterator", "list_iterator", "range_iterator") \
            and type(value).__module__ == "builtins":
        return _wrap_iterator(tx, value, source)
    if isinstance(value, weakref.ReferenceType):
        return WeakRefVT(value, source)
    if isinstance(value, types.BuiltinFunctionType) and value in BUILTINS:
        return BuiltinVT(value, source)
    if isinstance(value, types.BuiltinFunctionType):
        return BuiltinVT(value, source)
    if callable(value) and not hasattr(value, "__dict__"):
        return BuiltinVT(value, source)
    return UserObjectVT(value, source)


def _wrap_iterator(tx, it: Any, source: Source) -> VT:
    """A live tuple/list/range iterator (e.g. a loop's iterator passed to a resume function):
    its remaining items, read without advancing it."""
    _, (seq,), pos = it.__reduce__()
    tx.output.guards.iterator(source, it, pos, len(seq))
    items_src = source.method_call("__reduce__").item(1).item(0)
    if isinstance(seq, range):
        # NOTE: e.g. the ``.0`` argument of a comprehension's own frame (3.11) over a range.
        # From 3.12 a range iterator reduces to the range still ahead, position None, and
        # ``__setstate__(n)`` skips n more: the start is 0 relative to what is ahead.
        tx.output.guards.const(items_src, seq)
        start = 0 if pos is None else pos
        return InputIteratorVT([ConstantVT(v) for v in seq[start:]], source, start)
    items = [wrap(tx, v, items_src.item(pos + i)) for i, v in enumerate(seq[pos:])]
    return InputIteratorVT(items, source, pos)


class InputIteratorVT(IteratorVT):
    """A live iterator read from the frame's inputs: as far as the trace advanced it, the
    real iterator is advanced after the graph (``it.__setstate__(position)``)."""

    def __init__(self, items: list, source: Source, start: int):
        super().__init__(items)
        self.source = source
        self.start = start
        self.tracked = False

    def _advanced(self, tx) -> None:
        if not self.tracked:
            self.tracked = True
            tx.output.side_effects.track(self)

    def next(self, tx):
        v = super().next(tx)
        self._advanced(tx)
        return v

    def unpack(self, tx) -> list:
        out = super().unpack(tx)
        self._advanced(tx)
        return out

    def replay_value(self, cg) -> str:
        return str(self.start + self.pos)

    def replay_apply(self, target: str, value: str) -> str:
        return f"{target}.__setstate__({value})"
