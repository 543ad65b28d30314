"""Indexing lowerings (indirect loads): index.Tensor, gather, embedding.

The index tensor's value becomes an indirect symbol in the load's index
(``Load.indirect``), wrapped for negative values as eager does.  Indirect stores
(index_put, scatter_add, embedding_dense_backward) run as extern ATen calls.
"""
from __future__ import annotations

import sympy
import torch

from kiln.codegen.ir import IndexValue, Load, TensorValue, map_loads, new_indirect_symbol, walk
from kiln.codegen.lowering import NotLowered, register
from kiln.codegen.lowering.pointwise import broadcast_loader, cast, out_sizes

aten = torch.ops.aten


def load_indirect(x: TensorValue, index: list, bindings: list):
    """``x`` at ``index`` (which mentions the symbols in ``bindings``), with the bindings
    attached to the loads that use them."""
    e = x.load(index)
    syms = {s for s, _, _ in bindings}
    for n in walk(e):
        if isinstance(n, IndexValue) and n.expr.free_symbols & syms:
            raise NotLowered("indirect index into a computed index")

    def attach(ld: Load):
        used = ld.index.free_symbols & syms
        if not used:
            return None
        extra = tuple(b for b in bindings if b[0] in used)
        return Load(ld.buf, ld.index, ld.dtype, ld.indirect + extra)

    return map_loads(e, attach)


def _base(ctx, x: TensorValue) -> TensorValue:
    """The indexed tensor as a strided buffer view (indirect loads need plain loads)."""
    return x if x.strided is not None else ctx.realize(x)


def _int_index(t) -> bool:
    return isinstance(t, TensorValue) and t.dtype in (torch.int64, torch.int32)


def _indirect_index(x, indices: list, index: list, start: int, bnd: int, bsizes: list):
    """Index of ``x`` for one point ``index`` of an advanced-indexing result: the
    broadcast index dims ``index[start:start+bnd]`` select through the index tensors (each
    a new indirect symbol bound to the loaded value), the other dims pass through.
    Returns (index expressions of x, bindings (symbol, value, size))."""
    bidx = index[start:start + bnd]
    it = iter(index[:start] + index[start + bnd:])
    xi, bindings = [], []
    for d in range(len(x.sizes)):
        i = indices[d] if d < len(indices) else None
        if i is None:
            xi.append(next(it))
        else:
            v = cast(broadcast_loader(i, bsizes)(list(bidx)), torch.int64)
            s = new_indirect_symbol()
            bindings.append((s, v, x.sizes[d]))
            xi.append(s)
    return xi, bindings


@register(aten.index.Tensor)
def _index(ctx, x, indices):
    if not isinstance(x, TensorValue) or not all(i is None or _int_index(i) for i in indices):
        raise NotLowered("index with bool masks")
    x = _base(ctx, x)
    val = ctx.node.meta["val"]
    sizes = out_sizes(ctx)
    pos = [d for d, i in enumerate(indices) if i is not None]
    idx_tensors = [indices[d] for d in pos]
    bnd = max(len(t.sizes) for t in idx_tensors)
    adjacent = pos == list(range(pos[0], pos[-1] + 1))
    start = pos[0] if adjacent else 0
    bsizes = sizes[start:start + bnd]

    def loader(index):
        xi, bindings = _indirect_index(x, indices, list(index), start, bnd, bsizes)
        return cast(load_indirect(x, xi, bindings), val.dtype)

    return TensorValue(val.dtype, val.device, sizes, loader)


@register(aten._unsafe_index.Tensor)
def _unsafe_index(ctx, x, indices):
    return _index(ctx, x, indices)


@register(aten.gather.default)
def _gather(ctx, x, dim, index, *, sparse_grad=False):
    if not isinstance(x, TensorValue) or not _int_index(index):
        raise NotLowered("gather operands")
    x = _base(ctx, x)
    val = ctx.node.meta["val"]
    sizes = out_sizes(ctx)
    n = len(x.sizes)
    dim = dim + n if dim < 0 else dim
    if n == 0:
        raise NotLowered("gather of a 0-d tensor")
    if len(sizes) != n or len(index.sizes) != n:
        # NOTE: eager accepts a 0-d index into a 1-d tensor (quantile of a 0-d input)
        raise NotLowered("gather with an index of another rank")

    def loader(out_index):
        v = cast(index.load(out_index), torch.int64)
        s = new_indirect_symbol()
        xi = list(out_index)
        xi[dim] = s
        return cast(load_indirect(x, xi, [(s, v, x.sizes[dim])]), val.dtype)

    return TensorValue(val.dtype, val.device, sizes, loader)


@register(aten.embedding.default)
def _embedding(ctx, weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    if not isinstance(weight, TensorValue) or not _int_index(indices) or len(weight.sizes) != 2:
        raise NotLowered("embedding operands")
    weight = _base(ctx, weight)
    val = ctx.node.meta["val"]
    sizes = out_sizes(ctx)
    k = len(indices.sizes)

    def loader(out_index):
        v = cast(indices.load(out_index[:k]), torch.int64)
        s = new_indirect_symbol()
        return cast(load_indirect(weight, [s, out_index[k]], [(s, v, weight.sizes[0])]), val.dtype)

    return TensorValue(val.dtype, val.device, sizes, loader)


def _in_range(i, start, end, step):
    from kiln.codegen.ir import Op, Const
    from kiln.codegen.lowering.creation import _lt

    iv = IndexValue(sympy.sympify(i), torch.int64)
    c = Op("logical_and", (Op("ge", (iv, Const(0, torch.int64)), torch.bool) if start == 0 else
                           Op("ge", (iv, IndexValue(sympy.sympify(start), torch.int64)), torch.bool),
                           _lt(i, end)), torch.bool)
    if step != 1:
        from kiln.codegen.ir import ModIndex
        c = Op("logical_and", (c, Op("eq", (IndexValue(ModIndex(sympy.sympify(i) - start + step * end, step),
                                                       torch.int64), Const(0, torch.int64)), torch.bool)),
               torch.bool)
    return c


@register(aten.slice_scatter.default)
def _slice_scatter(ctx, x, src, dim=0, start=None, end=None, step=1):
    """``x`` with ``src`` written over ``x[start:end:step]`` along dim (masked loads)."""
    from kiln.codegen.lowering.creation import masked
    from kiln.codegen.lowering.views import _norm_bound
    from kiln.codegen.ir import FloorDiv

    if not isinstance(x, TensorValue) or not isinstance(src, TensorValue):
        raise NotLowered("slice_scatter operands")
    val = ctx.node.meta["val"]
    sizes = out_sizes(ctx)
    n = len(sizes)
    dim = dim + n if dim < 0 else dim
    st = _norm_bound(start, sizes[dim], sympy.Integer(0))
    en = st + src.sizes[dim] * step

    def loader(index):
        i = index[dim]
        sidx = list(index)
        sidx[dim] = FloorDiv(i - st + step * sizes[dim], step) - sizes[dim] if step != 1 else i - st
        return masked(_in_range(i, st, en, step), cast(src.load(sidx), val.dtype),
                      cast(x.load(index), val.dtype))

    return TensorValue(val.dtype, val.device, sizes, loader)


@register(aten.select_scatter.default)
def _select_scatter(ctx, x, src, dim, index):
    from kiln.codegen.ir import Op
    from kiln.codegen.lowering.creation import masked
    from kiln.codegen.ir import sympify_size

    if not isinstance(x, TensorValue) or not isinstance(src, TensorValue):
        raise NotLowered("select_scatter operands")
    val = ctx.node.meta["val"]
    sizes = out_sizes(ctx)
    n = len(sizes)
    dim = dim + n if dim < 0 else dim
    index = sympify_size(index)
    if index.is_Integer and int(index) < 0:
        index = sizes[dim] + index

    def loader(idx):
        i = idx[dim]
        cond = Op("eq", (IndexValue(sympy.sympify(i), torch.int64), IndexValue(index, torch.int64)), torch.bool)
        sidx = list(idx[:dim]) + list(idx[dim + 1:])
        return masked(cond, cast(src.load(sidx), val.dtype), cast(x.load(idx), val.dtype))

    return TensorValue(val.dtype, val.device, sizes, loader)


# ----------------------------------------------------------------------------- indirect stores

def _scatter_buffer(ctx, x: TensorValue, src_sizes, target_fn, value_fn) -> TensorValue:
    """A buffer: x, then ``out[target(y)] += value(y)`` for y over src_sizes."""
    from kiln.codegen.ir import Scatter, contiguous_strides, make_vars, strided_index

    val = ctx.node.meta["val"]
    if val.dtype in (torch.float16, torch.bfloat16, torch.bool):
        raise NotLowered("atomic add of this dtype")
    sizes = out_sizes(ctx)
    strides = contiguous_strides(sizes)
    xv = make_vars("x", len(sizes))
    yv = make_vars("y", len(src_sizes))
    base = cast(x.load(xv), val.dtype)
    out_index, bindings = target_fn(yv)
    target = strided_index(out_index, strides)
    value = cast(value_fn(yv), val.dtype)
    buf = ctx.new_buffer(val.dtype, val.device, sizes, strides,
                         Scatter(list(sizes), base, list(src_sizes), target, tuple(bindings), value))
    return TensorValue.of_buffer(buf)


@register(aten.index_put.default)
def _index_put(ctx, x, indices, values, accumulate=False):
    if not accumulate:
        raise NotLowered("index_put without accumulate")
    if not isinstance(x, TensorValue) or not isinstance(values, TensorValue) or \
            not all(i is None or _int_index(i) for i in indices):
        raise NotLowered("index_put operands")
    from kiln.codegen.ir import sympify_size

    fx_x, fx_idx = ctx.node.args[0], ctx.node.args[1]
    r = aten.index.Tensor(ctx.fake(fx_x), [ctx.fake(i) if i is not None else None for i in fx_idx])
    rsizes = [sympify_size(s) for s in r.shape]
    pos = [d for d, i in enumerate(indices) if i is not None]
    bnd = max(len(indices[d].sizes) for d in pos)
    adjacent = pos == list(range(pos[0], pos[-1] + 1))
    start = pos[0] if adjacent else 0
    bsizes = rsizes[start:start + bnd]

    def target(yv):
        return _indirect_index(x, indices, list(yv), start, bnd, bsizes)

    return _scatter_buffer(ctx, x, rsizes, target, lambda yv: broadcast_loader(values, rsizes)(list(yv)))


@register(aten.scatter_add.default)
def _scatter_add(ctx, x, dim, index, src):
    if not isinstance(x, TensorValue) or not isinstance(src, TensorValue) or not _int_index(index):
        raise NotLowered("scatter_add operands")
    n = len(x.sizes)
    dim = dim + n if dim < 0 else dim

    def target(yv):
        s = new_indirect_symbol()
        xi = list(yv)
        xi[dim] = s
        return xi, [(s, cast(index.load(list(yv)), torch.int64), x.sizes[dim])]

    return _scatter_buffer(ctx, x, index.sizes, target, lambda yv: src.load(list(yv)))
