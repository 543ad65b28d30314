"""Dead-code elimination for traced ATen graphs.

A node is removed when nothing uses it and running it has no effect beyond
its value.  Kept even when unused: ops that mutate (schema has ``(a!)``), ops
that return nothing (they run for their effect), effectful ops (the registry
in kiln.tracing.effects, which kiln.ops registers into), random ops (dropping
one would shift the RNG stream of every later random op), and anything that is not an ATen/custom OpOverload
(higher-order ops decide for themselves).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from kiln.passes import graph_pass
from kiln.tracing.effects import is_effectful


def _removable(node: fx.Node) -> bool:
    if node.op != "call_function" or node.users:
        return False
    target = node.target
    if target is operator.getitem:
        return True
    if not isinstance(target, torch._ops.OpOverload):
        return False
    schema = target._schema
    if schema.is_mutable or not schema.returns:
        return False
    if torch.Tag.nondeterministic_seeded in target.tags:
        return False
    return not is_effectful(target)


@graph_pass("dce")
def eliminate_dead_code(gm: fx.GraphModule) -> fx.GraphModule:
    """Remove unused pure nodes, last to first, so chains of dead nodes go too."""
    changed = False
    for node in reversed(list(gm.graph.nodes)):
        if _removable(node):
            gm.graph.erase_node(node)
            changed = True
    if changed:
        gm.recompile()
    return gm
