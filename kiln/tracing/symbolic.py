"""SymInt -> fx.Node: symbolic sizes rebuilt from their sympy expressions.

In "symbolic" mode an input's sizes are SymInts whose expressions are sympy
symbols.  When a SymInt (or a SymFloat derived from sizes, such as an
attention scale ``1 / sqrt(E)``) reaches an op, the graph needs a node
computing it.  Rather than tracing every Python-level SymInt operation, we
rebuild the node from the expression: each free symbol is read with
``aten.sym_size.int`` (or ``sym_stride``) from the placeholder that introduced
it, and the arithmetic becomes nodes calling the functions in ``_FUNCTIONS``,
a table keyed by the sympy function's name.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable

import sympy
import torch
import torch.fx as fx


def _floordiv(a: Any, b: Any) -> Any:
    return a // b


def _sqrt(a: Any) -> Any:
    return torch._sym_sqrt(a) if hasattr(torch, "_sym_sqrt") else math.sqrt(a)


# sympy head -> (python function of the rebuilt operands, n-ary fold?)
_FUNCTIONS: dict[str, tuple[Callable, bool]] = {
    "Add": (operator.add, True),
    "Mul": (operator.mul, True),
    "FloorDiv": (_floordiv, False),
    "Mod": (operator.mod, False),
    "PythonMod": (operator.mod, False),
    "PowByNatural": (operator.pow, False),
    "FloatPow": (operator.pow, False),
    "IntTrueDiv": (operator.truediv, False),
    "FloatTrueDiv": (operator.truediv, False),
    "ToFloat": (torch.sym_float, False),
    "TruncToInt": (torch.sym_int, False),
    "Max": (torch.sym_max, True),
    "Min": (torch.sym_min, True),
    "OpaqueUnaryFn_sqrt": (_sqrt, False),
    # NOTE: conditions on values read from tensor data (``aten._assert_scalar`` arguments)
    "Equality": (operator.eq, False),
    "Unequality": (operator.ne, False),
    "StrictLessThan": (operator.lt, False),
    "LessThan": (operator.le, False),
    "StrictGreaterThan": (operator.gt, False),
    "GreaterThan": (operator.ge, False),
    "And": (operator.and_, True),
    "Or": (operator.or_, True),
    "Not": (torch.sym_not, False),
}


class SymNodeBuilder:
    def __init__(self, graph: fx.Graph):
        self.graph = graph
        # symbol -> (how to read it: target, placeholder node, dim, SymInt value)
        self._sources: dict[sympy.Symbol, tuple[Callable, fx.Node, int, Any]] = {}
        self._cache: dict[sympy.Expr, tuple[Any, Any]] = {}

    def register_input(self, node: fx.Node, fake: torch.Tensor) -> None:
        """Remember where the free symbols of `fake`'s sizes/strides come from."""
        for target, values in ((torch.ops.aten.sym_size.int, fake.shape),
                               (torch.ops.aten.sym_stride.int, fake.stride())):
            for dim, s in enumerate(values):
                if isinstance(s, torch.SymInt):
                    expr = s.node.expr
                    if isinstance(expr, sympy.Symbol) and expr not in self._sources:
                        self._sources[expr] = (target, node, dim, s)

    def register_symint_input(self, node: fx.Node, s: Any) -> None:
        """A SymInt / SymFloat graph input (an int or float argument captured as a symbol):
        its symbol is the placeholder itself."""
        if isinstance(s, (torch.SymInt, torch.SymFloat)) and isinstance(s.node.expr, sympy.Symbol):
            self._sources[s.node.expr] = (None, node, -1, s)

    def register_bound(self, node: fx.Node, s: Any) -> None:
        """An op's scalar output (``aten._local_scalar_dense``: a value read from tensor data)
        whose expression is a new symbol: the node itself computes that symbol."""
        expr = s.node.expr
        if isinstance(expr, sympy.Symbol) and expr not in self._sources:
            self._sources[expr] = (None, node, -1, s)

    def node_for(self, s: Any) -> Any:
        expr = s.node.expr
        if not expr.free_symbols:
            # NOTE: a value the shape env has already specialised.
            if isinstance(s, torch.SymBool):
                return bool(expr)
            return int(expr) if isinstance(s, torch.SymInt) else float(expr)
        node, _ = self._build(expr)
        if isinstance(node, fx.Node):
            node.meta["val"] = s
        return node

    def _build(self, expr: sympy.Expr) -> tuple[Any, Any]:
        """(node or constant, its symbolic value) for `expr`."""
        if expr in self._cache:
            return self._cache[expr]
        built = self._build_uncached(expr)
        if isinstance(built[0], fx.Node):
            self._cache[expr] = built
        return built

    def _call(self, fn: Callable, parts: list[tuple[Any, Any]]) -> tuple[Any, Any]:
        val = fn(*(v for _, v in parts))
        node = self.graph.call_function(fn, tuple(n for n, _ in parts))
        node.meta["val"] = val
        return node, val

    def _build_uncached(self, expr: sympy.Expr) -> tuple[Any, Any]:
        if expr.is_Integer:
            return int(expr), int(expr)
        if expr.is_Number:
            return float(expr), float(expr)
        if expr in (sympy.true, sympy.false):
            return bool(expr), bool(expr)
        if isinstance(expr, sympy.Symbol):
            if expr not in self._sources:
                raise NotImplementedError(f"symbol {expr} does not come from a graph input")
            target, src, dim, val = self._sources[expr]
            if target is None:
                return src, val  # NOTE: a SymInt placeholder (register_symint_input)
            node = self.graph.call_function(target, (src, dim))
            node.meta["val"] = val
            return node, val
        head = type(expr).__name__
        if head == "Pow" and expr.args[1].is_Integer:
            return self._integer_power(expr)
        if head not in _FUNCTIONS:
            raise NotImplementedError(f"cannot rebuild symbolic expression {expr} ({head})")
        fn, nary = _FUNCTIONS[head]
        parts = [self._build(a) for a in expr.args]
        if not nary:
            return self._call(fn, parts)
        acc = parts[0]
        for p in parts[1:]:
            acc = self._call(fn, [acc, p])
        return acc

    def _integer_power(self, expr: sympy.Expr) -> tuple[Any, Any]:
        """sympy writes 1/x as Pow(x, -1): x ** k as repeated products, then a division."""
        base = self._build(expr.args[0])
        k = int(expr.args[1])
        acc = base
        for _ in range(abs(k) - 1):
            acc = self._call(operator.mul, [acc, base])
        if k < 0:
            acc = self._call(operator.truediv, [(1.0, 1.0), acc])
        return acc


def size_hint(s: Any, fallback: int = 2) -> Any:
    """A size as a plain int: SymInts give their hint (``fallback`` when unbacked), ints
    pass through. NOTE: never ``int(s)``: that adds a guard specialising the symbol."""
    if isinstance(s, torch.SymInt):
        hint = getattr(s.node, "hint", None)
        return int(hint) if hint is not None else fallback
    return s
