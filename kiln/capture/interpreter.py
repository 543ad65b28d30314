"""The symbolic bytecode interpreter (one translator per traced frame).

In: a code object plus symbolic locals.  Out: the fx graph (through the
shared OutputGraph) and the symbolic return value, or a graph break.

Each opcode has one handler method named after it, registered with the CPython
versions it serves (``bytecode.handles``; an opcode whose stack effect changed has one
method per convention, e.g. ``CALL`` and ``CALL_313``); the handlers live in the
``handlers_*`` mixins grouped by family (``handlers_basic``, ``handlers_call``,
``handlers_control``); operator semantics shared with the builtins live in
``operators``.
"""
from __future__ import annotations

import builtins
import contextlib
import inspect
import sys
import traceback
import types
from typing import Any, Optional

from kiln import fallbacks
from kiln.exc import BannedInCompile, ForbiddenCallError, KilnError, TorchRuntimeError, Unsupported, format_location

from . import bytecode as bc
from .handlers_basic import BasicHandlers
from .handlers_call import CallHandlers
from .handlers_control import ControlHandlers
from .handlers_except import ExceptHandlers
from .sources import ClosureSource, Source, global_source
from .variables.base import VT, ConstantVT, NullVT, unsupported
from .variables.builder import wrap
from .variables.callables import CellVT, NestedFunctionVT, is_library_module
from .variables.containers import DictVT, IteratorVT, TupleVT
from .variables.exceptions import ObservedException

# NOTE: nested calls inlined into one graph (transformers' module stacks with decorators and
# a generic associative scan's recursion reach 30); Python frames kept free for the rest.
MAX_INLINE_DEPTH = 64
STACK_HEADROOM = 250
CHEAP_DEPTH = 16
MAX_STEPS = 200_000  # instructions per inlined frame (endless generators / loops)


class LazyLocal(VT):
    """An argument not yet read: wrapped (and guarded) on first use."""

    def __init__(self, value: Any, source: Source):
        self.value = value
        self.source = source


class ReturnSignal(Exception):
    pass


class YieldSignal(Exception):
    """A generator run step by step reached a yield (``value``)."""

    def __init__(self, value: VT):
        self.value = value


class BreakSignal(Exception):
    """Raised by the root translator once it has generated its break code."""


class Translator(BasicHandlers, CallHandlers, ControlHandlers, ExceptHandlers):
    def __init__(self, code: types.CodeType, f_globals: dict, output, locals_: dict,
                 cells: dict, parent: Optional["Translator"] = None, fn_label: str = ""):
        self.code = code
        self.f_globals = f_globals
        self.f_builtins = f_globals.get("__builtins__", builtins)
        if isinstance(self.f_builtins, types.ModuleType):
            self.f_builtins = self.f_builtins.__dict__
        self.output = output
        self.locals: dict[str, VT] = locals_
        self.cells: dict[str, Any] = cells  # name -> CellVT or a real cell
        self.parent = parent
        self.depth = 0 if parent is None else parent.depth + 1
        self.insts, self.idx = bc.decode(code)
        self.stack: list[VT] = []
        self.ip = 0
        self.current: Optional[bc.Inst] = None
        self.kw_names: tuple = ()
        self.return_value: Optional[VT] = None
        self.library = is_library_module(types.SimpleNamespace(__name__=f_globals.get("__name__", "")))
        self.dispatch = _DISPATCH
        self.generator_values: Optional[list] = None
        self.suspend_on_yield = False  # a generator run step by step (run_to_yield)
        self.budget = MAX_STEPS
        # NOTE: closure cells of a function read from a source (guarded by its code object, not
        # its identity): name -> source of the cell, so reads and writes go through it.
        self.cell_sources: dict = {}

    # ------------------------------------------------------------ helpers
    def push(self, v: VT) -> None:
        self.stack.append(v)

    def pop(self) -> VT:
        return self.stack.pop()

    def popn(self, n: int) -> list:
        if n == 0:
            return []
        out = self.stack[-n:]
        del self.stack[-n:]
        return out

    def jump_to(self, offset: int) -> None:
        self.ip = self.idx[offset]

    def wrap(self, value: Any, source: Optional[Source]) -> VT:
        return wrap(self, value, source, guard=True)

    def wrap_static(self, value: Any) -> VT:
        return wrap(self, value, None, guard=False)

    def resolve(self, v: VT) -> VT:
        if isinstance(v, LazyLocal):
            return self.wrap(v.value, v.source)
        return v

    def frame_summary(self) -> traceback.FrameSummary:
        line = self.current.lineno if self.current else self.code.co_firstlineno
        return traceback.FrameSummary(self.code.co_filename, line or 0, self.code.co_name)

    def user_stack(self) -> list:
        out = []
        t = self
        while t is not None:
            out.append(t.frame_summary())
            t = t.parent
        return list(reversed(out))

    def where(self) -> str:
        fs = self.frame_summary()
        return format_location(fs.filename, fs.lineno)

    # ------------------------------------------------------------ running
    def step(self) -> None:
        self.budget -= 1
        if self.budget < 0:
            unsupported("too many instructions in one frame", why=f"more than {MAX_STEPS} steps")
        inst = self.insts[self.ip]
        self.current = inst
        self.ip += 1
        name = self.dispatch.get(inst.opname)
        if name is None:
            unsupported(f"opcode {inst.opname}", why="this bytecode instruction has no capture handler")
        try:
            getattr(self, name)(inst)
        except ObservedException as e:
            # NOTE: an exception eager raises here: its handler in this frame, or on to the caller.
            if not self.unwind_to_handler(inst, e.exc):
                raise
        finally:
            graph = getattr(self.output, "graph", None)
            last = graph._root._prev if graph is not None else None
            if last is not None and last.op not in ("root", "placeholder") and last.meta.get("stack_trace") is None:
                self._stamp_stack_trace(graph)

    def _stamp_stack_trace(self, graph) -> None:
        """``meta["stack_trace"]`` of the nodes this instruction added: the user's frames
        (innermost last), as PyTorch's capture records them (printed graphs show each
        node's file:line, and AOT copies it onto the ATen nodes)."""
        # NOTE: a node made with ``stack_trace`` None has none on purpose (grad-mode and
        # saved-tensors-hooks switches, as PyTorch's ``create_node`` makes them).
        key, t = [], self
        while t is not None:
            key.append((t.code, t.current.lineno if t.current else t.code.co_firstlineno))
            t = t.parent
        cache = self.output.__dict__.setdefault("_stack_traces", {})
        trace = cache.get(tuple(key))
        if trace is None:
            trace = cache[tuple(key)] = "".join(traceback.format_list(self.user_stack()))
        n = graph._root._prev
        while n.op not in ("root", "placeholder"):
            if "stack_trace" in n.meta:
                if n.meta["stack_trace"] is not None:
                    break
            else:
                n.meta["stack_trace"] = trace
            n = n._prev

    def run(self) -> Optional[VT]:
        try:
            while True:
                self.step()
        except ReturnSignal:
            return self.return_value
        except YieldSignal:
            raise
        except Unsupported as e:
            if not e.where:
                e.where = self.where()
                e.user_stack = self.user_stack()
            raise
        except Exception as e:  # noqa: BLE001 - an interpreter gap is a graph break, never a crash
            if isinstance(e, KilnError) or is_users_error(e):
                raise
            err = internal_error(self, e)
            raise err from e


    def run_to_yield(self) -> tuple:
        """Run a generator's frame on to its next yield: ``(True, value)``, or ``(False,
        return value)`` when it returns; the frame's state stays for the next step."""
        # NOTE: no generator_values: the frame runs in eager's order (not unrolled ahead),
        # so its mutations are not restricted as an unrolled generator's are.
        self.suspend_on_yield = True
        try:
            return False, self.run()
        except YieldSignal as y:
            return True, y.value

    def start_generator(self, fn: types.FunctionType, args: list, kwargs: dict) -> "Translator":
        """A translator for a call of generator function ``fn``, not yet run (see run_to_yield)."""
        if fn.__code__.co_flags & bc.UNSUPPORTED_FLAGS & ~bc.CO_GENERATOR or not fn.__code__.co_flags & bc.CO_GENERATOR:
            unsupported(f"{fn.__qualname__} is not a plain generator function")
        self.check_inline_depth()
        defaults = [self.wrap_static(d) for d in fn.__defaults__ or ()]
        kwdefaults = {k: self.wrap_static(v) for k, v in (fn.__kwdefaults__ or {}).items()}
        locals_ = bind_args(fn.__code__, fn.__qualname__, args, kwargs, defaults, kwdefaults)
        cells = dict(zip(fn.__code__.co_freevars, fn.__closure__ or ()))
        return Translator(fn.__code__, fn.__globals__, self.output, locals_, cells, parent=self)

    # ------------------------------------------------------------ inlining
    def inline_function(self, fn: types.FunctionType, args: list, kwargs: dict,
                        source: Optional[Source] = None) -> VT:
        """Inline a call of ``fn``.  ``source``: where ``fn`` was read, when it is guarded by its
        code object (a closure passed in): its defaults and cells are read through it, guarded."""
        if fn.__code__.co_flags & (bc.UNSUPPORTED_FLAGS & ~bc.CO_GENERATOR):
            unsupported(f"call to coroutine function {fn.__qualname__}")
        if source is None:
            defaults = [self.wrap_static(d) for d in fn.__defaults__ or ()]
            kwdefaults = {k: self.wrap_static(v) for k, v in (fn.__kwdefaults__ or {}).items()}
        else:
            defaults = [self.wrap(d, source.attr("__defaults__").item(i)) for i, d in enumerate(fn.__defaults__ or ())]
            kwdefaults = {k: self.wrap(v, source.attr("__kwdefaults__").item(k))
                          for k, v in (fn.__kwdefaults__ or {}).items()}
        locals_ = bind_args(fn.__code__, fn.__qualname__, args, kwargs, defaults, kwdefaults)
        cells = {}
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            cells[name] = cell
        cell_sources = {} if source is None else {
            name: source.attr("__closure__").item(i) for i, name in enumerate(fn.__code__.co_freevars)}
        return self._inline(fn.__code__, fn.__globals__, locals_, cells, cell_sources)

    def inline_nested(self, nf: NestedFunctionVT, args: list, kwargs: dict) -> VT:
        code = nf.code
        defaults = list(nf.defaults.items) if nf.defaults is not None else []
        kwdefaults = dict(nf.kwdefaults.items) if nf.kwdefaults is not None else {}
        locals_ = bind_args(code, nf.qualname, args, kwargs, defaults, kwdefaults)
        cells = {n: getattr(c, "cell", c) for n, c in zip(code.co_freevars, nf.closure)}
        return self._inline(code, nf.fn_globals, locals_, cells)

    def check_inline_depth(self) -> None:
        """A graph break before inlining one call more than kiln can: ``MAX_INLINE_DEPTH`` nested
        calls, or (each inlined call costs the interpreter a few Python frames) too little of
        Python's recursion limit left to trace it."""
        if self.depth >= MAX_INLINE_DEPTH:
            unsupported("inlining too deep (recursion)", why=f"more than {MAX_INLINE_DEPTH} nested calls")
        if self.depth < CHEAP_DEPTH:
            return  # NOTE: trace-time cost: the frame walk only once calls nest this deep
        frame, n = sys._getframe(), 0
        while frame is not None:
            frame, n = frame.f_back, n + 1
        if n > sys.getrecursionlimit() - STACK_HEADROOM:
            unsupported("inlining too deep (recursion)",
                        why=f"{n} Python frames deep, near the recursion limit ({sys.getrecursionlimit()})")

    def _as_vt(self, v: Any) -> VT:
        return self.resolve(v) if isinstance(v, VT) else self.wrap_static(v)

    def _inline(self, code, f_globals, locals_, cells, cell_sources: Optional[dict] = None) -> VT:
        self.check_inline_depth()
        sub = Translator(code, f_globals, self.output, locals_, cells, parent=self)
        sub.cell_sources = cell_sources or {}
        if code.co_flags & bc.CO_GENERATOR:
            # NOTE: a generator is run to completion here; its values become an iterator.
            # That is only equal to lazy iteration when running it has no side effects.
            from .variables.containers import generator_scope

            before = self.output.side_effects.size()
            sub.generator_values = []
            with generator_scope():
                ret = sub.run()
            if self.output.side_effects.size() != before:
                unsupported("generator with side effects", why="it is unrolled eagerly while tracing")
            it = IteratorVT(sub.generator_values)
            it.return_value = ret  # what `yield from` evaluates to
            return it
        with self.calling_frame():
            return sub.run()

    def calling_frame(self):
        """The caller's frame (this one, at its call) pushed on torch's TracingContext while a
        call is inlined, as PyTorch's capture does: ShapeEnv guards and errors raised inside
        name the user's stack (``TracingContext.extract_stack``)."""
        from torch._guards import TracingContext

        if TracingContext.try_get() is None:
            return contextlib.nullcontext()
        return TracingContext.current_frame(self.frame_summary())

    # ------------------------------------------------------------ names
    def load_global(self, name: str) -> VT:
        pend = self.output.side_effects.globals
        if self.f_globals is self.output.root_globals and name in pend:
            return pend[name][1]
        if name in self.f_globals:
            value = self.f_globals[name]
            if self.library:
                return self.wrap_static(value)
            src = global_source(self.output.objects, self.f_globals, self.output.root_globals, name)
            return self.wrap(value, src)
        if name in self.f_builtins:
            return self.wrap_static(self.f_builtins[name])
        unsupported(f"name '{name}' is not defined")

    def load_deref(self, name: str) -> VT:
        cell = self.cells.get(name)
        if isinstance(cell, CellVT):
            if cell.value is None:
                unsupported(f"free variable '{name}' referenced before assignment")
            return cell.value
        if cell is None:
            unsupported(f"closure variable {name}")
        pending = self.output.side_effects.pending_cell(cell)
        if pending is not None:
            return pending
        try:
            value = cell.cell_contents
        except ValueError:
            unsupported(f"free variable '{name}' referenced before assignment")
        src = self.cell_sources[name].attr("cell_contents") if name in self.cell_sources \
            else ClosureSource(self.output.objects.name_of(cell), name)
        if self.library:
            return self.wrap_static(value)
        return self.wrap(value, src)


def bind_args(code: types.CodeType, name: str, args: list, kwargs: dict, defaults: list,
              kwdefaults: dict) -> dict:
    """Bind VT arguments to the parameters of ``code`` (as CPython does)."""
    nargs, nkw = code.co_argcount, code.co_kwonlyargcount
    names = code.co_varnames
    pos_names, kw_names = names[:nargs], names[nargs:nargs + nkw]
    out: dict = {}
    extra = list(args[nargs:])
    for n, v in zip(pos_names, args):
        out[n] = v
    i = nargs + nkw
    if code.co_flags & bc.CO_VARARGS:
        out[names[i]] = TupleVT(extra)
        i += 1
    elif extra:
        unsupported(f"{name}() takes {nargs} positional arguments but {len(args)} were given")
    rest = {}
    posonly = code.co_posonlyargcount
    for k, v in kwargs.items():
        if k in pos_names[posonly:] or k in kw_names:
            if k in out:
                unsupported(f"{name}() got multiple values for argument '{k}'")
            out[k] = v
        else:
            rest[k] = v
    if code.co_flags & bc.CO_VARKEYWORDS:
        out[names[i]] = DictVT(rest)
    elif rest:
        unsupported(f"{name}() got an unexpected keyword argument '{next(iter(rest))}'")
    first_default = nargs - len(defaults)
    for j, n in enumerate(pos_names):
        if n not in out:
            if j < first_default:
                unsupported(f"{name}() missing required argument '{n}'")
            out[n] = defaults[j - first_default]
    for n in kw_names:
        if n not in out:
            if n not in kwdefaults:
                unsupported(f"{name}() missing required keyword-only argument '{n}'")
            out[n] = kwdefaults[n]
    return out


def is_users_error(e: Exception) -> bool:
    """Errors in the program as written (a dim marked dynamic that the code specializes, a
    marking call inside the region, an op invalid for sizes read from tensor data): raised to
    the user, never a graph break or an eager run."""
    if isinstance(e, (ForbiddenCallError, TorchRuntimeError, BannedInCompile)):
        return True
    if isinstance(getattr(e, "inner", None), BannedInCompile):
        return True  # NOTE: a backend's BackendCompilerFailed around a program compile refuses
    # NOTE: not imported here (slow): a ShapeEnv, which raises it, has loaded it already.
    ss = sys.modules.get("torch.fx.experimental.symbolic_shapes")
    return ss is not None and isinstance(e, ss.ConstraintViolationError)


def internal_error(tx, e: Exception) -> Unsupported:
    """An exception kiln did not mean to raise (a bug in an opcode handler or a VT), as a
    graph break "internal limitation: <Type>: <msg>" for users.

    Called from an ``except`` block: under ``KILN_STRICT=1`` (the test suite, CI) the
    original exception is re-raised instead, so kiln's bugs fail the tests rather than
    turning into graph breaks that still give the right answer.
    """
    if fallbacks.strict():
        raise e
    op = tx.current.opname if tx.current else "?"
    first = str(e).splitlines()[0] if str(e) else ""
    err = Unsupported(f"internal limitation: {type(e).__name__}: {first}",
                      why=f"capture's handler for {op} raised (a bug in kiln's capture interpreter)",
                      where=tx.where(),
                      hint="this part runs eagerly; please report it (KILN_STRICT=1 raises the original error)")
    err.user_stack = tx.user_stack()
    return err


_DISPATCH = bc.build_dispatch(Translator)
