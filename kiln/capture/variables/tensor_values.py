"""Python builtins applied to tensors and sizes: ``max`` / ``min`` of tensors or symbolic
sizes become graph nodes (``torch.maximum`` / ``torch.minimum``, ``torch.sym_max`` /
``torch.sym_min``).

In: the items of one ``max(...)`` / ``min(...)`` call (VTs, not all constants).
Out: the VT of the result, or a graph break where eager's answer could differ.
"""
from __future__ import annotations

import builtins
from typing import Callable

import torch

from .base import VT, ConstantVT, unsupported
from .tensor import TensorVT

# NOTE: eager ``max(a, b)`` of tensors is ``b if b > a else a``, which only works for
# one-element tensors; there its value is ``torch.maximum(a, b)`` when both have one
# dtype and shape (NaN aside: maximum propagates a NaN, the comparison may keep the
# other operand, as in PyTorch's own capture).  Other mixes (a tensor and a Python
# number: eager may return the number itself; different dtypes or shapes: eager
# returns one operand unchanged) break the graph.
_TENSOR_FOLD = {builtins.max: torch.maximum, builtins.min: torch.minimum}
_SYM_FOLD = {builtins.max: torch.sym_max, builtins.min: torch.sym_min}


def minmax_fold(tx, op: Callable, items: list) -> VT:
    """``op(items)`` for ``op`` = builtins.max / builtins.min, folded pairwise left to right."""
    acc = items[0]
    for item in items[1:]:
        acc = _pair(tx, op, acc, item)
    return acc


def _pair(tx, op: Callable, a: VT, b: VT) -> VT:
    from .numpy_vt import NdarrayVT

    if isinstance(a, NdarrayVT) or isinstance(b, NdarrayVT):
        # NOTE: as in PyTorch's capture, ``min(arr, 3)`` of a NumPy array is ``np.minimum``
        # (eager raises for arrays of more than one element).
        return _numpy_pair(tx, op, a, b)
    if isinstance(a, TensorVT) and isinstance(b, TensorVT):
        if a.fake.dtype != b.fake.dtype or a.fake.shape != b.fake.shape:
            unsupported(f"builtin {op.__name__} of tensors with different dtypes or shapes",
                        why="eager returns one operand unchanged, which no single torch op matches")
        if a.fake.numel() != 1:
            unsupported(f"builtin {op.__name__} of tensors with more than one element",
                        why="eager raises: the truth value of such a comparison is ambiguous")
        return tx.output.call_graph("call_function", _TENSOR_FOLD[op], [a, b], {})
    if isinstance(a, TensorVT) or isinstance(b, TensorVT):
        unsupported(f"builtin {op.__name__} of a tensor and a Python value",
                    why="eager may return the Python value itself", hint=f"use torch.clamp or torch.{op.__name__}imum")
    if hasattr(a, "sym") or hasattr(b, "sym"):
        if all(hasattr(v, "sym") or (isinstance(v, ConstantVT) and type(v.value) is int) for v in (a, b)):
            return tx.output.call_graph("call_function", _SYM_FOLD[op], [a, b], {})
        return ConstantVT(op(a.const(), b.const()))
    if a.is_const() and b.is_const():
        return ConstantVT(op(a.const(), b.const()))
    unsupported(f"builtin {op.__name__} of {a} and {b}")


def _numpy_pair(tx, op: Callable, a: VT, b: VT) -> VT:
    from .numpy_vt import NdarrayVT, call, _tnp

    for v in (a, b):
        if not (isinstance(v, NdarrayVT) or (isinstance(v, ConstantVT) and type(v.value) in (int, float, bool))
                or hasattr(v, "sym")):
            unsupported(f"builtin {op.__name__} of a NumPy array and {v}")
    return call(tx, "function", _tnp().maximum if op is builtins.max else _tnp().minimum, [a, b])


__all__ = ["minmax_fold"]
