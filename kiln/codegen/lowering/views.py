"""View lowerings: index rewrites, never copies.

A value that is a strided view of a buffer stays one (new sizes/strides/offset, so an
extern can take it as is); any other value gets a composed loader.
"""
from __future__ import annotations

from typing import Sequence

import sympy
import torch

from kiln.codegen.ir import (BufRef, FloorDiv, ModIndex, TensorValue, Load, compute_dtype,
                             contiguous_strides, product, strided_index, sympify_size)
from kiln.codegen.lowering import NotLowered, register

aten = torch.ops.aten
prims = torch.ops.prims


def _strided(tv: TensorValue, sizes, strides, offset) -> TensorValue:
    ref = BufRef(tv.strided.buf, tuple(sizes), tuple(strides), sympy.sympify(offset))
    cdt = compute_dtype(tv.dtype)
    name = ref.buf
    strides = list(strides)

    def loader(index):
        return Load(name, strided_index(index, strides, offset), cdt)

    return TensorValue(tv.dtype, tv.device, sizes, loader, ref)


def _lazy(tv: TensorValue, sizes, index_fn) -> TensorValue:
    ld = tv.loader
    return TensorValue(tv.dtype, tv.device, sizes, lambda index: ld(index_fn(index)))


def _dim(d: int, n: int) -> int:
    return d + n if d < 0 else d


def _sizes(ctx) -> list:
    return [sympify_size(s) for s in ctx.node.meta["val"].shape]


@register(aten.alias.default, aten.detach.default, aten.lift_fresh.default)
def _alias(ctx, x):
    return x


@register(aten.permute.default)
def _permute(ctx, x, dims):
    n = len(x.sizes)
    dims = [_dim(d, n) for d in dims]
    sizes = [x.sizes[d] for d in dims]
    if x.strided is not None:
        return _strided(x, sizes, [x.strided.strides[d] for d in dims], x.strided.offset)
    inv = [0] * n
    for i, d in enumerate(dims):
        inv[d] = i
    return _lazy(x, sizes, lambda index: [index[inv[j]] for j in range(n)])


@register(aten.t.default)
def _t(ctx, x):
    return _permute(ctx, x, list(range(len(x.sizes)))[::-1])


@register(aten.transpose.int)
def _transpose(ctx, x, a, b):
    n = len(x.sizes)
    dims = list(range(n))
    a, b = _dim(a, n), _dim(b, n)
    dims[a], dims[b] = dims[b], dims[a]
    return _permute(ctx, x, dims)


@register(aten.expand.default)
def _expand(ctx, x, size, *, implicit=False):
    sizes = _sizes(ctx)
    lead = len(sizes) - len(x.sizes)
    bcast = [x.sizes[j] == 1 and sizes[lead + j] != 1 for j in range(len(x.sizes))]
    if x.strided is not None:
        st = [sympy.Integer(0)] * lead + [sympy.Integer(0) if b else s
                                          for b, s in zip(bcast, x.strided.strides)]
        return _strided(x, sizes, st, x.strided.offset)
    return _lazy(x, sizes, lambda index: [sympy.Integer(0) if b else index[lead + j]
                                          for j, b in enumerate(bcast)])


def _norm_bound(v, size, default):
    if v is None:
        return default
    v = sympify_size(v)
    if v.is_Integer:
        if size.is_Integer:
            iv, isz = int(v), int(size)
            if iv < 0:
                iv += isz
            return sympy.Integer(min(max(iv, 0), isz))
        if int(v) < 0:
            return size + v
        if int(v) >= 2 ** 62:
            return size
        return v
    return v


@register(aten.slice.Tensor)
def _slice(ctx, x, dim=0, start=None, end=None, step=1):
    n = len(x.sizes)
    dim = _dim(dim, n)
    sizes = _sizes(ctx)
    size = x.sizes[dim]
    st = _norm_bound(start, size, sympy.Integer(0))
    if not x.sizes[dim].is_Integer and not sizes[dim].is_Integer and not (st.is_Integer or st.is_Symbol):
        pass
    if x.strided is not None:
        strides = list(x.strided.strides)
        off = x.strided.offset + st * strides[dim]
        strides[dim] = strides[dim] * step
        return _strided(x, sizes, strides, off)

    def fn(index):
        idx = list(index)
        idx[dim] = st + idx[dim] * step
        return idx

    return _lazy(x, sizes, fn)


@register(aten.select.int)
def _select(ctx, x, dim, index):
    n = len(x.sizes)
    dim = _dim(dim, n)
    index = sympify_size(index)
    if index.is_Integer and int(index) < 0:
        index = x.sizes[dim] + index
    sizes = x.sizes[:dim] + x.sizes[dim + 1:]
    if x.strided is not None:
        strides = list(x.strided.strides)
        off = x.strided.offset + index * strides[dim]
        del strides[dim]
        return _strided(x, sizes, strides, off)
    return _lazy(x, sizes, lambda idx: list(idx[:dim]) + [index] + list(idx[dim:]))


def _restride_size1(ctx, x):
    """A view that only adds/removes size-1 dims (squeeze/unsqueeze)."""
    sizes = _sizes(ctx)
    keep = [j for j, s in enumerate(x.sizes) if s != 1]
    new_keep = [j for j, s in enumerate(sizes) if s != 1]
    if len(keep) != len(new_keep):
        raise NotLowered("not a size-1 view")
    if x.strided is not None:
        strides = [sympy.Integer(1)] * len(sizes)
        for a, b in zip(keep, new_keep):
            strides[b] = x.strided.strides[a]
        return _strided(x, sizes, strides, x.strided.offset)
    n_old = len(x.sizes)

    def fn(index):
        idx = [sympy.Integer(0)] * n_old
        for a, b in zip(keep, new_keep):
            idx[a] = index[b]
        return idx

    return _lazy(x, sizes, fn)


@register(aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default)
def _squeeze(ctx, x, *dims):
    return _restride_size1(ctx, x)


def reshape_groups(old: Sequence, new: Sequence, hint) -> list:
    """Pair dims of ``old`` and ``new`` into groups of equal products (by size hints,
    checked symbolically); raises NotLowered when they cannot be paired."""
    ho = [hint(s) for s in old]
    hn = [hint(s) for s in new]
    if 0 in ho or 0 in hn:
        raise NotLowered("zero-size reshape")
    groups = []
    i = j = 0
    while i < len(old) and j < len(new):
        og, ng = [i], [j]
        po, pn = ho[i], hn[j]
        i += 1
        j += 1
        while po != pn:
            if po < pn:
                if i >= len(old):
                    raise NotLowered("reshape sizes")
                og.append(i); po *= ho[i]; i += 1
            else:
                if j >= len(new):
                    raise NotLowered("reshape sizes")
                ng.append(j); pn *= hn[j]; j += 1
        # trailing size-1 dims join this group
        while i < len(old) and ho[i] == 1 and (j >= len(new) or hn[j] != 1):
            og.append(i); i += 1
        while j < len(new) and hn[j] == 1 and (i >= len(old) or ho[i] != 1):
            ng.append(j); j += 1
        if sympy.expand(product([old[k] for k in og]) - product([new[k] for k in ng])) != 0:
            raise NotLowered("symbolic reshape")
        groups.append((og, ng))
    rest_o, rest_n = list(range(i, len(old))), list(range(j, len(new)))
    if any(ho[k] != 1 for k in rest_o) or any(hn[k] != 1 for k in rest_n):
        raise NotLowered("reshape sizes")
    if groups:
        groups[-1] = (groups[-1][0] + rest_o, groups[-1][1] + rest_n)
    elif rest_o or rest_n:
        groups.append((rest_o, rest_n))
    return groups


def _view(ctx, x, *_):
    sizes = _sizes(ctx)
    old = x.sizes
    if len(sizes) == len(old) and all(sympy.expand(a - b) == 0 for a, b in zip(sizes, old)):
        return x
    groups = reshape_groups(old, sizes, ctx.size_hint)
    if x.strided is not None:
        strides = [sympy.Integer(0)] * len(sizes)
        ok = True
        ost = x.strided.strides
        for og, ng in groups:
            real = [k for k in og if old[k] != 1]
            for a, b in zip(real, real[1:]):
                if sympy.expand(ost[a] - ost[b] * old[b]) != 0:
                    ok = False
            base = ost[real[-1]] if real else sympy.Integer(1)
            for k, s in zip(ng, contiguous_strides([sizes[k] for k in ng])):
                strides[k] = s * base
        if ok:
            return _strided(x, sizes, strides, x.strided.offset)

    def fn(index):
        out = [sympy.Integer(0)] * len(old)
        for og, ng in groups:
            nsz = [sizes[k] for k in ng]
            flat = strided_index([index[k] for k in ng], contiguous_strides(nsz))
            osz = [old[k] for k in og]
            for pos, k in enumerate(og):
                after = product(osz[pos + 1:])
                v = FloorDiv(flat, after)
                if pos > 0:
                    v = ModIndex(v, osz[pos])
                out[k] = v
        return out

    return _lazy(x, sizes, fn)


register(aten.view.default, aten._unsafe_view.default, aten.reshape.default,
         prims.view_of.default)(_view)


@register(aten.as_strided.default)
def _as_strided(ctx, x, size, stride, storage_offset=None):
    if x.strided is None:
        x = ctx.realize(x, like=ctx.fake(ctx.node.args[0]))
    base_off = x.strided.offset
    ref_off = sympify_size(storage_offset) if storage_offset is not None else base_off
    if storage_offset is None and not _is_base(x):
        raise NotLowered("as_strided of a view without storage_offset")
    return _strided(x, [sympify_size(s) for s in size], [sympify_size(s) for s in stride], ref_off)


def _is_base(x: TensorValue) -> bool:
    return x.strided is not None and x.strided.offset == 0


@register(aten.split.Tensor, aten.split_with_sizes.default)
def _split(ctx, x, split, dim=0):
    n = len(x.sizes)
    dim = _dim(dim, n)
    outs, start = [], sympy.Integer(0)
    for v in ctx.node.meta["val"]:
        length = sympify_size(v.shape[dim])
        outs.append(_slice_value(x, dim, start, length, [sympify_size(s) for s in v.shape]))
        start = start + length
    return outs


def _slice_value(x, dim, start, length, sizes):
    if x.strided is not None:
        strides = list(x.strided.strides)
        return _strided(x, sizes, strides, x.strided.offset + start * strides[dim])

    def fn(index):
        idx = list(index)
        idx[dim] = idx[dim] + start
        return idx

    return _lazy(x, sizes, fn)


@register(aten.unbind.int)
def _unbind(ctx, x, dim=0):
    n = len(x.sizes)
    dim = _dim(dim, n)
    if not x.sizes[dim].is_Integer:
        raise NotLowered("unbind of a symbolic dim")
    return [_select(ctx, x, dim, i) for i in range(int(x.sizes[dim]))]
