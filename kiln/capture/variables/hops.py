"""Higher-order ops in capture: PyTorch's entry points routed to kiln's own ops.

In: a call of a function recognised by its qualified name (``torch.cond``,
``torch.ops.higher_order.wrap``, ``torch.utils.checkpoint.checkpoint``, ``torch.while_loop``,
``functorch.experimental.control_flow.map``, ...).  Out: one
graph node calling the kiln op (``kiln.ops.cond``, ``kiln.ops.wrap``,
``kiln.ops.checkpoint``, ...) whose callables are subgraph modules captured by a nested
trace (subgraph.py), with getitem nodes for its outputs; or a graph break with the reason
(a body with side effects or a graph break, branches whose outputs differ).

Tables give ``handler(tx, fn, args, kwargs) -> VT``: ``PUBLIC`` by the public name
of a function (matched by identity with the object that name resolves to, so
``torch.cond`` is recognised however the user reached it), ``HIGHER_ORDER`` by the name
of a ``torch.ops.higher_order`` operator; ``BESIDE_OPERATOR`` names a public function that
lives in the module defining such an operator (``map`` beside ``map_impl``).

Loops: ``torch.while_loop`` becomes ``kiln.ops.while_loop(cond_graph, body_graph, carried,
additional)`` (tensor carries only; the body's outputs must match the carries), ``map``
becomes ``kiln.ops.map_impl(body_graph, xs, args)`` with the body traced on one slice.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Optional

import torch

from kiln.ops.foreign import is_foreign_hop

from ..sources import Source
from .base import VT, ConstantVT, unsupported
from .containers import ListVT, TupleVT
from .dicts import DictVT
from .subgraph import align, attach, rebuild, speculate, tree_leaves, tree_map
from .symbolic import SymNodeVT
from .tensor import TensorVT


class HopFnVT(VT):
    """A PyTorch higher-order entry point; calls go to its handler (``PUBLIC`` / ``HIGHER_ORDER``)."""

    def __init__(self, fn: Any, handler: Callable, source: Optional[Source] = None):
        self.fn = fn
        self.handler = handler
        self.source = source

    def python_type(self) -> type:
        return type(self.fn)

    def truthy(self, tx) -> bool:
        return True

    def call(self, tx, args: list, kwargs: dict) -> VT:
        return self.handler(tx, self.fn, [tx.resolve(a) for a in args],
                            {k: tx.resolve(v) for k, v in kwargs.items()})

    def getattr(self, tx, name: str) -> VT:
        return tx.wrap_static(getattr(self.fn, name))

    def reconstruct(self, cg) -> str:
        return self.source.code() if self.source is not None else cg.obj(self.fn)

    def __repr__(self) -> str:
        return f"HopFnVT({qualified_name(self.fn)})"


def qualified_name(fn: Any) -> str:
    if isinstance(fn, torch._ops.HigherOrderOperator):
        return f"torch.ops.higher_order.{fn.name()}"
    mod = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", "")
    return f"{mod}.{name}"


def handler_for(value: Any) -> Optional[Callable]:
    """The capture handler of ``value`` (None: not a higher-order entry point)."""
    if isinstance(value, torch._ops.HigherOrderOperator):
        return HIGHER_ORDER.get(value.name())
    kiln_handler = _kiln_op_handler(value)
    if kiln_handler is not None:
        return kiln_handler
    entry = _resolved().get(id(value))
    return entry[1] if entry is not None and entry[0] is value else None


def _kiln_op_handler(value: Any) -> Optional[Callable]:
    """The handler of one of kiln's own higher-order ops (``kiln.ops.wrap``, ...) called by user code."""
    from kiln.ops import base as ops_base

    if not isinstance(value, ops_base.HigherOrderOperator):
        return None
    import kiln.ops as kops

    if getattr(kops, value.__name__, None) is not value:
        return None
    return KILN_OPS.get(value.__name__)


def hop_vt(value: Any, source: Optional[Source]) -> Optional[VT]:
    """A HopFnVT when ``value`` is a higher-order entry point kiln captures, else None."""
    if not callable(value) or isinstance(value, type):
        return None
    handler = handler_for(value)
    return None if handler is None else HopFnVT(value, handler, source)


# --------------------------------------------------------------------------- helpers
def _items(v: VT, what: str) -> list:
    if isinstance(v, (TupleVT, ListVT)):
        return list(v.items)
    unsupported(f"{what} must be a tuple or list, got {v}")


def _target(fn: Any, kiln_op: Any) -> Any:
    """The node target of a call of ``fn``: the object itself when it is a PyTorch
    higher-order operator (the graph records what the user called, as PyTorch's does;
    kiln's stages read it as ``kiln_op`` through kiln.ops.foreign), else kiln's op."""
    return fn if is_foreign_hop(fn) else kiln_op


def _emit(tx, op: Any, args: tuple, fakes: list) -> list:
    """One call_function node of ``op``; a VT per output (its getitem)."""
    out = tx.output
    node = out.graph.create_node("call_function", op, args, {})
    vt = out._wrap_result(tuple(fakes), node)
    return list(vt.items) if isinstance(vt, TupleVT) else [vt]


def _fresh(fake: Any) -> Any:
    # NOTE: the op's outputs are new tensors: fresh fakes with the body outputs' metadata.
    if isinstance(fake, torch.Tensor):
        out = torch.empty_strided(fake.shape, fake.stride(), dtype=fake.dtype, device=fake.device)
        return out.requires_grad_(fake.requires_grad) if fake.requires_grad else out
    return fake


def _fakes(tx, sub) -> list:
    with tx.output.fake_mode:
        return [_fresh(f) for f in sub.fakes()]


def _bind(names: tuple, args: list, kwargs: dict, what: str, defaults: dict = None) -> list:
    defaults = defaults or {}
    if len(args) > len(names):
        unsupported(f"{what}() takes {len(names)} arguments but {len(args)} were given")
    bound = dict(zip(names, args))
    for k, v in kwargs.items():
        if k not in names:
            unsupported(f"{what}() got an unexpected keyword argument '{k}'",
                        why=f"{what} takes {', '.join(names)}")
        if k in bound:
            unsupported(f"{what}() got multiple values for argument '{k}'")
        bound[k] = v
    for n in names:
        if n not in bound:
            if n not in defaults:
                unsupported(f"{what}() missing required argument '{n}'")
            bound[n] = defaults[n]
    return [bound[n] for n in names]


def _tag_source(subs: list, name: str, op: Any) -> None:
    """``meta["source_fn_stack"]`` of the bodies' call nodes: ``(name, op)`` of this
    higher-order op in front of what they had (their own ``(node name, target)`` at the
    end), through nested bodies too, as PyTorch records it (``['wrap', 'wrap', 'linear']``)."""
    seen: set = set()
    for sub in subs:
        for mod in sub.gm.modules():
            graph = getattr(mod, "graph", None)
            if not isinstance(graph, torch.fx.Graph) or id(graph) in seen:
                continue
            seen.add(id(graph))
            for node in graph.nodes:
                if not node.op.startswith("call"):
                    continue
                stack = node.meta.get("source_fn_stack") or [(node.name, node.target)]
                node.meta["source_fn_stack"] = [(name, op)] + list(stack)


# --------------------------------------------------------------------------- cond
def _cond(tx, fn: Any, args: list, kwargs: dict) -> VT:
    from kiln.ops import cond as kiln_cond

    pred, true_fn, false_fn, operands = _bind(("pred", "true_fn", "false_fn", "operands"), args, kwargs,
                                              "torch.cond", {"operands": TupleVT([])})
    ops = _items(operands, "torch.cond's operands")
    if isinstance(pred, ConstantVT) or (pred.is_const() and not isinstance(pred, (TensorVT, SymNodeVT))):
        # NOTE: a Python constant predicate specialises on one branch (as PyTorch does).
        branch = true_fn if pred.const() else false_fn
        return branch.call(tx, ops, {})
    if isinstance(pred, TensorVT):
        if pred.fake.numel() != 1:
            unsupported(f"torch.cond: expected pred to be bool or single-element tensor, got shape "
                        f"{list(pred.fake.shape)}")
    elif not isinstance(pred, SymNodeVT):
        unsupported(f"torch.cond: pred must be a tensor, a bool or a SymBool, got {pred}")
    subs = [speculate(tx, true_fn, ops, {}, "torch.cond's true_fn", prefix_names=""),
            speculate(tx, false_fn, ops, {}, "torch.cond's false_fn", prefix_names="")]
    _check_branches(subs)
    op = _target(fn, kiln_cond)
    _tag_source(subs, "cond", op)
    args_nodes = align(subs, subs[0].n_explicit)
    graph = tx.output.graph
    nt = attach(tx.output, graph, subs[0].gm, "cond_true")
    nf = attach(tx.output, graph, subs[1].gm, "cond_false")
    outs = _emit(tx, op, (pred.node, nt, nf, tuple(args_nodes)), _fakes(tx, subs[0]))
    return rebuild(subs[0].out_tree, outs)


def _check_branches(subs: list) -> None:
    a, b = subs
    if _structure(a.out_tree) != _structure(b.out_tree):
        unsupported("torch.cond: the branches return different structures",
                    why=f"true_fn returns {_structure(a.out_tree)}, false_fn returns {_structure(b.out_tree)}",
                    hint="return the same (nested) tuple of tensors from both branches")
    for i, (x, y) in enumerate(zip(a.fakes(), b.fakes())):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            unsupported("torch.cond: a branch returns a SymInt", why="branches must return tensors")
        mx = (list(x.shape), x.dtype, x.device)
        my = (list(y.shape), y.dtype, y.device)
        if mx != my:
            unsupported(f"torch.cond: output {i} differs between the branches: "
                        f"shape={mx[0]}, dtype={mx[1]} vs shape={my[0]}, dtype={my[1]}",
                        why="both branches of torch.cond must return tensors of the same shape, dtype "
                            "and device",
                        hint="make the branches return matching outputs")
    if not a.outputs:
        unsupported("torch.cond: the branches return no tensors",
                    why="torch.cond's branches must return at least one tensor")


def _structure(tree: Any) -> Any:
    if isinstance(tree, int) and not isinstance(tree, bool):
        return "T"
    if isinstance(tree, (TupleVT, ListVT)):
        return (type(tree).__name__, tuple(_structure(i) for i in tree.items))
    if isinstance(tree, DictVT):
        return ("dict", tuple((k, _structure(v)) for k, v in tree.items.items()))
    if isinstance(tree, ConstantVT):
        return ("const", repr(tree.value))
    return repr(tree)


# --------------------------------------------------------------------------- wrap / checkpoint
def _wrap(tx, fn: Any, args: list, kwargs: dict) -> VT:
    from kiln.ops import wrap as kiln_wrap

    if not args:
        unsupported("wrap() needs a callable")
    body, rest = args[0], args[1:]
    sub = speculate(tx, body, rest, kwargs, "wrap", prune=True)
    op = _target(fn, kiln_wrap)
    _tag_source([sub], "wrap", op)
    node = attach(tx.output, tx.output.graph, sub.gm, "wrap_body")
    outs = _emit(tx, op, (node, *sub.args), _fakes(tx, sub))
    return rebuild(sub.out_tree, outs)


_CHECKPOINT_OK = {"use_reentrant", "preserve_rng_state"}


def _checkpoint(tx, fn: Any, args: list, kwargs: dict) -> VT:
    from kiln.ops import checkpoint as kiln_checkpoint

    if not args:
        unsupported("torch.utils.checkpoint.checkpoint() needs a function")
    extra = set(kwargs) - _CHECKPOINT_OK
    if extra:
        unsupported(f"torch.utils.checkpoint.checkpoint with {', '.join(sorted(extra))}",
                    why="kiln's checkpoint region takes only use_reentrant and preserve_rng_state",
                    hint="drop the option, or let this call run eagerly")
    body, rest = args[0], args[1:]
    sub = speculate(tx, body, rest, {}, "torch.utils.checkpoint.checkpoint", prune=True)
    op = _target(fn, kiln_checkpoint)
    _tag_source([sub], "checkpoint", op)
    node = attach(tx.output, tx.output.graph, sub.gm, "wrap_body")
    outs = _emit(tx, op, (node, *sub.args), _fakes(tx, sub))
    return rebuild(sub.out_tree, outs)


# --------------------------------------------------------------------------- while_loop
def _while_loop(tx, fn: Any, args: list, kwargs: dict) -> VT:
    from kiln.ops import while_loop as kiln_while_loop

    names = ("cond_fn", "body_fn", "carried_inputs", "additional_inputs")
    if not isinstance(fn, torch._ops.HigherOrderOperator):
        names = names[:3]  # NOTE: the public torch.while_loop takes no additional_inputs
    bound = _bind(names, args, kwargs, "torch.while_loop", {"additional_inputs": TupleVT([])})
    cond_fn, body_fn, carried = bound[:3]
    additional = bound[3] if len(bound) == 4 else TupleVT([])
    c_items = _items(carried, "torch.while_loop's carried_inputs")
    ops = c_items + _items(additional, "torch.while_loop's additional_inputs")
    for i, c in enumerate(c_items):
        if not isinstance(c, TensorVT):
            unsupported(f"torch.while_loop: carried input {i} is {c}, not a tensor",
                        why="kiln captures loops over tensor carries; an int's value after the loop is "
                            "unknown while tracing",
                        hint="carry it as a 0-d tensor (torch.tensor(n))")
    subs = [speculate(tx, cond_fn, ops, {}, "torch.while_loop's cond_fn"),
            speculate(tx, body_fn, ops, {}, "torch.while_loop's body_fn")]
    _check_loop_pred(subs[0])
    _bare_output(subs[0])
    outs = _check_loop_body(subs[1], c_items)
    op = _target(fn, kiln_while_loop)
    _tag_source(subs, "while_loop", op)
    args_nodes = align(subs, subs[0].n_explicit)
    graph = tx.output.graph
    nc = attach(tx.output, graph, subs[0].gm, "while_loop_cond")
    nb = attach(tx.output, graph, subs[1].gm, "while_loop_body")
    with tx.output.fake_mode:
        fakes = [_like_carry(c.fake, o) for c, o in zip(c_items, outs)]
    n = len(c_items)
    res = _emit(tx, op, (nc, nb, tuple(args_nodes[:n]), tuple(args_nodes[n:])), fakes)
    return TupleVT(res)


def _check_loop_pred(sub) -> None:
    tree = sub.out_tree
    if isinstance(tree, (TupleVT, ListVT)) and len(tree.items) == 1:
        tree = tree.items[0]
    ok = isinstance(tree, int) and not isinstance(tree, bool) and isinstance(sub.outputs[tree], TensorVT)
    if ok:
        p = sub.outputs[tree].fake
        ok = p.dtype == torch.bool and p.numel() == 1
    if not ok:
        unsupported("torch.while_loop: cond_fn must return a boolean scalar tensor",
                    why=f"cond_fn returns {tree}; a loop whose condition is a Python constant either never "
                        "runs or never stops",
                    hint="return a 0-d bool tensor computed from the carried values")


def _bare_output(sub) -> None:
    """The subgraph returns its one output itself, not a 1-tuple.

    NOTE: as PyTorch's graph records while_loop's cond_fn (its eager while_loop refuses a
    tuple predicate; kiln's op takes both)."""
    out = next(n for n in reversed(sub.graph.nodes) if n.op == "output")
    (node,) = out.args[0]
    out.args = (node,)
    sub.gm.recompile()


def _check_loop_body(sub, carried: list) -> list:
    """The body's output fakes, one per carry with its shape, dtype and device."""
    tree = sub.out_tree
    items = list(tree.items) if isinstance(tree, (TupleVT, ListVT)) else [tree]
    if len(items) != len(carried):
        unsupported(f"torch.while_loop: body_fn returns {len(items)} values but there are {len(carried)} "
                    "carried inputs",
                    why="each iteration's outputs are the next iteration's inputs",
                    hint="return one value per carried input from body_fn")
    outs = []
    for i, (c, it) in enumerate(zip(carried, items)):
        o = sub.outputs[it] if isinstance(it, int) and not isinstance(it, bool) else None
        if not isinstance(o, TensorVT):
            unsupported(f"torch.while_loop: body_fn output {i} is {it if o is None else o}, not a tensor",
                        why="each iteration's outputs are the next iteration's inputs")
        mc = (list(c.fake.shape), c.fake.dtype, c.fake.device)
        mo = (list(o.fake.shape), o.fake.dtype, o.fake.device)
        if mc != mo:
            unsupported(f"torch.while_loop: body_fn output {i} has shape={mo[0]}, dtype={mo[1]} but carried "
                        f"input {i} has shape={mc[0]}, dtype={mc[1]}",
                        why="body_fn must return tensors of the same shape, dtype and device as the carried "
                            "inputs (they are the next iteration's inputs)",
                        hint="make body_fn keep the shapes and dtypes of its carried values")
        outs.append(o.fake)
    return outs


def _like_carry(carry: torch.Tensor, body_out: torch.Tensor) -> torch.Tensor:
    from kiln.ops.while_loop import _layout

    # NOTE: every iteration's carry keeps the first one's layout (kiln.ops.while_loop).
    out = torch.empty_strided(carry.shape, _layout(carry), dtype=carry.dtype, device=carry.device)
    return out.requires_grad_(body_out.requires_grad) if body_out.requires_grad else out


# --------------------------------------------------------------------------- map
def _map(tx, fn: Any, args: list, kwargs: dict) -> VT:
    if kwargs:
        unsupported(f"map() got unexpected keyword arguments {', '.join(sorted(kwargs))}",
                    why="map takes map(f, xs, *args)")
    if len(args) < 2:
        unsupported("map() needs a function and the xs to map over")
    f, xs, rest = args[0], args[1], list(args[2:])
    leaves = _mapped_leaves(xs)
    return _map_call(tx, fn, f, leaves, [_sliced(tx, xs)] + rest)


def _map_impl(tx, fn: Any, args: list, kwargs: dict) -> VT:
    f, xs, pos = _bind(("f", "xs", "pos_args"), args, kwargs, "map_impl")
    x_items = _items(xs, "map_impl's xs")
    leaves = _mapped_leaves(TupleVT(x_items))
    sliced = _items(_sliced(tx, TupleVT(x_items)), "map_impl's xs")
    return _map_call(tx, fn, f, leaves, sliced + _items(pos, "map_impl's pos_args"))


def _mapped_leaves(xs: VT) -> list:
    leaves = tree_leaves(xs)
    if not leaves or any(not isinstance(x, TensorVT) for x in leaves) or \
            len(leaves) != _n_leaves(xs):
        unsupported(f"map: the mapped xs can only consist of tensors, got {xs}",
                    why="map slices every leaf of xs along dim 0")
    sizes = [x.fake.shape[0] if x.fake.dim() else None for x in leaves]
    if any(s is None for s in sizes):
        unsupported("map: a mapped tensor is 0-d", why="map slices every leaf of xs along dim 0")
    if any(str(s) != str(sizes[0]) for s in sizes) or str(sizes[0]) == "0":
        unsupported(f"map: leading dimensions of mapped xs must be equal and non-zero, got "
                    f"{[list(x.fake.shape) for x in leaves]}",
                    why="map slices every leaf of xs along dim 0")
    return leaves


def _n_leaves(v: VT) -> int:
    if isinstance(v, (TupleVT, ListVT)):
        return sum(_n_leaves(i) for i in v.items)
    if isinstance(v, DictVT):
        return sum(_n_leaves(i) for i in v.items.values())
    return 1


def _sliced(tx, xs: VT) -> VT:
    """``xs`` with each tensor replaced by one slice along dim 0 (a fresh fake with that
    slice's strides, fed by the whole tensor's node)."""
    def one(x: VT) -> VT:
        t = x.fake
        with tx.output.fake_mode:
            s = torch.empty_strided(t.shape[1:], t.stride()[1:], dtype=t.dtype, device=t.device)
        if t.requires_grad:
            s.requires_grad_(True)
        return TensorVT(x.node, s)

    return tree_map(xs, one)


def _map_call(tx, fn: Any, f: VT, leaves: list, call_args: list) -> VT:
    from kiln.ops import map_impl

    sub = speculate(tx, f, call_args, {}, "map's body")
    op = _target(fn, map_impl)
    _tag_source([sub], "map", op)
    n = len(leaves)
    if not sub.outputs or len(sub.outputs) != _n_leaves(sub.out_tree) or \
            any(not isinstance(o, TensorVT) for o in sub.outputs):
        unsupported(f"map: the body must return tensors, got {sub.out_tree}",
                    why="map stacks every output of its body along a new dim 0")
    body = attach(tx.output, tx.output.graph, sub.gm, "map_body")
    batch = leaves[0].fake.shape[0]
    with tx.output.fake_mode:
        fakes = [torch.empty((batch, *o.shape), dtype=o.dtype, device=o.device) for o in sub.fakes()]
    fakes = [t.requires_grad_(True) if o.requires_grad else t for t, o in zip(fakes, sub.fakes())]
    outs = _emit(tx, op, (body, tuple(sub.args[:n]), tuple(sub.args[n:])), fakes)
    return rebuild(sub.out_tree, outs)


# --------------------------------------------------------------------------- table
PUBLIC: dict = {
    "torch.cond": _cond,
    "torch.utils.checkpoint.checkpoint": _checkpoint,
    "torch.while_loop": _while_loop,
}
from .functorch import PUBLIC as _FUNCTORCH_PUBLIC  # noqa: E402 - torch.func transforms (functorch.py)

PUBLIC.update(_FUNCTORCH_PUBLIC)
HIGHER_ORDER: dict = {
    "cond": _cond,
    "wrap": _wrap,
    "tag_activation_checkpoint": _checkpoint,
    "while_loop": _while_loop,
    "map_impl": _map_impl,
}
# kiln's own ops, by name, when user code calls them (``kiln.ops.wrap(body, x)``)
KILN_OPS: dict = {
    "cond": _cond,
    "wrap": _wrap,
    "checkpoint": _checkpoint,
    "while_loop": _while_loop,
    "map_impl": _map_impl,
}
# NOTE: a public function living beside a torch.ops.higher_order operator, found through
# the module that defines the operator's class (map's own module has no public path).
BESIDE_OPERATOR: dict = {
    ("map_impl", "map"): _map,
}
_RESOLVED: dict = {}   # id(object) -> (object, handler), from PUBLIC's names


def _resolved() -> dict:
    if not _RESOLVED:
        for name, handler in PUBLIC.items():
            mod, _, attr = name.rpartition(".")
            try:
                obj = getattr(importlib.import_module(mod), attr)
            except (ImportError, AttributeError):  # NOTE: a torch without that entry point
                continue
            _RESOLVED[id(obj)] = (obj, handler)
        for (op_name, attr), handler in BESIDE_OPERATOR.items():
            obj = _beside_operator(op_name, attr)
            if obj is not None:
                _RESOLVED[id(obj)] = (obj, handler)
    return _RESOLVED


def _beside_operator(op_name: str, attr: str) -> Any:
    import sys

    try:
        op = getattr(torch.ops.higher_order, op_name)
    except (AttributeError, RuntimeError):  # NOTE: a torch without that operator
        return None
    mod = sys.modules.get(type(op).__module__)
    return getattr(mod, attr, None) if mod is not None else None


__all__ = ["HopFnVT", "hop_vt", "handler_for", "qualified_name", "PUBLIC", "HIGHER_ORDER", "BESIDE_OPERATOR"]
