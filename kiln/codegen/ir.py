"""kiln.codegen.ir: the loop IR between lowering and the printers.

In:  nothing (data types only).  Out: expressions, buffers and lazy tensor values.

- Expressions (:class:`Load`, :class:`Const`, :class:`IndexValue`, :class:`Op`) are small
  immutable, hashable trees; structural equality gives CSE and cache keys.  ``str(e)``
  prints readable Python.  Index math is sympy over integer symbols (loop variables
  ``x0..``/``r0..``, shape symbols ``s0..`` from the ShapeEnv, indirect symbols ``ind0..``).
- Expression dtypes are *compute* dtypes: float16/bfloat16 values compute in float32 and
  are rounded when stored (a buffer's dtype is its storage dtype).
- A :class:`Buffer` is a named layout (sizes, strides, dtype, device) with a body:
  :class:`Pointwise`, :class:`Reduction`, :class:`Extern` (an ATen call), or
  :class:`InputBuffer` (a graph input / an extern's output).
- A :class:`TensorValue` is a lazy tensor: sizes and a loader ``index -> Expr``; pointwise
  lowerings compose loaders, views rewrite the index.  ``strided`` is set when the value
  is a plain strided view of one buffer (then externs can use it without a copy).

Nothing here knows which language kernels are printed in.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Optional, Sequence

import sympy
import torch


# ----------------------------------------------------------------------------- index math

class FloorDiv(sympy.Function):
    """Integer floor division of non-negative index expressions (a // b)."""

    is_integer = True
    nargs = (2,)

    @classmethod
    def eval(cls, a, b):  # noqa: D102
        if b == 1:
            return a
        if a == 0:
            return sympy.Integer(0)
        if a.is_Integer and b.is_Integer:
            return sympy.Integer(int(a) // int(b))
        if isinstance(a, FloorDiv):  # (a // b) // c == a // (b * c)
            return FloorDiv(a.args[0], a.args[1] * b)
        # (k*b*q + r) // b == k*q + r // b when the divisor divides terms exactly
        if a.is_Add:
            keep, out = [], []
            for t in a.args:
                q = sympy.cancel(t / b)
                if _is_int_expr(q):
                    out.append(q)
                else:
                    keep.append(t)
            if out:
                rest = sympy.Add(*keep)
                if rest == 0:
                    return sympy.Add(*out)
                return sympy.Add(*out) + FloorDiv(rest, b)
        q = sympy.cancel(a / b)
        if _is_int_expr(q):
            return q
        return None


class ModIndex(sympy.Function):
    """a % b for non-negative index expressions (C and Python agree there)."""

    is_integer = True
    nargs = (2,)

    @classmethod
    def eval(cls, a, b):  # noqa: D102
        if b == 1 or a == 0:
            return sympy.Integer(0)
        if a.is_Integer and b.is_Integer:
            return sympy.Integer(int(a) % int(b))
        if a.is_Add:
            keep = [t for t in a.args if not _is_int_expr(sympy.cancel(t / b))]
            if len(keep) != len(a.args):
                return ModIndex(sympy.Add(*keep), b)
        if _is_int_expr(sympy.cancel(a / b)):
            return sympy.Integer(0)
        return None


def _is_int_expr(q) -> bool:
    return bool(q.is_integer) and not q.has(FloorDiv, ModIndex) and q.is_polynomial()


def floordiv(a, b) -> sympy.Expr:
    return FloorDiv(sympy.sympify(a), sympy.sympify(b))


def modindex(a, b) -> sympy.Expr:
    return ModIndex(sympy.sympify(a), sympy.sympify(b))


_var_cache: dict = {}


def _max_value(e: sympy.Expr, sizes: dict) -> Optional[sympy.Expr]:
    """The largest value of ``e`` (a sum of non-negative multiples of loop vars and
    constants) when each var ``v`` runs over ``range(sizes[v])``; None otherwise."""
    total = sympy.Integer(0)
    for t in sympy.Add.make_args(sympy.expand(e)):
        coeff, rest = t.as_coeff_Mul()
        if rest == 1:
            total += coeff
        elif rest in sizes and coeff >= 0:
            total += coeff * (sizes[rest] - 1)
        else:
            return None
    return total


def simplify_in_ranges(e: sympy.Expr, sizes: dict) -> sympy.Expr:
    """``e`` with ``a // b`` -> 0 and ``a % b`` -> ``a`` wherever ``a`` stays below
    ``b`` while each loop var ``v`` runs over ``range(sizes[v])`` (integer sizes)."""
    def fold(f):
        a, b = f.args
        top = _max_value(a, sizes)
        if top is None or not b.is_Integer or not top.is_Integer or top >= b:
            return f
        return sympy.Integer(0) if isinstance(f, FloorDiv) else a

    prev = None
    while prev != e:
        prev = e
        e = sympy.expand(e.replace(lambda f: isinstance(f, (FloorDiv, ModIndex)), fold))
    return e


def var(prefix: str, i: int) -> sympy.Symbol:
    """Loop variable ``x3`` / ``r1`` / ``y0`` (non-negative integer symbols)."""
    key = (prefix, i)
    s = _var_cache.get(key)
    if s is None:
        s = _var_cache[key] = sympy.Symbol(f"{prefix}{i}", integer=True, nonnegative=True)
    return s


def make_vars(prefix: str, n: int) -> list[sympy.Symbol]:
    return [var(prefix, i) for i in range(n)]


def sympify_size(s: Any) -> sympy.Expr:
    """An int / SymInt / sympy expr as a sympy expr."""
    if isinstance(s, torch.SymInt):
        return s.node.expr
    if isinstance(s, sympy.Basic):
        return s
    return sympy.Integer(int(s))


def contiguous_strides(sizes: Sequence[sympy.Expr]) -> list[sympy.Expr]:
    out, acc = [], sympy.Integer(1)
    for s in reversed(list(sizes)):
        out.append(acc)
        acc = acc * s
    return list(reversed(out))


def product(xs: Sequence[sympy.Expr]) -> sympy.Expr:
    acc = sympy.Integer(1)
    for x in xs:
        acc = acc * x
    return acc


def strided_index(index: Sequence[sympy.Expr], strides: Sequence[sympy.Expr],
                  offset: sympy.Expr = sympy.Integer(0)) -> sympy.Expr:
    return sympy.expand(offset + sum((i * s for i, s in zip(index, strides)), sympy.Integer(0)))


# ----------------------------------------------------------------------------- expressions

def compute_dtype(dt: torch.dtype) -> torch.dtype:
    """The dtype a value of storage dtype ``dt`` computes in."""
    return torch.float32 if dt in (torch.float16, torch.bfloat16) else dt


_ind_counter = itertools.count()


class Expr:
    """Base of the expression trees (immutable; hash cached)."""

    dtype: torch.dtype
    __slots__ = ()

    def children(self) -> tuple["Expr", ...]:
        return ()


def _cached_hash(cls):
    """Frozen dataclass with its hash computed once (trees are hashed a lot)."""
    cls = dataclasses.dataclass(frozen=True, eq=True)(cls)
    raw_hash = cls.__hash__

    def __hash__(self):
        h = self.__dict__.get("_h")
        if h is None:
            h = raw_hash(self)
            object.__setattr__(self, "_h", h)
        return h

    cls.__hash__ = __hash__
    return cls


@_cached_hash
class Load(Expr):
    """Element ``buf[index]``; ``indirect`` binds symbols in ``index`` to integer value
    expressions (gather/index/embedding): ``((sym, value, bound), ...)``; a negative value
    is wrapped by ``bound`` as eager indexing does."""

    buf: str
    index: sympy.Expr
    dtype: torch.dtype
    indirect: tuple = ()

    def children(self):
        return tuple(v for _, v, _ in self.indirect)

    def __str__(self):
        ind = "".join(f", {s}={v}" for s, v, _ in self.indirect)
        return f"{self.buf}[{self.index}{ind}]"


@_cached_hash
class Const(Expr):
    value: Any
    dtype: torch.dtype

    def __str__(self):
        return repr(self.value)


@_cached_hash
class IndexValue(Expr):
    """An index expression used as a value (arange, iota, masks, symbolic sizes)."""

    expr: sympy.Expr
    dtype: torch.dtype

    def __str__(self):
        return f"index({self.expr})"


@_cached_hash
class Op(Expr):
    """``name(*args)`` computed in ``dtype`` (see the printers' tables for names)."""

    name: str
    args: tuple
    dtype: torch.dtype

    def children(self):
        return self.args

    def __str__(self):
        if self.name == "cast":
            return f"{self.args[0]}.to({str(self.dtype).replace('torch.', '')})"
        return f"{self.name}({', '.join(map(str, self.args))})"


def new_indirect_symbol() -> sympy.Symbol:
    return sympy.Symbol(f"ind{next(_ind_counter)}", integer=True)


def walk(e: Expr):
    """Every node of ``e`` once (DAG order: children before parents)."""
    seen: set = set()
    out: list = []
    stack = [(e, False)]
    while stack:
        node, done = stack.pop()
        if done:
            out.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        for c in node.children():
            if c not in seen:
                stack.append((c, False))
    return out


def loads(e: Expr) -> list[Load]:
    return [n for n in walk(e) if isinstance(n, Load)]


def op_count(e: Expr) -> int:
    return sum(1 for n in walk(e) if isinstance(n, (Op, Load)))


def map_index(e: Expr, fn: Callable[[sympy.Expr], sympy.Expr], memo: Optional[dict] = None) -> Expr:
    """``e`` with every index expression replaced by ``fn(index)``."""
    memo = {} if memo is None else memo
    r = memo.get(e)
    if r is not None:
        return r
    if isinstance(e, Load):
        ind = tuple((s, map_index(v, fn, memo), b) for s, v, b in e.indirect)
        r = Load(e.buf, fn(e.index), e.dtype, ind)
    elif isinstance(e, IndexValue):
        r = IndexValue(fn(e.expr), e.dtype)
    elif isinstance(e, Op):
        r = Op(e.name, tuple(map_index(a, fn, memo) for a in e.args), e.dtype)
    else:
        r = e
    memo[e] = r
    return r


def substitute(e: Expr, mapping: dict) -> Expr:
    if not mapping:
        return e
    return map_index(e, lambda ix: ix.xreplace(mapping) if ix.free_symbols & mapping.keys() else ix)


def map_loads(e: Expr, fn: Callable[[Load], Optional[Expr]], memo: Optional[dict] = None) -> Expr:
    """``e`` with each Load replaced by ``fn(load)`` (None keeps it)."""
    memo = {} if memo is None else memo
    r = memo.get(e)
    if r is not None:
        return r
    if isinstance(e, Load):
        ind = tuple((s, map_loads(v, fn, memo), b) for s, v, b in e.indirect)
        e2 = Load(e.buf, e.index, e.dtype, ind) if ind != e.indirect else e
        r = fn(e2)
        r = e2 if r is None else r
    elif isinstance(e, Op):
        r = Op(e.name, tuple(map_loads(a, fn, memo) for a in e.args), e.dtype)
    else:
        r = e
    memo[e] = r
    return r


# ----------------------------------------------------------------------------- buffers

@dataclasses.dataclass
class Pointwise:
    """``out[x] = expr(x)`` for x in ``ranges`` (expr over vars x0..)."""

    ranges: list
    expr: Expr


REDUCTION_TYPES = ("sum", "prod", "max", "min", "argmax", "argmin", "any")


@dataclasses.dataclass
class Reduction:
    """``out[x] = reduce_{r in reduction_ranges} expr(x, r)``; expr over x0.. and r0..;
    ``acc_dtype`` is the accumulator's compute dtype."""

    ranges: list
    reduction_ranges: list
    reduction_type: str
    expr: Expr
    acc_dtype: torch.dtype


@dataclasses.dataclass
class Scatter:
    """``out[x] = base(x)`` for x in ``ranges``, then for y in ``src_ranges``:
    ``out[target(y)] += value(y)`` (atomic); ``target`` is a store index over y vars whose
    indirect symbols are bound in ``indirect`` (as in :class:`Load`).  base is over x0..,
    target/value over y0.."""

    ranges: list
    base: Expr
    src_ranges: list
    target: sympy.Expr
    indirect: tuple
    value: Expr


@dataclasses.dataclass
class Extern:
    """``name = op(*args, **kwargs)`` run by the wrapper; buffers in args are ``BufRef``s."""

    op: Any
    args: tuple
    kwargs: dict


@dataclasses.dataclass
class InputBuffer:
    """A tensor that exists before the kernels run (graph input, extern output)."""

    source: str                      # wrapper expression giving the tensor
    producer: Optional[str] = None   # the extern node producing it, if any


@dataclasses.dataclass(frozen=True)
class BufRef:
    """A strided view of a buffer, as an extern argument."""

    buf: str
    sizes: tuple
    strides: tuple
    offset: sympy.Expr


@dataclasses.dataclass
class Buffer:
    name: str
    dtype: torch.dtype
    device: torch.device
    sizes: list
    strides: list
    body: Any
    origins: list = dataclasses.field(default_factory=list)   # fx node names it came from

    def store_index(self, index: Sequence[sympy.Expr]) -> sympy.Expr:
        return strided_index(index, self.strides)

    def is_kernel(self) -> bool:
        return isinstance(self.body, (Pointwise, Reduction, Scatter))


# ----------------------------------------------------------------------------- lazy values

class TensorValue:
    """A lazy tensor (see module docstring)."""

    __slots__ = ("dtype", "device", "sizes", "loader", "strided", "origins")

    def __init__(self, dtype: torch.dtype, device: torch.device, sizes: Sequence[sympy.Expr],
                 loader: Callable[[list], Expr], strided: Optional[BufRef] = None,
                 origins: Optional[list] = None):
        self.dtype = dtype
        self.device = device
        self.sizes = [sympy.sympify(s) for s in sizes]
        self.loader = loader
        self.strided = strided
        self.origins = origins or []

    @property
    def cdtype(self) -> torch.dtype:
        return compute_dtype(self.dtype)

    def load(self, index: Sequence[sympy.Expr]) -> Expr:
        return self.loader(list(index))

    @staticmethod
    def of_buffer(buf: Buffer, sizes=None, strides=None, offset=sympy.Integer(0)) -> "TensorValue":
        sizes = list(buf.sizes if sizes is None else sizes)
        strides = list(buf.strides if strides is None else strides)
        ref = BufRef(buf.name, tuple(sizes), tuple(strides), sympy.sympify(offset))
        cdt = compute_dtype(buf.dtype)
        name = buf.name

        def loader(index):
            return Load(name, strided_index(index, strides, offset), cdt)

        return TensorValue(buf.dtype, buf.device, sizes, loader, ref)

    def __repr__(self):
        return f"TensorValue({self.dtype}, {self.sizes}, strided={self.strided is not None})"
