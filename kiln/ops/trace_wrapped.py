"""trace_wrapped(*args, fn): call `fn` eagerly, trace it as one opaque node.

Tensor backward hooks run arbitrary Python.  To let them into a compiled
backward graph, a hook is wrapped as ``trace_wrapped(grad, fn=hook)``: in eager
it is just ``fn(grad)``; under tracing it becomes a single node calling a
small ``self_invoke`` function that runs the op again at run time, so the hook
body is never traced (it may not be traceable) yet runs in graph order.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from kiln.ops.base import HigherOrderOperator


class TraceWrapped(HigherOrderOperator):
    def __init__(self) -> None:
        super().__init__("trace_wrapped")

    def check_args(self, *args: Any, fn: Callable = None, **kwargs: Any) -> None:
        if not callable(fn):
            raise TypeError(f"trace_wrapped needs a callable fn=..., got {fn!r}")
        if not args or not all(isinstance(a, torch.Tensor) for a in args):
            raise TypeError("trace_wrapped takes tensor positional arguments")


_trace_wrapped_op = TraceWrapped()


def trace_wrapped(*args: torch.Tensor, fn: Callable) -> Any:
    """Call fn(*args); under kiln tracing, record one opaque node instead."""
    return _trace_wrapped_op(*args, fn=fn)


@_trace_wrapped_op.py_impl("eager")
def _eager(*args: torch.Tensor, fn: Callable) -> Any:
    return fn(*args)


@_trace_wrapped_op.py_impl("fake")
def _fake(*args: torch.Tensor, fn: Callable) -> Any:
    # NOTE: the wrapped function is opaque: its result is assumed to have
    # the first argument's metadata (a hook returns a gradient like its input).
    return torch.empty_like(args[0])


@_trace_wrapped_op.py_impl("trace")
def _trace(mode: Any, *args: torch.Tensor, fn: Callable) -> Any:
    def self_invoke(*runtime_args: torch.Tensor) -> Any:
        with torch.no_grad():
            return _trace_wrapped_op(*runtime_args, fn=fn)

    self_invoke.__module__ = __name__
    # the traced value stands for fn's result without running fn at trace time
    with torch.no_grad():
        out = torch.empty_like(args[0]) if mode.tracer.fake_mode is not None \
            else _trace_wrapped_op(*args, fn=fn)
    mode.tracer.record(self_invoke, args, {}, out, name="trace_wrapped")
    return out


def _inline(*args: torch.Tensor, fn: Callable) -> Any:
    return fn(*args)


# NOTE: kiln's bytecode capture inlines ``_kiln_orig`` in place of a function: a hook
# wrapped in trace_wrapped is traced through (its body joins the captured graph), as in
# a compiled-autograd graph recaptured by kiln.compile; make_fx keeps the opaque node.
trace_wrapped._kiln_orig = _inline
