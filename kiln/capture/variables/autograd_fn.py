"""``MyFunction.apply(...)`` of a ``torch.autograd.Function`` subclass in captured code.

In: the class and the call's argument VTs.  Out: the call's result VT.

When gradients are needed (grad mode on and a tensor argument requires grad), the
Function's ``forward`` is traced into a subgraph ``fwd_body_N`` and its ``backward`` into
``bwd_body_N`` (nested traces, variables/subgraph.py), and the graph gets one node
``kiln.ops.autograd_function_apply(fwd_body_N, bwd_body_N, *operands,
non_differentiable_idx=[...])`` with a getitem per output, as PyTorch's capture records its
own ``autograd_function_apply``; AOT autograd then compiles the forward and the user's
backward (kiln/ops/autograd_function.py).  The ``ctx`` both bodies see is a
:class:`AutogradCtxVT`: ``save_for_backward``, attributes set in forward (constants or
tensors), ``needs_input_grad`` (constants: the arguments' requires_grad), ``saved_tensors``,
``mark_non_differentiable``.  The forward returns ``(outputs, saved)``: ``saved`` are the
values of the forward that the backward reads, whatever way they reached it; the backward
takes ``(*grad_outputs, *saved)`` and returns one gradient per operand.

Without gradients, or when the capture cannot do it (a graph break or data-dependent
Python in either body, ``ctx.mark_dirty``, ``set_materialize_grads(False)``,
side effects in a body...), the call stays one opaque node calling ``cls.apply``, which
runs the Function eagerly; the reason is recorded (``kiln.fallbacks``).  A failed attempt
may have left state behind it (inputs, guards, side effects of the half-traced body), so
it restarts the frame's capture (:class:`RecaptureFrame`) with the class marked opaque.
"""
from __future__ import annotations

import inspect
import types
from typing import Any, Optional

import torch
import torch.fx as fx

from kiln.exc import KilnError, Unsupported

from .base import VT, ConstantVT, unsupported
from .containers import ListVT, TupleVT
from .subgraph import attach, speculate, tree_leaves
from .tensor import TensorVT


class RecaptureFrame(KilnError):
    """Capture the frame again from its start: a Function's capture failed half-way and is
    now marked to run as one opaque call."""


class AutogradApplyVT(VT):
    """``cls.apply`` of a ``torch.autograd.Function`` subclass."""

    def __init__(self, cls: type):
        self.cls = cls

    def python_type(self) -> type:
        return types.MethodType

    def call(self, tx, args: list, kwargs: dict) -> VT:
        args = [tx.resolve(a) for a in args]
        kwargs = {k: tx.resolve(v) for k, v in kwargs.items()}
        opaque = _opaque_classes(tx)
        if self.cls not in opaque and _training(tx, args):
            why = _refusal(self.cls, kwargs)
            if why is None:
                try:
                    return capture_apply(tx, self.cls, args)
                except Unsupported as e:
                    why = f"{e.what}" + (f" ({e.why})" if e.why else "")
                opaque[self.cls] = why
                _record(self.cls, why)
                raise RecaptureFrame(f"{self.cls.__name__}.apply runs as one opaque call")
            if not kwargs:  # NOTE: keyword arguments refuse this call, not the class
                opaque[self.cls] = why
            _record(self.cls, why)
        return _opaque_call(tx, self.cls, args, kwargs)

    def getattr(self, tx, name: str) -> VT:
        return tx.wrap_static(getattr(self.cls.apply, name))

    def reconstruct(self, cg) -> str:
        from .callables import autograd_apply

        return cg.obj(autograd_apply(self.cls))

    def __repr__(self) -> str:
        return f"AutogradApplyVT({self.cls.__name__})"


def is_function_apply(value: Any) -> bool:
    """``value`` is ``cls.apply`` bound to a ``torch.autograd.Function`` subclass."""
    return isinstance(value, types.MethodType) and isinstance(value.__self__, type) \
        and issubclass(value.__self__, torch.autograd.Function) \
        and value.__func__ is torch.autograd.Function.apply.__func__


def _opaque_call(tx, cls: type, args: list, kwargs: dict) -> VT:
    from .callables import autograd_apply
    from .torch_fns import call_torch

    return call_torch(tx, autograd_apply(cls), args, kwargs)


def _opaque_classes(tx) -> dict:
    # NOTE: kept on the compile context: a class that failed once stays opaque for its
    # later frames and recompiles (its reason is recorded once).
    return tx.output.ctx.__dict__.setdefault("opaque_autograd_functions", {})


def _record(cls: type, why: str) -> None:
    from kiln.fallbacks import record_fallback

    from .. import stats

    record_fallback("capture", f"{cls.__qualname__}.apply (runs as one opaque call)", why)
    # NOTE: counted as a graph break, as PyTorch's capture counts a Function it falls back on.
    stats.graph_break(why)


def _training(tx, args: list) -> bool:
    return tx.output.grad_enabled and any(isinstance(a, TensorVT) and a.fake.requires_grad for a in args)


def _overrides(cls: type, name: str) -> bool:
    """``cls`` (or a class between it and torch.autograd.Function) defines ``name``."""
    bases = set(torch.autograd.Function.__mro__)
    return any(name in vars(k) for k in cls.__mro__ if k not in bases)


def _refusal(cls: type, kwargs: dict) -> Optional[str]:
    """Why ``cls`` cannot be captured before trying (None: try)."""
    if kwargs:
        return "keyword arguments to apply are not captured"
    if not _overrides(cls, "forward") or not _overrides(cls, "backward"):
        return "the Function does not define both forward and backward"
    names = ("forward", "backward", "setup_context") if _overrides(cls, "setup_context") else ("forward", "backward")
    for name in names:
        if not isinstance(inspect.getattr_static(cls, name), staticmethod):
            return f"{name} is not a staticmethod"
    return None


# --------------------------------------------------------------------------- ctx
_CTX_METHODS = ("save_for_backward", "mark_non_differentiable", "mark_dirty", "set_materialize_grads",
                "save_for_forward")


class AutogradCtxVT(VT):
    """The ``ctx`` of a captured Function call (see module docstring)."""

    def __init__(self, needs_input_grad: tuple):
        self.attrs: dict = {}
        self.saved: Optional[list] = None
        self.non_differentiable: list = []
        self.needs_input_grad = needs_input_grad

    def python_type(self) -> type:
        return torch.autograd.function.FunctionCtx

    def getattr(self, tx, name: str) -> VT:
        if name in self.attrs:
            return self.attrs[name]
        if name in ("saved_tensors", "saved_variables"):
            return TupleVT(list(self.saved or []))
        if name == "needs_input_grad":
            return TupleVT([ConstantVT(b) for b in self.needs_input_grad])
        if name in _CTX_METHODS:
            return _CtxMethodVT(self, name)
        unsupported(f"ctx.{name} of a captured autograd.Function",
                    why="only save_for_backward, saved_tensors, needs_input_grad, mark_non_differentiable "
                        "and attributes set in forward are modelled")

    def setattr(self, tx, name: str, value: VT) -> None:
        if name in _CTX_METHODS or name in ("saved_tensors", "needs_input_grad", "saved_variables") \
                or name.startswith("_"):
            unsupported(f"setting ctx.{name} of a captured autograd.Function")
        self.attrs[name] = value

    def __repr__(self) -> str:
        return "AutogradCtxVT"


class _CtxMethodVT(VT):
    def __init__(self, ctx: AutogradCtxVT, name: str):
        self.ctx = ctx
        self.name = name

    def call(self, tx, args: list, kwargs: dict) -> VT:
        ctx, name = self.ctx, self.name
        args = [tx.resolve(a) for a in args]
        if kwargs:
            unsupported(f"ctx.{name} with keyword arguments")
        if name == "save_for_backward":
            for a in args:
                if not isinstance(a, TensorVT) and not (isinstance(a, ConstantVT) and a.value is None):
                    unsupported(f"ctx.save_for_backward of {a}", why="save_for_backward takes tensors or None")
            ctx.saved = list(args)
            return ConstantVT(None)
        if name == "mark_non_differentiable":
            if any(not isinstance(a, TensorVT) for a in args):
                unsupported("ctx.mark_non_differentiable of a non-tensor")
            ctx.non_differentiable.extend(args)
            return ConstantVT(None)
        if name == "set_materialize_grads" and len(args) == 1 and args[0].is_const() and args[0].const():
            return ConstantVT(None)
        unsupported(f"ctx.{name}() in a captured autograd.Function",
                    why="in-place forwards (mark_dirty), unmaterialized grads and forward-mode AD are not "
                        "captured")


# --------------------------------------------------------------------------- capture
class _NameOnly:
    """Stands for the node of a body argument that has none outside (a grad output): its name."""

    def __init__(self, name: str):
        self.name = name


def _grad_mode(out, mode: bool):
    import contextlib

    @contextlib.contextmanager
    def switch():
        # NOTE: no graph node: autograd runs a Function's forward (and a backward without
        # create_graph) with grad off; only the bodies' fake values need it.
        before = out.grad_enabled
        out.grad_enabled = mode
        torch._C._set_grad_enabled(mode)
        try:
            yield
        finally:
            out.grad_enabled = before
            torch._C._set_grad_enabled(before)

    return switch()


def _unwrap_backward(fn: Any) -> Any:
    """The user's backward under ``@once_differentiable``.

    NOTE: the wrapper runs it under no_grad and, with grad off (a backward without
    create_graph, as the captured one runs), returns its outputs as they are."""
    wrapped = getattr(fn, "__wrapped__", None)
    code = getattr(fn, "__code__", None)
    if wrapped is not None and code is not None and code is _ONCE_CODE:
        return wrapped
    return fn


def _once_code() -> Any:
    from torch.autograd.function import once_differentiable

    return once_differentiable(lambda ctx: None).__code__


_ONCE_CODE = _once_code()


def capture_apply(tx, cls: type, args: list) -> VT:
    """Trace ``cls.forward`` and ``cls.backward`` and emit the ``autograd_function_apply``
    node (see module docstring); raises Unsupported when either body cannot be captured."""
    out = tx.output
    needs = tuple(isinstance(a, TensorVT) and a.fake.requires_grad for a in args)
    ctx = AutogradCtxVT(needs)
    name = cls.__name__
    body = _SetupContextForwardVT(cls) if _overrides(cls, "setup_context") else tx.wrap_static(cls.forward)
    with _grad_mode(out, False):
        fwd = speculate(tx, body, [ctx] + list(args), {}, f"{name}.forward")
    outs = _forward_outputs(fwd, name)
    non_diff = [i for i, o in enumerate(outs) if any(o.node is m.node for m in ctx.non_differentiable)]
    grads = _grad_inputs(tx, cls, fwd, outs)
    with _grad_mode(out, False):
        bwd = speculate(tx, tx.wrap_static(_unwrap_backward(cls.backward)), [ctx] + grads, {},
                        f"{name}.backward")
    n_grads = sum(isinstance(g, TensorVT) for g in grads)
    saved = _wire_saved(fwd, bwd, n_grads)
    # NOTE: an input returned as it is needs nothing here: the op's autograd.Function
    # returns it as a view, by the same rule as the user's Function in eager.
    _set_output(fwd.graph, (tuple(o.node for o in outs), tuple(saved)))
    _set_output(bwd.graph, tuple(_grads_per_operand(bwd, args, name, len(fwd.args))))
    fwd.gm.recompile()
    bwd.gm.recompile()
    graph = out.graph
    nf = attach(out, graph, fwd.gm, "fwd_body")
    nb = attach(out, graph, bwd.gm, "bwd_body")
    node = graph.create_node("call_function", _kiln_op(), (nf, nb, *fwd.args),
                             {"non_differentiable_idx": non_diff})
    vt = out._wrap_result(_example_outputs(out, fwd, bwd, non_diff), node)
    items = list(vt.items) if isinstance(vt, TupleVT) else [vt]
    return _rebuild(fwd.out_tree, items)


class _SetupContextForwardVT(VT):
    """``(ctx, *args) -> forward(*args)``, then ``setup_context(ctx, args, output)``: a Function
    written with setup_context, as one body (autograd runs both under the forward's grad mode)."""

    def __init__(self, cls: type):
        self.cls = cls

    def call(self, tx, args: list, kwargs: dict) -> VT:
        ctx, rest = args[0], list(args[1:])
        output = tx.wrap_static(self.cls.forward).call(tx, rest, kwargs)
        tx.wrap_static(self.cls.setup_context).call(tx, [ctx, TupleVT(rest), output], {})
        return output


def _kiln_op() -> Any:
    from kiln.ops import autograd_function_apply

    return autograd_function_apply


def _forward_outputs(fwd, name: str) -> list:
    """The forward's tensor outputs (a tensor, or a flat tuple of tensors and constants)."""
    tree = fwd.out_tree
    items = [tree] if _is_index(tree) else list(tree.items) if type(tree) is TupleVT else None
    if items is None or not all(_is_index(i) or isinstance(i, ConstantVT) for i in items):
        unsupported(f"{name}.forward returns {tree}",
                    why="kiln captures a forward returning a tensor or a flat tuple of tensors and constants")
    for o in fwd.outputs:
        if not isinstance(o, TensorVT):
            unsupported(f"{name}.forward returns a SymInt", why="a Function's traced outputs are tensors here")
    if not fwd.outputs:
        unsupported(f"{name}.forward returns no tensor")
    return list(fwd.outputs)


def _is_index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _grad_inputs(tx, cls: type, fwd, outs: list) -> list:
    """One VT per forward output for the backward: a fresh tensor (named after backward's
    parameter) for a tensor output, None for a constant."""
    tree = fwd.out_tree
    items = [tree] if _is_index(tree) else list(tree.items)
    names = _param_names(_unwrap_backward(cls.backward))
    res = []
    with tx.output.fake_mode:
        for k, it in enumerate(items):
            if not _is_index(it):
                res.append(ConstantVT(None))
                continue
            fake = outs[it].fake
            g = torch.empty_strided(fake.shape, fake.stride(), dtype=fake.dtype, device=fake.device)
            # NOTE: autograd may hand the backward a gradient of any layout: its strides are unknown.
            tx.output.__dict__.setdefault("layout_unknown", {})[id(g)] = g
            label = names[k] if k < len(names) else f"grad_out_{k}"
            res.append(TensorVT(_NameOnly(label), g))
    return res


def _param_names(fn: Any) -> list:
    try:
        params = list(inspect.signature(fn).parameters.values())[1:]
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _wire_saved(fwd, bwd, n_grads: int) -> list:
    """The forward's nodes the backward reads (its placeholders after the grads), in order;
    a value from outside both bodies becomes an input of the forward first."""
    saved = []
    fwd_ins = dict(zip(map(id, fwd.args), [n for n in fwd.graph.nodes if n.op == "placeholder"]))
    for a in bwd.args[n_grads:]:
        if isinstance(a, fx.Node) and a.graph is fwd.graph:
            saved.append(a)
            continue
        if not isinstance(a, fx.Node):
            unsupported("the backward reads a value the forward cannot hand over")
        ph = fwd_ins.get(id(a))
        if ph is None:
            ph = _append_placeholder(fwd.graph, f"{a.name}", a.meta.get("example_value"))
            fwd.args.append(a)
            fwd_ins[id(a)] = ph
        saved.append(ph)
    return saved


def _append_placeholder(g: fx.Graph, name: str, example: Any) -> fx.Node:
    phs = [n for n in g.nodes if n.op == "placeholder"]
    ctx = g.inserting_after(phs[-1]) if phs else g.inserting_before(next(iter(g.nodes)))
    with ctx:
        ph = g.placeholder(name)
    ph.target = ph.name
    ph.meta["example_value"] = example
    return ph


def _set_output(g: fx.Graph, value: Any) -> None:
    out_node = next(n for n in reversed(g.nodes) if n.op == "output")
    out_node.args = (value,)


def _grads_per_operand(bwd, args: list, name: str, n_operands: int) -> list:
    """The backward's gradients, one per forward operand (placeholder of the forward):
    the gradient of a top-level tensor argument, None for everything else."""
    out_node = next(n for n in reversed(bwd.graph.nodes) if n.op == "output")
    leaves = list(out_node.args[0])
    tree = bwd.out_tree
    items = list(tree.items) if isinstance(tree, (TupleVT, ListVT)) else [tree]
    while len(items) > len(args) and isinstance(items[-1], ConstantVT) and items[-1].value is None:
        items = items[:-1]  # NOTE: autograd drops extra gradients when they are all None
    if len(items) != len(args):
        unsupported(f"{name}.backward returns {len(items)} gradients for {len(args)} inputs",
                    why="autograd raises for this; the Function runs eagerly so that it does")
    res = []
    for arg, item in zip(args, items):
        n = len(tree_leaves(arg))
        grad = leaves[item] if _is_index(item) else None
        if grad is not None and not isinstance(arg, TensorVT):
            unsupported(f"{name}.backward returns a gradient for a non-tensor input",
                        why="autograd raises for this; the Function runs eagerly so that it does")
        if not _is_index(item) and not (isinstance(item, ConstantVT) and item.value is None):
            unsupported(f"{name}.backward returns {item} as a gradient")
        res.extend([grad] if isinstance(arg, TensorVT) else [None] * n)
    return res + [None] * (n_operands - len(res))


def _example_outputs(out, fwd, bwd, non_diff: list) -> tuple:
    """The op run on the operands' fake values: outputs with the metadata autograd gives a
    Function's outputs (non-leaf, requires_grad unless marked, views of returned inputs)."""
    vals = []
    for a in fwd.args:
        if not isinstance(a, fx.Node) or "example_value" not in a.meta:
            unsupported(f"an operand of the captured Function has no fake value ({a})")
        vals.append(a.meta["example_value"])
    with out.fake_mode:
        return tuple(_kiln_op()(fwd.gm, bwd.gm, *vals, non_differentiable_idx=non_diff))


def _rebuild(tree: Any, items: list) -> VT:
    if _is_index(tree):
        return items[tree]
    return TupleVT([items[i] if _is_index(i) else i for i in tree.items])


__all__ = ["AutogradApplyVT", "AutogradCtxVT", "RecaptureFrame", "capture_apply", "is_function_apply"]
