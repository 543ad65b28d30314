"""capture/ddp.py: compiling models under torch.distributed's DistributedDataParallel.

Two ways a user writes it, both compile the same thing, the wrapped module's forward:

- ``DDP(kiln.compile(model))``: DDP's forward runs eagerly and calls the compiled module.
- ``kiln.compile(DDP(model))``: :class:`DDPOptimizedModule` runs DDP's forward eagerly
  (its pre/post-forward bookkeeping: buffer broadcast, the reducer's state, unused-parameter
  search) and compiles only ``DDP.module``'s forward, as PyTorch's capture does
  (torch's own code is never traced; DDP's forward does no tensor math).

Either way the compiled frame runs inside DDP's ``_inside_ddp_forward`` (the class's
active module is set), so :func:`split_for_ddp` finds the DDP module at compile time and
splits the graph at its gradient buckets (kiln/backends/ddp_split.py).  kiln issues no
communication: DDP's reducer does all of it, from the gradient hooks of the parameters.
"""
from __future__ import annotations

import functools
import sys
import types
from typing import Any, Callable, Optional

import torch

from .api import OptimizedModule


def _compiled_forward(ctx, mod: torch.nn.Module) -> Callable:
    fwd = mod.__dict__.get("forward")
    if isinstance(fwd, types.MethodType):
        return functools.partial(ctx.wrapper_for(fwd.__func__), fwd.__self__)
    if isinstance(fwd, types.FunctionType):
        return ctx.wrapper_for(fwd)
    return functools.partial(ctx.wrapper_for(type(mod).forward), mod)


class DDPOptimizedModule(OptimizedModule):
    """``kiln.compile(DDP(model))``: DDP's forward eagerly, ``model.forward`` compiled."""

    def __init__(self, ddp: torch.nn.Module, ctx):
        super().__init__(ddp, ctx)
        inner = ddp.module
        self.__dict__["_kiln_inner_fwd"] = _compiled_forward(ctx, inner)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        ddp = self._kiln_mod
        inner = ddp.module
        missing = object()
        prev = inner.__dict__.get("forward", missing)
        # NOTE: an instance attribute for the duration of the call: DDP calls
        # ``self.module(...)``, whose hooks (if any) still run eagerly around it.
        inner.forward = self._kiln_inner_fwd
        try:
            return ddp(*args, **kwargs)
        finally:
            if prev is missing:
                del inner.forward
            else:
                inner.forward = prev


def wrapper_class(mod: torch.nn.Module) -> Optional[type]:
    """The OptimizedModule class for a wrapper module kiln must not trace into (None: none)."""
    dist_mod = sys.modules.get("torch.nn.parallel.distributed")
    # NOTE: (wrapper type, compiled module class); a table so FSDP1 / others can join.
    table = [(getattr(dist_mod, "DistributedDataParallel", None), DDPOptimizedModule)]
    for cls, wrapper in table:
        if cls is not None and isinstance(mod, cls):
            return wrapper
    return None


def split_for_ddp(gm, example: list, compile_fn: Callable) -> Optional[Callable]:
    """The compiled graph split at the active DDP module's buckets, or None (no DDP, or
    ``config.optimize_ddp`` off): then the caller compiles ``gm`` as one graph."""
    from . import config

    if not config.optimize_ddp or "torch.nn.parallel.distributed" not in sys.modules:
        return None
    from kiln.backends.ddp_split import active_ddp_module, compile_for_ddp

    ddp = active_ddp_module()
    if ddp is None:
        return None
    return compile_for_ddp(gm, example, example, ddp, compile_fn)
