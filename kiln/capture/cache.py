"""Compile contexts, per-code-object caches of guarded entries, and wrappers.

Compiled entries live with the code object, as PyTorch keeps them on ``co_extra``: one
``CacheLine`` per (code, backend, globals dict, defaults), shared by every wrapper of
a function with that code made by any ``kiln.compile`` / ``kiln.optimize`` call with
an equal backend (PyTorch's backend-match guard: the same backend callable, mode,
options and ``dynamic``).  A closure made anew from the same code reuses the entries:
an entry takes the function's closure tuple as its first argument (``___cl``) and reads
its cells from it.  A wrapper holds its line's entry list directly, so a cache hit
costs one loop over generated entry functions (most recent first).  A miss reports the
newest entry's first failing guard to ``guard_fail_fn``, then compiles a new entry, up
to ``config.cache_size_limit`` entries per line; past it the function runs eagerly,
recorded once as a fallback (kiln.fallbacks) naming the reason.
"""
from __future__ import annotations

import functools
import inspect
import itertools
import os
import sysconfig
import types
import weakref
from collections import namedtuple
from typing import Any, Callable, Optional

import torch

from kiln import fallbacks
from kiln.exc import KilnError, RecompileError, Unsupported, user_traceback

from .interpreter import is_users_error
from . import bytecode as bc
from . import config, stats

MISS = object()
GuardFail = namedtuple("GuardFail", ["reason", "orig_code"])

_ALL_CACHES: "weakref.WeakSet" = weakref.WeakSet()
# NOTE: code object -> its CodeCache; weak, so that a dropped function's code takes its entries along.
_CODE_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
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


class CacheLine:
    """The entries of one code object compiled for one backend, one globals dict and one
    defaults tuple: shared by every function object with these (see the module docstring)."""

    def __init__(self, key: tuple):
        self.key = key
        self.entries: list = []
        self.whys: list = []
        self.skip = False
        self.skip_routed = False  # NOTE: a skipped frame's callees are still compiled frames
        self.warned = False

    def clear(self) -> None:
        self.entries.clear()
        self.whys.clear()
        self.skip = self.skip_routed = self.warned = False


class CodeCache:
    """What kiln keeps for one code object: its cache lines, and the sizes its compiles saw
    per backend (automatic dynamic shapes)."""

    def __init__(self) -> None:
        self.lines: list[CacheLine] = []
        self.frame_states: list = []  # (backend key, FrameState)

    def line(self, key: tuple) -> CacheLine:
        for ln in self.lines:
            if _same_key(ln.key, key):
                return ln
        ln = CacheLine(key)
        self.lines.append(ln)
        return ln

    def frame_state(self, backend_key: tuple):
        from .dynamic import FrameState

        for k, st in self.frame_states:
            if k == backend_key:
                return st
        st = FrameState()
        self.frame_states.append((backend_key, st))
        return st

    def clear(self) -> None:
        for ln in self.lines:
            ln.clear()  # NOTE: in place: wrappers hold their line's entry list
        self.frame_states.clear()


def code_cache(code: types.CodeType) -> CodeCache:
    cc = _CODE_CACHES.get(code)
    if cc is None:
        cc = _CODE_CACHES[code] = CodeCache()
    return cc


def _same_key(a: tuple, b: tuple) -> bool:
    """Line keys: (backend key, globals, defaults, kwdefaults); the backend key compares by
    ``==`` (PyTorch's backend match), the function's parts by identity."""
    return a[0] == b[0] and all(x is y for x, y in zip(a[1:], b[1:]))


class FunctionCache:
    def __init__(self, ctx: "CompileContext", fn: types.FunctionType):
        self.ctx = ctx
        self.fn = fn
        # NOTE: the key keeps the globals and defaults alive, so their identities stay unique.
        self.line = code_cache(fn.__code__).line(
            (ctx.backend_key, fn.__globals__, fn.__defaults__, fn.__kwdefaults__))
        self.entries: list = self.line.entries
        self.whys: list = self.line.whys
        self.closure = fn.__closure__
        self._eager: Optional[Callable] = None
        _ALL_CACHES.add(self)

    @property
    def eager(self) -> Callable:
        """What a skipped frame runs: the function itself, or (a graph break in a loop, as
        PyTorch skips such a frame) a copy whose callees are compiled frames (routed_calls.py)."""
        if not self.line.skip_routed:
            return self.fn
        if self._eager is None:
            self._eager = self.ctx.eager_with_compiled_calls(self.fn)
        return self._eager

    def clear(self) -> None:
        code_cache(self.fn.__code__).clear()
        self._eager = None

    def miss(self, args: tuple, kwargs: dict) -> Any:
        fn = self.fn
        if not self.ctx.enabled:
            return fn(*args, **kwargs)
        line = self.line
        if line.skip:
            return self.eager(*args, **kwargs)
        cl = self.closure
        reason = self.whys[0](cl, *args, **kwargs) if self.whys else None
        if reason is not None and self.ctx.guard_fail_fn is not None:
            self.ctx.guard_fail_fn(GuardFail(reason, fn.__code__))
        if config.error_on_recompile and self.entries:
            raise RecompileError(f"recompiling {_frame_name(fn)}",
                                 why=f"the guards of its {len(self.entries)} compiled entries failed: {reason}",
                                 hint="kiln.capture.config.error_on_recompile is set; unset it to let "
                                      "the function compile again")
        limit = self._over_limit(args, kwargs)
        if limit is not None:
            if not line.warned:
                line.warned = True
                fallbacks.record_fallback(
                    "capture", _frame_name(fn),
                    f"reached {limit}; last recompile reason: {reason}. It now runs eagerly",
                    where=_frame_where(fn))
            return fn(*args, **kwargs)
        from .convert import compile_frame

        stats.frame_started()
        try:
            if fallbacks.forced("capture"):
                raise Unsupported(f"capture of {fn.__qualname__}", why=fallbacks.FORCED_REASON)
            with _compile_context(fn.__code__):
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
            line.skip = True
            line.skip_routed = bool(getattr(e, "skip_frame", False))
            return self.eager(*args, **kwargs)
        stats.frame_ok()
        self.entries.insert(0, entry)
        self.whys.insert(0, why)
        out = entry(cl, *args, **kwargs)
        if out is MISS:
            # NOTE: guards that fail right after compiling mean an unguardable input; stay correct.
            self.entries.pop(0)
            failed = self.whys.pop(0)(cl, *args, **kwargs)
            line.skip = True
            fallbacks.record_fallback("capture", _frame_name(fn),
                                      "the guards of the new entry fail on the inputs it was compiled for "
                                      f"(an input kiln cannot guard on: {failed}); the function runs eagerly "
                                      "from now on", where=_frame_where(fn))
            return fn(*args, **kwargs)
        return out


    def _over_limit(self, args: tuple, kwargs: dict) -> Optional[str]:
        """Which recompile limit a new entry would pass (None: neither): entries for the same
        identity-guarded locals (``cache_size_limit``), or all of them (the accumulated one)."""
        if len(self.entries) >= config.accumulated_cache_size_limit:
            return f"accumulated_cache_size_limit ({config.accumulated_cache_size_limit})"
        if len(self.entries) < config.cache_size_limit:
            return None
        bound = None
        same = 0
        for e in self.entries:
            matched = getattr(e, "__kiln_id_matched__", None) or {}
            if matched and bound is None:
                try:
                    from .entry_source import frame_signature

                    bound = frame_signature(self.fn).bind(*args, **kwargs).arguments
                except TypeError:
                    bound = {}
            if all(bound.get(name, _ABSENT) is obj for name, obj in matched.items()):
                same += 1
        return f"cache_size_limit ({config.cache_size_limit})" if same >= config.cache_size_limit else None


_ABSENT = object()


def _frame_name(fn: types.FunctionType) -> str:
    return f"{fn.__qualname__} ({fn.__code__.co_filename}:{fn.__code__.co_firstlineno})"


def _frame_where(fn: types.FunctionType) -> str:
    return f"{fn.__code__.co_filename}:{fn.__code__.co_firstlineno}"


def make_wrapper(cache: FunctionCache) -> Callable:
    from .functorch_entry import active as transforms_active, call_under_transform

    entries = cache.entries
    miss = cache.miss
    is_jit_tracing = torch._C._is_tracing
    fx_symbolic = torch.fx._symbolic_trace
    cl = cache.closure
    _MISS = MISS

    def kiln_compiled(*args, **kwargs):
        if is_jit_tracing():
            # NOTE: as PyTorch's compiled functions: torch.jit.trace would record what the
            # compiled code does (guards, generated Python), not the function.
            raise RuntimeError("kiln: a compiled function cannot be traced by torch.jit.trace; "
                               "trace the original function instead")
        if fx_symbolic._is_fx_tracing_flag and fx_symbolic.is_fx_symbolic_tracing():
            return _under_fx_trace(cache.fn, args, kwargs)
        try:
            if transforms_active():
                # NOTE: inside an eager torch.func transform (functorch_entry.py).
                return call_under_transform(cache, args, kwargs)
            for e in entries:
                r = e(cl, *args, **kwargs)
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
    # NOTE: PyTorch's protocol for the function a compiled callable wraps (its innermost_fn,
    # torch.compiler.disable and run-only mode unwrap a compiled function through it; the id
    # tells the wrapper itself from a functools.wraps copy of its attributes).
    kiln_compiled._torchdynamo_orig_callable = cache.fn
    kiln_compiled._torchdynamo_wrapper_id = id(kiln_compiled)
    return kiln_compiled


def _under_fx_trace(fn: types.FunctionType, args: tuple, kwargs: dict) -> Any:
    """A compiled function called while ``torch.fx.symbolic_trace`` traces its caller: an
    error, as PyTorch's (its proxies are no inputs capture can guard), or, with
    ``config.error_on_nested_fx_trace`` False, the original function, traced by FX."""
    if config.error_on_nested_fx_trace:
        raise RuntimeError("Detected that you are using FX to symbolically trace a dynamo-optimized "
                           "function. This is not supported at the moment.")
    return fn(*args, **kwargs)


class CompileContext:
    """One compile configuration (backend, fullgraph, guard_fail_fn...)."""

    def __init__(self, backend: Callable, backend_name: str, fullgraph: bool = False,
                 guard_fail_fn: Optional[Callable] = None, dynamic: Optional[bool] = None,
                 backend_key: Any = None):
        self.backend = backend
        self.backend_name = backend_name
        self.fullgraph = fullgraph
        self.guard_fail_fn = guard_fail_fn
        from .dynamic import effective_mode

        self.dynamic = effective_mode(dynamic, backend_name)
        # NOTE: what PyTorch's backend-match guard compares: contexts with equal keys share the
        # entries of each code object (by default the backend callable itself).  Unlike
        # PyTorch, fullgraph is part of it: a fullgraph=True call must not run an entry
        # compiled with graph breaks (it would hide the error the user asked for).
        self.backend_key = (backend if backend_key is None else backend_key, self.dynamic, fullgraph)
        self.enabled = True
        self._wrappers: dict = {}
        self._resumes: dict = {}
        self._routed: dict = {}  # function -> its copy whose calls are compiled (eager_with_compiled_calls)
        self.break_reasons: list = []
        self.eager_frames: list[str] = []  # why a whole function runs uncompiled (explain shows them)
        self._hooked_warned: set[int] = set()  # modules with hooks already recorded as running eagerly
        self._resume_codes: dict = {}

    def frame_state(self, code: types.CodeType):
        """Sizes seen by this code object's compiles with this backend (automatic dynamic shapes)."""
        return code_cache(code).frame_state(self.backend_key)

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

    def resume_function(self, fn_globals: dict, closure: Optional[tuple], spec: bc.ResumeSpec,
                        compiled: bool) -> Callable:
        """The function continuing a frame of ``spec.code`` after a graph break, over the
        frame's globals and closure (PyTorch's resume functions get the frame's cells)."""
        # NOTE: keyed by the closure tuple's id; the cached value keeps that tuple alive
        # (so the id cannot be reused) and is checked by identity.
        code_key = (spec.code, spec.target, spec.stack_nulls, spec.dead, spec.cell_only, spec.reentered)
        key = code_key + (compiled, id(closure), id(fn_globals))
        hit = self._resumes.get(key)
        if hit is not None and hit[0] is closure and hit[1] is fn_globals:
            return hit[2]
        # NOTE: one code object per resume point, so that closures of one frame share its entries.
        code = self._resume_codes.get(code_key)
        if code is None:
            code = self._resume_codes[code_key] = bc.make_resume_code(spec)
            stats.resume_created(spec.name)
        raw = types.FunctionType(code, fn_globals, spec.name, None, closure)
        # NOTE: an eager remainder still compiles the functions it calls (as PyTorch's callback does).
        fn = self.wrapper_for(raw) if compiled else self.eager_with_compiled_calls(raw)
        self._resumes[key] = (closure, fn_globals, fn)
        return fn

    def resume_factory(self, fn_globals: dict, spec: bc.ResumeSpec, compiled: bool) -> Callable:
        """``closure -> resume function``: what an entry shared by closures of one code calls
        with its own ``___cl``."""
        return functools.partial(self.resume_function, fn_globals, spec=spec, compiled=compiled)

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


_FRAME_IDS: "weakref.WeakKeyDictionary[types.CodeType, list]" = weakref.WeakKeyDictionary()
# NOTE: a counter, not len(_FRAME_IDS): entries of collected code objects leave the dict,
# and a reused length would give two live frames one id.
_NEXT_FRAME_ID = itertools.count()


def _compile_context(code: types.CodeType):
    """torch's CompileContext for one compile of ``code``, as PyTorch's capture enters it:
    CompileId(frame id of the code object, its compile count); code run while compiling (a
    user backend, torch's own AOT) reads it with ``CompileContext.get()``, and the frame's
    ShapeEnv guards are listed in its ``shape_env_guards``."""
    from torch._guards import CompileContext, CompileId, compile_context

    ids = _FRAME_IDS.get(code)
    if ids is None:
        ids = _FRAME_IDS[code] = [next(_NEXT_FRAME_ID), 0]
    else:
        ids[1] += 1
    return compile_context(CompileContext(CompileId(frame_id=ids[0], frame_compile_id=ids[1])))


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
    for cc in list(_CODE_CACHES.values()):
        cc.clear()
