"""Effectful operators and ``with_effects``, which orders them with tokens.

An effectful op (``aten._print``, an op taking an opaque script object, a
custom op registered here) must run exactly once per call, in program order,
even after functionalization has made the graph free to reorder.  Wrapping it
as ``with_effects(token, op, *args) -> (new_token, *outputs)`` makes that
order a data dependence: each effectful call consumes the previous token.
"""
from __future__ import annotations

from typing import Any

import torch

from kiln.ops.base import HigherOrderOperator
# NOTE: the registry itself lives in tracing/ (its dead-code elimination asks it);
# these names are kiln.ops' public API too.
from kiln.tracing.effects import (
    EffectType,
    get_effect,
    has_aliasing,
    is_effectful,
    register_effectful_op,
    unregister_effectful_op,
)


def new_token() -> torch.Tensor:
    """A fresh effect token: an empty tensor carrying no data, only order."""
    return torch.tensor([])


class WithEffects(HigherOrderOperator):
    """with_effects(token, op, *args, **kwargs) -> (new_token, *op_outputs)"""

    def __init__(self) -> None:
        super().__init__("with_effects")

    def check_args(self, token: Any = None, op: Any = None, *args: Any, **kwargs: Any) -> None:
        if not isinstance(op, (torch._ops.OpOverload, HigherOrderOperator)):
            raise AssertionError(
                f"with_effects takes an OpOverload or a kiln HOP, got {type(op).__name__}"
            )
        if has_aliasing(op):
            raise AssertionError("Ops with aliasing is not supported")


with_effects = WithEffects()


@with_effects.py_impl("eager")
def _with_effects_eager(token: torch.Tensor, op: Any, *args: Any, **kwargs: Any) -> tuple:
    out = op(*args, **kwargs)
    # NOTE: only a tuple result is spread: a list result (Tensor[]) is one
    # output in the op's schema, and stays one output here.
    if isinstance(out, tuple):
        return (new_token(), *out)
    return (new_token(), out)


@with_effects.py_impl("fake")
def _with_effects_fake(token: torch.Tensor, op: Any, *args: Any, **kwargs: Any) -> tuple:
    return _with_effects_eager(token, op, *args, **kwargs)


__all__ = ["EffectType", "get_effect", "has_aliasing", "is_effectful", "new_token",
           "register_effectful_op", "unregister_effectful_op", "with_effects", "WithEffects"]
