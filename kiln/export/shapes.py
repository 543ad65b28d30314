"""Dynamic dimensions of an export: ``Dim``, derived dims, and the fake inputs they give.

In:  ``dynamic_shapes`` as the user wrote it (a dict keyed by the forward's argument
     names, or a tuple/list in argument order, following each input's structure; per
     tensor a dict ``{dim: Dim}`` or a tuple/list with one entry per dim).
Out: :func:`leaf_specs` one entry per flat input leaf (None, or a list with one of
     None / int / :class:`Dim` / :class:`DerivedDim` / ``Dim.AUTO`` / ``Dim.STATIC`` per
     dim); :func:`make_fakes` the fake inputs (a SymInt per named or automatic dim, one
     symbol per Dim name, derived dims as expressions of their root);
     :func:`range_constraints` what tracing left of each symbol's range, raising
     :class:`kiln.exc.ConstraintViolationError` (with "Suggested fixes:") where the
     program specialised a dim the user declared dynamic.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.utils._pytree as pytree

from kiln import exc

INT_MAX = (1 << 63) - 1


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Dim.{self.name}"


class Dim:
    """A named dynamic dimension: ``Dim("batch", min=1, max=1024)``.

    ``Dim.AUTO``: dynamic where the program allows it, else static (no error);
    ``Dim.STATIC``: the example's size; ``Dim.DYNAMIC``: as ``AUTO`` but an error if the
    program specialises it.  ``2 * d``, ``d + 1``, ``d - 1`` are derived dims."""

    AUTO = _Marker("AUTO")
    STATIC = _Marker("STATIC")
    DYNAMIC = _Marker("DYNAMIC")

    def __init__(self, name: str, *, min: Optional[int] = None, max: Optional[int] = None) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise exc.ExportError(f"Dim({name!r}): a Dim's name must be a Python identifier",
                                  where=exc.user_location())
        lo = 0 if min is None else int(min)
        hi = INT_MAX if max is None else int(max)
        if lo < 0 or hi < lo:
            raise exc.ExportError(f"Dim({name!r}, min={min}, max={max}): an empty or negative range",
                                  where=exc.user_location(), hint="use 0 <= min <= max")
        self.__name__ = name
        self.min, self.max = lo, hi
        self.user_range = min is not None or max is not None

    def __repr__(self) -> str:
        bounds = "" if not self.user_range else f", min={self.min}, max={self.max}"
        return f"Dim({self.__name__!r}{bounds})"

    def __mul__(self, k: int) -> "DerivedDim":
        return DerivedDim(self, int(k), 0)

    __rmul__ = __mul__

    def __add__(self, k: int) -> "DerivedDim":
        return DerivedDim(self, 1, int(k))

    __radd__ = __add__

    def __sub__(self, k: int) -> "DerivedDim":
        return DerivedDim(self, 1, -int(k))


@dataclass(frozen=True)
class DerivedDim:
    """``scale * root + offset`` of a root :class:`Dim`."""

    root: Dim
    scale: int
    offset: int

    @property
    def __name__(self) -> str:
        return repr(self)

    def __repr__(self) -> str:
        s = self.root.__name__ if self.scale == 1 else f"{self.scale}*{self.root.__name__}"
        return s if not self.offset else f"{s} {'+' if self.offset > 0 else '-'} {abs(self.offset)}"

    def __mul__(self, k: int) -> "DerivedDim":
        return DerivedDim(self.root, self.scale * int(k), self.offset * int(k))

    __rmul__ = __mul__

    def __add__(self, k: int) -> "DerivedDim":
        return DerivedDim(self.root, self.scale, self.offset + int(k))

    def __sub__(self, k: int) -> "DerivedDim":
        return DerivedDim(self.root, self.scale, self.offset - int(k))

    def value(self, root_value: int) -> int:
        return self.scale * root_value + self.offset

    def root_of(self, value: int) -> Optional[int]:
        """The root's value giving ``value``, or None when there is none."""
        q, r = divmod(value - self.offset, self.scale)
        return q if r == 0 else None


def dims(*names: str, min: Optional[int] = None, max: Optional[int] = None) -> tuple:
    """``dims("a", "b")`` -> ``(Dim("a"), Dim("b"))`` with the same range."""
    return tuple(Dim(n, min=min, max=max) for n in names)


def input_names(fn: Callable, args: tuple, kwargs: dict) -> tuple[list, list]:
    """Names of ``fn``'s positional arguments as called, and of the keyword ones."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = []
    pos = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var = next((p.name for p in params if p.kind == p.VAR_POSITIONAL), "args")
    names = [pos[i] if i < len(pos) else f"{var}_{i - len(pos)}" for i in range(len(args))]
    return names, list(kwargs)


def _where(path: str) -> str:
    return f"dynamic_shapes{path}"


def _tensor_spec(t: torch.Tensor, spec: Any, path: str) -> Optional[list]:
    if spec is None:
        return None
    if isinstance(spec, dict):
        bad = [k for k in spec if not isinstance(k, int) or not -t.dim() <= k < t.dim()]
        if bad:
            raise exc.ExportError(
                f"{_where(path)} names dim {bad[0]!r} of a tensor with {t.dim()} dims",
                why="the keys of a tensor's dynamic_shapes dict are its dim indices",
                where=exc.user_location(), hint=f"use keys in range({t.dim()})")
        out: list = [None] * t.dim()
        for k, v in spec.items():
            out[k % t.dim()] = v
        return out
    if isinstance(spec, (tuple, list)):
        if len(spec) != t.dim():
            raise exc.ExportError(
                f"{_where(path)} has {len(spec)} entries for a tensor with {t.dim()} dims",
                why="a tuple or list gives one entry (None, int or Dim) per dim",
                where=exc.user_location(), hint=f"give {t.dim()} entries, or a dict {{dim: Dim}}")
        return list(spec)
    raise exc.ExportError(f"{_where(path)} is {spec!r}, which is not a dynamic-shape spec of a tensor",
                          where=exc.user_location(),
                          hint="use None, a dict {dim: Dim} or a tuple with one entry per dim")


def _walk(value: Any, spec: Any, path: str, out: list) -> None:
    """Append one entry per pytree leaf of ``value`` (the order tree_flatten gives)."""
    if isinstance(value, torch.Tensor):
        out.append(_tensor_spec(value, spec, path))
        return
    children, ctx = pytree.tree_flatten(value)
    if len(children) == 1 and children[0] is value:   # a non-tensor leaf
        if spec is not None:
            raise exc.ExportError(f"{_where(path)} is {spec!r} for an input that is not a tensor "
                                  f"({type(value).__name__})", where=exc.user_location(),
                                  hint="give None for inputs that are not tensors")
        out.append(None)
        return
    if spec is None:
        out.extend([None] * len(children))
        return
    if isinstance(value, dict):
        if not isinstance(spec, dict) or set(spec) - set(value):
            extra = sorted(map(str, set(spec) - set(value))) if isinstance(spec, dict) else []
            raise exc.ExportError(
                f"{_where(path)} does not follow the input's structure (a dict with keys "
                f"{sorted(map(str, value))})" + (f"; unknown keys {extra}" if extra else ""),
                where=exc.user_location(), hint="give a dict with the input's keys")
        for k, v in value.items():
            _walk(v, spec.get(k), f"{path}[{k!r}]", out)
        return
    if isinstance(value, (tuple, list)):
        if not isinstance(spec, (tuple, list)) or len(spec) != len(value):
            raise exc.ExportError(
                f"{_where(path)} does not follow the input's structure (a {type(value).__name__} "
                f"of {len(value)})", where=exc.user_location(),
                hint=f"give a tuple or list of {len(value)} entries")
        for i, (v, s) in enumerate(zip(value, spec)):
            _walk(v, s, f"{path}[{i}]", out)
        return
    raise exc.ExportError(f"{_where(path)}: inputs of type {type(value).__name__} cannot take a "
                          "dynamic-shape spec", where=exc.user_location(), hint="give None")


def leaf_specs(fn: Callable, args: tuple, kwargs: dict, dynamic_shapes: Any) -> list:
    """One dim-spec entry per flat leaf of ``(args, kwargs)`` (see the module docstring)."""
    n_leaves = len(pytree.tree_leaves((tuple(args), kwargs)))
    if dynamic_shapes is None:
        return [None] * n_leaves
    pos, kw = input_names(fn, args, kwargs)
    values = list(args) + [kwargs[k] for k in kw]
    names = pos + kw
    if isinstance(dynamic_shapes, dict):
        unknown = [k for k in dynamic_shapes if k not in names]
        if unknown:
            raise exc.ExportError(
                f"dynamic_shapes names {unknown[0]!r}, which is not an input of the program",
                why=f"its inputs are {names}", where=exc.user_location(),
                hint="key dynamic_shapes by the forward's argument names")
        specs = [dynamic_shapes.get(n) for n in names]
    elif isinstance(dynamic_shapes, (tuple, list)):
        if len(dynamic_shapes) != len(values):
            raise exc.ExportError(
                f"dynamic_shapes has {len(dynamic_shapes)} entries for {len(values)} inputs",
                where=exc.user_location(), hint="give one entry (None when static) per input")
        specs = list(dynamic_shapes)
    else:
        raise exc.ExportError(f"dynamic_shapes is a {type(dynamic_shapes).__name__}",
                              where=exc.user_location(),
                              hint="give a dict keyed by argument name, or a tuple in argument order")
    out: list = []
    for name, v, s in zip(names, values, specs):
        _walk(v, s, f"[{name!r}]", out)
    assert len(out) == n_leaves
    return out


def _entry(d: Any, size: int, where: str) -> Any:
    if d is None or d is Dim.STATIC:
        return None
    if isinstance(d, int) and not isinstance(d, bool):
        if d != size:
            raise exc.ExportError(f"{where} is declared {d}, but the example input's size is {size}",
                                  where=exc.user_location(), hint=f"declare {size}, or pass a matching input")
        return None
    if isinstance(d, (Dim, DerivedDim, _Marker)):
        return d
    raise exc.ExportError(f"{where} is {d!r}", why="a dim's entry is None, an int or a Dim",
                          where=exc.user_location())


@dataclass
class Symbols:
    """What :func:`make_fakes` made: a SymInt per Dim name (and per automatic dim)."""

    roots: dict          # name -> (Dim or marker, SymInt, example value, where)
    derived: list        # (DerivedDim, example value, where)
    shape_env: Any


def _root_symint(mode, value: int, lo: int, hi: int):
    from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext, StrictMinMaxConstraint
    from torch.utils._sympy.value_ranges import ValueRanges

    # NOTE: a one-dim stand-in tensor gives a fresh symbol with this range; the inputs
    # are then made from the SymInts, so a name used twice is one symbol.
    ctx = StatelessSymbolicContext(
        dynamic_sizes=[DimDynamic.DYNAMIC],
        constraint_sizes=[StrictMinMaxConstraint(vr=ValueRanges(lo, hi), warn_only=False)])
    return mode.from_tensor(torch.empty(value, device="meta"), symbolic_context=ctx).shape[0]


def make_fakes(mode, leaves: list, specs: list, names: list) -> tuple[list, Symbols]:
    """Fake inputs of ``leaves`` with the dims of ``specs`` symbolic (``names``: each
    leaf's path, for messages)."""
    syms = Symbols({}, [], mode.shape_env)
    fakes = []
    for leaf, spec, name in zip(leaves, specs, names):
        if not isinstance(leaf, torch.Tensor):
            fakes.append(leaf)
            continue
        if spec is None or all(_entry(d, s, f"{name} dim {i}") is None
                               for i, (d, s) in enumerate(zip(spec, leaf.shape))):
            fakes.append(mode.from_tensor(leaf, static_shapes=True))
            continue
        sizes = [_size(syms, mode, d, int(s), f"{name}.size({i})")
                 for i, (d, s) in enumerate(zip(spec, leaf.shape))]
        with mode:
            f = torch.empty_strided(sizes, _contiguous(sizes), dtype=leaf.dtype, device=leaf.device)
        fakes.append(f.requires_grad_(leaf.requires_grad))
    return fakes, syms


def _contiguous(sizes: list) -> list:
    strides, acc = [], 1
    for s in reversed(sizes):
        strides.append(acc)
        acc = acc * s
    return list(reversed(strides))


def _size(syms: Symbols, mode, d: Any, size: int, where: str):
    d = _entry(d, size, where)
    if d is None:
        return size
    if isinstance(d, DerivedDim):
        root = d.root
        rv = d.root_of(size)
        if rv is None:
            raise exc.ExportError(f"{where} is {size}, which no value of {root.__name__} gives as {d!r}",
                                  where=exc.user_location(), hint="pass an example input of a matching size")
        sym = _root(syms, mode, root, rv, f"{root.__name__} (from {where})")
        syms.derived.append((d, size, where))
        return d.scale * sym + d.offset
    if isinstance(d, _Marker):
        key = f"_auto_{len(syms.roots)}"
        return _root(syms, mode, d, size, where, key)
    return _root(syms, mode, d, size, where)


def _root(syms: Symbols, mode, d: Any, size: int, where: str, key: Optional[str] = None):
    key = key or d.__name__
    if key in syms.roots:
        prev_d, sym, prev, prev_where = syms.roots[key]
        if prev != size:
            raise exc.ExportError(
                f"{where} is {size} but {prev_where} is {prev}, and both are Dim {key!r}",
                why="one Dim stands for one size", where=exc.user_location(),
                hint="use two Dims, or pass example inputs whose sizes agree")
        return sym
    if size in (0, 1):
        if isinstance(d, _Marker):
            syms.roots[key] = (d, size, size, where)
            return size
        raise exc.ExportError(
            f"{where} is {size} in the example input, and Dim {key!r} marks it dynamic",
            why="sizes 0 and 1 are specialised (broadcasting reads them), so the program would "
                "only take that size", where=exc.user_location(),
            hint="pass an example input whose size there is 2 or more")
    lo, hi = (max(d.min, 2), d.max) if isinstance(d, Dim) else (2, INT_MAX)
    if not lo <= size <= hi:
        raise exc.ExportError(f"{where} is {size}, outside {d!r}", where=exc.user_location(),
                              hint="widen the Dim's range or pass an input inside it")
    sym = _root_symint(mode, size, lo, hi)
    syms.roots[key] = (d, sym, size, where)
    return sym


@dataclass(frozen=True)
class Range:
    """The sizes a symbol of an exported program may take (``max`` None: unbounded)."""

    min: int
    max: Optional[int]

    def __contains__(self, v: int) -> bool:
        return v >= self.min and (self.max is None or v <= self.max)

    def __repr__(self) -> str:
        return f"VR[{self.min}, {'int_oo' if self.max is None else self.max}]"


def size_bound(v: Any) -> Optional[int]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isinf(f) or f >= INT_MAX else int(f)


def range_constraints(syms: Symbols) -> tuple[dict, dict]:
    """(``{symbol name: Range}``, ``{Dim name: symbol name}``) after tracing; raises
    :class:`kiln.exc.ConstraintViolationError` listing suggested fixes where the program
    specialised or narrowed a declared Dim."""
    env = syms.shape_env
    out, names, fixes, why = {}, {}, [], []
    for key, (d, sym, example, where) in syms.roots.items():
        if isinstance(sym, int):
            continue
        expr = env.replace(sym.node.expr)
        auto = isinstance(d, _Marker) and d is Dim.AUTO
        if not expr.free_symbols:
            if not auto:
                why.append(f"{where} (Dim {key!r}) was specialised to {int(expr)} by the program")
                fixes.append(f"{key} = {int(expr)}  # or Dim.STATIC for {where}")
            continue
        if expr != sym.node.expr:
            if not auto:
                why.append(f"{where} (Dim {key!r}) must equal {expr} in the program")
                fixes.append(f"{key} = <the Dim of the other size> (or a derived dim: {expr})")
            continue
        vr = env.var_to_range.get(expr)
        lo, hi = (size_bound(vr.lower), size_bound(vr.upper)) if vr is not None else (2, None)
        lo = 2 if lo is None else lo
        if isinstance(d, Dim) and (lo > max(d.min, 2) or (hi is not None and hi < d.max)):
            why.append(f"{where} (Dim {key!r}) only works in [{lo}, {hi if hi is not None else 'inf'}] "
                       f"in the program, not in the declared range")
            fixes.append(f"{key} = Dim({key!r}, min={lo}" + (f", max={hi})" if hi is not None else ")"))
        out[str(expr)] = Range(lo, hi)
        names[key] = str(expr)
    if why:
        raise exc.ConstraintViolationError(
            "kiln.export: the program does not allow the dynamic shapes it was given",
            why="; ".join(why), where=exc.user_location(),
            hint="Suggested fixes:\n  " + "\n  ".join(fixes))
    return out, names


__all__ = ["Dim", "DerivedDim", "dims", "Range", "leaf_specs", "make_fakes", "range_constraints",
           "input_names", "Symbols"]
