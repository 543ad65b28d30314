"""Reduction lowerings: sum, prod, mean, amax/amin, argmax/argmin, any/all, var, var_mean,
max/min over a dim.

Each makes a Reduction buffer over the kept dims (inputs are inlined into its body);
keepdim is a size-1 view of it.  mean/var divide in a lazy pointwise after the sum.
var uses two passes (mean, then the sum of squared differences): the scheduler puts
both loops into one kernel per row.
"""
from __future__ import annotations

from typing import Optional, Sequence

import sympy
import torch

from kiln.codegen.ir import (Const, Op, Reduction, TensorValue, compute_dtype, contiguous_strides,
                             make_vars, product, sympify_size)
from kiln.codegen.lowering import NotLowered, register
from kiln.codegen.lowering.pointwise import cast
from kiln.codegen.lowering.views import _strided

aten = torch.ops.aten


def _norm_dims(dims, n: int) -> list[int]:
    if n == 0:   # a 0-d tensor: dim 0 / -1 name the tensor itself, nothing to reduce over
        return []
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(n))
    if isinstance(dims, int):
        dims = [dims]
    return sorted({d + n if d < 0 else d for d in dims})


def _keepdim_view(tv: TensorValue, n: int, dims: list[int]) -> TensorValue:
    sizes, strides, it = [], [], iter(zip(tv.sizes, tv.strided.strides))
    for d in range(n):
        if d in dims:
            sizes.append(sympy.Integer(1)); strides.append(sympy.Integer(1))
        else:
            s, st = next(it)
            sizes.append(s); strides.append(st)
    return _strided(tv, sizes, strides, tv.strided.offset)


def make_reduction(ctx, x: TensorValue, dims, keepdim: bool, rtype: str, out_dtype: torch.dtype,
                   acc_dtype: Optional[torch.dtype] = None, pre=None) -> TensorValue:
    """A Reduction buffer of ``x`` over ``dims`` (a lazy keepdim view when asked)."""
    n = len(x.sizes)
    dims = _norm_dims(dims, n)
    kept = [d for d in range(n) if d not in dims]
    xv = make_vars("x", len(kept))
    rv = make_vars("r", len(dims))
    idx: list = [None] * n
    for v, d in zip(xv, kept):
        idx[d] = v
    for v, d in zip(rv, dims):
        idx[d] = v
    acc = compute_dtype(acc_dtype or out_dtype)
    e = x.load(idx)
    if pre is not None:
        e = pre(e, idx)
    if rtype not in ("argmax", "argmin"):
        e = cast(e, acc)
    sizes = [x.sizes[d] for d in kept]
    buf = ctx.new_buffer(out_dtype, x.device, sizes, contiguous_strides(sizes),
                         Reduction(sizes, [x.sizes[d] for d in dims], rtype, e, acc))
    tv = TensorValue.of_buffer(buf)
    return _keepdim_view(tv, n, dims) if keepdim else tv


def _sum_dtype(in_dtype: torch.dtype, dtype) -> torch.dtype:
    if dtype is not None:
        return dtype
    if in_dtype == torch.bool or not (in_dtype.is_floating_point or in_dtype.is_complex):
        return torch.int64
    return in_dtype


def _need_tensor(x):
    if not isinstance(x, TensorValue):
        raise NotLowered("not a tensor")


@register(aten.sum.dim_IntList, aten.sum.default)
def _sum(ctx, x, dims=None, keepdim=False, *, dtype=None):
    _need_tensor(x)
    out = _sum_dtype(x.dtype, dtype)
    return make_reduction(ctx, x, dims, keepdim, "sum", out)


@register(aten.prod.dim_int, aten.prod.default)
def _prod(ctx, x, dim=None, keepdim=False, *, dtype=None):
    _need_tensor(x)
    return make_reduction(ctx, x, dim, keepdim, "prod", _sum_dtype(x.dtype, dtype))


def _mean_value(ctx, x, dims, keepdim, out_dtype) -> TensorValue:
    n = len(x.sizes)
    nd = _norm_dims(dims, n)
    count = product([x.sizes[d] for d in nd])
    acc = compute_dtype(out_dtype)
    s = make_reduction(ctx, x, dims, keepdim, "sum", acc)
    return _scale(s, count, out_dtype, acc)


def _scale(s: TensorValue, count, out_dtype, acc, offset=0) -> TensorValue:
    ld = s.loader

    def loader(index):
        # NOTE: eager divides by max(0, count - correction): var over an empty (or too
        # short) range is 0/0 = NaN, not 0/-1 = -0.
        denom = count - offset
        dd = sympy.sympify(denom)
        if dd.is_number:
            d = Const(max(float(dd), 0.0) if offset else float(dd), acc)
        else:
            d = cast(_index_value(dd), acc)
            if offset:
                d = Op("sub", (cast(_index_value(count), acc), Const(float(offset), acc)), acc)
                d = Op("maximum", (d, Const(0.0, acc)), acc)
        return cast(Op("truediv", (ld(index), d), acc), out_dtype)

    return TensorValue(out_dtype, s.device, s.sizes, loader)


def _index_value(e):
    from kiln.codegen.ir import IndexValue

    return IndexValue(sympy.sympify(e), torch.int64)


@register(aten.mean.dim, aten.mean.default)
def _mean(ctx, x, dims=None, keepdim=False, *, dtype=None):
    _need_tensor(x)
    out = dtype or ctx.node.meta["val"].dtype
    return _mean_value(ctx, x, dims, keepdim, out)


def _minmax(rtype):
    def lower(ctx, x, dims=(), keepdim=False):
        _need_tensor(x)
        return make_reduction(ctx, x, dims, keepdim, rtype, x.dtype)

    return lower


register(aten.amax.default)(_minmax("max"))
register(aten.amin.default)(_minmax("min"))


def _arg(rtype):
    def lower(ctx, x, dim=None, keepdim=False):
        _need_tensor(x)
        if dim is None:
            out = make_reduction(ctx, x, None, False, rtype, torch.int64)
            if keepdim:
                return _keepdim_view(out, len(x.sizes), list(range(len(x.sizes))))
            return out
        return make_reduction(ctx, x, [dim], keepdim, rtype, torch.int64)

    return lower


register(aten.argmax.default)(_arg("argmax"))
register(aten.argmin.default)(_arg("argmin"))


@register(aten.max.dim)
def _max_dim(ctx, x, dim, keepdim=False):
    return (_minmax("max")(ctx, x, [dim], keepdim), _arg("argmax")(ctx, x, dim, keepdim))


@register(aten.min.dim)
def _min_dim(ctx, x, dim, keepdim=False):
    return (_minmax("min")(ctx, x, [dim], keepdim), _arg("argmin")(ctx, x, dim, keepdim))


@register(aten.max.default)
def _max_all(ctx, x):
    return _minmax("max")(ctx, x, None, False)


@register(aten.min.default)
def _min_all(ctx, x):
    return _minmax("min")(ctx, x, None, False)


def _truthy(e, idx):
    if e.dtype == torch.bool:
        return e
    return Op("ne", (e, cast(Const(0, torch.int64), e.dtype)), torch.bool)


@register(aten.any.default, aten.any.dim, aten.any.dims)
def _any(ctx, x, dims=None, keepdim=False):
    _need_tensor(x)
    out = ctx.node.meta["val"].dtype
    if out != torch.bool:
        raise NotLowered("any of uint8")
    return make_reduction(ctx, x, dims, keepdim, "any", torch.bool, pre=_truthy)


@register(aten.all.default, aten.all.dim, aten.all.dims)
def _all(ctx, x, dims=None, keepdim=False):
    _need_tensor(x)
    if ctx.node.meta["val"].dtype != torch.bool:
        raise NotLowered("all of uint8")
    # all(x) == !any(!x)
    r = make_reduction(ctx, x, dims, keepdim, "any", torch.bool,
                       pre=lambda e, idx: Op("logical_not", (_truthy(e, idx),), torch.bool))
    ld = r.loader
    return TensorValue(torch.bool, r.device, r.sizes,
                       lambda i: Op("logical_not", (ld(i),), torch.bool))


def _var_parts(ctx, x, dims, correction, keepdim):
    n = len(x.sizes)
    nd = _norm_dims(dims, n)
    if not x.dtype.is_floating_point:
        raise NotLowered("var of a non-float tensor")
    out = x.dtype
    acc = compute_dtype(out)
    count = product([x.sizes[d] for d in nd])
    mean_kd = _mean_value(ctx, x, nd, True, acc)
    mload = mean_kd.loader

    def pre(e, idx):
        m = mload([sympy.Integer(0) if d in nd else idx[d] for d in range(n)])
        diff = Op("sub", (cast(e, acc), m), acc)
        return Op("mul", (diff, diff), acc)

    ssq = make_reduction(ctx, x, nd, keepdim, "sum", acc, pre=pre)
    corr = 1 if correction is None else correction
    var = _scale(ssq, count, out, acc, offset=corr)
    if keepdim:
        mean = TensorValue(out, x.device, mean_kd.sizes, lambda i: cast(mload(i), out))
    else:
        kept = [d for d in range(n) if d not in nd]

        def mean_loader(index):
            full = [sympy.Integer(0)] * n
            for v, d in zip(index, kept):
                full[d] = v
            return cast(mload(full), out)

        mean = TensorValue(out, x.device, [x.sizes[d] for d in kept], mean_loader)
    return var, mean


@register(aten.var.correction)
def _var(ctx, x, dims=None, *, correction=None, keepdim=False):
    _need_tensor(x)
    return _var_parts(ctx, x, dims, correction, keepdim)[0]


@register(aten.var_mean.correction)
def _var_mean(ctx, x, dims=None, *, correction=None, keepdim=False):
    _need_tensor(x)
    return _var_parts(ctx, x, dims, correction, keepdim)
