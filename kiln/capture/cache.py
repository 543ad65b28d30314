"""Compile contexts, per-function caches of guarded entries, and wrappers.

A wrapper holds its function's entry list directly, so a cache hit costs one
loop over generated entry functions (most recent first).  A miss reports the
newest entry's first failing guard to ``guard_fail_fn``, then compiles a new
entry, up to ``config.cache_size_limit`` entries; past it the function runs
eagerly, recorded once as a fallback (kiln.fallbacks) naming the reason.
"""
from __future__ import annotations

import functools
import os
import sysconfig
import types
import weakref
from collections import namedtuple
from typing import Any, Callable, Optional

import torch

from kiln import fallbacks
from kiln.exc import KilnError, Unsupported, user_traceback

from .interpreter import is_users_error
from . import bytecode as bc
from . import config, stats

MISS = object()
GuardFail = namedtuple("GuardFail", ["reason", "orig_code"])

_ALL_CACHES: "weakref.WeakSet" = weakref.WeakSet()
# NOTE: with the separator, so that torch's folder does not also match torchvision's.
_KILN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_STDLIB = sysconfig.get_paths()["stdlib"]


def is_library_code(code: types.CodeType) -> bool:
    f = code.co_filename
    if f.startswith("<frozen"):
        return True
    if f.startswith(_KILN_DIR) or f.startswith(_TORCH_DIR):
        return True
    return f.startswith(_STDLIB) and "site-packages" not in f and "dist-packages" not in f


class FunctionCache:
    def __init__(self, ctx: "CompileContext", fn: types.FunctionType):
        self.ctx = ctx
        self.fn = fn
        self.entries: list = []
        self.whys: list = []
        self.skip = False
        self.warned = False
        # NOTE: what a skipped frame runs: the function itself, or (a graph break in a loop, as
        # PyTorch skips such a frame) a copy whose callees are compiled frames (routed_calls.py).
        self.eager: Callable = fn
        _ALL_CACHES.add(self)

    def clear(self) -> None:
        self.ctx._frame_states.pop(self.fn.__code__, None)
        self.entries.clear()
        self.whys.clear()
        self.skip = False
        self.warned = False
        self.eager = self.fn

    def miss(self, args: tuple, kwargs: dict) -> Any:
        fn = self.fn
        if not self.ctx.enabled:
            return fn(*args, **kwargs)
        if self.skip:
            return self.eager(*args, **kwargs)
        reason = self.whys[0](*args, **kwargs) if self.whys else None
        if reason is not None and self.ctx.guard_fail_fn is not None:
            self.ctx.guard_fail_fn(GuardFail(reason, fn.__code__))
        if len(self.entries) >= config.cache_size_limit:
            if not self.warned:
                self.warned = True
                fallbacks.record_fallback(
                    "capture", _frame_name(fn),
                    f"reached cache_size_limit ({config.cache_size_limit}); last recompile reason: "
                    f"{reason}. It now runs eagerly", where=_frame_where(fn))
            return fn(*args, **kwargs)
        from .convert import compile_frame

        stats.frame_started()
        try:
            if fallbacks.forced("capture"):
                raise Unsupported(f"capture of {fn.__qualname__}", why=fallbacks.FORCED_REASON)
            entry, why = compile_frame(self.ctx, fn, args, kwargs)
        except Exception as e:  # noqa: BLE001 - capture failure: run eagerly (never crash)
            if isinstance(e, Unsupported):
                stats.unimplemented(e.what)
            if self.ctx.fullgraph or is_users_error(e):
                raise
            if not isinstance(e, KilnError) and fallbacks.strict():
                raise  # NOTE: KILN_STRICT=1: a kiln bug, not a limitation to paper over
            first = str(e).splitlines()[0] if str(e) else ""
            why_text = f"{type(e).__name__}: {first}"
            if isinstance(e, Unsupported) and e.why:
                why_text += f" ({e.why})"
            self.ctx.eager_frames.append(f"{_frame_name(fn)} runs eagerly: {type(e).__name__}: {e}")
            if not getattr(e, "fallback_recorded", False):
                fallbacks.record_fallback("capture", _frame_name(fn), why_text,
                                          where=(getattr(e, "where", "") or _frame_where(fn)).splitlines()[0])
            self.skip = True
            if getattr(e, "skip_frame", False):
                self.eager = self.ctx.eager_with_compiled_calls(fn)
            return self.eager(*args, **kwargs)
        stats.frame_ok()
        self.entries.insert(0, entry)
        self.whys.insert(0, why)
        out = entry(*args, **kwargs)
        if out is MISS:
            # NOTE: guards that fail right after compiling mean an unguardable input; stay correct.
            self.entries.pop(0)
            failed = self.whys.pop(0)(*args, **kwargs)
            self.skip = True
            fallbacks.record_fallback("capture", _frame_name(fn),
                                      "the guards of the new entry fail on the inputs it was compiled for "
                                      f"(an input kiln cannot guard on: {failed}); the function runs eagerly "
                                      "from now on", where=_frame_where(fn))
            return fn(*args, **kwargs)
        return out


def _frame_name(fn: types.FunctionType) -> str:
    return f"{fn.__qualname__} ({fn.__code__.co_filename}:{fn.__code__.co_firstlineno})"


def _frame_where(fn: types.FunctionType) -> str:
    return f"{fn.__code__.co_filename}:{fn.__code__.co_firstlineno}"


def make_wrapper(cache: FunctionCache) -> Callable:
    from .functorch_entry import active as transforms_active, call_under_transform

    entries = cache.entries
    miss = cache.miss
    _MISS = MISS

    def kiln_compiled(*args, **kwargs):
        try:
            if transforms_active():
                # NOTE: inside an eager torch.func transform (functorch_entry.py).
                return call_under_transform(cache, args, kwargs)
            for e in entries:
                r = e(*args, **kwargs)
                if r is not _MISS:
                    return r
            return miss(args, kwargs)
        except KilnError as err:
            # NOTE: the traceback a user sees starts at their call: kiln's frames (and torch's,
            # and generated code) are cut, the user's own frames in between are kept.
            # Exceptions that are not kiln's (the user's code, KILN_STRICT bugs) keep theirs.
            raise err.with_traceback(user_traceback(err.__traceback__)) from err.__cause__

    functools.update_wrapper(kiln_compiled, cache.fn)
    kiln_compiled._kiln_orig = cache.fn
    kiln_compiled._kiln_cache = cache
    return kiln_compiled


class CompileContext:
    """One compile configuration (backend, fullgraph, guard_fail_fn...)."""

    def __init__(self, backend: Callable, backend_name: str, fullgraph: bool = False,
                 guard_fail_fn: Optional[Callable] = None, dynamic: Optional[bool] = None):
        self.backend = backend
        self.backend_name = backend_name
        self.fullgraph = fullgraph
        self.guard_fail_fn = guard_fail_fn
        from .dynamic import effective_mode

        self.dynamic = effective_mode(dynamic, backend_name)
        self.enabled = True
        self._wrappers: dict = {}
        self._resumes: dict = {}
        self._routed: dict = {}  # function -> its copy whose calls are compiled (eager_with_compiled_calls)
        self.break_reasons: list = []
        self.eager_frames: list[str] = []  # why a whole function runs uncompiled (explain shows them)
        self._hooked_warned: set[int] = set()  # modules with hooks already recorded as running eagerly
        self._frame_states: dict = {}

    def frame_state(self, code: types.CodeType):
        """Sizes seen by this code object's compiles (automatic dynamic shapes)."""
        from .dynamic import FrameState

        st = self._frame_states.get(code)
        if st is None:
            st = self._frame_states[code] = FrameState()
        return st

    def wrapper_for(self, fn: types.FunctionType) -> Callable:
        w = self._wrappers.get(fn)
        if w is None:
            w = make_wrapper(FunctionCache(self, fn))
            self._wrappers[fn] = w
        return w

    def kcall(self, fn: Any, args: tuple, kwargs: dict) -> Any:
        """Call ``fn`` from generated code; Python callees are compiled frames."""
        frame_only = _disabled_frame_only(fn)
        if frame_only is not None:
            func, bound_self = frame_only
            run = self.eager_with_compiled_calls(func)
            return run(bound_self, *args, **kwargs) if bound_self is not None else run(*args, **kwargs)
        target = _compilable(fn)
        if target is None:
            if isinstance(fn, torch.nn.Module) and _has_forward_hooks(fn) and id(fn) not in self._hooked_warned:
                # NOTE: a graph break left this call to generated code; the hooks must run as
                # eager runs them, so the module's forward is not compiled: say so once.
                self._hooked_warned.add(id(fn))
                fallbacks.record_fallback(
                    "capture", f"{type(fn).__name__}.forward",
                    "the module has forward hooks; called after a graph break, it runs eagerly "
                    "(hooks included)", where=_frame_where(type(fn).forward)
                    if isinstance(type(fn).forward, types.FunctionType) else "")
            return fn(*args, **kwargs)
        func, bound_self = target
        w = self.wrapper_for(func)
        if bound_self is not None:
            return w(bound_self, *args, **kwargs)
        return w(*args, **kwargs)

    def kwrap(self, fn: Any) -> Any:
        """``fn`` for a call made by eager bytecode: Python callees still get compiled."""
        if _compilable(fn) is None:
            return fn
        return functools.partial(self.kcall_star, fn)

    def kcall_star(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return self.kcall(fn, args, kwargs)

    def eager_with_compiled_calls(self, fn: types.FunctionType) -> Callable:
        """``fn`` run eagerly, each function it calls compiled as a frame of its own (what
        PyTorch's eval-frame callback does for a frame it skips); ``fn`` itself where its code
        cannot be rewritten (routed_calls.py)."""
        from .routed_calls import routed_function

        out = self._routed.get(fn)
        if out is None:
            out = self._routed[fn] = routed_function(fn, self.kwrap) or fn
        return out

    def resume_function(self, root_fn: types.FunctionType, spec: bc.ResumeSpec, compiled: bool) -> Callable:
        # NOTE: keyed by the closure tuple's id; the cached value keeps that tuple alive
        # (so the id cannot be reused) and is checked by identity.
        key = (spec.code, spec.target, spec.stack_nulls, spec.dead, spec.cell_only, compiled,
               id(root_fn.__closure__), id(root_fn.__globals__))
        hit = self._resumes.get(key)
        if hit is not None and hit[0] is root_fn.__closure__ and hit[1] is root_fn.__globals__:
            return hit[2]
        code = bc.make_resume_code(spec)
        stats.resume_created(spec.name)
        raw = types.FunctionType(code, root_fn.__globals__, spec.name, None, root_fn.__closure__)
        # NOTE: an eager remainder still compiles the functions it calls (as PyTorch's callback does).
        fn = self.wrapper_for(raw) if compiled else self.eager_with_compiled_calls(raw)
        self._resumes[key] = (root_fn.__closure__, root_fn.__globals__, fn)
        return fn

    def run_backend(self, gm, example: list) -> Callable:
        from kiln.backends.common import call_backend

        def compile_fn(g, ex):
            return call_backend(self.backend, g, ex, name=self.backend_name, fallback_to_eager=not self.fullgraph)

        # NOTE: captured inside DDP's forward: the graph is split at DDP's gradient buckets
        # (kiln/backends/ddp_split.py), each part compiled by the backend on its own.
        from .ddp import split_for_ddp

        split = split_for_ddp(gm, example, compile_fn)
        return split if split is not None else compile_fn(gm, example)

    def record_break(self, reason) -> None:
        self.break_reasons.append(reason)


def _disabled_frame_only(fn: Any):
    """(function, bound self) of a callable disabled for its own frame only (``kiln.disable`` /
    ``torch.compiler.disable`` with ``recursive=False``): it runs eagerly, its callees compiled."""
    bound_self = None
    if isinstance(fn, torch.nn.Module):
        fn, bound_self = type(fn).forward, fn
    elif isinstance(fn, types.MethodType):
        fn, bound_self = fn.__func__, fn.__self__
    inner = getattr(fn, "_kiln_disable_frame_only", None)
    if inner is None and getattr(fn, "_torchdynamo_disable", False) \
            and getattr(fn, "_torchdynamo_disable_recursive", True) is False:
        inner = getattr(fn, "_torchdynamo_orig_callable", None)
    if not isinstance(inner, types.FunctionType) or _skip(inner):
        return None
    if bound_self is not None and isinstance(bound_self, torch.nn.Module) and _has_forward_hooks(bound_self):
        return None
    return inner, bound_self


def _compilable(fn: Any):
    if getattr(fn, "_kiln_disable", False) or hasattr(fn, "_kiln_orig"):
        return None
    if isinstance(fn, types.MethodType) and isinstance(fn.__func__, types.FunctionType):
        f = fn.__func__
        return None if _skip(f) else (f, fn.__self__)
    if isinstance(fn, types.FunctionType):
        return None if _skip(fn) else (fn, None)
    if isinstance(fn, torch.nn.Module):
        if _has_forward_hooks(fn):
            return None
        fwd = type(fn).forward
        if isinstance(fwd, types.FunctionType) and not _skip(fwd):
            return fwd, fn
    return None


def _has_forward_hooks(mod: torch.nn.Module) -> bool:
    from torch.nn.modules import module as m

    return bool(mod._forward_hooks or mod._forward_pre_hooks or m._global_forward_hooks
                or m._global_forward_pre_hooks)


def _skip(fn: types.FunctionType) -> bool:
    return bool(fn.__code__.co_flags & bc.UNSUPPORTED_FLAGS) or is_library_code(fn.__code__) \
        or getattr(fn, "_kiln_disable", False)


def reset_all() -> None:
    for c in list(_ALL_CACHES):
        c.clear()
