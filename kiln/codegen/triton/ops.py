"""kiln.codegen.triton.ops: the Triton template of each loop-IR op, in one table.

In:  an op name (the loop IR's, as in the C++ printer's ``CPP_OPS``), its printed
     operands, the dtypes, and whether the kernel runs under the interpreter.
Out: :func:`op_str` -> the Triton expression.  Math functions go through
     :func:`kiln.codegen.triton.compat.math_call` (libdevice on GPUs, what the interpreter
     has on CPUs); an op with no template raises :class:`kiln.exc.CodegenError`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from kiln import exc
from kiln.codegen.triton import compat

TL_TYPES = {
    torch.float32: "tl.float32", torch.float64: "tl.float64", torch.float16: "tl.float16",
    torch.bfloat16: "tl.bfloat16", torch.int64: "tl.int64", torch.int32: "tl.int32",
    torch.int16: "tl.int16", torch.int8: "tl.int8", torch.uint8: "tl.uint8", torch.bool: "tl.int1",
}

_BINARY = {"add": "+", "sub": "-", "mul": "*", "eq": "==", "ne": "!=", "lt": "<", "le": "<=",
           "gt": ">", "ge": ">=", "bitwise_and": "&", "bitwise_or": "|", "bitwise_xor": "^",
           "lshift": "<<", "rshift": ">>", "logical_and": "&", "logical_or": "|",
           "logical_xor": "^"}


def tl_type(dt: torch.dtype) -> str:
    try:
        return TL_TYPES[dt]
    except KeyError:
        raise exc.CodegenError(f"no Triton type for {dt}") from None


@dataclasses.dataclass(frozen=True)
class _Operands:
    """What an op's template sees: printed operands ``a``, the result's Triton type ``t`` and
    dtype ``dt``, the first operand's dtype ``ad``, whether it is floating (``f``), and
    whether the kernel runs under the interpreter."""

    a: list
    t: str
    dt: torch.dtype
    ad: torch.dtype
    f: bool
    interpret: bool

    def math(self, name: str, a: list | None = None) -> str:
        s = compat.math_call(name, self.a if a is None else a, self.interpret)
        if s is None:
            raise exc.CodegenError(f"no Triton math for {name}"
                                   + (" under the interpreter" if self.interpret else ""))
        return s


def _binary(o: _Operands, name: str) -> str:
    a = o.a
    if o.dt == torch.bool and name in ("add", "mul"):
        return f"({a[0]} {'|' if name == 'add' else '&'} {a[1]})"
    return f"({a[0]} {_BINARY[name]} {a[1]})"


def _extremum(name: str) -> Callable[[_Operands], str]:
    short = "max" if name == "maximum" else "min"
    return lambda o: f"kiln_{short}({o.a[0]}, {o.a[1]})" if o.f else f"tl.{name}({o.a[0]}, {o.a[1]})"


def _nan_ignoring(name: str) -> Callable[[_Operands], str]:
    m = "tl.maximum" if name == "fmax" else "tl.minimum"
    return lambda o: (f"tl.where({o.a[0]} != {o.a[0]}, {o.a[1]}, tl.where({o.a[1]} != {o.a[1]}, {o.a[0]}, "
                      f"{m}({o.a[0]}, {o.a[1]})))")


def _abs(o: _Operands) -> str:
    return o.a[0] if o.dt in (torch.bool, torch.uint8) else f"tl.abs({o.a[0]})"


def _sign(o: _Operands) -> str:
    x = o.a[0]
    if o.dt == torch.bool:
        return x
    s = f"(({x} > 0).to({o.t}) - ({x} < 0).to({o.t}))"
    return f"tl.where({x} != {x}, {x}, {s})" if o.f else s


def _rounding(name: str) -> Callable[[_Operands], str]:
    def f(o: _Operands) -> str:
        x = o.a[0]
        if not o.f:   # NOTE: integers are already whole
            return x if name != "frac" else f"({x} * 0)"
        if name == "frac":
            return f"({x} - {o.math('trunc')})"
        return o.math(name)
    return f


def _float_or_int(float_fn: Callable[[_Operands], str], int_tpl: str) -> Callable[[_Operands], str]:
    return lambda o: float_fn(o) if o.f else int_tpl.format(*o.a)


def _tpl(tpl: str) -> Callable[[_Operands], str]:
    return lambda o: tpl.format(*o.a)


def _signbit(o: _Operands) -> str:
    if not o.f:
        return f"({o.a[0]} < 0)"
    bits = {torch.float32: "tl.int32", torch.float64: "tl.int64"}[o.ad]
    return f"({o.a[0]}.to({bits}, bitcast=True) < 0)"


def _copysign(o: _Operands) -> str:
    bits = "tl.int64" if o.ad == torch.float64 else "tl.int32"
    return f"tl.where({o.a[1]}.to({bits}, bitcast=True) < 0, -tl.abs({o.a[0]}), tl.abs({o.a[0]}))"


# NOTE: one template per op name (the C++ printer's CPP_OPS covers the same names).
TRITON_OPS: dict[str, Callable[[_Operands], str]] = {
    **{name: (lambda o, name=name: _binary(o, name)) for name in _BINARY},
    "neg": lambda o: f"(-{o.a[0]})",
    "truediv": lambda o: f"({o.a[0]} / {o.a[1]})",
    "cast": lambda o: f"({o.a[0]} != 0)" if o.dt == torch.bool else f"{o.a[0]}.to({o.t})",
    "where": _tpl("tl.where({0}, {1}, {2})"),
    "maximum": _extremum("maximum"),
    "minimum": _extremum("minimum"),
    "fmax": _nan_ignoring("fmax"),
    "fmin": _nan_ignoring("fmin"),
    "relu": lambda o: f"tl.where({o.a[0]} < 0, 0, {o.a[0]}).to({o.t})",
    "sigmoid": lambda o: f"(1.0 / (1.0 + {o.math('exp', [f'(-{o.a[0]})'])}))",
    "reciprocal": _tpl("(1.0 / {0})"),
    "rsqrt": lambda o: o.math("rsqrt"),
    "abs": _abs,
    "sign": _sign,
    **{name: _rounding(name) for name in ("floor", "ceil", "trunc", "round", "frac")},
    "bitwise_not": _tpl("(~{0})"),
    "logical_not": _tpl("({0} == 0)"),
    "floordiv": _float_or_int(_tpl("kiln_floordiv_float({0}, {1})"), "kiln_floordiv_int({0}, {1})"),
    "truncdiv": _float_or_int(lambda o: o.math("trunc", [f"({o.a[0]} / {o.a[1]})"]), "kiln_truncdiv_int({0}, {1})"),
    "mod": _float_or_int(_tpl("kiln_mod_float({0}, {1})"), "kiln_mod_int({0}, {1})"),
    "fmod": _float_or_int(_tpl("kiln_fmod({0}, {1})"), "({0} % tl.where({1} == 0, 1, {1}))"),
    "pow": _float_or_int(lambda o: o.math("pow"), "kiln_pow_int({0}, {1})"),
    "isnan": _tpl("({0} != {0})"),
    "isinf": _float_or_int(_tpl("(tl.abs({0}) == float('inf'))"), "({0} != {0})"),
    "isfinite": _float_or_int(_tpl("(({0} == {0}) & (tl.abs({0}) != float('inf')))"), "({0} == {0})"),
    "signbit": _signbit,
    "copysign": _copysign,
}


def op_str(name: str, a: list, args: tuple, dt: torch.dtype, interpret: bool) -> str:
    """Triton for Op ``name`` with printed operands ``a`` (exprs ``args``), result dtype ``dt``;
    names without a template are math functions (``compat.math_call``)."""
    ad = args[0].dtype if args else dt
    o = _Operands(a, tl_type(dt), dt, ad, ad.is_floating_point, interpret)
    rule = TRITON_OPS.get(name)
    return rule(o) if rule is not None else o.math(name)


__all__ = ["op_str", "tl_type", "TL_TYPES", "TRITON_OPS"]
