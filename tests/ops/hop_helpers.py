"""Helpers shared by the higher-order-op tests (cond, while_loop, map)."""
from __future__ import annotations

from kiln.aot import aot_function, make_boxed_func


def _calls(gm, target):
    """The call_function nodes of ``gm`` whose target is ``target``."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def _aot(fn, partition=None):
    """``aot_function(fn)`` whose compilers keep each graph: (compiled fn, graphs)."""
    graphs = []

    def compiler(gm, example):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    kw = {"partition_fn": partition} if partition else {}
    return aot_function(fn, fw_compiler=compiler, bw_compiler=compiler, **kw), graphs
