"""Higher-order ops in capture: PyTorch's entry points routed to kiln's own ops.

In: a call of a function recognised by its qualified name (``torch.cond``,
``torch.ops.higher_order.wrap``, ``torch.utils.checkpoint.checkpoint``, ...).  Out: one
graph node calling the kiln op (``kiln.ops.cond``, ``kiln.ops.wrap``,
``kiln.ops.checkpoint``, ...) whose callables are subgraph modules captured by a nested
trace (subgraph.py), with getitem nodes for its outputs; or a graph break with the reason
(a body with side effects or a graph break, branches whose outputs differ).

Two tables give ``handler(tx, fn, args, kwargs) -> VT``: ``PUBLIC`` by the public name
of a function (matched by identity with the object that name resolves to, so
``torch.cond`` is recognised however the user reached it), ``HIGHER_ORDER`` by the name
of a ``torch.ops.higher_order`` operator.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Optional

import torch

from ..sources import Source
from .base import VT, ConstantVT, unsupported
from .containers import ListVT, TupleVT
from .dicts import DictVT
from .subgraph import align, attach, rebuild, speculate
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
    entry = _resolved().get(id(value))
    return entry[1] if entry is not None and entry[0] is value else None


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
    args_nodes = align(subs, subs[0].n_explicit)
    graph = tx.output.graph
    nt = attach(tx.output, graph, subs[0].gm, "cond_true")
    nf = attach(tx.output, graph, subs[1].gm, "cond_false")
    outs = _emit(tx, kiln_cond, (pred.node, nt, nf, tuple(args_nodes)), _fakes(tx, subs[0]))
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
    node = attach(tx.output, tx.output.graph, sub.gm, "wrap_body")
    outs = _emit(tx, kiln_wrap, (node, *sub.args), _fakes(tx, sub))
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
    node = attach(tx.output, tx.output.graph, sub.gm, "wrap_body")
    outs = _emit(tx, kiln_checkpoint, (node, *sub.args), _fakes(tx, sub))
    return rebuild(sub.out_tree, outs)


# --------------------------------------------------------------------------- table
PUBLIC: dict = {
    "torch.cond": _cond,
    "torch.utils.checkpoint.checkpoint": _checkpoint,
}
HIGHER_ORDER: dict = {
    "cond": _cond,
    "wrap": _wrap,
    "tag_activation_checkpoint": _checkpoint,
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
    return _RESOLVED


__all__ = ["HopFnVT", "hop_vt", "handler_for", "qualified_name", "PUBLIC", "HIGHER_ORDER"]
