"""HigherOrderOperator: an operator with one implementation per mode.

A higher-order operator (HOP) takes callables or operators as arguments
(``with_effects(token, op, *args)``, ``strict_mode(fn, operands)``).  It cannot
go through the C++ dispatcher, so it dispatches itself, in Python:

  key            when                                   impl signature
  "eager"        no Python dispatch mode is active      impl(*args, **kwargs)
  "fake"         args are FakeTensors / fake mode on    impl(*args, **kwargs)
  "trace"        kiln's make_fx tracer is on top        impl(mode, *args, **kwargs)
  "functionalize" kiln's functionalization mode on top  impl(mode, *args, **kwargs)

Autograd needs no key of its own: the eager implementation runs differentiable
ops, so autograd records them as usual.  A kiln TorchDispatchMode says which
key it serves with a class attribute ``kiln_hop_key``; mode implementations are
called with that mode popped off the stack, so running the HOP again inside
them reaches the next mode down (as PyTorch's HOP dispatch does).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import _get_current_dispatch_mode, _pop_mode_temporarily

_KEYS = ("eager", "fake", "trace", "functionalize")


class HigherOrderOperator:
    """Base class of kiln's higher-order operators."""

    def __init__(self, name: str, module: str = "kiln.ops"):
        self.__name__ = name
        self.__qualname__ = name
        self.__module__ = module
        self._impls: dict[str, Callable] = {}

    def __repr__(self) -> str:
        return f"{self.__module__}.{self.__name__}"

    def py_impl(self, key: str) -> Callable[[Callable], Callable]:
        """Decorator: register the implementation of this op for `key`."""
        if key not in _KEYS:
            raise ValueError(f"unknown HOP dispatch key {key!r}; expected one of {_KEYS}")

        def register(fn: Callable) -> Callable:
            self._impls[key] = fn
            return fn

        return register

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.check_args(*args, **kwargs)
        return self.dispatch(*args, **kwargs)

    def check_args(self, *args: Any, **kwargs: Any) -> None:
        """Validate arguments before dispatch (overridden by subclasses)."""

    def dispatch(self, *args: Any, **kwargs: Any) -> Any:
        mode = _get_current_dispatch_mode()
        if mode is not None:
            key = getattr(mode, "kiln_hop_key", None)
            impl = self._impls.get(key) if key else None
            if impl is None and key == "trace":
                impl = self._trace_default
            if impl is not None:
                with _pop_mode_temporarily() as popped:
                    return impl(popped, *args, **kwargs)
            if key is None and "fake" in self._impls and _has_fake(args, kwargs):
                # NOTE: FakeTensorMode itself is on the stack (capture's fake calls).
                return self._impls["fake"](*args, **kwargs)
            # NOTE: a mode kiln does not know (a user's logging mode, a
            # foreign functionalization): run the op's body, whose ATen ops
            # then reach that mode one by one.
            return self._impls["eager"](*args, **kwargs)
        if "fake" in self._impls and _has_fake(args, kwargs):
            return self._impls["fake"](*args, **kwargs)
        return self._impls["eager"](*args, **kwargs)

    def _trace_default(self, mode: Any, *args: Any, **kwargs: Any) -> Any:
        """Run the op below the tracer, then record it as one node."""
        out = self(*args, **kwargs)
        mode.tracer.record(self, args, kwargs, out, name=self.__name__)
        return out


def _has_fake(args: tuple, kwargs: dict) -> bool:
    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
        return True
    return any(isinstance(x, FakeTensor) for x in pytree.tree_leaves((args, kwargs)))
