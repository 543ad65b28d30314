"""torch.func transforms applied to captured subgraphs (the runtime side of capture's
``variables/functorch.py``).

In: a transform kind (``"vmap"``, ``"grad"``, ``"vjp_apply"``, ...), its options (Python
constants: ``in_dims``, ``argnums``, ``has_aux``, ...), templates of the user's call
(argument and output trees: where tensors go, and the constants between them), and at
run time the body subgraph module plus the flat tensors of the call.  Out: the flat
tensor leaves of what ``torch.func.<transform>(f, ...)(*args)`` returns in eager.

Capture records one ``call_function`` node whose target is a function made here
(``make_call``), called as ``target(body_gm, *flat)``: it rebuilds the user's function
``f`` around the body (``user_fn``: the user's pytree of arguments in, the user's pytree
of outputs out) and calls PyTorch's own eager transform on it.  Because functorch's
transforms work at the dispatcher level, tracing that call (make_fx, fake tensors,
functionalization, AOT's joint trace) sees plain ATen ops: nothing here is traced
specially.  The same function run on fake tensors at capture time gives the output
metadata and tree structure (``apply``), so capture and run time share one code path.

``flat`` is: the body's explicit inputs (tensor / SymInt leaves of the call's arguments,
in pytree order), then the body's free inputs (closed-over tensors: constants of ``f``,
never batched or differentiated, as in eager), then the transform's own tensors that are
not arguments of ``f`` (``jvp``'s tangents, the cotangents of a ``vjp_fn`` call).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

LEAF = object()  # NOTE: the place of a traced value (tensor or SymInt) in a template


@dataclass(frozen=True)
class Template:
    """A pytree with traced leaves marked: ``spec`` (pytree.TreeSpec) and, per leaf,
    ``LEAF`` or the constant that stands there."""

    spec: Any
    leaves: tuple

    @staticmethod
    def of(tree: Any) -> "Template":
        leaves, spec = pytree.tree_flatten(tree)
        return Template(spec, tuple(leaves))

    @property
    def n_traced(self) -> int:
        return sum(1 for v in self.leaves if v is LEAF)

    def fill(self, values: Any) -> Any:
        """The tree with its traced leaves taken from ``values`` in order."""
        it = iter(values)
        return pytree.tree_unflatten([next(it) if v is LEAF else v for v in self.leaves], self.spec)

    def traced(self, tree: Any) -> list:
        """The values at the traced leaves of ``tree`` (a tree of this template's structure)."""
        leaves = pytree.tree_leaves(tree)
        return [x for x, v in zip(leaves, self.leaves) if v is LEAF]


# --------------------------------------------------------------------------- transforms
# NOTE: each entry is (fn, opts, args, kwargs, extra) -> what the eager transform returns.
def _curried(name: str) -> Callable:
    """``torch.func.<name>(fn, **opts)(*args, **kwargs)`` (vmap, grad, jacrev, ...): the
    options are passed by name, as the user's call gave them (or their defaults)."""
    def run(fn: Callable, o: dict, args: tuple, kwargs: dict, extra: Any) -> Any:
        return getattr(torch.func, name)(fn, **o)(*args, **kwargs)

    run.__name__ = f"_{name}"
    return run


def _jvp(fn: Callable, o: dict, args: tuple, kwargs: dict, extra: Any) -> Any:
    return torch.func.jvp(fn, args, extra, strict=o["strict"], has_aux=o["has_aux"])


def _vjp_out(fn: Callable, o: dict, args: tuple, kwargs: dict, extra: Any) -> Any:
    # NOTE: vjp's primal output (and aux); its vjp_fn is a separate node (``_vjp_apply``).
    res = torch.func.vjp(fn, *args, has_aux=o["has_aux"])
    return (res[0], res[2]) if o["has_aux"] else res[0]


def _vjp_apply(fn: Callable, o: dict, args: tuple, kwargs: dict, extra: Any) -> Any:
    # NOTE: a call of the vjp_fn of ``vjp(fn, *args)``: the forward runs again here (one
    # node per call keeps each node a pure function of its inputs).
    return torch.func.vjp(fn, *args, has_aux=o["has_aux"])[1](*extra[0], **extra[1])


def _linearize_apply(fn: Callable, o: dict, args: tuple, kwargs: dict, extra: Any) -> Any:
    # NOTE: linearize's jvp_fn(*tangents) is jvp at the same primals.
    return torch.func.jvp(fn, args, extra)[1]


def _call(fn: Callable, o: dict, args: tuple, kwargs: dict, extra: Any) -> Any:
    return fn(*args, **kwargs)


TRANSFORMS: dict = {
    **{k: _curried(k) for k in ("vmap", "grad", "grad_and_value", "jacrev", "jacfwd", "hessian")},
    "jvp": _jvp,
    "vjp_out": _vjp_out,
    "vjp_apply": _vjp_apply,
    "linearize_apply": _linearize_apply,
    "call": _call,
}


# --------------------------------------------------------------------------- the call
@dataclass(frozen=True)
class CallSpec:
    """Everything static about one transform call (fixed at capture time)."""

    kind: str
    opts: tuple          # sorted (name, value) pairs
    call: Template       # (args tuple, kwargs dict) of the user's function
    out: Template        # what the body returns
    n_free: int          # closed-over tensors after the explicit inputs
    extra: Template      # the transform's own tensors (tangents, cotangents), or an empty tuple


def apply(spec: CallSpec, body: Callable, *flat: Any) -> Any:
    """What the eager transform returns (a pytree) for the flat inputs ``flat``."""
    n = spec.call.n_traced
    explicit, free = flat[:n], flat[n:n + spec.n_free]
    if dict(spec.opts).get("detach"):
        # NOTE: linearize's jvp_fn is a graph traced with the primals (and closures) as
        # constants: its result carries no gradient back to them.
        explicit, free = (tuple(_detach(t) for t in part) for part in (explicit, free))
    extra = spec.extra.fill(flat[n + spec.n_free:])
    args, kwargs = spec.call.fill(explicit)

    def user_fn(*a: Any, **k: Any) -> Any:
        outs = body(*spec.call.traced((a, k)), *free)
        return spec.out.fill(outs)

    return TRANSFORMS[spec.kind](user_fn, dict(spec.opts), tuple(args), dict(kwargs), extra)


def _detach(t: Any) -> Any:
    return t.detach() if isinstance(t, torch.Tensor) else t


def result_leaves(res: Any) -> tuple:
    """The tensor leaves of a transform's result, in pytree order (the node's outputs)."""
    return tuple(x for x in pytree.tree_leaves(res) if isinstance(x, torch.Tensor))


def make_call(spec: CallSpec) -> Callable:
    """The graph node's target: ``target(body, *flat) -> tuple`` of result tensors."""
    def run(body: Callable, *flat: Any) -> tuple:
        return result_leaves(apply(spec, body, *flat))

    run.__name__ = run.__qualname__ = f"func_{spec.kind}"
    run.__module__ = __name__
    run.kiln_func_spec = spec
    return run


__all__ = ["LEAF", "Template", "CallSpec", "TRANSFORMS", "apply", "result_leaves", "make_call"]
