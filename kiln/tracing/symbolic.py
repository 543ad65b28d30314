"""SymInt -> fx.Node: symbolic sizes rebuilt from their sympy expressions.

In "symbolic" mode an input's sizes are SymInts whose expressions are sympy
symbols.  When a SymInt reaches an op (``x.view(x.shape[0] * 2)``) the graph
needs a node computing it.  Rather than tracing every Python-level SymInt
operation, we rebuild the node from the expression: each free symbol is read
with ``aten.sym_size.int`` (or ``sym_stride``) from the placeholder that
introduced it, and the arithmetic becomes ``operator`` nodes.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import sympy
import torch
import torch.fx as fx


def _floordiv(a: Any, b: Any) -> Any:
    return a // b


class SymNodeBuilder:
    def __init__(self, graph: fx.Graph):
        self.graph = graph
        # symbol -> (how to read it: (target, node, dim))
        self._sources: dict[sympy.Symbol, tuple[Callable, fx.Node, int]] = {}
        self._cache: dict[sympy.Expr, fx.Node] = {}

    def register_input(self, node: fx.Node, fake: torch.Tensor) -> None:
        """Remember where the free symbols of `fake`'s sizes/strides come from."""
        for target, values in ((torch.ops.aten.sym_size.int, fake.shape),
                               (torch.ops.aten.sym_stride.int, fake.stride())):
            for dim, s in enumerate(values):
                if isinstance(s, torch.SymInt):
                    expr = s.node.expr
                    if isinstance(expr, sympy.Symbol) and expr not in self._sources:
                        self._sources[expr] = (target, node, dim, s)

    def node_for(self, s: Any) -> Any:
        expr = s.node.expr
        if not expr.free_symbols:
            # NOTE: a SymInt that the shape env has already specialised.
            return int(expr) if isinstance(s, torch.SymInt) else s.node.hint
        return self._build(expr, s)

    def _build(self, expr: sympy.Expr, s: Any) -> Any:
        if expr in self._cache:
            return self._cache[expr]
        node = self._build_uncached(expr, s)
        if isinstance(node, fx.Node):
            self._cache[expr] = node
        return node

    def _build_uncached(self, expr: sympy.Expr, s: Any) -> Any:
        if expr.is_Integer:
            return int(expr)
        if isinstance(expr, sympy.Symbol):
            if expr not in self._sources:
                raise NotImplementedError(
                    f"symbol {expr} does not come from a graph input"
                )
            target, src, dim, val = self._sources[expr]
            node = self.graph.call_function(target, (src, dim))
            node.meta["val"] = val
            return node
        head = type(expr).__name__
        if head in _BINARY:
            fn = _BINARY[head]
            parts = [self._build(a, s) for a in expr.args]
            acc = parts[0]
            for p in parts[1:]:
                acc = self.graph.call_function(fn, (acc, p))
            acc.meta["val"] = s
            return acc
        if head == "Pow" and expr.args[1].is_Integer and int(expr.args[1]) > 0:
            base = self._build(expr.args[0], s)
            acc = base
            for _ in range(int(expr.args[1]) - 1):
                acc = self.graph.call_function(operator.mul, (acc, base))
            return acc
        if head in ("FloorDiv", "Mod", "PythonMod"):
            a, b = (self._build(x, s) for x in expr.args)
            fn = _floordiv if head == "FloorDiv" else operator.mod
            node = self.graph.call_function(fn, (a, b))
            node.meta["val"] = s
            return node
        raise NotImplementedError(f"cannot rebuild symbolic expression {expr} ({head})")


_BINARY = {"Add": operator.add, "Mul": operator.mul}
