"""cond(pred, true_fn, false_fn, operands): data-dependent control flow as one op.

In eager it calls ``true_fn(*operands)`` when ``pred`` is true, else ``false_fn(*operands)``
(``pred``: a bool, a SymBool, or a one-element tensor).  On fake tensors both branches
run and must return the same structure of tensors with equal shapes, dtypes and devices;
the true branch's outputs stand for the result.  Under kiln's tracer both branches are
traced into subgraphs ``true_graph_N`` / ``false_graph_N`` (tensors of the outer trace
they read become extra operands of both) and the graph gets one node
``cond(pred, true_graph_N, false_graph_N, operands)`` returning a flat tuple.  Under
functionalization each branch is functionalized on its own.  With operands that require
grad under a kiln mode, an autograd.Function records the op; its backward is another
``cond`` over the branches' backward bodies, so AOT's joint graph holds a forward and a
backward cond.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from kiln import exc
from kiln.ops.base import HigherOrderOperator, _has_fake
from kiln.ops.subgraph import (
    check_same_outputs, differentiable, flat_fn, functional_bodies, grad_body,
    kiln_mode_on_top, mark_aten_subgraph, needs_autograd, trace_subgraphs, unwrap_operands,
)


class Cond(HigherOrderOperator):
    def __init__(self) -> None:
        super().__init__("cond")

    def check_args(self, pred: Any = None, true_fn: Any = None, false_fn: Any = None,
                   operands: Any = ()) -> None:
        if not callable(true_fn) or not callable(false_fn):
            raise TypeError("cond takes two callables: cond(pred, true_fn, false_fn, operands)")
        if not isinstance(operands, (tuple, list)):
            raise TypeError(f"cond takes its operands as a tuple or list, got {type(operands).__name__}")
        if isinstance(pred, torch.Tensor) and pred.numel() != 1:
            raise RuntimeError(f"Expected pred to be bool or single-element tensor, but got {pred}.")

    def __call__(self, pred: Any, true_fn: Callable, false_fn: Callable, operands: Any = ()) -> Any:
        operands = tuple(operands)
        self.check_args(pred, true_fn, false_fn, operands)
        if isinstance(pred, (bool, int)) and not isinstance(pred, torch.SymBool):
            # NOTE: a Python constant: the branch is known, nothing to trace as a cond.
            return (true_fn if pred else false_fn)(*operands)
        if needs_autograd(operands) and kiln_mode_on_top():
            return _autograd_cond(pred, true_fn, false_fn, operands)
        return self.dispatch(pred, true_fn, false_fn, operands)


cond = Cond()


@cond.py_impl("eager")
def _eager(pred: Any, true_fn: Callable, false_fn: Callable, operands: tuple) -> Any:
    if _has_fake((pred, operands), {}):
        return _fake(pred, true_fn, false_fn, operands)
    return (true_fn if bool(pred) else false_fn)(*operands)


@cond.py_impl("fake")
def _fake(pred: Any, true_fn: Callable, false_fn: Callable, operands: tuple) -> Any:
    t, f = flat_fn(true_fn), flat_fn(false_fn)
    outs_t, outs_f = t(*operands), f(*operands)
    check_same_outputs("torch.cond", ["true_fn", "false_fn"], [outs_t, outs_f])
    if t.spec != f.spec:
        raise exc.Unsupported("torch.cond: the branches return different structures",
                              why=f"true_fn returns {t.spec}, false_fn returns {f.spec}")
    return pytree.tree_unflatten(list(outs_t), t.spec)


@cond.py_impl("functionalize")
def _functionalize(mode: Any, pred: Any, true_fn: Callable, false_fn: Callable, operands: tuple) -> Any:
    t, f = flat_fn(true_fn), flat_fn(false_fn)
    bodies = functional_bodies(mode, [t, f], "a torch.cond branch")
    out = cond(mode.value_of(pred), bodies[0], bodies[1], unwrap_operands(mode, operands))
    out = pytree.tree_map_only(torch.Tensor, mode.new_base, out)
    return _unflatten(out, t, f)


@cond.py_impl("trace")
def _trace(mode: Any, pred: Any, true_fn: Callable, false_fn: Callable, operands: tuple) -> Any:
    tracer = mode.tracer
    t, f = flat_fn(true_fn), flat_fn(false_fn)
    (gt, gf), all_ops = trace_subgraphs(tracer, [t, f], operands)
    mark_aten_subgraph(gt)
    mark_aten_subgraph(gf)
    out = cond(pred, gt, gf, all_ops)
    nt = tracer.add_subgraph(gt, "true_graph_")
    nf = tracer.add_subgraph(gf, "false_graph_")
    tracer.record(cond, (pred, nt, nf, tuple(all_ops)), {}, tuple(out), name="cond")
    return _unflatten(out, t, f)


def _unflatten(out: Any, t: Callable, f: Callable) -> Any:
    # NOTE: only the branch that ran has a spec when the predicate was real.
    spec = t.spec if t.spec is not None else f.spec
    return pytree.tree_unflatten(list(out), spec) if spec is not None else out


class _CondAutograd(torch.autograd.Function):
    """cond recorded for autograd; backward = cond of the branches' backward bodies."""

    @staticmethod
    def forward(ctx, pred, true_fn, false_fn, spec_box, *operands):
        t, f = flat_fn(true_fn), flat_fn(false_fn)
        outs = cond(pred, t, f, operands)
        spec_box.append(t.spec if t.spec is not None else f.spec)
        ctx.fns = (true_fn, false_fn)
        ctx.mask = [differentiable(o) and o.requires_grad for o in operands]
        ctx.n_ops = len(operands)
        tensors = [o for o in operands if isinstance(o, torch.Tensor)]
        ctx.tensor_pos = [i for i, o in enumerate(operands) if isinstance(o, torch.Tensor)]
        ctx.consts = {i: o for i, o in enumerate(operands) if not isinstance(o, torch.Tensor)}
        ctx.save_for_backward(pred, *tensors)
        ctx.mark_non_differentiable(*[o for o in outs if isinstance(o, torch.Tensor)
                                      and not differentiable(o)])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        pred, *tensors = ctx.saved_tensors
        operands = [None] * ctx.n_ops
        for i, tsr in zip(ctx.tensor_pos, tensors):
            operands[i] = tsr
        for i, c in ctx.consts.items():
            operands[i] = c
        true_fn, false_fn = ctx.fns
        bt = grad_body(true_fn, ctx.n_ops, ctx.mask)
        bf = grad_body(false_fn, ctx.n_ops, ctx.mask)
        gs = list(cond(pred, bt, bf, tuple(operands) + tuple(grads)))
        out = [None, None, None, None]
        for m in ctx.mask:
            out.append(gs.pop(0) if m else None)
        return tuple(out)


def _autograd_cond(pred: Any, true_fn: Callable, false_fn: Callable, operands: tuple) -> Any:
    spec_box: list = []
    outs = _CondAutograd.apply(pred, true_fn, false_fn, spec_box, *operands)
    return pytree.tree_unflatten(list(outs), spec_box[0])


__all__ = ["cond", "Cond"]
