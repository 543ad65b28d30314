"""PyTorch's higher-order operators in a graph, read as kiln's own ops.

In:  an ``fx.GraphModule`` whose call nodes may target a PyTorch higher-order operator
     (an object of ``torch.ops.higher_order``: ``wrap``, ``cond``, ...).  Capture records
     the very object user code called (so user backends and graph inspection see what
     the user called, and the graph prints as ``torch.ops.higher_order.wrap(...)``); kiln
     never imports those objects, it only receives them in graphs.
Out: ``kiln_graph(gm)``: ``gm`` itself when no node (in it or in its bodies) targets one
     in ``FOREIGN``; otherwise a copy whose nodes target kiln's op of the same meaning and
     calling convention (``torch.ops.higher_order.wrap`` -> ``kiln.ops.wrap``), bodies with
     such nodes copied likewise.  The copy shares parameters, buffers and every other
     attribute with ``gm`` (the user's graph is left as it was).

Every kiln stage that takes a captured graph (AOT autograd, export, codegen, make_fx of a
graph) calls ``kiln_graph`` at its entry, so only kiln's ops reach kiln's tracers.  A
PyTorch operator missing from the table stays as it is (kiln's tracer then reports it).
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.fx as fx

# NOTE: the name of a torch.ops.higher_order operator -> the name of kiln's op in
# kiln.ops taking the same arguments (capture emits kiln's argument conventions for both).
FOREIGN: dict = {
    "wrap": "wrap",
    "tag_activation_checkpoint": "checkpoint",
    "cond": "cond",
    "while_loop": "while_loop",
    "map_impl": "map_impl",
}


def is_foreign_hop(target: Any) -> bool:
    """Whether ``target`` is a PyTorch higher-order operator (not one of kiln's)."""
    return isinstance(target, torch._ops.HigherOrderOperator)


def kiln_op_for(target: Any) -> Optional[Any]:
    """kiln's op standing for the PyTorch higher-order operator ``target`` (None: none,
    or ``target`` is not one)."""
    if not is_foreign_hop(target):
        return None
    name = FOREIGN.get(target.name())
    if name is None:
        return None
    import kiln.ops as kops

    return getattr(kops, name)


def _graph_modules(gm: fx.GraphModule) -> list:
    return [m for m in gm.modules() if isinstance(m, fx.GraphModule)]


def has_foreign(gm: Any) -> bool:
    """Whether ``gm`` (or a graph module inside it) calls an operator of ``FOREIGN``."""
    if not isinstance(gm, fx.GraphModule):
        return False
    return any(n.op == "call_function" and kiln_op_for(n.target) is not None
               for m in _graph_modules(gm) for n in m.graph.nodes)


def kiln_graph(gm: Any) -> Any:
    """``gm`` with PyTorch's higher-order operators replaced by kiln's (see the module
    docstring); anything but a GraphModule is returned as it is."""
    if not has_foreign(gm):
        return gm
    graph = copy.deepcopy(gm.graph)
    for node in graph.nodes:
        op = kiln_op_for(node.target) if node.op == "call_function" else None
        if op is not None:
            node.target = op
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta = dict(gm.meta)
    # NOTE: bodies (get_attr of a subgraph, call_module of a split graph) with such
    # nodes are replaced by their own copies; everything else stays shared with gm.
    done: set = set()
    for node in graph.nodes:
        if node.op not in ("get_attr", "call_module") or node.target in done:
            continue
        done.add(node.target)
        owner_path, _, leaf = node.target.rpartition(".")
        owner = new.get_submodule(owner_path) if owner_path else new
        sub = getattr(owner, leaf, None)
        if has_foreign(sub):
            setattr(owner, leaf, kiln_graph(sub))
    new.recompile()
    return new


__all__ = ["FOREIGN", "is_foreign_hop", "kiln_op_for", "has_foreign", "kiln_graph"]
