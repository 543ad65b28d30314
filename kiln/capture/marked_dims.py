"""Dims the user marks dynamic or static before compiling.

``kiln.mark_dynamic(t, dim, min=, max=)``, ``kiln.maybe_mark_dynamic(t, dim)`` and
``kiln.mark_static(t, dim)`` set the same tensor attributes as PyTorch's
``torch._dynamo.mark_dynamic`` & co., so a program written for either is read the same way:

- a dim marked dynamic is a symbolic size from the first compile (its own symbol, never
  shared with an equal size), constrained: if the trace specializes it to one value, or (with
  ``min``/``max``) makes a guard that not every size in the range satisfies, compiling raises
  ``ConstraintViolationError`` naming the guard and the line of user code, as PyTorch does;
- ``maybe_mark_dynamic`` is the same without the constraint; ``mark_static`` keeps a dim
  static under automatic dynamic shapes;
- each tensor input is guarded on its marks: a later call with a dim marked that was not
  marked at compile time recompiles.

Calling the marking functions inside the compiled region is an error (the mark must be set
before compiling), as in PyTorch.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import torch

DYNAMIC = "_dynamo_dynamic_indices"
WEAK = "_dynamo_weak_dynamic_indices"
STATIC = "_dynamo_static_indices"
RANGES = "_dynamo_dynamic_range"
MARK_ATTRS = (DYNAMIC, WEAK, STATIC)


@dataclasses.dataclass(frozen=True)
class DimRange:
    """A dim marked dynamic with bounds (the fields PyTorch's own record has)."""

    dim: int
    min: Optional[int]
    max: Optional[int]


def _dims(index: Any) -> list:
    return list(index) if isinstance(index, (list, tuple)) else [index]


def mark_dynamic(t: torch.Tensor, index: Any, *, min: Optional[int] = None, max: Optional[int] = None) -> None:
    """Compile ``t``'s dim(s) ``index`` as symbolic sizes (in ``[min, max]`` when given)."""
    for i in _dims(index):
        if not hasattr(t, DYNAMIC):
            t._dynamo_dynamic_indices = set()
            t._dynamo_dynamic_range = set()
        t._dynamo_dynamic_indices.add(i)
        if min is not None or max is not None:
            t._dynamo_dynamic_range.add(DimRange(i, min, max))


def maybe_mark_dynamic(t: torch.Tensor, index: Any) -> None:
    """Like mark_dynamic, but a trace that specializes the dim is not an error."""
    for i in _dims(index):
        if not hasattr(t, WEAK):
            t._dynamo_weak_dynamic_indices = set()
        t._dynamo_weak_dynamic_indices.add(i)


def mark_static(t: torch.Tensor, index: Any) -> None:
    """Keep ``t``'s dim(s) ``index`` static, also under automatic dynamic shapes."""
    for i in _dims(index):
        if not hasattr(t, STATIC):
            t._dynamo_static_indices = set()
        t._dynamo_static_indices.add(i)


# NOTE: PyTorch's marking functions by (module, qualified name): calling them while tracing is
# a user error (they must run before compiling).
MARKING_FUNCTIONS = {("torch._dynamo.decorators", n) for n in
                     ("mark_dynamic", "maybe_mark_dynamic", "mark_static", "mark_unbacked")}
MARKING_FUNCTIONS |= {(__name__, n) for n in ("mark_dynamic", "maybe_mark_dynamic", "mark_static")}


def is_marking_function(fn: Any) -> bool:
    key = (getattr(fn, "__module__", None), getattr(fn, "__qualname__", None))
    return key in MARKING_FUNCTIONS


def has_marks(values) -> bool:
    """Whether a tensor among ``values`` (or one level inside a list/tuple/dict) has marks."""
    for v in values:
        items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else (v,)
        for x in items:
            if isinstance(x, torch.Tensor) and any(hasattr(x, a) for a in MARK_ATTRS):
                return True
    return False


def apply_marks(t: torch.Tensor, dims: Optional[list]) -> tuple[Optional[list], dict]:
    """``dims`` (booleans: symbolic or not; None: all static) with ``t``'s marks applied, and
    {dim: (min, max, constrained)} for the dims marked dynamic (their own symbols)."""
    if not any(hasattr(t, a) for a in MARK_ATTRS):
        return dims, {}
    out = list(dims) if dims is not None else [False] * t.dim()
    marked: dict = {}
    ranges = {r.dim: (r.min, r.max) for r in getattr(t, RANGES, ())}
    for attr, constrained in ((WEAK, False), (DYNAMIC, True)):
        for d in getattr(t, attr, ()):
            if -t.dim() <= d < t.dim():
                d %= t.dim()
                out[d] = True
                lo, hi = ranges.get(d, (None, None))
                marked[d] = (lo, hi, constrained)
    for d in getattr(t, STATIC, ()):
        if -t.dim() <= d < t.dim():
            out[d % t.dim()] = False
            marked.pop(d % t.dim(), None)
    return (out if any(out) else None), marked


def marks_within(t: Any, attr: str, allowed: frozenset) -> bool:
    """Guard helper: ``t``'s marks under ``attr`` are among those it was compiled with."""
    v = getattr(t, attr, None)
    return v is None or set(v) <= allowed


def check_in_range(name: str, size: int, lo: Optional[int], hi: Optional[int]) -> None:
    """A marked dim's size at compile time must lie in its [min, max]."""
    if (lo is not None and size < lo) or (hi is not None and size > hi):
        raise _error_class()(f"{size} not in range [{lo}, {hi}]",
                             why=f"{name} is {size}, outside the range it was marked dynamic with",
                             hint="mark it with a range that holds the sizes it is called with")


def check_constraints(shape_env, marked: list, render=str) -> None:
    """Raise ConstraintViolationError when the trace specialized a constrained marked dim, or made
    a guard that some size in its [min, max] does not satisfy.

    ``marked``: (name, symbol, min, max) of the dims marked with ``mark_dynamic``; ``render``
    prints a guard over the inputs' names."""
    import sympy

    problems = []
    for name, sym, lo, hi in marked:
        value = shape_env.simplify(sym) if hasattr(shape_env, "simplify") else shape_env.replacements.get(sym, sym)
        vr = shape_env.var_to_range.get(sym)
        if isinstance(value, sympy.Integer) or (vr is not None and vr.lower == vr.upper):
            const = int(value) if isinstance(value, sympy.Integer) else int(vr.lower)
            problems.append(f"Not all values of {name} are valid because {name} was inferred to be a "
                            f"constant ({const}).")
            continue
        if lo is None and hi is None:
            continue
        for g in shape_env.guards:
            if g.expr.free_symbols == {sym} and not _holds_over(g.expr, sym, lo, hi):
                problems.append(f"Not all values of {name} in the specified range "
                                f"{_range_text(name, lo, hi)} satisfy the generated guard "
                                f"{_rendered(render, g.expr)}.")
    if problems:
        raise _error_class()(
            f"Constraints violated ({', '.join(n for n, *_ in marked)})!",
            why="\n".join(f"  - {p}" for p in problems),
            hint="the code specializes a dim marked with mark_dynamic: remove the mark (or use "
                 "maybe_mark_dynamic), widen its range, or change the code that guards on it")


@functools.lru_cache(maxsize=None)
def _error_class() -> type:
    """kiln's ConstraintViolationError that is also PyTorch's (``except`` either catches it); made
    on first use, as PyTorch's module is slow to import."""
    from torch.fx.experimental.symbolic_shapes import ConstraintViolationError as TorchError

    from kiln.exc import ConstraintViolationError

    return type("ConstraintViolationError", (ConstraintViolationError, TorchError),
                {"__module__": "kiln.exc", "__doc__": ConstraintViolationError.__doc__})


def _rendered(render, expr) -> str:
    try:
        return render(expr)
    except (KeyError, TypeError):
        return str(expr)


def _range_text(name: str, lo, hi) -> str:
    return " <= ".join(p for p in (str(lo) if lo is not None else "", name, str(hi) if hi is not None else "") if p)


def _holds_over(expr, sym, lo: Optional[int], hi: Optional[int]) -> bool:
    """Whether the one-symbol guard ``expr`` holds for every integer in [lo, hi] (a bound that is
    None: the guard's own constants and their neighbours, and a far value, are tried)."""
    import sympy

    if lo is not None and hi is not None and hi - lo <= 4096:
        points = range(lo, hi + 1)
    else:
        consts = {int(a) for a in expr.atoms(sympy.Integer)}
        cands = {c + k for c in consts for k in (-1, 0, 1)}
        base = lo if lo is not None else (hi if hi is not None else 2)
        cands |= {base, base + (1 << 20) if hi is None else base - (1 << 20)}
        points = sorted(c for c in cands if (lo is None or c >= lo) and (hi is None or c <= hi))
    return all(bool(expr.subs(sym, p)) for p in points)
