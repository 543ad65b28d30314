"""Effectful operators and ``with_effects``, which orders them with tokens.

An effectful op (``aten._print``, an op taking an opaque script object, a
custom op registered here) must run exactly once per call, in program order,
even after functionalization has made the graph free to reorder.  Wrapping it
as ``with_effects(token, op, *args) -> (new_token, *outputs)`` makes that
order a data dependence: each effectful call consumes the previous token.
"""
from __future__ import annotations

from enum import Enum
from typing import Any, Union

import torch

from kiln.ops.base import HigherOrderOperator


class EffectType(Enum):
    ORDERED = "ordered"


OpLike = Union[str, torch._ops.OpOverload, HigherOrderOperator]

# qualified op name ("aten::_print") or HOP -> effect
_EFFECTS: dict[Any, EffectType] = {}


def _key(op: OpLike) -> Any:
    if isinstance(op, str):
        return op if "::" in op else op.replace(".", "::", 1)
    if isinstance(op, torch._ops.OpOverload):
        return op._schema.name
    return op


def register_effectful_op(op: OpLike, effect: EffectType = EffectType.ORDERED) -> None:
    """Mark `op` ("ns::name", an OpOverload, or a kiln HOP) as side-effectful."""
    _EFFECTS[_key(op)] = effect


def unregister_effectful_op(op: OpLike) -> None:
    _EFFECTS.pop(_key(op), None)


def _takes_script_object(op: torch._ops.OpOverload) -> bool:
    return any(isinstance(a.type, torch._C.ClassType) for a in op._schema.arguments)


def get_effect(op: Any) -> EffectType | None:
    """The effect of `op`, or None for a pure op."""
    if isinstance(op, torch._ops.OpOverload):
        eff = _EFFECTS.get(op._schema.name)
        if eff is None and _takes_script_object(op):
            return EffectType.ORDERED
        return eff
    if isinstance(op, HigherOrderOperator):
        return _EFFECTS.get(op)
    return None


def has_aliasing(op: Any) -> bool:
    """True when op's schema has alias annotations (mutates or returns a view)."""
    if not isinstance(op, torch._ops.OpOverload):
        return False
    schema = op._schema
    return any(a.alias_info is not None for a in list(schema.arguments) + list(schema.returns))


def is_effectful(op: Any) -> bool:
    return get_effect(op) is not None and not has_aliasing(op)


register_effectful_op("aten::_print")
register_effectful_op("aten::_linalg_check_errors")


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
