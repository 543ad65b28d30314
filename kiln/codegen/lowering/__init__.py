"""kiln.codegen.lowering: ATen op -> loop IR, one table keyed by op.

In: an fx node's op and its arguments already lowered (``TensorValue`` for tensors,
sympy expressions for SymInts, Python scalars).  Out: a ``TensorValue`` (or a tuple /
list of them, or a scalar).  A lowering may raise :class:`NotLowered` to ask for an
extern call of the ATen op instead (a correct, slower path; never a failure).

Families live in their own modules (pointwise, reductions, views, indexing, creation);
each registers with :func:`register`.  ``ctx`` (a :class:`kiln.codegen.graph.GraphLowering`)
gives them ``realize``, ``new_buffer``, the fx node and its fake value (``ctx.node``).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

LOWERINGS: dict[Any, Callable] = {}


class NotLowered(Exception):
    """This call of the op is not lowered (the graph calls the ATen op instead)."""


def register(*ops: Any) -> Callable:
    """Register a lowering ``fn(ctx, *args, **kwargs)`` for ops (overloads or packets;
    a packet registers every overload)."""

    def deco(fn: Callable) -> Callable:
        for op in ops:
            if isinstance(op, torch._ops.OpOverloadPacket):
                for name in op.overloads():
                    ov = getattr(op, name)
                    # NOTE: functional graphs never call out= or in-place overloads.
                    if not ov._schema.is_mutable:
                        LOWERINGS.setdefault(ov, fn)
            else:
                LOWERINGS[op] = fn
        return fn

    return deco


def lowering_for(op: Any) -> Callable | None:
    _load_families()
    return LOWERINGS.get(op)


_loaded = False


def _load_families() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    # NOTE: explicit overloads register before packets (setdefault), so modules that
    # register specific overloads come first.
    from kiln.codegen.lowering import views, pointwise, reductions, indexing, creation  # noqa: F401


__all__ = ["LOWERINGS", "NotLowered", "register", "lowering_for"]
