"""register_hook(tensor, body, *free): a backward hook on an intermediate tensor, in a graph.

In:  a tensor made inside a captured graph, the hook's body as a graph module
     ``body(grad, *free) -> ()`` (the hook returned None) or ``-> (new_grad,)``, and the
     values of the enclosing graph the body reads (``free``).
Out: the same tensor, with the hook registered on it (when it requires grad: under
     no_grad nothing can reach it).

Running the captured graph eagerly registers a real hook.  Tracing it with AOT (the
joint forward+backward trace) registers the hook on the traced tensor, so it fires
while the backward is traced and the body's ops become part of the backward graph, in
the place eager's autograd runs the hook (PyTorch records the same with its
``register_hook`` higher-order op).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx


class GraphHook:
    """The hook registered on the tensor: runs ``body(grad, *free)``."""

    __slots__ = ("body", "free")

    def __init__(self, body: Callable, free: tuple):
        self.body = body
        self.free = free

    def __call__(self, grad: torch.Tensor) -> Any:
        out = self.body(grad, *self.free)
        return out[0] if out else None


def register_hook(tensor: torch.Tensor, body: Callable, *free: Any) -> torch.Tensor:
    """Register ``body`` as a backward hook of ``tensor``; returns ``tensor``."""
    if tensor.requires_grad:
        tensor.register_hook(GraphHook(body, free))
    return tensor


# NOTE: its result may go unused (the hook still has to be registered).
fx.node._side_effectful_functions.add(register_hook)

__all__ = ["register_hook", "GraphHook"]
