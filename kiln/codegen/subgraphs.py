"""Subgraphs of higher-order ops (a cond's branches, a while_loop's cond and body, a map's
body): compiled on their own.

In: an ATen GraphModule read by a get_attr node (``true_graph_0``), its placeholders
carrying fake values.  Out: a callable ``f(*args) -> tuple`` running the generated
code, which the HOP's extern call (``kiln.ops.cond(pred, f_true, f_false, operands)``)
calls like the subgraph itself.  A subgraph codegen cannot compile runs as the ATen
graph it is (the GraphModule itself).
"""
from __future__ import annotations

from typing import Any, Callable

import torch.fx as fx

from kiln import exc


class CompiledSubgraph:
    """The compiled form of one subgraph, callable as the GraphModule was."""

    def __init__(self, gm: fx.GraphModule, boxed: Callable):
        self.gm = gm
        self.boxed = boxed
        self.__name__ = "compiled_subgraph"

    def __call__(self, *args: Any) -> tuple:
        return tuple(self.boxed(list(args)))

    def __repr__(self) -> str:
        return f"CompiledSubgraph({self.gm.__class__.__name__})"


def compile_subgraph(gm: fx.GraphModule) -> Callable:
    """``gm`` through the codegen core (see module docstring)."""
    from kiln.codegen.graph import compile_aten_graph

    example = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    try:
        return CompiledSubgraph(gm, compile_aten_graph(gm, example))
    except exc.CodegenError as e:
        # NOTE: the subgraph alone runs eagerly; the enclosing graph stays compiled.
        from kiln.fallbacks import record_fallback

        record_fallback("codegen", "a higher-order op's subgraph runs as its ATen graph", str(e).splitlines()[0])
        return gm
