"""The one registry of Python's own types and library callables that capture models.

In: a callable met in a call (a builtin function, a class).  Out: its handler,
``handler(tx, *arg_vts, **kwarg_vts) -> VT``, or None.  Each family lives in its own
module with its own table (sets.py, dicts.py, collections_vt.py, itertools_vt.py,
functools_vt.py); this module only merges them, and holds ``WRAPPERS``: how a value of
one of these types read from the caller becomes a VT (keyed by its exact type).
"""
from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Optional

_FUNCTIONS: dict = {}
_TYPES: dict = {}
_WRAPPERS: dict = {}


def _load() -> None:
    from . import collections_vt, functools_vt, itertools_vt
    from .dicts import build_dict, fromkeys
    from .sets import build_set, wrap_set

    _FUNCTIONS.update(functools_vt.FUNCTIONS)
    from .new_objects import library_functions

    _FUNCTIONS.update(library_functions())
    _FUNCTIONS.update(itertools_vt.ITERTOOLS)
    for cls in (dict, collections.OrderedDict, collections.defaultdict):
        # NOTE: ``dict.fromkeys`` is a new bound method object at each access; equal ones
        # hash alike, so the table finds it.
        _FUNCTIONS[cls.fromkeys] = fromkeys(cls)
    _TYPES.update(itertools_vt.ITERTOOLS)
    _TYPES.update(functools_vt.TYPES)
    _TYPES.update(collections_vt.TYPES)
    from . import warnings_vt

    _TYPES.update(warnings_vt.TYPES)
    _TYPES[dict] = lambda tx, *a, **k: build_dict(tx, dict, *a, **k)
    _TYPES[set] = lambda tx, *a: build_set(tx, set, *a)
    _TYPES[frozenset] = lambda tx, *a: build_set(tx, frozenset, *a)
    _WRAPPERS.update({
        set: wrap_set,
        frozenset: wrap_set,
        collections.deque: collections_vt.wrap_deque,
        functools._lru_cache_wrapper: lambda tx, v, src, guard: functools_vt.wrap_lru_cache(tx, v, src),
    })
    from .objects import GradReentry, wrap_grad_reentry

    _WRAPPERS[GradReentry] = wrap_grad_reentry
    from .autocast import autocast_wrappers

    _WRAPPERS.update(autocast_wrappers())
    from .numpy_vt import np, wrap_ndarray

    if np is not None:
        _WRAPPERS[np.ndarray] = wrap_ndarray


def _table(t: dict) -> dict:
    if not t:
        _load()
    return t


def library_function(fn: Any) -> Optional[Callable]:
    try:
        return _table(_FUNCTIONS).get(fn)
    except TypeError:  # an unhashable callable
        return None


def library_type(cls: type) -> Optional[Callable]:
    try:
        return _table(_TYPES).get(cls)
    except TypeError:
        return None


def wrapper_for(value: Any) -> Optional[Callable]:
    """``wrap(tx, value, source, guard) -> VT`` for a value of a modelled type, or None."""
    return _table(_WRAPPERS).get(type(value))


__all__ = ["library_function", "library_type", "wrapper_for"]


# ---------------------------------------------------------------- typing
_TYPING_MODULES = ("typing", "typing_extensions", "types", "collections.abc", "builtins")


def _static(vt) -> Any:
    """The real Python object a VT of a type expression stands for (classes, typing
    objects, constants, tuples/lists of those), or raise Unsupported."""
    from .base import unsupported
    from .containers import SequenceVT
    from .hashing import real_object

    if isinstance(vt, SequenceVT):
        vals = [_static(i) for i in vt.items]
        return vals if vt.pytype is list else tuple(vals)
    if vt.is_const():
        return vt.const()
    obj = real_object(vt)
    if obj is not None and type(obj).__module__ in _TYPING_MODULES:
        return obj
    unsupported(f"{vt} inside a type expression")


def static_subscript(tx, obj, key) -> Any:
    """``List[int]``, ``Callable[[T], T]``, ``dict[str, int]``: a subscript of a typing
    object or of a builtin generic class, evaluated while tracing (pure, and its result is
    a constant of the program).  None when ``obj`` is not one of those."""
    from .hashing import real_object

    real = real_object(obj)
    if real is None:
        return None
    is_typing = type(real).__module__ in ("typing", "typing_extensions")
    is_generic_class = isinstance(real, type) and hasattr(real, "__class_getitem__") \
        and real.__module__ in _TYPING_MODULES + ("collections", "_collections_abc")
    if not (is_typing or is_generic_class):
        return None
    return tx.wrap_static(real[_static(key)])
