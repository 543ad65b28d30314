"""The effect registry: which operators have side effects (and so must not be
dropped or reordered).

In:  an operator (an ATen/custom ``OpOverload``, or any hashable operator object
     such as one of kiln's higher-order operators).
Out: its effect (``EffectType.ORDERED``) or None for a pure operator.

NOTE: this lives in tracing/, the lowest stage that asks (dead-code elimination of
traced graphs); kiln.ops registers its operators here and re-exports these names,
so tracing never imports kiln.ops (which itself imports tracing).
"""
from __future__ import annotations

from enum import Enum
from typing import Any, Hashable, Union

import torch


class EffectType(Enum):
    ORDERED = "ordered"


OpLike = Union[str, torch._ops.OpOverload, Hashable]

# qualified op name ("aten::_print") or operator object -> effect
_EFFECTS: dict[Any, EffectType] = {}


def _key(op: OpLike) -> Any:
    if isinstance(op, str):
        return op if "::" in op else op.replace(".", "::", 1)
    if isinstance(op, torch._ops.OpOverload):
        return op._schema.name
    return op


def register_effectful_op(op: OpLike, effect: EffectType = EffectType.ORDERED) -> None:
    """Mark `op` ("ns::name", an OpOverload, or an operator object) as side-effectful."""
    _EFFECTS[_key(op)] = effect


def unregister_effectful_op(op: OpLike) -> None:
    """Forget `op`'s effect (it is pure again unless its schema says otherwise)."""
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
    if isinstance(op, str):
        return _EFFECTS.get(_key(op))
    try:
        return _EFFECTS.get(op)
    except TypeError:  # unhashable: never registered
        return None


def has_aliasing(op: Any) -> bool:
    """True when op's schema has alias annotations (mutates or returns a view)."""
    if not isinstance(op, torch._ops.OpOverload):
        return False
    schema = op._schema
    return any(a.alias_info is not None for a in list(schema.arguments) + list(schema.returns))


def is_effectful(op: Any) -> bool:
    """An op with a registered effect and no aliasing (those are functionalized instead)."""
    return get_effect(op) is not None and not has_aliasing(op)


register_effectful_op("aten::_print")
register_effectful_op("aten::_linalg_check_errors")

__all__ = ["EffectType", "register_effectful_op", "unregister_effectful_op", "get_effect",
           "has_aliasing", "is_effectful"]
