"""``Tensor.register_hook`` on a tensor made inside the compiled region, kept in the graph.

In:  the TensorVT of an intermediate tensor (no source) and the hook's VT.
Out: a ``kiln.ops.register_hook.register_hook(tensor, body, *free)`` node; the tensor's
     VT now stands for that node's result, so every later use (and the graph output)
     is the hooked tensor.  The hook's body is captured as a subgraph taking the
     gradient (plus what it reads from the enclosing graph), traced with autocast off,
     as autograd runs it in a backward called outside autocast regions.

A hook capture cannot trace as one graph (a print, a Python side effect such as
appending the gradient to a list, data-dependent code) or one that would fail in
eager (a tensor that does not require grad, a hook returning something other than
None or a tensor like the gradient) is a graph break with the reason: then the hook
is registered by eager code on the graph's output, which is just as correct.
"""
from __future__ import annotations

import torch

from kiln.exc import Unsupported
from kiln.ops.register_hook import register_hook

from .base import VT, ConstantVT, unsupported
from .tensor import TensorVT


class GraphHookHandleVT(VT):
    """The RemovableHandle of a hook registered inside the graph: it exists only there."""

    def call_method(self, tx, name: str, args: list, kwargs: dict) -> VT:
        unsupported(f"RemovableHandle.{name}() of a hook registered inside the compiled region",
                    why="the hook is part of the graph; its handle is not a Python object here")

    def getattr(self, tx, name: str) -> VT:
        unsupported(f"attribute {name} of the handle of a hook registered inside the compiled region")

    def reconstruct(self, cg) -> str:
        unsupported("the handle of a hook registered inside the compiled region leaves it",
                    why="the hook is part of the graph; its handle is not a Python object here")


def _trace_body(tx, tensor: TensorVT, hook: VT):
    from .subgraph import speculate

    out = tx.output
    with out.fake_mode:
        grad = torch.empty_like(tensor.fake, memory_format=torch.contiguous_format)
    # NOTE: autograd runs the hook in the backward, where (PyTorch's AMP recipe) no autocast
    # region is active; kiln traces the backward with autocast off too.
    with torch._C._DisableAutocast():
        try:
            return speculate(tx, hook, [TensorVT(tensor.node, grad)], {}, "Tensor.register_hook")
        except Unsupported as e:
            unsupported(f"Tensor.register_hook on an intermediate tensor: the hook cannot be traced "
                        f"({e.what})",
                        why="the hook runs eagerly instead, registered on the graph's output",
                        hint="keep hooks free of prints and Python side effects to keep them in the graph")


def _check_result(sub, tensor: TensorVT) -> None:
    tree = sub.out_tree
    if isinstance(tree, ConstantVT) and tree.value is None:
        return
    fakes = sub.fakes()
    ok = isinstance(tree, int) and not isinstance(tree, bool) and len(fakes) == 1 \
        and isinstance(fakes[0], torch.Tensor) and fakes[0].shape == tensor.fake.shape \
        and fakes[0].dtype == tensor.fake.dtype
    if not ok:
        unsupported("Tensor.register_hook: the hook returns something other than None or a "
                    "gradient like its input", why="eager raises when the hook runs")


def register_intermediate_hook(tx, tensor: TensorVT, hook: VT) -> VT:
    """``tensor.register_hook(hook)`` for a tensor made in the graph (see module docstring)."""
    from .subgraph import attach

    if not tensor.fake.requires_grad:
        unsupported("Tensor.register_hook on a tensor that does not require grad",
                    why="eager raises: cannot register a hook on a tensor that doesn't require gradient")
    sub = _trace_body(tx, tensor, hook)
    _check_result(sub, tensor)
    out = tx.output
    body = attach(out, out.graph, sub.gm, "hook_body")
    node = out.graph.call_function(register_hook, (tensor.node, body, *sub.args[sub.n_explicit:]))
    node.meta["example_value"] = tensor.fake
    tensor.node = node
    return GraphHookHandleVT()


__all__ = ["register_intermediate_hook", "GraphHookHandleVT"]
