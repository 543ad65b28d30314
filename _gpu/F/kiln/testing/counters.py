"""Backends that count and record what they are given (for tests).

``CompileCounter`` counts frames (calls) and ops (nodes whose op is call_function,
call_method or call_module) exactly as PyTorch's dynamo ``CompileCounter``.
"""
from __future__ import annotations

from typing import Any, Callable, Union

import torch


def count_ops(gm: torch.fx.GraphModule) -> int:
    """Number of call_function / call_method / call_module nodes in ``gm``."""
    return sum(1 for node in gm.graph.nodes if "call" in node.op)


class CompileCounter:
    """A backend that runs graphs eagerly and counts them.

    ``frame_count``: how many graphs it compiled; ``op_count``: their ops, summed.
    """

    def __init__(self) -> None:
        self.frame_count = 0
        self.op_count = 0
        self.clear()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable[..., Any]:
        self.frame_count += 1
        self.op_count += count_ops(gm)
        return gm.forward

    def clear(self) -> None:
        self.frame_count = 0
        self.op_count = 0


class CompileCounterWithBackend:
    """Like :class:`CompileCounter`, but compiles with ``backend`` (a name or callable)
    and keeps the graphs it was given in ``graphs``."""

    def __init__(self, backend: Union[str, Callable]) -> None:
        self.backend = backend
        self.frame_count = 0
        self.op_count = 0
        self.graphs: list[torch.fx.GraphModule] = []
        self.clear()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable[..., Any]:
        from kiln.backends import lookup_backend

        self.frame_count += 1
        self.op_count += count_ops(gm)
        self.graphs.append(gm)
        return lookup_backend(self.backend)(gm, example_inputs)

    def clear(self) -> None:
        self.frame_count = 0
        self.op_count = 0
        self.graphs = []


class EagerAndRecordGraphs:
    """The ``eager`` backend that also keeps every graph in ``graphs``."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable[..., Any]:
        self.graphs.append(gm)
        return gm.forward


class AotEagerAndRecordGraphs:
    """The ``aot_eager`` backend that keeps the torch-level graphs (``graphs``) and the
    AOT forward and backward graphs (``fw_graphs``, ``bw_graphs``)."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []
        self.fw_graphs: list[torch.fx.GraphModule] = []
        self.bw_graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable[..., Any]:
        from kiln.backends.debugging import aot_eager

        self.graphs.append(gm)

        def fw_compiler(g: torch.fx.GraphModule, inputs: list) -> Callable[..., Any]:
            self.fw_graphs.append(g)
            return g.forward

        def bw_compiler(g: torch.fx.GraphModule, inputs: list) -> Callable[..., Any]:
            self.bw_graphs.append(g)
            return g.forward

        return aot_eager(gm, example_inputs, fw_compiler=fw_compiler, bw_compiler=bw_compiler)


__all__ = [
    "count_ops",
    "CompileCounter",
    "CompileCounterWithBackend",
    "EagerAndRecordGraphs",
    "AotEagerAndRecordGraphs",
]
