"""Creation lowerings: full, scalar_tensor, arange, iota; cat and constant_pad_nd (masked
loads: only the selected input is read)."""
from __future__ import annotations

import sympy
import torch

from kiln.codegen.ir import Const, IndexValue, Op, TensorValue, compute_dtype, sympify_size
from kiln.codegen.lowering import NotLowered, register
from kiln.codegen.lowering.pointwise import cast, out_sizes

aten = torch.ops.aten
prims = torch.ops.prims


def _const_value(ctx, value) -> TensorValue:
    val = ctx.node.meta["val"]
    cdt = compute_dtype(val.dtype)
    if isinstance(value, sympy.Basic):
        e = cast(IndexValue(value, torch.int64), cdt)
    elif isinstance(value, (bool, int, float)):
        e = cast(Const(value, torch.float64 if isinstance(value, float) else
                       torch.bool if isinstance(value, bool) else torch.int64), cdt)
    else:
        raise NotLowered("fill value")
    return TensorValue(val.dtype, val.device, out_sizes(ctx), lambda index: cast(e, val.dtype))


@register(aten.full.default)
def _full(ctx, size, fill_value, **kw):
    return _const_value(ctx, fill_value)


@register(aten.full_like.default)
def _full_like(ctx, x, fill_value, **kw):
    return _const_value(ctx, fill_value)


@register(aten.zeros_like.default)
def _zeros_like(ctx, x, **kw):
    return _const_value(ctx, 0)


@register(aten.ones_like.default)
def _ones_like(ctx, x, **kw):
    return _const_value(ctx, 1)


@register(aten.scalar_tensor.default)
def _scalar_tensor(ctx, s, **kw):
    return _const_value(ctx, s)


@register(aten.zeros.default)
def _zeros(ctx, size, **kw):
    return _const_value(ctx, 0)


@register(aten.ones.default)
def _ones(ctx, size, **kw):
    return _const_value(ctx, 1)


def _range(ctx, start, step) -> TensorValue:
    val = ctx.node.meta["val"]
    cdt = compute_dtype(val.dtype)

    def loader(index):
        i = index[0]
        if not cdt.is_floating_point and all(isinstance(v, (int, sympy.Basic)) for v in (start, step)):
            return cast(IndexValue(sympy.sympify(start) + i * sympy.sympify(step), torch.int64), val.dtype)
        t = torch.float64
        e = Op("add", (cast(Const(float(start), t), t),
                       Op("mul", (cast(IndexValue(i, torch.int64), t), Const(float(step), t)), t)), t)
        return cast(e, val.dtype)

    return TensorValue(val.dtype, val.device, out_sizes(ctx), loader)


@register(aten.arange.start_step)
def _arange_ss(ctx, start, end, step=1, **kw):
    return _range(ctx, start, step)


@register(aten.arange.start)
def _arange_s(ctx, start, end, **kw):
    return _range(ctx, start, 1)


@register(aten.arange.default)
def _arange(ctx, end, **kw):
    return _range(ctx, 0, 1)


@register(prims.iota.default)
def _iota(ctx, length, *, start, step, dtype, device, requires_grad):
    return _range(ctx, start, step)


def masked(mask, value, other):
    """``value`` where ``mask`` else ``other``; value's loads run only under the mask."""
    return Op("masked", (mask, value, other), value.dtype)


def _lt(a, b):
    return Op("lt", (IndexValue(sympy.sympify(a), torch.int64), IndexValue(sympy.sympify(b), torch.int64)),
              torch.bool)


def _ge(a, b):
    return Op("ge", (IndexValue(sympy.sympify(a), torch.int64), IndexValue(sympy.sympify(b), torch.int64)),
              torch.bool)


@register(aten.cat.default)
def _cat(ctx, tensors, dim=0):
    val = ctx.node.meta["val"]
    sizes = out_sizes(ctx)
    dim = dim + len(sizes) if dim < 0 else dim
    parts = [t for t in tensors if isinstance(t, TensorValue)
             and not (len(t.sizes) == 1 and t.sizes[0] == 0 and len(sizes) != 1)]
    if len(parts) != len([t for t in tensors if t is not None]) and any(
            not isinstance(t, TensorValue) for t in tensors):
        raise NotLowered("cat of non-tensors")
    cdt = compute_dtype(val.dtype)
    offsets, acc = [], sympy.Integer(0)
    for t in parts:
        offsets.append(acc)
        acc = acc + t.sizes[dim]

    def loader(index):
        out = None
        for t, off in reversed(list(zip(parts, offsets))):
            idx = list(index)
            idx[dim] = idx[dim] - off
            v = cast(t.load(idx), val.dtype)
            if out is None:
                # NOTE: the last part is masked too: unmasked, its loads ran at
                # index - offset < 0 for the other parts' elements, before the start of
                # its buffer (an illegal address on a GPU when the buffer starts a page).
                out = v if off == 0 else masked(_ge(index[dim], off), v, Const(0, v.dtype))
            else:
                inside = _lt(index[dim], off + t.sizes[dim])
                if off != 0:
                    # NOTE: a middle part's loads are masked on both sides: below ``off``
                    # its index is negative (the earlier parts' elements), and the
                    # select chain alone would still run those loads
                    inside = Op("logical_and", (_ge(index[dim], off), inside), torch.bool)
                out = masked(inside, v, out)
        return out

    return TensorValue(val.dtype, val.device, sizes, loader)


@register(aten.constant_pad_nd.default)
def _pad(ctx, x, pad, value=0):
    val = ctx.node.meta["val"]
    sizes = out_sizes(ctx)
    n = len(sizes)
    cdt = compute_dtype(val.dtype)
    lows = [sympy.Integer(0)] * n
    for k in range(len(pad) // 2):
        lows[n - 1 - k] = sympify_size(pad[2 * k])
    fill = cast(Const(value, torch.float64 if isinstance(value, float) else torch.int64), val.dtype)

    def loader(index):
        idx = [i - lo for i, lo in zip(index, lows)]
        conds = []
        for d in range(n):
            if lows[d] != 0 or sympy.expand(sizes[d] - x.sizes[d]) != 0:
                conds.append(Op("logical_and", (
                    Op("ge", (IndexValue(idx[d], torch.int64), Const(0, torch.int64)), torch.bool),
                    _lt(idx[d], x.sizes[d])), torch.bool))
        v = cast(x.load(idx), val.dtype)
        if not conds:
            return v
        m = conds[0]
        for c in conds[1:]:
            m = Op("logical_and", (m, c), torch.bool)
        return masked(m, v, fill)

    return TensorValue(val.dtype, val.device, sizes, loader)
