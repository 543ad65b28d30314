"""ops/: kiln's higher-order operators.

In:  callables/operators plus tensor operands.
Out: results as eager PyTorch computes them; under kiln's tracer, one graph
     node per call (``with_effects``, ``trace_wrapped``'s ``self_invoke``,
     ``strict_mode`` with its body as a subgraph attribute; ``cond`` with both branches
     as subgraphs; ``wrap`` and ``checkpoint`` inlined, checkpointed nodes tagged
     for recomputation; ``while_loop`` with its cond and body as subgraphs; ``map``
     recorded as ``map_impl`` with its body as a subgraph; ``autograd_function_apply``, a
     captured autograd.Function, inlined: its forward, and under autograd its backward).
"""
from kiln.ops.autograd_function import autograd_function_apply
from kiln.ops.base import HigherOrderOperator
from kiln.ops.cond import cond
from kiln.ops.effects import (
    EffectType,
    get_effect,
    has_aliasing,
    is_effectful,
    new_token,
    register_effectful_op,
    unregister_effectful_op,
    with_effects,
)
from kiln.ops.map import map, map_impl
from kiln.ops.strict_mode import strict_mode
from kiln.ops.trace_wrapped import trace_wrapped
from kiln.ops.while_loop import while_loop
from kiln.ops.wrap import checkpoint, wrap
from kiln.ops.foreign import kiln_graph as _kiln_graph
from kiln.tracing.make_fx import register_entry_pass as _register_entry_pass

_register_entry_pass(_kiln_graph)

__all__ = [
    "HigherOrderOperator", "EffectType", "get_effect", "has_aliasing", "is_effectful",
    "new_token", "register_effectful_op", "unregister_effectful_op", "with_effects",
    "strict_mode", "trace_wrapped", "cond", "wrap", "checkpoint",
    "while_loop", "map", "map_impl", "autograd_function_apply",
]
