"""map(f, xs, *args): ``f`` applied to every slice of ``xs`` along dim 0, results stacked.

In: ``f(x_slice, *args)`` returning a pytree of tensors; ``xs`` a pytree of tensors with
the same non-zero size of dim 0; ``args`` passed unchanged to every call.  Out: the pytree
``f`` returns, each tensor stacked over the slices (``torch.stack``: contiguous, dim 0 of
size ``xs``'s).

``map`` flattens its pytrees and calls the operator ``map_impl(f, xs, args)`` (flat tuples
in, a flat tuple out), which is the graph node.  In eager the slices run one by one.  On
fake tensors ``f`` runs once on the first slice and fresh tensors with the batch
dimension stand for the result.  Under kiln's tracer ``f`` becomes a subgraph
``map_body_graph_N`` (tensors of the outer trace it reads become extra args) and the graph
gets one node ``map_impl(body_graph, xs, args)``.  Under functionalization the body is
functionalized on its own.  With inputs that require grad under a kiln mode, an
autograd.Function records the op; its backward is another ``map_impl`` of the body's
vector-Jacobian product over ``(xs, grads)``, the gradients of ``args`` summed over dim 0.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree

from kiln.ops.base import HigherOrderOperator, _has_fake
from kiln.ops.while_loop import bake_constants, distinct
from kiln.ops.subgraph import (
    differentiable, flat_fn, functional_bodies, grad_body, kiln_mode_on_top,
    mark_aten_subgraph, needs_autograd, trace_subgraphs, unwrap_operands,
)


def _check_xs(flat_xs: Sequence[Any]) -> None:
    if not flat_xs:
        raise RuntimeError("map: xs must contain at least one tensor")
    if not all(isinstance(t, torch.Tensor) for t in flat_xs):
        raise RuntimeError(f"Mapped xs can only consist of tensors. Got xs {list(flat_xs)}.")
    if any(t.dim() == 0 for t in flat_xs):
        raise RuntimeError("map: the mapped xs must have a dim 0 to map over; got a 0-d tensor")
    shapes = [t.shape for t in flat_xs]
    n = shapes[0][0]
    if isinstance(n, int) and n == 0:
        raise RuntimeError("Leading dimensions of mapped xs cannot be 0.")
    if any(not _eq(s[0], n) for s in shapes):
        raise RuntimeError(f"Leading dimensions of mapped xs must be consistent. Got shapes {shapes}.")


def _eq(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an undecidable symbolic comparison
        return False


class MapImpl(HigherOrderOperator):
    def __init__(self) -> None:
        super().__init__("map_impl")

    def check_args(self, f: Any = None, xs: Any = (), args: Any = ()) -> None:
        if not callable(f):
            raise TypeError(f"map takes a callable, got {type(f).__name__}")
        if not isinstance(xs, (tuple, list)) or not isinstance(args, (tuple, list)):
            raise TypeError("map_impl takes its xs and args as tuples: map_impl(f, xs, args)")
        _check_xs(xs)

    def __call__(self, f: Callable, xs: Sequence[Any], args: Sequence[Any] = ()) -> tuple:
        self.check_args(f, xs, args)
        xs, args = tuple(xs), tuple(args)
        if needs_autograd(xs + args) and kiln_mode_on_top():
            return tuple(_MapAutograd.apply(f, len(xs), *xs, *args))
        return self.dispatch(f, xs, args)


map_impl = MapImpl()


def map(f: Callable, xs: Any, *args: Any) -> Any:  # noqa: A001 - PyTorch's name
    """``f`` over the slices of ``xs`` along dim 0, stacked (see module docstring)."""
    flat_xs, xs_spec = pytree.tree_flatten(xs)
    flat_args, args_spec = pytree.tree_flatten(args)
    _check_xs(flat_xs)
    n_xs = len(flat_xs)

    def flat_body(*flat: Any) -> Any:
        x = pytree.tree_unflatten(list(flat[:n_xs]), xs_spec)
        a = pytree.tree_unflatten(list(flat[n_xs:]), args_spec)
        return f(x, *a)

    flat_body.__name__ = getattr(f, "__name__", "map_body")
    body = flat_fn(flat_body)
    out = map_impl(body, tuple(flat_xs), tuple(flat_args))
    return pytree.tree_unflatten(list(out), body.spec)


# --------------------------------------------------------------------------- impls
def _as_tuple(out: Any) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _check_outputs(outs: Sequence[Any]) -> None:
    for i, o in enumerate(outs):
        if not isinstance(o, torch.Tensor):
            raise RuntimeError(f"map: the body must return tensors, but output {i} is "
                               f"{type(o).__name__} {o!r}")


@map_impl.py_impl("eager")
def _eager(f: Callable, xs: tuple, args: tuple) -> tuple:
    if _has_fake((xs, args), {}):
        return _fake(f, xs, args)
    per_slice = [_as_tuple(f(*[x[i] for x in xs], *args)) for i in range(xs[0].shape[0])]
    _check_outputs(per_slice[0])
    if any(len(p) != len(per_slice[0]) for p in per_slice):
        raise RuntimeError("map: the body returned a different number of values for different slices")
    return tuple(torch.stack(list(leaves)) for leaves in zip(*per_slice))


@map_impl.py_impl("fake")
def _fake(f: Callable, xs: tuple, args: tuple) -> tuple:
    outs = _as_tuple(f(*[x.select(0, 0) for x in xs], *args))
    _check_outputs(outs)
    n = xs[0].shape[0]
    return tuple(torch.empty((n, *o.shape), dtype=o.dtype, device=o.device) for o in outs)


@map_impl.py_impl("functionalize")
def _functionalize(mode: Any, f: Callable, xs: tuple, args: tuple) -> tuple:
    g, ops = bake_constants(f, xs + args, len(xs))
    (body,) = functional_bodies(mode, [flat_fn(g)], "a map body")
    out = map_impl(body, unwrap_operands(mode, ops[:len(xs)]), unwrap_operands(mode, ops[len(xs):]))
    return tuple(pytree.tree_map_only(torch.Tensor, mode.new_base, out))


@map_impl.py_impl("trace")
def _trace(mode: Any, f: Callable, xs: tuple, args: tuple) -> tuple:
    tracer = mode.tracer
    # NOTE: the body is traced on a slice with the strides every slice has (a view of
    # the first one), so a compiled body indexes the slices the way they are laid out.
    slices = tuple(x.select(0, 0) for x in xs)
    (gm,), all_ops = trace_subgraphs(tracer, [flat_fn(f)], distinct(slices + tuple(args)))
    mark_aten_subgraph(gm)
    extra = tuple(args) + tuple(all_ops[len(slices) + len(args):])
    out = map_impl(gm, xs, extra)
    node = tracer.add_subgraph(gm, "map_body_graph_")
    tracer.record(map_impl, (node, tuple(xs), extra), {}, tuple(out), name="map_impl")
    return tuple(out)


# --------------------------------------------------------------------------- autograd
class _MapAutograd(torch.autograd.Function):
    """map_impl recorded for autograd; backward = map_impl of the body's vjp."""

    @staticmethod
    def forward(ctx, f, n_xs, *operands):
        xs, args = operands[:n_xs], operands[n_xs:]
        outs = map_impl(f, xs, args)
        ctx.f = f
        ctx.n_xs = n_xs
        ctx.n_ops = len(operands)
        ctx.mask = [differentiable(o) and o.requires_grad for o in operands]
        ctx.tensor_pos = [i for i, o in enumerate(operands) if isinstance(o, torch.Tensor)]
        ctx.consts = {i: o for i, o in enumerate(operands) if not isinstance(o, torch.Tensor)}
        ctx.save_for_backward(*[operands[i] for i in ctx.tensor_pos])
        ctx.mark_non_differentiable(*[o for o in outs if not differentiable(o)])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        operands: list = [None] * ctx.n_ops
        for i, t in zip(ctx.tensor_pos, ctx.saved_tensors):
            operands[i] = t
        for i, c in ctx.consts.items():
            operands[i] = c
        return (None, None, *_map_backward(ctx.f, ctx.n_xs, tuple(operands), ctx.mask, grads))


def _map_backward(f: Callable, n_xs: int, operands: tuple, mask: list, grads: tuple) -> list:
    xs, args = operands[:n_xs], operands[n_xs:]
    if not any(mask):
        return [None] * len(operands)
    step = grad_body(f, len(operands), mask)
    n_out = len(grads)

    def backward_slice(*a: Any) -> tuple:
        # a = (*x_slices, *grad_slices, *args): grad_body takes (*operands, *grad_outputs)
        return step(*a[:n_xs], *a[n_xs + n_out:], *a[n_xs:n_xs + n_out])

    gs = tuple(g.contiguous() for g in grads)
    got = iter(map_impl(backward_slice, xs + gs, args))
    out: list = []
    for i, m in enumerate(mask):
        if not m:
            out.append(None)
            continue
        g = next(got)
        # NOTE: every slice sees the same args: their gradient is the sum over slices.
        out.append(g if i < n_xs else g.sum(0))
    return out


__all__ = ["map", "map_impl", "MapImpl"]
