"""``torch.autograd.graph.disable_saved_tensors_hooks(msg)``: as a with-block or a decorator.

In: a call of it in the region (a constant message).  Out: graph nodes
``torch._C._autograd._saved_tensors_hooks_disable(msg)`` where the region disables the hooks
and ``_saved_tensors_hooks_enable()`` / ``_saved_tensors_hooks_disable(prev)`` where it
restores the message it found, in PyTorch's order: a with-block disables on entry, a
decorator when it decorates (and again on each later call) and restores after each call.

Invariants: the message in force when the frame starts is read while tracing and guarded
(``CONSTANT_MATCH`` on ``_saved_tensors_hooks_get_disabled_error_message()``); what the
region leaves in force is set again by the generated code after the graph (see
``replay_after_graph``), so it does not depend on a backend running these nodes (AOT drops
them, as in PyTorch).  Nothing is switched for real while tracing.
"""
from __future__ import annotations

import contextlib
import types
from typing import Optional

import torch

from .base import VT, ConstantVT, unsupported

_get = torch._C._autograd._saved_tensors_hooks_get_disabled_error_message
_disable = torch._C._autograd._saved_tensors_hooks_disable
_enable = torch._C._autograd._saved_tensors_hooks_enable


def _current(tx) -> Optional[str]:
    """The message in force at this point of the trace (the frame's, guarded, at first)."""
    out = tx.output
    if "saved_hooks_initial" not in out.__dict__:
        from ..sources import CallSource, ObjectSource

        initial = _get()
        out.saved_hooks_initial = out.saved_hooks_message = initial
        src = CallSource(ObjectSource(out.objects.name_of(_get), "torch._C._autograd._saved_tensors_hooks_get_"
                                                                 "disabled_error_message"))
        out.guards.const(src, initial)
    return out.saved_hooks_message


def _switch(tx, message: Optional[str]) -> None:
    """A graph node that puts ``message`` in force (None: the hooks enabled again)."""
    _current(tx)
    if message is None:
        node = tx.output.graph.call_function(_enable, ())
    else:
        node = tx.output.graph.call_function(_disable, (message,))
    node.meta["stack_trace"] = None  # NOTE: none, as PyTorch makes this node
    tx.output.saved_hooks_message = message


def apply_message(message: Optional[str]) -> None:
    """Put ``message`` in force (None: enabled); run by the generated code."""
    if message is None:
        _enable()
    else:
        _disable(message)


def replay_after_graph(out, cg) -> None:
    """After the graph: the message the region left in force, if it changed it."""
    if "saved_hooks_initial" in out.__dict__ and out.saved_hooks_message != out.saved_hooks_initial:
        cg.line(f"{cg.obj(apply_message)}({out.saved_hooks_message!r})")


class SavedHooksDisabledVT(VT):
    """The object ``disable_saved_tensors_hooks(msg)`` made in the region."""

    def __init__(self, message: str):
        self.message = message
        self.prev: Optional[str] = None
        self.entered = False

    def python_type(self) -> type:
        return contextlib._GeneratorContextManager

    def enter(self, tx) -> None:
        if self.entered:
            unsupported("entering disable_saved_tensors_hooks twice", why="eager raises RuntimeError")
        self.prev = _current(tx)
        _switch(tx, self.message)
        self.entered = True

    def exit(self, tx) -> None:
        if not self.entered:
            unsupported("__exit__ of disable_saved_tensors_hooks that was not entered")
        _switch(tx, self.prev)
        self.entered = False

    def call_method(self, tx, name: str, args: list, kwargs: dict) -> VT:
        if name == "__enter__" and not args and not kwargs:
            self.enter(tx)
            return ConstantVT(None)
        if name == "__exit__":
            return self.getattr(tx, "__exit__").call(tx, args, kwargs)
        unsupported(f"method {name} of disable_saved_tensors_hooks")

    def getattr(self, tx, name: str) -> VT:
        if name == "__exit__":
            return SavedHooksExitVT(self)
        unsupported(f"attribute {name} of disable_saved_tensors_hooks")

    def call(self, tx, args: list, kwargs: dict) -> VT:
        # NOTE: as a decorator: PyTorch's capture disables the hooks where the function is
        # decorated; each call of it restores the previous message after it returns.
        from .callables import NestedFunctionVT, UserFunctionVT

        if len(args) != 1 or kwargs or not isinstance(args[0], (UserFunctionVT, NestedFunctionVT)):
            unsupported("call to disable_saved_tensors_hooks(...)", why="only a function to decorate is modelled")
        self.enter(tx)
        return DecoratedSavedHooksVT(self, args[0])

    def __repr__(self) -> str:
        return f"SavedHooksDisabledVT({self.message!r})"


def _replayable():
    from .objects import ReplayableExitVT

    return ReplayableExitVT


class SavedHooksExitVT(_replayable()):
    """The block's ``__exit__``: replayable, so a graph break inside the block resumes
    compiled (the generated code keeps the message in force across the break)."""

    def __init__(self, cm: SavedHooksDisabledVT):
        self.cm = cm

    def call(self, tx, args: list, kwargs: dict) -> VT:
        if any(not (a.is_const() and a.const() is None) for a in args) or kwargs:
            unsupported("an exception leaving a disable_saved_tensors_hooks block")
        self.cm.exit(tx)
        return ConstantVT(False)

    def reconstruct(self, cg) -> str:
        # NOTE: after a graph break inside the block: its exit puts back the message found on
        # entry (called by the resume function, or when the call at the break raises).
        return f"{cg.obj(_exit_to)}({self.cm.prev!r})"


def _exit_to(prev: Optional[str]):
    def __exit__(*exc) -> None:
        apply_message(prev)

    return __exit__


class DecoratedSavedHooksVT(VT):
    """A function decorated with ``@disable_saved_tensors_hooks(msg)``."""

    def __init__(self, cm: SavedHooksDisabledVT, fn: VT):
        self.cm = cm
        self.fn = fn

    def python_type(self) -> type:
        return types.FunctionType

    def call(self, tx, args: list, kwargs: dict) -> VT:
        if not self.cm.entered:
            self.cm.enter(tx)
        out = self.fn.call(tx, args, kwargs)
        self.cm.exit(tx)
        return out


def saved_hooks_functions() -> dict:
    """The torch functions of this state, for torch_fns' table: reads answer the traced
    state, direct switches are tracked like the context manager's."""
    def get(tx) -> VT:
        return ConstantVT(_current(tx))

    def disable(tx, message: VT) -> VT:
        if not message.is_const() or not isinstance(message.const(), str):
            unsupported("_saved_tensors_hooks_disable with a message that is not a constant string")
        _switch(tx, message.const())
        return ConstantVT(None)

    def enable(tx) -> VT:
        _switch(tx, None)
        return ConstantVT(None)

    return {torch.autograd.graph.disable_saved_tensors_hooks: disable_saved_tensors_hooks_call,
            _get: get, _disable: disable, _enable: enable}


def disable_saved_tensors_hooks_call(tx, message: VT, *rest: VT, **kwargs: VT) -> VT:
    if rest or kwargs or not message.is_const() or not isinstance(message.const(), str):
        unsupported("disable_saved_tensors_hooks with a message that is not a constant string")
    return SavedHooksDisabledVT(message.const())
