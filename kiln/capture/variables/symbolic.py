"""Symbolic sizes: a SymInt (from the frame's ShapeEnv) plus the fx node that produces it.

A ``SymNodeVT`` stands for a size read from a tensor with dynamic dims
(``x.shape[0]``) or arithmetic on such sizes.  Arithmetic stays symbolic
(``operator.*`` nodes in the graph); anything that needs a Python value
(``range(n)``, a comparison, ``if n > 4``) asks the ShapeEnv, which records
a guard, so the entry stays correct for every input it accepts.
"""
from __future__ import annotations

from typing import Any

import torch

from .base import VT, ConstantVT

SYM_TYPES = (torch.SymInt, torch.SymFloat, torch.SymBool)
_PY = {torch.SymInt: int, torch.SymFloat: float, torch.SymBool: bool}


def is_symbolic(v: Any) -> bool:
    """A SymInt/SymFloat/SymBool whose value is not a known constant."""
    return isinstance(v, SYM_TYPES) and not v.node.is_constant() and v.node.expr.free_symbols != set()


def has_unbacked(v: Any) -> bool:
    """A Sym* whose expression has unbacked symbols (values read from tensor data)."""
    if not isinstance(v, SYM_TYPES):
        return False
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    return bool(free_unbacked_symbols(v))


def concrete(v: Any) -> Any:
    """The Python value of a Sym* (guarding it in its ShapeEnv), or ``v`` itself.

    NOTE: a value that depends on tensor data (unbacked symbols) has none while tracing:
    a graph break, as PyTorch's GuardOnDataDependentSymNode is."""
    if isinstance(v, SYM_TYPES):
        from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

        try:
            return _PY[type(v)](v)
        except GuardOnDataDependentSymNode as e:
            data_dependent(e)
    return v


def data_dependent(e: Exception) -> "NoReturn":  # noqa: F821
    """The graph break for a guard on a value read from tensor data."""
    from .base import unsupported

    expr = getattr(e, "cond", None)
    unsupported(f"data-dependent guard on {expr if expr is not None else 'a value read from tensor data'}",
                why="the value comes from tensor data (Tensor.item() / tolist()), unknown while tracing "
                    "(could not guard on data-dependent expression)",
                hint="use torch._check() / torch._check_is_size() to state what holds, or accept the graph break")


class SymNodeVT(VT):
    def __init__(self, node, sym: Any):
        self.node = node
        self.sym = sym

    def python_type(self) -> type:
        return _PY[type(self.sym)]

    def is_const(self) -> bool:
        return False

    def const(self) -> Any:
        # NOTE: specialising: the ShapeEnv records `sym == value` as a guard.
        return concrete(self.sym)

    def truthy(self, tx) -> bool:
        from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

        try:
            return bool(self.sym)
        except GuardOnDataDependentSymNode as e:
            data_dependent(e)

    def getattr(self, tx, name: str) -> VT:
        return ConstantVT(self.const()).getattr(tx, name)

    def reconstruct(self, cg) -> str:
        if has_unbacked(self.sym) or isinstance(self.sym, torch.SymFloat):
            # NOTE: no input size computes it, or a float (an unspecialized float input's
            # arithmetic, computed by the graph as PyTorch does): a graph output.
            return cg.graph_scalar(self)
        return cg.sym_expr(self.sym)

    def __repr__(self) -> str:
        return f"SymNodeVT({self.node}, {self.sym})"
