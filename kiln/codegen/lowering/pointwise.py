"""Pointwise lowerings: elementwise math, comparisons, casts, where, clamp.

Each composes the inputs' loaders (so chains fuse without a buffer).  Type promotion
follows eager (``torch._prims_common.elementwise_dtypes`` with the op's promotion kind,
computed on the fx node's fake arguments); float16/bfloat16 compute in float32.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import sympy
import torch
from torch._prims_common import ELEMENTWISE_TYPE_PROMOTION_KIND as K, elementwise_dtypes

from kiln.codegen.ir import Const, Expr, IndexValue, Op, TensorValue, compute_dtype, sympify_size
from kiln.codegen.lowering import NotLowered, register

aten = torch.ops.aten
prims = torch.ops.prims


def cast(e: Expr, dtype: torch.dtype) -> Expr:
    dtype = compute_dtype(dtype)
    if e.dtype == dtype:
        return e
    if isinstance(e, Const):
        v = e.value
        if dtype == torch.bool:
            return Const(bool(v), dtype)
        if dtype.is_floating_point:
            return Const(float(v), dtype)
        if not isinstance(v, float) or math.isfinite(v):
            return Const(int(v), dtype)
    return Op("cast", (e,), dtype)


def broadcast_loader(tv: TensorValue, out_sizes: Sequence[sympy.Expr]) -> Callable[[list], Expr]:
    """Loader of ``tv`` broadcast (right-aligned) to ``out_sizes``."""
    lead = len(out_sizes) - len(tv.sizes)
    ones = [s == 1 for s in tv.sizes]

    def loader(index):
        idx = [sympy.Integer(0) if one else index[lead + j] for j, one in enumerate(ones)]
        return tv.loader(idx)

    return loader


def _fake(ctx, a):
    return ctx.fake(a)


def out_sizes(ctx) -> list:
    return [sympify_size(s) for s in ctx.node.meta["val"].shape]


def to_expr(a: Any, dtype: torch.dtype, sizes, index) -> Expr:
    """One operand at ``index`` as an expression of compute dtype ``dtype``."""
    if isinstance(a, TensorValue):
        return cast(broadcast_loader(a, sizes)(index), dtype)
    if isinstance(a, sympy.Basic):
        return cast(IndexValue(a, torch.int64), dtype)
    if isinstance(a, (bool, int, float)):
        if isinstance(a, float) and not dtype.is_floating_point and dtype != torch.bool:
            return cast(Const(a, torch.float64), dtype)
        return cast(Const(a, torch.float64 if isinstance(a, float) else
                          torch.bool if isinstance(a, bool) else torch.int64), dtype)
    raise NotLowered(f"operand {type(a).__name__}")


def make_pointwise(ctx, fn: Callable[..., Expr], args: Sequence[Any], kind=K.DEFAULT,
                   compute: torch.dtype | None = None) -> TensorValue:
    """A lazy value ``fn(*operands)`` over the node's output shape."""
    val = ctx.node.meta["val"]
    sizes = out_sizes(ctx)
    if compute is None:
        fakes = [ctx.fake(a) for a in args if not isinstance(a, sympy.Basic)]
        fakes = [f for f in fakes if isinstance(f, (torch.Tensor, bool, int, float))]
        compute = elementwise_dtypes(*fakes, type_promotion_kind=kind)[0] if fakes else val.dtype
    cdt = compute_dtype(compute)
    out_dtype = val.dtype

    def loader(index):
        ops = [to_expr(a, cdt, sizes, index) for a in args]
        return cast(fn(*ops, dtype=cdt), out_dtype)

    return TensorValue(out_dtype, val.device, sizes, loader)


def op(name: str) -> Callable[..., Expr]:
    def f(*xs, dtype):
        return Op(name, tuple(xs), dtype)

    return f


def op_bool(name: str) -> Callable[..., Expr]:
    def f(*xs, dtype):
        return Op(name, tuple(xs), torch.bool)

    return f


# ----------------------------------------------------------------------------- unary

_UNARY_FLOAT = {  # INT_TO_FLOAT ops
    aten.exp: "exp", aten.exp2: "exp2", aten.expm1: "expm1", aten.log: "log", aten.log2: "log2",
    aten.log10: "log10", aten.log1p: "log1p", aten.sin: "sin", aten.cos: "cos", aten.tan: "tan",
    aten.tanh: "tanh", aten.asin: "asin", aten.acos: "acos", aten.atan: "atan", aten.sinh: "sinh",
    aten.cosh: "cosh", aten.asinh: "asinh", aten.acosh: "acosh", aten.atanh: "atanh",
    aten.sqrt: "sqrt", aten.rsqrt: "rsqrt", aten.erf: "erf", aten.erfc: "erfc",
    aten.sigmoid: "sigmoid", aten.reciprocal: "reciprocal", aten.lgamma: "lgamma",
}
_UNARY_SAME = {
    aten.neg: "neg", aten.abs: "abs", aten.floor: "floor", aten.ceil: "ceil", aten.trunc: "trunc",
    aten.round: "round", aten.sign: "sign", aten.relu: "relu", aten.bitwise_not: "bitwise_not",
    aten.frac: "frac",
}
_UNARY_BOOL = {aten.isnan: "isnan", aten.isinf: "isinf", aten.logical_not: "logical_not",
               aten.signbit: "signbit", aten.isfinite: "isfinite"}


def _reg_unary(table, kind, fnmaker):
    for packet, name in table.items():
        f = fnmaker(name)

        def lower(ctx, x, *rest, _f=f, **kw):
            if rest or kw:
                raise NotLowered("extra arguments")
            return make_pointwise(ctx, _f, [x], kind)

        register(packet.default)(lower)


_reg_unary(_UNARY_FLOAT, K.INT_TO_FLOAT, op)
_reg_unary(_UNARY_SAME, K.DEFAULT, op)
_reg_unary(_UNARY_BOOL, K.ALWAYS_BOOL, op_bool)


def _bool_of(x: Expr) -> Expr:
    return x if x.dtype == torch.bool else Op("ne", (x, cast(Const(0, torch.int64), x.dtype)), torch.bool)


@register(aten.logical_not.default)
def _logical_not(ctx, x):
    return make_pointwise(ctx, lambda a, dtype: Op("logical_not", (_bool_of(a),), torch.bool),
                          [x], K.DEFAULT)


@register(aten.bitwise_not.default)
def _bitwise_not(ctx, x):
    if ctx.fake(x).dtype == torch.bool:
        return make_pointwise(ctx, lambda a, dtype: Op("logical_not", (a,), torch.bool), [x])
    return make_pointwise(ctx, op("bitwise_not"), [x])


# ----------------------------------------------------------------------------- binary

def _with_alpha(name):
    def lower(ctx, a, b, alpha=1):
        def f(x, y, dtype):
            if alpha != 1:
                y = Op("mul", (y, cast(Const(alpha, torch.float64 if isinstance(alpha, float)
                                             else torch.int64), dtype)), dtype)
            return Op(name, (x, y), dtype)

        return make_pointwise(ctx, f, [a, b])

    return lower


register(aten.add.Tensor, aten.add.Scalar)(_with_alpha("add"))
register(aten.sub.Tensor, aten.sub.Scalar)(_with_alpha("sub"))
register(aten.rsub.Tensor, aten.rsub.Scalar)(
    lambda ctx, a, b, alpha=1: _with_alpha("sub")(ctx, b, a, alpha))

_BINARY = {
    (aten.mul.Tensor, aten.mul.Scalar): ("mul", K.DEFAULT),
    (aten.maximum.default,): ("maximum", K.DEFAULT),
    (aten.minimum.default,): ("minimum", K.DEFAULT),
    (aten.fmod.Tensor, aten.fmod.Scalar): ("fmod", K.DEFAULT),
    (aten.remainder.Tensor, aten.remainder.Scalar): ("mod", K.DEFAULT),
    (aten.atan2.default,): ("atan2", K.INT_TO_FLOAT),
    (aten.bitwise_and.Tensor, aten.bitwise_and.Scalar): ("bitwise_and", K.DEFAULT),
    (aten.bitwise_or.Tensor, aten.bitwise_or.Scalar): ("bitwise_or", K.DEFAULT),
    (aten.bitwise_xor.Tensor, aten.bitwise_xor.Scalar): ("bitwise_xor", K.DEFAULT),
    (aten.bitwise_left_shift.Tensor,): ("lshift", K.DEFAULT),
    (aten.bitwise_right_shift.Tensor,): ("rshift", K.DEFAULT),
    (aten.copysign.Tensor,): ("copysign", K.INT_TO_FLOAT),
    (aten.hypot.default,): ("hypot", K.DEFAULT),
    (aten.fmax.default,): ("fmax", K.DEFAULT),
    (aten.fmin.default,): ("fmin", K.DEFAULT),
}
for _ops, (_name, _kind) in _BINARY.items():
    def _lower(ctx, a, b, _n=_name, _k=_kind):
        return make_pointwise(ctx, op(_n), [a, b], _k)

    register(*_ops)(_lower)

_COMPARE = {
    (aten.eq.Tensor, aten.eq.Scalar): "eq", (aten.ne.Tensor, aten.ne.Scalar): "ne",
    (aten.lt.Tensor, aten.lt.Scalar): "lt", (aten.le.Tensor, aten.le.Scalar): "le",
    (aten.gt.Tensor, aten.gt.Scalar): "gt", (aten.ge.Tensor, aten.ge.Scalar): "ge",
}
for _ops, _name in _COMPARE.items():
    def _lower(ctx, a, b, _n=_name):
        # NOTE: operands compare in their promoted dtype (DEFAULT), the result is bool.
        return make_pointwise(ctx, op_bool(_n), [a, b], K.DEFAULT)

    register(*_ops)(_lower)

for _packet, _name in ((aten.logical_and, "logical_and"), (aten.logical_or, "logical_or"),
                       (aten.logical_xor, "logical_xor")):
    def _lower(ctx, a, b, _n=_name):
        return make_pointwise(ctx, lambda x, y, dtype: Op(_n, (_bool_of(x), _bool_of(y)), torch.bool),
                              [a, b], K.DEFAULT)

    register(_packet.default)(_lower)


@register(aten.div.Tensor, aten.div.Scalar)
def _div(ctx, a, b):
    return make_pointwise(ctx, op("truediv"), [a, b], K.INT_TO_FLOAT)


@register(aten.div.Tensor_mode, aten.div.Scalar_mode)
def _div_mode(ctx, a, b, rounding_mode=None):
    if rounding_mode is None:
        return _div(ctx, a, b)
    name = {"trunc": "truncdiv", "floor": "floordiv"}[rounding_mode]
    return make_pointwise(ctx, op(name), [a, b], K.DEFAULT)


@register(aten.floor_divide.default, aten.floor_divide.Scalar)
def _floor_divide(ctx, a, b):
    return make_pointwise(ctx, op("floordiv"), [a, b], K.DEFAULT)


def _int_power(x: Expr, n: int, dtype: torch.dtype) -> Expr:
    """``x ** n`` for an integer ``n >= 1`` as multiplications (binary exponentiation)."""
    result, base = None, x
    while n:
        if n & 1:
            result = base if result is None else Op("mul", (result, base), dtype)
        n >>= 1
        if n:
            base = Op("mul", (base, base), dtype)
    return result


# NOTE: a libm pow per element costs ~20 ns and stops vectorization (GELU's x ** 3 was
# most of GPT-2's MLP time); small integral exponents become multiplications, as
# eager's pow kernel does for 2 and 3.
_MAX_UNROLLED_POWER = 8


def _pow_scalar_rule(e: float, floating: bool) -> Callable[..., Expr] | None:
    """A cheaper expression for ``x ** e`` with a constant ``e``, or None."""
    if e == 0.5 and floating:
        return op("sqrt")
    if e == -0.5 and floating:
        return op("rsqrt")
    if float(e).is_integer() and 1 <= abs(e) <= _MAX_UNROLLED_POWER and (e > 0 or floating):
        n = int(abs(e))
        if e > 0:
            return lambda x, dtype: _int_power(x, n, dtype)
        return lambda x, dtype: Op("truediv", (Const(1.0, dtype), _int_power(x, n, dtype)), dtype)
    return None


@register(aten.pow.Tensor_Scalar)
def _pow_ts(ctx, a, e):
    if isinstance(e, (int, float)) and not isinstance(e, bool):
        floating = ctx.fake(a).dtype.is_floating_point or isinstance(e, float)
        rule = _pow_scalar_rule(e, floating)
        if rule is not None:
            # NOTE: the exponent takes part in type promotion (int tensor ** 0.5 is float).
            compute = elementwise_dtypes(ctx.fake(a), e, type_promotion_kind=K.BOOL_TO_LONG)[0]
            return make_pointwise(ctx, rule, [a], compute=compute)
    if isinstance(e, int) and e < 0 and not ctx.fake(a).dtype.is_floating_point:
        raise NotLowered("integer to a negative power")
    return make_pointwise(ctx, op("pow"), [a, e], K.BOOL_TO_LONG)


@register(aten.pow.Tensor_Tensor, aten.pow.Scalar)
def _pow(ctx, a, e):
    return make_pointwise(ctx, op("pow"), [a, e], K.BOOL_TO_LONG)


@register(aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar)
def _where(ctx, c, a, b):
    def f(cc, x, y, dtype):
        return Op("where", (cc, x, y), dtype)

    val = ctx.node.meta["val"]
    sizes = out_sizes(ctx)

    def loader(index):
        cc = to_expr(c, torch.bool, sizes, index)
        return f(cc, to_expr(a, compute_dtype(val.dtype), sizes, index),
                 to_expr(b, compute_dtype(val.dtype), sizes, index), dtype=compute_dtype(val.dtype))

    return TensorValue(val.dtype, val.device, sizes, lambda i: cast(loader(i), val.dtype))


def _clamp_fn(lo, hi):
    def f(x, *bounds, dtype):
        it = iter(bounds)
        if lo is not None:
            x = Op("maximum", (x, next(it)), dtype)
        if hi is not None:
            x = Op("minimum", (x, next(it)), dtype)
        return x

    return f


@register(aten.clamp.default, aten.clamp.Tensor)
def _clamp(ctx, x, min=None, max=None):
    args = [x] + [b for b in (min, max) if b is not None]
    return make_pointwise(ctx, _clamp_fn(min, max), args, K.DEFAULT)


@register(aten.clamp_min.default, aten.clamp_min.Tensor)
def _clamp_min(ctx, x, lo):
    return make_pointwise(ctx, _clamp_fn(lo, None), [x, lo], K.DEFAULT)


@register(aten.clamp_max.default, aten.clamp_max.Tensor)
def _clamp_max(ctx, x, hi):
    return make_pointwise(ctx, _clamp_fn(None, hi), [x, hi], K.DEFAULT)


@register(aten.threshold_backward.default)
def _threshold_backward(ctx, g, x, threshold):
    def f(gg, xx, t, dtype):
        return Op("where", (Op("le", (xx, t), torch.bool), Const(0, dtype) if not dtype.is_floating_point
                            else Const(0.0, dtype), gg), dtype)

    return make_pointwise(ctx, f, [g, x, threshold], K.DEFAULT)


# ----------------------------------------------------------------------------- casts / copies

@register(prims.convert_element_type.default)
def _convert_element_type(ctx, x, dtype):
    return _identity_to(ctx, x)


def _identity_to(ctx, x):
    val = ctx.node.meta["val"]
    if not isinstance(x, TensorValue):
        raise NotLowered("not a tensor")
    sizes = out_sizes(ctx)
    ld = broadcast_loader(x, sizes)
    return TensorValue(val.dtype, val.device, sizes, lambda i: cast(ld(i), val.dtype))


@register(aten._to_copy.default)
def _to_copy(ctx, x, *, dtype=None, layout=None, device=None, pin_memory=None,
             non_blocking=False, memory_format=None):
    val = ctx.node.meta["val"]
    if val.device != ctx.fake(x).device or (layout not in (None, torch.strided)):
        raise NotLowered("device or layout change")
    return _identity_to(ctx, x)


@register(aten.clone.default)
def _clone(ctx, x, *, memory_format=None):
    return _identity_to(ctx, x)


@register(aten.copy.default)
def _copy(ctx, dst, src, non_blocking=False):
    return _identity_to(ctx, src)


@register(aten.lift_fresh_copy.default)
def _lift_fresh_copy(ctx, x):
    return _identity_to(ctx, x)


@register(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _masked_fill(ctx, x, mask, value):
    val = ctx.node.meta["val"]
    cdt = compute_dtype(val.dtype)
    sizes = out_sizes(ctx)

    def loader(index):
        return Op("where", (to_expr(mask, torch.bool, sizes, index), to_expr(value, cdt, sizes, index),
                            to_expr(x, cdt, sizes, index)), cdt)

    return TensorValue(val.dtype, val.device, sizes, lambda i: cast(loader(i), val.dtype))


@register(aten.lerp.Scalar, aten.lerp.Tensor)
def _lerp(ctx, a, b, w):
    def f(x, y, ww, dtype):
        return Op("add", (x, Op("mul", (ww, Op("sub", (y, x), dtype)), dtype)), dtype)

    return make_pointwise(ctx, f, [a, b, w], K.DEFAULT)


@register(aten.addcmul.default)
def _addcmul(ctx, a, b, c, *, value=1):
    def f(x, y, z, v, dtype):
        return Op("add", (x, Op("mul", (v, Op("mul", (y, z), dtype)), dtype)), dtype)

    return make_pointwise(ctx, f, [a, b, c, value], K.DEFAULT)


@register(aten.addcdiv.default)
def _addcdiv(ctx, a, b, c, *, value=1):
    def f(x, y, z, v, dtype):
        return Op("add", (x, Op("mul", (v, Op("truediv", (y, z), dtype)), dtype)), dtype)

    return make_pointwise(ctx, f, [a, b, c, value], K.INT_TO_FLOAT)
