"""kiln.export's program archive: the file format of save / load, nothing unpickled.

    kiln.export.save(ep, "model.kiln")
    ep2 = kiln.export.load("model.kiln")      # an ExportedProgram; ep2.module()(x)

The file is a zip archive of two members:

* ``program.json``: the format name and schema version, the graph (and the graphs of
  its subgraph attributes, e.g. ``strict_graph_0``), the signature, the symbols and
  range constraints, the in/out specs (``torch.utils._pytree.treespec_dumps``), the
  input meta, the Dim names, a record (dtype, shape, device, Parameter or not) of every
  tensor, and the SHA-256 and size of every other member.
* ``weights.safetensors``: the state_dict, the constants and tensor attributes of the
  graphs, saved contiguous on the CPU (``safetensors``; a dense tensor of another layout,
  a transposed one say, gets its strides back on load).  A tensor that is the same
  tensor as another (same storage, offset, sizes and strides) is saved once and comes
  back as that same tensor; other overlaps (views of one another) are saved as
  separate copies, and their aliasing is lost.

Graph nodes are JSON: op, name, target, args/kwargs as a tagged tree (node references by
name, ints, floats as text, inf and nan included, bools, None, strings, lists, tuples,
dtypes, devices, layouts, memory formats, slices, symbolic sizes as expression text) and
the meta that is needed again (``val``: dtype, shape, stride, device of a tensor; a
number, a symbolic size, or a list of those).  Targets are named: ATen operators by
qualified name (``aten::add.Tensor``), and a fixed table of Python functions
(``operator``/``math``/``torch.sym_*``, used by symbolic sizes) and of kiln's
higher-order operators (``kiln.ops.strict_mode``...).  ``save`` refuses anything else.

``load`` never unpickles, never imports a module named in the file and never evaluates
text from it: operator names are looked up on ``torch.ops`` and must give an
``OpOverload``, other targets come from the tables, symbolic expressions are parsed
with ``ast`` and only arithmetic over the declared symbols is evaluated, and node names
and attribute names must be identifiers (the only code that runs is what ``torch.fx``
generates from the checked graph).  A file that is not a kiln program, is truncated or
damaged, has been edited (a member whose SHA-256 does not match), has another schema
version, names an unknown operator or target, or whose weights do not match the
program is refused with a :class:`kiln.exc.SerializationError` (what, why, hint).

The program comes back with fresh fake tensors as ``meta["val"]`` (symbolic ones, in a
new ShapeEnv with the saved symbols and their ranges, when the program has symbolic
sizes); ``example_inputs`` is None after load.
"""
from __future__ import annotations

import ast
import math
import operator
import re
from typing import Any, Callable, Optional

import torch

from kiln import exc
from kiln.export.program import (ExportedProgram, ExportGraphSignature, InputKind, InputSpec, LeafMeta,
                                 OutputKind, OutputSpec)
from kiln.export.shapes import INT_MAX, Range

FORMAT = "kiln.export.program"
SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = (1,)
PROGRAM = "program.json"
WEIGHTS = "weights.safetensors"
_MAX_PROGRAM_BYTES = 1 << 30
_MAX_EXPR_CHARS = 4096
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


# --------------------------------------------------------------------------- name tables


def _dtype_table() -> dict:
    out = {}
    for name in dir(torch):
        v = getattr(torch, name, None)
        if isinstance(v, torch.dtype):
            out.setdefault(str(v).split(".", 1)[1], v)
    return out


_DTYPES = _dtype_table()
_LAYOUTS = {str(v).split(".", 1)[1]: v for v in
            (getattr(torch, n, None) for n in ("strided", "sparse_coo", "sparse_csr", "sparse_csc",
                                               "sparse_bsr", "sparse_bsc", "_mkldnn", "jagged"))
            if isinstance(v, torch.layout)}
_MEMORY_FORMATS = {str(v).split(".", 1)[1]: v for v in
                   (getattr(torch, n, None) for n in ("contiguous_format", "channels_last",
                                                      "channels_last_3d", "preserve_format"))
                   if isinstance(v, torch.memory_format)}


def _python_targets() -> dict:
    from kiln.tracing import symbolic

    table: dict = {}
    for n in ("getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs",
              "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift",
              "rshift", "is_", "is_not", "contains"):
        table[f"operator.{n}"] = getattr(operator, n)
    for n in ("ceil", "floor", "trunc", "sqrt", "log2", "log", "exp"):
        table[f"math.{n}"] = getattr(math, n)
    for n in ("sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sum", "_sym_sqrt",
              "sym_sqrt", "_assert"):
        if hasattr(torch, n):
            table[f"torch.{n}"] = getattr(torch, n)
    table["kiln.tracing.symbolic._floordiv"] = symbolic._floordiv
    table["kiln.tracing.symbolic._sqrt"] = symbolic._sqrt
    return table


def _hop_targets() -> dict:
    from kiln.ops import cond, map_impl, strict_mode, while_loop, with_effects
    from kiln.ops.trace_wrapped import _trace_wrapped_op

    return {"kiln.ops.strict_mode": strict_mode, "kiln.ops.with_effects": with_effects,
            "kiln.ops.trace_wrapped": _trace_wrapped_op,
            "kiln.ops.while_loop": while_loop, "kiln.ops.map_impl": map_impl, "kiln.ops.cond": cond}


_TABLES: Optional[dict] = None


def _tables() -> dict:
    """{"python": name -> function, "hop": name -> op} and the reverse (id -> (kind, name))."""
    global _TABLES
    if _TABLES is None:
        py, hop = _python_targets(), _hop_targets()
        rev = {id(v): ("python", k) for k, v in py.items()}
        rev.update({id(v): ("hop", k) for k, v in hop.items()})
        _TABLES = {"python": py, "hop": hop, "reverse": rev}
    return _TABLES


def _op_name(op: torch._ops.OpOverload) -> str:
    return f"{op.namespace}::{op._opname}.{op._overloadname}"


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_OP_NAME = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)::([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)$")
_SYMBOL = re.compile(r"^([su])([0-9]{1,9})$")


def _resolve_op(name: Any) -> Optional[torch._ops.OpOverload]:
    """``aten::add.Tensor`` -> ``torch.ops.aten.add.Tensor``, or None (nothing is imported)."""
    m = _OP_NAME.match(name) if isinstance(name, str) else None
    if m is None:
        return None
    ns, op, overload = m.groups()
    if any(p.startswith("__") for p in (ns, op, overload)) or hasattr(type(torch.ops), ns):
        return None
    try:
        space = getattr(torch.ops, ns)
        if not isinstance(space, torch._ops._OpNamespace):
            return None
        packet = getattr(space, op)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            return None
        out = getattr(packet, overload)
    except Exception:   # NOTE: AttributeError / RuntimeError from the dispatcher's lookup
        return None
    return out if isinstance(out, torch._ops.OpOverload) else None


# --------------------------------------------------------------------------- symbolic expressions

def _floordiv(a: Any, b: Any) -> Any:
    return a // b


def _fold(fn: Callable) -> Callable:
    def f(*xs: Any) -> Any:
        acc = xs[0]
        for x in xs[1:]:
            acc = fn(acc, x)
        return acc
    return f


def _sqrt(a: Any) -> Any:
    from kiln.tracing import symbolic

    return symbolic._sqrt(a)


# sympy's printed heads (torch.utils._sympy.functions) -> a function of SymInt/SymFloat values
_EXPR_FUNCS: dict = {
    "Max": _fold(torch.sym_max), "Min": _fold(torch.sym_min), "Mod": operator.mod,
    "PythonMod": operator.mod, "FloorDiv": _floordiv, "CleanDiv": _floordiv, "ToFloat": torch.sym_float,
    "TruncToInt": torch.sym_int, "IntTrueDiv": operator.truediv, "FloatTrueDiv": operator.truediv,
    "OpaqueUnaryFn_sqrt": _sqrt, "FloatPow": operator.pow, "PowByNatural": operator.pow,
    "CeilToInt": math.ceil, "FloorToInt": math.floor, "Eq": operator.eq, "Ne": operator.ne,
}
_EXPR_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                ast.Div: operator.truediv, ast.FloorDiv: _floordiv, ast.Mod: operator.mod,
                ast.Pow: operator.pow, ast.BitAnd: operator.and_, ast.BitOr: operator.or_}
_EXPR_CMPOPS = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
                ast.Eq: operator.eq, ast.NotEq: operator.ne}


class _BadExpr(ValueError):
    pass


def _parse_expr(text: Any, names: Any) -> ast.AST:
    """The checked syntax tree of a symbolic expression: integers, floats, the symbols in
    ``names``, arithmetic, comparisons and the heads of ``_EXPR_FUNCS`` only."""
    if not isinstance(text, str) or not text or len(text) > _MAX_EXPR_CHARS:
        raise _BadExpr(f"{text!r} is not an expression")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise _BadExpr(f"{text!r} does not parse: {e}") from None

    def check(n: ast.AST, depth: int) -> None:
        if depth > 200:
            raise _BadExpr(f"{text!r} is nested too deeply")
        if isinstance(n, ast.Constant):
            v = n.value
            if isinstance(v, bool) or (isinstance(v, int) and abs(v) <= 1 << 64) or isinstance(v, float):
                return
            raise _BadExpr(f"{text!r} holds the constant {v!r}")
        if isinstance(n, ast.Name):
            if n.id not in names:
                raise _BadExpr(f"{text!r} names {n.id!r}, which is not a symbol of the program")
            return
        if isinstance(n, ast.BinOp) and type(n.op) in _EXPR_BINOPS:
            if isinstance(n.op, ast.Pow) and not (isinstance(n.right, ast.Constant)
                                                  and isinstance(n.right.value, (int, float))
                                                  and not isinstance(n.right.value, bool)
                                                  and abs(n.right.value) <= 64):
                raise _BadExpr(f"{text!r} raises to a power that is not a small constant")
            check(n.left, depth + 1)
            check(n.right, depth + 1)
            return
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd, ast.Invert)):
            check(n.operand, depth + 1)
            return
        if isinstance(n, ast.Compare) and all(type(o) in _EXPR_CMPOPS for o in n.ops):
            for c in [n.left, *n.comparators]:
                check(c, depth + 1)
            return
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in _EXPR_FUNCS
                and not n.keywords and n.args and not any(isinstance(a, ast.Starred) for a in n.args)):
            for a in n.args:
                check(a, depth + 1)
            return
        raise _BadExpr(f"{text!r} holds {type(n).__name__}, which a symbolic size cannot")

    check(tree.body, 0)
    return tree.body


def _eval_expr(text: str, env: dict) -> Any:
    """``text`` over ``env`` (symbol name -> SymInt), after :func:`_parse_expr`'s check."""
    return _eval_tree(_parse_expr(text, env), env)


def _eval_tree(tree: ast.AST, env: dict) -> Any:
    """A tree :func:`_parse_expr` checked, over ``env`` (symbol name -> int or SymInt)."""
    def ev(n: ast.AST) -> Any:
        if isinstance(n, ast.Constant):
            return n.value
        if isinstance(n, ast.Name):
            return env[n.id]
        if isinstance(n, ast.BinOp):
            return _EXPR_BINOPS[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.UnaryOp):
            v = ev(n.operand)
            if isinstance(n.op, ast.Invert):
                return torch.sym_not(v)
            return -v if isinstance(n.op, ast.USub) else +v
        if isinstance(n, ast.Compare):
            out, left = None, ev(n.left)
            for o, c in zip(n.ops, n.comparators):
                right = ev(c)
                r = _EXPR_CMPOPS[type(o)](left, right)
                out = r if out is None else (out & r)
                left = right
            return out
        assert isinstance(n, ast.Call)
        return _EXPR_FUNCS[n.func.id](*(ev(a) for a in n.args))

    return ev(tree)


# --------------------------------------------------------------------------- errors


def _refuse(what: str, why: str = "", hint: str = "") -> exc.SerializationError:
    return exc.SerializationError(what, why=why, where=exc.user_location(), hint=hint)


class _LoadError(Exception):
    """Raised inside load; becomes a SerializationError naming the file."""

    def __init__(self, what: str, why: str = "", hint: str = "") -> None:
        super().__init__(what)
        self.what, self.why, self.hint = what, why, hint or _DEFAULT_HINT


_MALFORMED_HINT = "the file was edited or written by something else; save the program again"
_DEFAULT_HINT = "load a file written by kiln.export.save, or export and save the model again"


def _malformed(what: str, why: str = "") -> _LoadError:
    return _LoadError(f"kiln.export.load: {PROGRAM} is malformed: {what}", why=why, hint=_MALFORMED_HINT)


def _dense(shape: list, stride: list) -> bool:
    """Whether ``stride`` lays ``shape`` out densely (a permutation of the contiguous layout)."""
    expected = 1
    for st, n in sorted((st, n) for n, st in zip(shape, stride) if n != 1):
        if st != expected:
            return False
        expected *= n
    return True
