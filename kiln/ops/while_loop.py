"""while_loop(cond_fn, body_fn, carried_inputs, additional_inputs=()): a loop as one op.

In: ``cond_fn(*carried, *additional)`` returning a boolean scalar tensor (or a bool),
``body_fn(*carried, *additional)`` returning as many values as ``carried_inputs`` (a tuple
or list of tensors; ints only in eager), of the same shapes, dtypes and devices.
Out: the carried values once ``cond_fn`` is false, as a tuple (clones of the inputs when
the loop never runs).

In eager the loop runs in Python.  On fake tensors the body runs once, its outputs are
checked against the carried inputs and fresh tensors stand for the result.  Under kiln's
tracer both callables become subgraphs ``while_loop_cond_graph_N`` /
``while_loop_body_graph_N`` (tensors of the outer trace they read become extra additional
inputs) and the graph gets one node ``while_loop(cond_graph, body_graph, carried,
additional)`` returning a flat tuple.  Under functionalization each body is functionalized
on its own.  With inputs that require grad under a kiln mode, an autograd.Function records
the loop (forward: the same loop with an iteration counter); its backward is another
``while_loop`` running the body's vector-Jacobian product from the last iteration down.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree

from kiln import exc
from kiln.ops.base import HigherOrderOperator, _has_fake
from kiln.ops.subgraph import (
    differentiable, flat_fn, functional_bodies, grad_body, kiln_mode_on_top,
    mark_aten_subgraph, needs_autograd, trace_subgraphs, unwrap_operands,
)

_WHAT = "while_loop"


class WhileLoop(HigherOrderOperator):
    def __init__(self) -> None:
        super().__init__("while_loop")

    def check_args(self, cond_fn: Any = None, body_fn: Any = None, carried_inputs: Any = (),
                   additional_inputs: Any = ()) -> None:
        if not callable(cond_fn) or not callable(body_fn):
            raise TypeError("while_loop takes two callables: "
                            "while_loop(cond_fn, body_fn, carried_inputs, additional_inputs)")
        for name, v in (("carried_inputs", carried_inputs), ("additional_inputs", additional_inputs)):
            if not isinstance(v, (tuple, list)):
                raise RuntimeError(f"{name} must be a tuple or list, got {type(v).__name__}")
        for c in carried_inputs:
            if not isinstance(c, (torch.Tensor, int, torch.SymInt)) or isinstance(c, bool):
                raise RuntimeError("while_loop's carried_inputs must be tensors or ints, "
                                   f"got {type(c).__name__}")

    def __call__(self, cond_fn: Callable, body_fn: Callable, carried_inputs: Sequence[Any],
                 additional_inputs: Sequence[Any] = ()) -> tuple:
        self.check_args(cond_fn, body_fn, carried_inputs, additional_inputs)
        carried, additional = tuple(carried_inputs), tuple(additional_inputs)
        if needs_autograd(carried + additional) and kiln_mode_on_top():
            return _autograd_while_loop(cond_fn, body_fn, carried, additional)
        return self.dispatch(cond_fn, body_fn, carried, additional)


while_loop = WhileLoop()


# --------------------------------------------------------------------------- checks
def _as_tuple(out: Any) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _pred(value: Any) -> Any:
    """cond_fn's result as one value (a traced subgraph returns a 1-tuple)."""
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if isinstance(value, (bool, torch.SymBool)):
        return value
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.numel() == 1 \
            and value.dim() <= 1:
        return value
    raise RuntimeError(f"while_loop: cond_fn must return a boolean scalar tensor or a boolean, "
                       f"got {_describe(value)}")


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"a tensor of shape {list(v.shape)} and dtype {v.dtype}"
    return f"{type(v).__name__} {v!r}"


def check_body_outputs(carried: Sequence[Any], outs: Sequence[Any]) -> None:
    """body_fn returns one value per carried input, with the same shape, dtype and device."""
    if len(outs) != len(carried):
        raise exc.Unsupported(
            f"while_loop: body_fn returns {len(outs)} values but there are {len(carried)} carried inputs",
            why="each iteration's outputs are the next iteration's inputs",
            hint="return one value per carried input from body_fn")
    for i, (c, o) in enumerate(zip(carried, outs)):
        if isinstance(c, torch.Tensor) != isinstance(o, torch.Tensor):
            raise exc.Unsupported(
                f"while_loop: body_fn output {i} is {_describe(o)} but carried input {i} is {_describe(c)}",
                why="each iteration's outputs are the next iteration's inputs")
        if isinstance(c, torch.Tensor) and not _same_meta(c, o):
            raise exc.Unsupported(
                f"while_loop: body_fn output {i} has shape={list(o.shape)}, dtype={o.dtype}, "
                f"device={o.device} but carried input {i} has shape={list(c.shape)}, dtype={c.dtype}, "
                f"device={c.device}",
                why="body_fn must return tensors of the same shape, dtype and device as the carried "
                    "inputs (they are the next iteration's inputs)",
                hint="make body_fn keep the shapes and dtypes of its carried values")


def _same_meta(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.device != b.device or a.dim() != b.dim():
        return False
    try:
        return all(bool(x == y) for x, y in zip(a.shape, b.shape))
    except Exception:  # noqa: BLE001 - an undecidable symbolic comparison
        return False


# --------------------------------------------------------------------------- layouts
def _layout(t: torch.Tensor) -> tuple:
    """The strides every iteration's carry keeps: the input's own when it is dense and
    non-overlapping, else contiguous ones."""
    import torch._prims_common as prims

    dense = getattr(prims, "is_non_overlapping_and_dense_or_false", None) \
        or getattr(prims, "is_non_overlapping_and_dense")  # NOTE: the older torch's name
    if dense(t):
        return tuple(t.stride())
    return tuple(prims.make_contiguous_strides_for(t.shape))


def _restride(t: Any, like: Any) -> Any:
    # NOTE: a compiled body was generated for one layout of its inputs: a carry that came
    # back with other strides (body_fn returned a transpose) is copied into that layout,
    # so every iteration (and the result) has the layout the subgraphs were built for.
    if not isinstance(t, torch.Tensor) or (t.stride() == like.stride() and t is not like):
        return t
    strides = _layout(like)
    if tuple(t.stride()) == strides:
        return t
    out = torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device)
    return out.copy_(t)


def _fresh_like(t: Any) -> Any:
    if not isinstance(t, torch.Tensor):
        return t
    return torch.empty_strided(t.shape, _layout(t), dtype=t.dtype, device=t.device)


# --------------------------------------------------------------------------- impls
@while_loop.py_impl("eager")
def _eager(cond_fn: Callable, body_fn: Callable, carried: tuple, additional: tuple) -> tuple:
    if _has_fake((carried, additional), {}):
        return _fake(cond_fn, body_fn, carried, additional)
    vals = tuple(_restride(c, c) for c in carried)
    inputs = {id(x) for x in carried + additional if isinstance(x, torch.Tensor)}
    while bool(_pred(cond_fn(*vals, *additional))):
        outs = _as_tuple(body_fn(*vals, *additional))
        check_body_outputs(carried, outs)
        vals = tuple(_restride(o, c) for o, c in zip(outs, carried))
    # NOTE: the result never aliases an input (the loop may not run, or body_fn may
    # return a carried value unchanged).
    return tuple(v.clone() if isinstance(v, torch.Tensor) and id(v) in inputs else v for v in vals)


def _no_ints(carried: Sequence[Any], where: str) -> None:
    if any(not isinstance(c, torch.Tensor) for c in carried):
        raise exc.Unsupported(
            f"while_loop with an int carried input {where}",
            why="the int's value after the loop is unknown until the loop runs",
            hint="carry the int as a 0-d tensor (torch.tensor(n)) instead")


@while_loop.py_impl("fake")
def _fake(cond_fn: Callable, body_fn: Callable, carried: tuple, additional: tuple) -> tuple:
    _no_ints(carried, "on fake tensors")
    _pred(cond_fn(*carried, *additional))
    outs = _as_tuple(body_fn(*carried, *additional))
    check_body_outputs(carried, outs)
    return tuple(_fresh_like(c) for c in carried)


def bake_constants(fn: Callable, operands: Sequence[Any], n_keep: int) -> tuple[Callable, tuple]:
    """``fn`` taking only the tensors of ``operands`` after the first ``n_keep`` (its other
    values built in), and those operands.

    NOTE: a functionalized body takes tensors only; an int passed alongside (map's
    ``y.size(0)``) is the same in every call, so the body keeps it as a constant."""
    pos = [i for i, o in enumerate(operands) if i < n_keep or isinstance(o, torch.Tensor)]
    if len(pos) == len(operands):
        return fn, tuple(operands)
    consts = {i: o for i, o in enumerate(operands) if i not in set(pos)}

    def baked(*xs: Any) -> Any:
        full = dict(consts)
        full.update(zip(pos, xs))
        return fn(*[full[i] for i in range(len(operands))])

    baked.__name__ = getattr(fn, "__name__", "body")
    return baked, tuple(operands[i] for i in pos)


@while_loop.py_impl("functionalize")
def _functionalize(mode: Any, cond_fn: Callable, body_fn: Callable, carried: tuple,
                   additional: tuple) -> tuple:
    _no_ints(carried, "under functionalization")
    n = len(carried)
    c, ops = bake_constants(cond_fn, carried + additional, n)
    b, _ = bake_constants(body_fn, carried + additional, n)
    bodies = functional_bodies(mode, [flat_fn(c), flat_fn(b)], "a while_loop body")
    out = while_loop(bodies[0], bodies[1], unwrap_operands(mode, ops[:n]),
                     unwrap_operands(mode, ops[n:]))
    return tuple(pytree.tree_map_only(torch.Tensor, mode.new_base, out))


@while_loop.py_impl("trace")
def _trace(mode: Any, cond_fn: Callable, body_fn: Callable, carried: tuple, additional: tuple) -> tuple:
    tracer = mode.tracer
    if tracer.fake_mode is not None:
        _no_ints(carried, "under fake or symbolic tracing")
    operands = carried + additional
    (gc, gb), all_ops = trace_subgraphs(tracer, [flat_fn(cond_fn), flat_fn(body_fn)], distinct(operands))
    _check_traced_body(gb, carried)
    mark_aten_subgraph(gc)
    mark_aten_subgraph(gb)
    extra = additional + tuple(all_ops[len(operands):])
    out = while_loop(gc, gb, carried, extra)
    nc = tracer.add_subgraph(gc, "while_loop_cond_graph_")
    nb = tracer.add_subgraph(gb, "while_loop_body_graph_")
    tracer.record(while_loop, (nc, nb, tuple(carried), extra), {}, tuple(out), name="while_loop")
    return tuple(out)


def distinct(operands: Sequence[Any]) -> tuple:
    """``operands`` with a repeated tensor replaced by an alias of it.

    NOTE: the tracer maps a tensor to one node; a tensor passed twice (the carry and an
    additional input both ``x``) would make both placeholders one, so the body's trace
    would read the second wherever it reads the first."""
    seen: set = set()
    out = []
    for o in operands:
        if isinstance(o, torch.Tensor):
            if id(o) in seen:
                o = o.view_as(o)
            seen.add(id(o))
        out.append(o)
    return tuple(out)


def _check_traced_body(gb: Any, carried: tuple) -> None:
    out_node = next(n for n in gb.graph.nodes if n.op == "output")
    vals = [a.meta.get("val") if hasattr(a, "meta") else a for a in _as_tuple(out_node.args[0])]
    check_body_outputs(carried, vals)


# --------------------------------------------------------------------------- autograd
def _counted(cond_fn: Callable, body_fn: Callable) -> tuple[Callable, Callable]:
    """The loop with an iteration counter as its first carry."""

    def cond_n(n: torch.Tensor, *xs: Any) -> Any:
        return _pred(cond_fn(*xs))

    def body_n(n: torch.Tensor, *xs: Any) -> tuple:
        return (n + 1, *_as_tuple(body_fn(*xs)))

    return cond_n, body_n


def _replay(body_fn: Callable, k: torch.Tensor, carried: tuple, additional: tuple) -> tuple:
    """The carries after ``k`` iterations of ``body_fn`` from ``carried``."""
    nc = len(carried)

    def cond_k(j: torch.Tensor, *xs: Any) -> torch.Tensor:
        return j < xs[nc]

    def body_k(j: torch.Tensor, *xs: Any) -> tuple:
        return (j + 1, *_as_tuple(body_fn(*xs[:nc], *xs[nc + 1:])))

    j0 = torch.zeros((), dtype=torch.int64, device=k.device)
    return tuple(while_loop(cond_k, body_k, (j0, *carried), (k, *additional))[1:])


class _WhileLoopAutograd(torch.autograd.Function):
    """while_loop recorded for autograd; backward = a while_loop over the body's vjp.

    NOTE: the backward recomputes the carry of iteration k by replaying k iterations
    from the saved inputs (O(n^2) body runs for n iterations) rather than saving every
    iteration's carry: that keeps every shape static (a stack of n carries would have a
    data-dependent size)."""

    @staticmethod
    def forward(ctx, cond_fn, body_fn, n_carried, *operands):
        carried, additional = operands[:n_carried], operands[n_carried:]
        device = next(o.device for o in operands if isinstance(o, torch.Tensor))
        cond_n, body_n = _counted(cond_fn, body_fn)
        n0 = torch.zeros((), dtype=torch.int64, device=device)
        count, *outs = while_loop(cond_n, body_n, (n0, *carried), additional)
        ctx.body_fn = body_fn
        ctx.n_carried = n_carried
        ctx.n_ops = len(operands)
        ctx.tensor_pos = [i for i, o in enumerate(operands) if isinstance(o, torch.Tensor)]
        ctx.consts = {i: o for i, o in enumerate(operands) if not isinstance(o, torch.Tensor)}
        ctx.needs = [isinstance(o, torch.Tensor) and o.requires_grad for o in operands]
        ctx.save_for_backward(count, *[operands[i] for i in ctx.tensor_pos])
        ctx.mark_non_differentiable(*[o for o in outs if isinstance(o, torch.Tensor) and not differentiable(o)])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        count, *tensors = ctx.saved_tensors
        operands: list = [None] * ctx.n_ops
        for i, t in zip(ctx.tensor_pos, tensors):
            operands[i] = t
        for i, c in ctx.consts.items():
            operands[i] = c
        grads_in = _loop_backward(ctx.body_fn, count, tuple(operands), ctx.n_carried, grads)
        return (None, None, None, *[g if need else None for g, need in zip(grads_in, ctx.needs)])


def _loop_backward(body_fn: Callable, count: torch.Tensor, operands: tuple, n_carried: int,
                   grads: tuple) -> list:
    """Gradients of every operand (None where not differentiable) of a loop that ran
    ``count`` iterations, given the gradients of its outputs."""
    carried, additional = operands[:n_carried], operands[n_carried:]
    cmask = [differentiable(c) for c in carried]
    amask = [differentiable(a) for a in additional]
    step = grad_body(body_fn, len(operands), cmask + amask)
    g_carried = tuple(torch.zeros_like(c) if g is None else g.contiguous()
                      for c, g, m in zip(carried, grads, cmask) if m)
    g_add = tuple(torch.zeros_like(a) for a, m in zip(additional, amask) if m)
    ng, na = len(g_carried), len(g_add)

    def cond_b(idx: torch.Tensor, *rest: Any) -> torch.Tensor:
        return idx < rest[ng + na]

    def body_b(idx: torch.Tensor, *rest: Any) -> tuple:
        gc, ga = rest[:ng], rest[ng:ng + na]
        n, ops = rest[ng + na], rest[ng + na + 1:]
        c0, add = ops[:n_carried], ops[n_carried:]
        ck = _replay(body_fn, n - 1 - idx, c0, add)
        it = iter(gc)
        gouts = [next(it) if m else None for m in cmask]
        got = step(*ck, *add, *gouts)
        new_gc, ga_step = got[:ng], got[ng:]
        new_gc = tuple(g.to(c.dtype) for g, c in zip(new_gc, gc))
        return (idx + 1, *new_gc, *[a + b for a, b in zip(ga, ga_step)])

    idx0 = torch.zeros((), dtype=torch.int64, device=count.device)
    out = while_loop(cond_b, body_b, (idx0, *g_carried, *g_add), (count, *operands))
    res = iter(out[1:])
    return [next(res) if m else None for m in cmask + amask]


def _autograd_while_loop(cond_fn: Callable, body_fn: Callable, carried: tuple, additional: tuple) -> tuple:
    return tuple(_WhileLoopAutograd.apply(cond_fn, body_fn, len(carried), *carried, *additional))


__all__ = ["while_loop", "WhileLoop", "check_body_outputs", "distinct", "bake_constants"]
