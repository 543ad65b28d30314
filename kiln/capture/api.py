"""Entry points: compile, optimize, optimize_assert, disable, reset, graph_break."""
from __future__ import annotations

import functools
import types
from typing import Any, Callable, Optional, Union

import torch

from kiln.backends.registry import DEFAULT_BACKEND, backend_name, lookup_backend


def graph_break() -> None:
    """Inside a compiled function: end the current graph here (a no-op in eager)."""


def _resolve_backend(backend: Any, mode: Optional[str] = None, options: Optional[dict] = None):
    # NOTE: the registry's lookup is the one check of what a backend is (a known name, or a
    # callable); backends/common.call_backend is the one check of what it returns.
    fn = lookup_backend(backend)
    name = backend_name(backend)
    extra = {k: v for k, v in (("mode", mode), ("options", options)) if v is not None}
    check = getattr(fn, "check_options", None)
    if extra and check is not None:
        check(**extra)  # NOTE: a misspelled option fails here, not at the first call
    if extra:
        inner = fn
        fn = lambda gm, ex: inner(gm, ex, **extra)  # noqa: E731
    return fn, name


class OptimizedModule(torch.nn.Module):
    """A module whose forward runs through a compile wrapper; keeps the module's interface."""

    def __init__(self, mod: torch.nn.Module, ctx):
        super().__init__()
        self._orig_mod = mod
        # NOTE: a plain attribute too, so the per-call path skips Module.__getattr__.
        self.__dict__["_kiln_mod"] = mod
        self.__dict__["_kiln_ctx"] = ctx
        # NOTE: PyTorch's name for how it was compiled: applied to another function or method
        # (``model.training_step = compiled.dynamo_ctx(model.training_step)``), it compiles it
        # the same way, sharing this module's compiled entries.
        self.__dict__["dynamo_ctx"] = _Optimizer(ctx)
        fwd = mod.__dict__.get("forward")
        if isinstance(fwd, types.MethodType):
            self.__dict__["_kiln_fwd"] = functools.partial(ctx.wrapper_for(fwd.__func__), fwd.__self__)
        elif isinstance(fwd, types.FunctionType):
            self.__dict__["_kiln_fwd"] = ctx.wrapper_for(fwd)
        else:
            self.__dict__["_kiln_fwd"] = functools.partial(ctx.wrapper_for(type(mod).forward), mod)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        mod = self._kiln_mod
        if mod._forward_hooks or mod._forward_pre_hooks:
            # NOTE: hooks run eagerly around the compiled forward.
            mod.forward = self._kiln_fwd
            try:
                return mod(*args, **kwargs)
            finally:
                del mod.forward
        return self._kiln_fwd(*args, **kwargs)

    def __reduce__(self):
        # NOTE: compiled code is not pickled: the module is, with how it was compiled.
        spec = getattr(self._kiln_ctx, "spec", None)
        if spec is None:
            raise TypeError("this compiled module was not made by kiln.compile/kiln.optimize; "
                            "pickle its _orig_mod instead")
        return (_rebuild_optimized, (self._orig_mod, spec))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._orig_mod, name)


def _apply(ctx, target: Any) -> Any:
    if isinstance(target, torch.nn.Module):
        from .ddp import wrapper_class  # NOTE: DDP(model): compile model.forward, run DDP's eagerly

        return (wrapper_class(target) or OptimizedModule)(target, ctx)
    if isinstance(target, types.MethodType) and isinstance(target.__func__, types.FunctionType):
        return functools.partial(ctx.wrapper_for(target.__func__), target.__self__)
    if isinstance(target, types.FunctionType):
        if hasattr(target, "_kiln_orig"):
            target = target._kiln_orig
        target = _hop_entry(target)
        return ctx.wrapper_for(target)
    if callable(target):
        call = getattr(type(target), "__call__", None)
        if isinstance(call, types.FunctionType):
            return functools.partial(ctx.wrapper_for(call), target)
        if isinstance(target, (types.BuiltinFunctionType, types.BuiltinMethodType, types.MethodDescriptorType,
                               types.WrapperDescriptorType, types.MethodWrapperType)):
            # NOTE: a C function has no frame to capture: a Python function calling it is
            # compiled instead, as PyTorch's wrap_inline does (``kiln.compile(torch.sin)``).
            return functools.wraps(target)(ctx.wrapper_for(_inline_call(target)))
    raise TypeError(f"kiln.compile expects a function or nn.Module, got {type(target).__name__}")


def _inline_call(fn: Any) -> types.FunctionType:
    """A Python function that calls ``fn`` (a frame for capture to trace)."""

    def inline_call(*args, **kwargs):
        return fn(*args, **kwargs)

    return inline_call


def _hop_entry(fn: types.FunctionType) -> types.FunctionType:
    """``fn`` itself, or for a higher-order entry point (``kiln.compile(torch.while_loop)``)
    a function calling it: the call is then captured as the op, not its Python body."""
    from .variables.hops import handler_for

    if handler_for(fn) is None:
        return fn

    def call_higher_order_op(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return call_higher_order_op


class _Optimizer:
    """What ``kiln.optimize(...)`` returns: apply it to a function or module."""

    def __init__(self, ctx):
        self.ctx = ctx

    def __call__(self, target: Any) -> Any:
        return _apply(self.ctx, target)


def _context(backend, fullgraph=False, guard_fail_fn=None, dynamic=None, mode=None, options=None):
    from .cache import CompileContext

    fn, name = _resolve_backend(backend, mode, options)
    # NOTE: PyTorch's backend match: one backend callable with the same mode and options
    # (torch.compile's _TorchCompileWrapper.__eq__) shares compiled entries.
    key = (lookup_backend(backend), mode, options)
    ctx = CompileContext(fn, name, fullgraph=fullgraph, guard_fail_fn=guard_fail_fn, dynamic=dynamic,
                         backend_key=key)
    # NOTE: what made it, so that a pickled compiled module is compiled the same way when loaded.
    ctx.spec = dict(backend=backend, fullgraph=fullgraph, guard_fail_fn=guard_fail_fn, dynamic=dynamic,
                    mode=mode, options=options)
    return ctx


def _rebuild_optimized(mod: torch.nn.Module, spec: dict) -> torch.nn.Module:
    """Unpickling an OptimizedModule: the module, compiled again with the same arguments."""
    return _apply(_context(**spec), mod)


def compile(fn_or_module: Any = None, *, backend: Union[str, Callable] = DEFAULT_BACKEND, fullgraph: bool = False,
            dynamic: Optional[bool] = None, mode: Optional[str] = None, options: Optional[dict] = None) -> Any:
    """Compile a function or nn.Module (or return a decorator when called without one).

    In: a Python function / module.  Out: a callable with the same signature that
    captures torch-level graphs from the bytecode on each new kind of input and runs
    them through ``backend``.  ``fullgraph=True`` raises kiln.exc.Unsupported at the
    first graph break instead of running that part eagerly.
    """
    if fn_or_module is None:
        return lambda f: compile(f, backend=backend, fullgraph=fullgraph, dynamic=dynamic, mode=mode,
                                 options=options)
    return _apply(_context(backend, fullgraph, None, dynamic, mode, options), fn_or_module)


def optimize(backend: Union[str, Callable] = DEFAULT_BACKEND, *, nopython: bool = False,
             guard_fail_fn: Optional[Callable] = None, dynamic: Optional[bool] = None) -> _Optimizer:
    """The decorator form: ``kiln.optimize("eager", guard_fail_fn=f)(fn)``."""
    return _Optimizer(_context(backend, nopython, guard_fail_fn, dynamic))


def optimize_assert(backend: Union[str, Callable], *, dynamic: Optional[bool] = None) -> _Optimizer:
    """``optimize(backend, nopython=True)``: any graph break raises kiln.exc.Unsupported."""
    return optimize(backend, nopython=True, dynamic=dynamic)


def disable(fn: Optional[Callable] = None, recursive: bool = True) -> Callable:
    """Run ``fn`` eagerly even when called from compiled code (a graph break there).

    ``recursive=False``: only ``fn``'s own frame runs eagerly; the functions it calls are
    compiled as frames of their own (as PyTorch's ``disable(recursive=False)``)."""
    if fn is None:
        return lambda f: disable(f, recursive)
    orig = getattr(fn, "_kiln_orig", fn)

    @functools.wraps(orig)
    def kiln_disabled(*args: Any, **kwargs: Any) -> Any:
        return orig(*args, **kwargs)

    kiln_disabled._kiln_disable = True
    if not recursive:
        kiln_disabled._kiln_disable_frame_only = orig
    return kiln_disabled


def reset() -> None:
    """Drop every compiled entry (the next call of a compiled function recompiles)."""
    from .cache import reset_all

    reset_all()
    from .stats import clear as clear_stats

    clear_stats()
    import sys

    ca = sys.modules.get("kiln.compiled_autograd")  # NOTE: its graphs hold compiled callables too
    if ca is not None:
        ca.reset()
    from kiln.codegen import metrics  # NOTE: lazy: codegen is a later stage

    metrics.reset()
