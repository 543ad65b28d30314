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


def concrete(v: Any) -> Any:
    """The Python value of a Sym* (guarding it in its ShapeEnv), or ``v`` itself."""
    if isinstance(v, SYM_TYPES):
        return _PY[type(v)](v)
    return v


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
        return bool(self.sym)

    def getattr(self, tx, name: str) -> VT:
        return ConstantVT(self.const()).getattr(tx, name)

    def reconstruct(self, cg) -> str:
        return cg.sym_expr(self.sym)

    def __repr__(self) -> str:
        return f"SymNodeVT({self.node}, {self.sym})"
