"""Helpers shared by the HOPs whose arguments are callables run as subgraphs.

``flat_fn(fn)``: ``fn`` returning a pytree -> a function returning a flat tuple of leaves
(the spec of the last call is kept on it).
``trace_subgraphs(tracer, fns, operands)``: each callable traced by kiln's make_fx into
its own GraphModule, all taking the same inputs ``(*operands, *lifted)``, where
``lifted`` are the tensors of the enclosing trace the bodies read (closures).
``functional_bodies(mode, fns)``: each callable wrapped so that running it
functionalizes it on its own (its in-place ops become functional ones).
``grad_body(fn, n, mask)``: the backward of ``fn`` as a callable of
``(*operands, *grad_outputs)`` returning the gradients of the operands in ``mask``.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from kiln import exc


def flat_fn(fn: Callable) -> Callable:
    """``fn`` with its output flattened to a tuple; ``.spec`` holds the last output's spec."""

    def flat(*args: Any) -> tuple:
        out = fn(*args)
        leaves, spec = pytree.tree_flatten(out)
        flat.spec = spec
        return tuple(leaves)

    flat.spec = None
    flat.__name__ = getattr(fn, "__name__", "body")
    return flat


def _sub_mode(tracer: Any) -> str:
    if tracer.fake_mode is None:
        return "real"
    return "symbolic" if tracer.fake_mode.shape_env is not None else "fake"


def trace_subgraphs(tracer: Any, fns: Sequence[Callable], operands: Sequence[Any]) -> tuple[list, tuple]:
    """Trace every fn on ``operands``; returns (graph modules, operands + lifted tensors)."""
    from kiln.tracing import make_fx
    from kiln.tracing.tracer import lifting_from

    gms, lifts = [], []
    for fn in fns:
        if isinstance(fn, fx.GraphModule) and _is_aten_graph(fn):
            gms.append(fn)
            lifts.append([])
            continue
        with lifting_from(tracer) as lifted:
            gm = make_fx(fn, tracing_mode=_sub_mode(tracer))(*operands)
        gms.append(gm)
        lifts.append(list(lifted))
    union: list = []
    for lifted in lifts:
        for t in lifted:
            if all(t is not u for u in union):
                union.append(t)
    if union:
        for gm, lifted in zip(gms, lifts):
            _align_inputs(gm, len(operands), lifted, union, tracer)
    return gms, tuple(operands) + tuple(union)


def _is_aten_graph(gm: fx.GraphModule) -> bool:
    # NOTE: a subgraph kiln's tracer already made (retracing one is a no-op).
    return bool(gm.meta.get("kiln_aten_subgraph"))


def _align_inputs(gm: fx.GraphModule, n_ops: int, lifted: list, union: list, tracer: Any) -> None:
    """Make ``gm`` take ``(*operands, *union)`` (see :func:`align_placeholders`)."""
    def fresh(t: Any, ph: fx.Node) -> None:
        ph.meta["val"] = tracer.meta_val(t)

    align_placeholders(gm.graph, n_ops, lifted, union, "lifted_", fresh)
    gm.recompile()


def align_placeholders(g: fx.Graph, n_keep: int, own: list, union: list, prefix: str,
                       fresh_meta: Callable[[Any, fx.Node], None]) -> None:
    """Rewrite ``g``'s placeholders after the first ``n_keep`` (one per value of ``own``)
    into one per value of ``union``, in its order: a value of ``own`` keeps its uses and
    metadata; a value only other bodies read gets an unused placeholder whose metadata
    ``fresh_meta(value, placeholder)`` sets.  Values are matched by identity."""
    phs = [n for n in g.nodes if n.op == "placeholder"]
    old = dict(zip(map(id, own), phs[n_keep:]))
    anchor = phs[n_keep - 1] if n_keep else None
    for k, t in enumerate(union):
        ctx = g.inserting_after(anchor) if anchor is not None else g.inserting_before(next(iter(g.nodes)))
        with ctx:
            ph = g.placeholder(f"{prefix}{k}")
        prev = old.get(id(t))
        if prev is not None:
            ph.meta = dict(prev.meta)
            prev.replace_all_uses_with(ph)
            g.erase_node(prev)
        else:
            fresh_meta(t, ph)
        anchor = ph


def mark_aten_subgraph(gm: fx.GraphModule) -> fx.GraphModule:
    gm.meta["kiln_aten_subgraph"] = True
    return gm


def functional_bodies(mode: Any, fns: Sequence[Callable], what: str) -> list:
    """Each fn as a callable that functionalizes itself (see module docstring)."""
    from kiln.aot.collect import run_functionalized

    def make(fn: Callable) -> Callable:
        def functional_body(*xs: Any) -> tuple:
            inner, outs = run_functionalized(fn, list(xs), mode.decompositions, None)
            for i, info in enumerate(inner.input_info):
                if info.mutates_data or info.mutates_storage or info.mutates_metadata:
                    raise exc.FunctionalizationError(
                        f"{what} mutates its input {i}",
                        why="the body of a higher-order op must be functional: its writes "
                            "could not be replayed outside it",
                        where=exc.user_location(),
                        hint="clone the input inside the body before writing to it")
            vals = [inner.value_of(o) for o in outs]
            ins = {id(x) for x in xs}
            # NOTE: an output that is an input would alias it; a body's outputs are new tensors.
            return tuple(v.clone() if isinstance(v, torch.Tensor) and id(v) in ins else v for v in vals)

        functional_body.__name__ = getattr(fn, "__name__", "body")
        return functional_body

    return [make(fn) for fn in fns]


def unwrap_operands(mode: Any, operands: Sequence[Any]) -> tuple:
    return tuple(mode.value_of(o) for o in operands)


def differentiable(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and (t.dtype.is_floating_point or t.dtype.is_complex)


def grad_body(fn: Callable, n_ops: int, mask: Sequence[bool]) -> Callable:
    """``(*operands, *grad_outputs) -> grads of the operands flagged in mask`` (zeros where
    the body does not use one), recomputing ``fn``'s forward inside."""

    def backward_body(*args: Any) -> tuple:
        ops, gouts = args[:n_ops], args[n_ops:]
        with torch.enable_grad():
            xs = [o.detach().requires_grad_(m) if isinstance(o, torch.Tensor) else o
                  for o, m in zip(ops, mask)]
            outs = pytree.tree_leaves(fn(*xs))
            pairs = [(o, g) for o, g in zip(outs, gouts)
                     if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
            wrt = [x for x, m in zip(xs, mask) if m]
            if pairs and wrt:
                grads = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                            allow_unused=True)
            else:
                grads = [None] * len(wrt)
        return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(wrt, grads))

    backward_body.__name__ = f"{getattr(fn, '__name__', 'body')}_backward"
    return backward_body


def kiln_mode_on_top() -> bool:
    """A kiln tracing or functionalization mode is the innermost dispatch mode."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    mode = _get_current_dispatch_mode()
    return getattr(mode, "kiln_hop_key", None) in ("trace", "functionalize")


def needs_autograd(operands: Sequence[Any]) -> bool:
    return torch.is_grad_enabled() and any(isinstance(o, torch.Tensor) and o.requires_grad
                                           for o in pytree.tree_leaves(list(operands)))


def check_same_outputs(what: str, names: Sequence[str], outs: Sequence[Sequence[Any]]) -> None:
    """Every branch returns as many values, of the same kind, shape, dtype and device."""
    first = outs[0]
    for name, other in zip(names[1:], outs[1:]):
        if len(other) != len(first):
            raise exc.Unsupported(
                f"{what}: {names[0]} returns {len(first)} values but {name} returns {len(other)}",
                why="both branches must return the same structure",
                hint="make the branches return matching outputs")
        for i, (a, b) in enumerate(zip(first, other)):
            if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
                raise exc.Unsupported(f"{what}: output {i} is a tensor in one branch only",
                                      why="both branches must return the same structure")
            if isinstance(a, torch.Tensor):
                ma = (tuple(a.shape), a.dtype, a.device)
                mb = (tuple(b.shape), b.dtype, b.device)
                if not _same_meta(ma, mb):
                    raise exc.Unsupported(
                        f"{what}: output {i} differs between branches: {_fmt(ma)} vs {_fmt(mb)}",
                        why="both branches must return tensors of the same shape, dtype and device",
                        hint="make the branches return matching outputs")


def _same_meta(a: tuple, b: tuple) -> bool:
    if a[1] != b[1] or a[2] != b[2] or len(a[0]) != len(b[0]):
        return False
    for x, y in zip(a[0], b[0]):
        if isinstance(x, int) and isinstance(y, int) and x != y:
            return False
        if not (isinstance(x, int) and isinstance(y, int)):
            try:
                if bool(x != y):
                    return False
            except Exception:  # noqa: BLE001 - an undecidable symbolic comparison
                return False
    return True


def _fmt(m: tuple) -> str:
    return f"shape={list(m[0])}, dtype={m[1]}, device={m[2]}"
