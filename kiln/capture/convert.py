"""Converting one frame: trace it, then generate its entry (graph + resume).

In: a Python function and the arguments of one call.  Out: a generated
``___entry`` function (guards + compiled graph + rebuild of Python state) and
its ``___why`` reason function.  At a graph break the frame's entry runs the
graph so far, performs the unsupported instruction in plain Python and
continues in a resume function (compiled on its first call).
"""
from __future__ import annotations

import contextlib
import inspect
import types
from typing import Any, Callable, Optional

import torch

from kiln.exc import KilnError, Unsupported
from kiln.fallbacks import record_fallback

from . import bytecode as bc
from . import stats
from .entry_source import EntryWriter, base_namespace, build_entry, frame_signature
from .interpreter import LazyLocal, Translator, internal_error, is_users_error
from .marked_dims import check_constraints, has_marks
from .handlers_control import COND_JUMPS
from .output import GraphCompileReason, OutputGraph
from .routed_calls import maybe_has_backedge
from .sources import LocalSource
from .variables.autocast import replay_after_graph as replay_autocast, unwind as unwind_autocast
from .variables.saved_hooks import replay_after_graph as replay_saved_hooks
from .variables.autograd_fn import RecaptureFrame
from .variables.base import NullVT, unsupported
from .variables.callables import CellVT, RealCellVT
from .variables.tensor import TensorVT

MAX_RESTARTS = 4
MAX_RECAPTURES = 8


class Restart(Exception):
    def __init__(self, step: int, error: Unsupported):
        self.step = step
        self.error = error


class Done(Exception):
    """The root translator produced its entry body."""


class RootTranslator(Translator):
    def __init__(self, ctx, fn: types.FunctionType, bound: inspect.BoundArguments, break_step, break_error):
        code = fn.__code__
        output = OutputGraph(ctx, fn.__globals__, ctx.frame_state(code), marked=has_marks(bound.arguments.values()))
        output.objects.bind_closure(fn.__closure__)
        # NOTE: a comprehension's iterator argument is ``.0`` in its code, ``implicit0`` in its signature.
        names = {n: f".{n[8:]}" for n in bound.signature.parameters
                 if n.startswith("implicit") and f".{n[8:]}" in code.co_varnames}
        locals_ = {names.get(n, n): LazyLocal(v, LocalSource(names.get(n, n))) for n, v in bound.arguments.items()}
        cells = dict(zip(code.co_freevars, fn.__closure__ or ()))
        for name, param in bc.resume_cell_args(code).items():
            # NOTE: a resume function's cell variables arrive as the cells themselves (real cells,
            # shared with closures made before the break), read through their parameter.
            cell = bound.arguments.get(param)
            if not isinstance(cell, types.CellType):
                unsupported(f"resume function {code.co_name} called without the cell of '{name}'")
            cells[name] = cell
            output.objects.bind_cell_arg(cell, param)
            locals_.pop(name, None)
        super().__init__(code, fn.__globals__, output, locals_, cells)
        self.ctx = ctx
        self.fn = fn
        self.nsteps = 0
        self.break_step = break_step
        self.break_error = break_error
        self.body: list[str] = []
        self.graph_args = None  # sources of the graph's inputs, once it is compiled

    # ---------------------------------------------------------- main loop
    def run(self):
        while True:
            self.nsteps += 1
            if self.nsteps == self.break_step:
                self.break_at(self.insts[self.ip], self.break_error)
            try:
                self.step()
            except (Done, Restart):
                raise
            except Exception as e:  # noqa: BLE001
                if (isinstance(e, KilnError) and not isinstance(e, Unsupported)) or getattr(e, "skip_frame", False) \
                        or is_users_error(e):
                    raise
                if not isinstance(e, Unsupported):
                    e = internal_error(self, e)
                self._annotate(e)
                if self.ctx.fullgraph:
                    raise e
                raise Restart(self.nsteps, e) from None

    def _annotate(self, e: Unsupported) -> None:
        if not e.where:
            e.where = self.where()
        if not getattr(e, "user_stack", None):
            e.user_stack = self.user_stack()

    # ---------------------------------------------------------- return
    def on_return(self, value):
        reason = GraphCompileReason("return", self.user_stack(), graph_break=False)
        self._emit_graph([value], reason, live_cells=set())
        self.export_info = ([(s, v) for s, v, *_ in self.output.inputs], value, self.out_nodes)
        self.cg.line(f"___ret = {self.cg.expr(value)}")
        self._emit_side_effects()
        self.cg.line("return ___ret")
        self.body = self.cg.lines
        raise Done()

    def _emit_graph(self, values: list, reason: GraphCompileReason, live_cells: Optional[set] = None) -> None:
        """Compile the graph with the tensors ``values`` need, emit its call."""
        out = self.output
        if live_cells is None:
            # NOTE: at a graph break the frame's own cells go on in its resume function.
            live_cells = {id(c) for c in self.cells.values() if isinstance(c, CellVT)}
        collect = EntryWriter(out.objects, symbols=out.symbols)
        collect.live_cells = live_cells
        for v in values + out.side_effects.values():
            if not isinstance(v, NullVT):
                collect.expr(v)
        nodes = collect.needed
        # NOTE: a tensor made from a NumPy array each call is told apart by the array itself.
        out.guards.distinct([getattr(s, "identity_source", s) for s, _, _, from_mod in out.inputs if not from_mod])
        outputs = [_vt_of(out, n) for n in nodes]
        compiled = out.compile(outputs, reason)
        self.compiled = compiled
        self.out_nodes = nodes
        self.cg = EntryWriter(out.objects, {n: i for i, n in enumerate(nodes)}, symbols=out.symbols)
        self.cg.live_cells = live_cells
        # NOTE: the graph call itself is written by build_entry, right after the guard,
        # so that it reads the access chains the guard has bound (guard_cse.py).
        self.graph_args = [s for s, *_ in out.inputs] if compiled is not None else None
        self.body = self.cg.lines

    def _emit_side_effects(self) -> None:
        # NOTE: after every value was read into a temp: replay may mutate sources.
        out = self.output
        out.side_effects.emit_replay(self.cg)
        if out.grad_enabled != out.initial_grad:
            self.cg.line(f"___set_grad({out.grad_enabled})")
        replay_autocast(out, self.cg)
        replay_saved_hooks(out, self.cg)

    # ---------------------------------------------------------- breaks
    def on_tensor_branch(self, inst, v):
        err = Unsupported("data-dependent branch on a tensor",
                          why="the condition depends on tensor values, unknown while tracing",
                          hint="use torch.where / torch.cond, or accept the graph break")
        self._annotate(err)
        if self.ctx.fullgraph:
            raise err
        self.break_at(inst, err)

    def break_at(self, inst: bc.Inst, err: Unsupported) -> None:
        stack = list(self.stack)
        # NOTE: as in PyTorch: a break inside a loop body (a jump back to or before it follows,
        # before any return) would break again on every iteration: the whole frame runs
        # eagerly instead, and the functions it calls are compiled as frames of their own.
        # A break of another kind in a loop compiles the graph so far, the rest runs eagerly.
        in_loop = maybe_has_backedge(self.code, inst.offset)
        if in_loop and (inst.opname in _CALL_OPS or inst.opname in _RESUMABLE_OPS or (
                inst.opname in COND_JUMPS and stack and isinstance(stack[-1], TensorVT))):
            raise loop_break(self.code, err)
        if _generic_with_exits(self.code, inst.offset, stack):
            raise generic_ctx_break(self.code, err)
        if self.current_exc is not None:
            raise except_block_break(self.code, err)
        reason = GraphCompileReason(err.what, getattr(err, "user_stack", []) or self.user_stack())
        self.ctx.record_break(reason)
        # NOTE: as in PyTorch, a jump on a tensor is not counted as a graph break.
        stats.graph_break(err.what, data_dependent_jump=inst.opname in COND_JUMPS and bool(stack)
                          and isinstance(stack[-1], TensorVT))
        # NOTE: inside a try/with region the instruction must run where the frame's
        # exception table can catch what it raises: the rest of the frame runs eagerly.
        # Grad-mode and no-op `with` blocks are the exception: their cleanup is replayed around it.
        self.with_exits = _grad_with_exits(self.code, self.insts, self.idx, inst.offset, stack)
        in_try = (bc.in_try_block(self.code, inst.offset) and self.with_exits is None) or in_loop
        if inst.opname in COND_JUMPS and _data_condition(stack[-1]) and not in_try:
            self._break_jump(inst, stack, reason)
        elif inst.opname in _CALL_OPS and not in_try:
            self._break_call(inst, stack, reason)
        else:
            self._break_eager(inst, stack, reason, simple_ok=not in_try)
        raise Done()

    def _guarded(self, stmt: str, stack_names: list) -> None:
        """Emit ``stmt``; inside grad-mode with-blocks, restore grad mode if it raises."""
        exits = [stack_names[i] for i in getattr(self, "with_exits", None) or []]
        if not exits:
            self.cg.line(stmt)
            return
        self.cg.line("try:")
        self.cg.line(f"    {stmt}")
        self.cg.line("except BaseException:")
        for e in exits:
            self.cg.line(f"    {e}(None, None, None)")
        self.cg.line("    raise")

    def _leave_grad_blocks(self, stack: list, names: list) -> tuple:
        """(stack names, reentered slots) for the resume call at a break inside grad-mode
        with-blocks (``self.with_exits``): emits the code that leaves them once the break's
        instruction ran (their ``__exit__``, innermost first) and puts in their stack slots
        GradReentry objects that the resume function's prologue enters again.

        NOTE: as in PyTorch, the resume function starts in the mode outside the blocks and its
        graph sets each block's mode itself (``_set_grad_enabled`` nodes at its start), so the
        grad mode of the rest of the block is the graph's own; the innermost block goes on in the
        mode of the moment (the instruction may have changed it), an outer one in the mode its
        inner block was entered in."""
        from .variables.objects import GradExitVT, GradReentry

        slots = sorted(i for i in getattr(self, "with_exits", None) or [] if isinstance(stack[i], GradExitVT)
                       and names[i] is not None)
        if not slots:
            return names, ()
        cg = self.cg
        cg.line(f"___grad_now = {cg.obj(torch.is_grad_enabled)}()")
        for i in reversed(slots):
            cg.line(f"{names[i]}(None, None, None)")
        names = list(names)
        modes = [str(bool(stack[j].prev)) for j in slots[1:]] + ["___grad_now"]
        for i, mode in zip(slots, modes):
            names[i] = f"{cg.obj(GradReentry)}({mode})"
        return names, tuple(slots)

    def _live_locals(self, offset: int) -> dict:
        live = bc.loads_after(self.insts, offset)
        if live is not None and "__class__" in self.code.co_freevars and self.code.co_varnames:
            live.add(self.code.co_varnames[0])  # NOTE: zero-argument super() reads it implicitly
        out = {}
        for name in self.code.co_varnames:
            if name in self.code.co_cellvars:
                continue  # NOTE: passed as its cell (_frame_cells)
            if name in self.locals and (live is None or name in live):
                out[name] = self.locals[name]
        return out

    def _frame_cells(self) -> dict:
        """Every cell variable of the frame as a VT of its cell object: the resume function
        goes on with these very cells (closures made before the break share them)."""
        out = {}
        for name in self.code.co_cellvars:
            cell = self.cells.get(name)
            out[name] = cell if isinstance(cell, CellVT) else RealCellVT(cell) if cell is not None else CellVT()
        return out

    def _prepare(self, stack: list, offset: int, extra: list, reason) -> tuple:
        locals_ = self._live_locals(offset)
        cells = self._frame_cells()
        values = [v for v in stack if not isinstance(v, NullVT)] + list(locals_.values())
        values += list(cells.values()) + extra
        self._emit_graph(values, reason)
        cg = self.cg
        stack_names = []
        for i, v in enumerate(stack):
            if isinstance(v, NullVT):
                stack_names.append(None)
            else:
                cg.line(f"___s{i} = {cg.expr(v)}")
                stack_names.append(f"___s{i}")
        local_names = {}
        for i, (name, v) in enumerate(locals_.items()):
            tmp = f"___l_{name}" if name.isidentifier() else f"___l{i}"
            cg.line(f"{tmp} = {cg.expr(v)}")
            local_names[name] = tmp
        cell_names = {}
        for i, (name, v) in enumerate(cells.items()):
            tmp = f"___cell_{name}" if name.isidentifier() else f"___cell{i}"
            cg.line(f"{tmp} = {cg.expr(v)}")
            cell_names[name] = tmp
        self._emit_side_effects()
        return stack_names, local_names, cell_names

    def _resume_call(self, offset: int, stack_names: list, local_names: dict, cell_names: dict,
                     compiled: bool, reentered: tuple = ()) -> str:
        dead = tuple(n for n in self.code.co_varnames if n not in local_names and n not in self.code.co_cellvars)
        spec = bc.ResumeSpec(self.code, offset, tuple(s is None for s in stack_names), dead,
                             tuple(c for c in cell_names if c not in self.code.co_varnames),
                             f"__resume_at_{offset}", reentered)
        if self.fn.__closure__:
            # NOTE: the entry serves every closure of this code: the resume function is made
            # over the closure the entry was called with.
            factory = self.ctx.resume_factory(self.fn.__globals__, spec, compiled)
            name = f"{self.output.objects.name_of(factory)}(___cl)"
        else:
            name = self.output.objects.name_of(self.ctx.resume_function(self.fn.__globals__, None, spec, compiled))
        args = [cell_names[n] if n in cell_names else local_names.get(n, "None") for n in self.code.co_varnames]
        args += [s for s in stack_names if s is not None]
        args += [cell_names[c] for c in spec.cell_only]
        return f"{name}({', '.join(args)})"

    def _break_call(self, inst, stack, reason) -> None:
        if inst.opname == "CALL":
            n = inst.arg + 2
            kw = self.kw_names
        elif inst.opname == "CALL_KW":
            n = inst.arg + 3  # NOTE: 3.13: the keyword names tuple is the top operand
            kw = tuple(stack[-1].const())
        else:
            n = 3 + (inst.arg & 1)
            if not bc.LAYOUT.ex_call_null_slot and len(stack) > n - 1 and not isinstance(stack[-n], NullVT):
                n -= 1
            kw = ()
        nxt = self.insts[inst.index + 1].offset
        # NOTE: the call's own operands are rebuilt like any other stack slot.
        stack_names, local_names, cell_names = self._prepare(stack, nxt, [], reason)
        call_slots = stack_names[len(stack) - n:]
        self._guarded(f"___r = {self._call_expr(inst, call_slots, kw)}", stack_names)
        new_stack, reentered = self._leave_grad_blocks(stack, stack_names[: len(stack) - n])
        self.cg.line("return " + self._resume_call(nxt, new_stack + ["___r"], local_names, cell_names, True,
                                                   reentered))
        self.body = self.cg.lines

    def _call_expr(self, inst, slots: list, kw: tuple) -> str:
        if inst.opname == "CALL_FUNCTION_EX":
            slots = [s for s in slots if s is not None]
            fn, args = slots[0], slots[1]
            kwargs = slots[2] if len(slots) > 2 else "{}"
            return f"___kcall({fn}, tuple({args}), {kwargs})"
        if inst.opname == "CALL_KW":
            slots = slots[:-1]  # the keyword names, already in ``kw``
        if slots[0] is None:
            fn, args = slots[1], slots[2:]
        elif slots[1] is None and bc.LAYOUT.null_after_callable:
            fn, args = slots[0], slots[2:]
        else:
            fn, args = slots[0], slots[1:]
        npos = len(args) - len(kw)
        pos = "".join(a + ", " for a in args[:npos])
        kws = ", ".join(f"{k!r}: {a}" for k, a in zip(kw, args[npos:]))
        return f"___kcall({fn}, ({pos}), {{{kws}}})"

    def _break_jump(self, inst, stack, reason) -> None:
        nxt = self.insts[inst.index + 1].offset
        stack_names, local_names, cell_names = self._prepare(stack, min(nxt, inst.argval), [], reason)
        cond = stack_names[-1]
        rest, reentered = self._leave_grad_blocks(stack, stack_names[:-1])
        taken = self._resume_call(inst.argval, rest, local_names, cell_names, True, reentered)
        fall = self._resume_call(nxt, rest, local_names, cell_names, True, reentered)
        test = cond if inst.opname.endswith("IF_TRUE") else f"not {cond}"
        self.cg.line(f"if {test}:")
        self.cg.line(f"    return {taken}")
        self.cg.line(f"return {fall}")
        self.body = self.cg.lines

    def _break_eager(self, inst, stack, reason, simple_ok: bool = True) -> None:
        simple = simple_step(inst, len(stack)) if simple_ok else None
        offset = self.insts[inst.index + 1].offset if simple else inst.offset
        stack_names, local_names, cell_names = self._prepare(stack, offset, [], reason)
        if simple is None:
            slot = _callable_slot(inst, stack)
            if slot is not None and stack_names[slot] is not None:
                # NOTE: the call runs in the eager remainder (inside the frame's try block);
                # its callee still goes through kcall, so it is compiled as a frame of its own.
                self.cg.line(f"{stack_names[slot]} = ___kwrap({stack_names[slot]})")
            if bc.LAYOUT.jump_wants_bool and inst.opname in _TRUTH_JUMPS and stack_names and stack_names[-1]:
                # NOTE: 3.13's jump reads an exact bool (its TO_BOOL was a no-op in capture).
                self.cg.line(f"{stack_names[-1]} = bool({stack_names[-1]})")
            stack_names, reentered = self._leave_grad_blocks(stack, stack_names)
            self.cg.line("return " + self._resume_call(inst.offset, stack_names, local_names, cell_names, False,
                                                       reentered))
        else:
            # NOTE: a simple instruction runs here in Python; the rest resumes compiled.
            npop, code, push = simple
            args = stack_names[len(stack) - npop:]
            if None in args:
                raise Unsupported("NULL operand at a graph break", where=self.where())
            self._guarded(code.format(*args), stack_names)
            kept, reentered = self._leave_grad_blocks(stack, stack_names[: len(stack) - npop])
            self.cg.line("return " + self._resume_call(offset, kept + push, local_names, cell_names, True,
                                                       reentered))
        self.body = self.cg.lines


def _data_condition(v) -> bool:
    """A jump condition known only at run time: a tensor, or a value read from tensor data
    (the graph returns it, both branches become resume functions)."""
    from .variables.symbolic import SymNodeVT, has_unbacked

    return isinstance(v, TensorVT) or (isinstance(v, SymNodeVT) and has_unbacked(v.sym))


def _grad_with_exits(code, insts: list, idx: dict, offset: int, stack: list):
    """Stack slots of the replayable ``__exit__`` callables (grad mode, no-op contexts) of
    every with-block around ``offset`` (innermost first); None when any enclosing handler is
    something else (a try block).

    NOTE: the exception table names only the innermost handler of an instruction; an outer
    with-block is found through the inner one's cleanup (``COPY 3; POP_EXCEPT; RERAISE 1``,
    where the handler's own region leads), whose handler is the next one out."""
    from .variables.objects import ReplayableExitVT

    table = bc.parse_exception_table(code.co_exceptiontable)

    def covering(off: int):
        return next((e for e in table if e.start <= off <= e.end), None)

    slots: list = []
    e = covering(offset)
    while e is not None and len(slots) <= len(table):
        i = idx.get(e.target)
        ok = i is not None and i + 1 < len(insts) and insts[i].opname == "PUSH_EXC_INFO" \
            and insts[i + 1].opname == "WITH_EXCEPT_START"
        if not ok or e.depth < 1 or e.depth > len(stack) or not isinstance(stack[e.depth - 1], ReplayableExitVT):
            return None
        slots.append(e.depth - 1)
        cleanup = covering(e.target)
        e = covering(cleanup.target) if cleanup is not None else None
    return slots


def _generic_with_exits(code, offset: int, stack: list) -> bool:
    """Whether ``offset`` lies inside a with-block of a context manager of a user class
    (its ``__exit__`` is a user method on the stack): PyTorch's generic context managers."""
    from .variables.callables import UserMethodVT

    for e in bc.parse_exception_table(code.co_exceptiontable):
        if e.start <= offset <= e.end and 1 <= e.depth <= len(stack):
            v = stack[e.depth - 1]
            if isinstance(v, UserMethodVT) and v.fn.__name__ == "__exit__":
                return True
    return False


def _skip_frame_error(what: str, err: Unsupported, why: str, hint: str) -> Unsupported:
    """An Unsupported that makes the whole frame run eagerly (``skip_frame``), keeping ``err``'s
    place in the user's code."""
    out = Unsupported(f"{what}: {err.what}", why=why, where=err.where, hint=hint)
    out.user_stack = getattr(err, "user_stack", None)
    out.skip_frame = True
    return out


def generic_ctx_break(code: types.CodeType, err: Unsupported) -> Unsupported:
    """The error that makes a frame run eagerly: ``err`` broke the graph inside the with-block
    of a user-defined context manager, whose ``__exit__`` kiln cannot replay around a break."""
    return _skip_frame_error(
        "graph break under a user-defined context manager", err,
        f"the with-block in {code.co_name} cannot be resumed after a graph break, so the frame runs "
        "eagerly (as in PyTorch); the functions it calls (the context manager's __enter__ / __exit__ "
        "too) are compiled as frames of their own",
        "move the context manager out of the compiled region, or the graph break out of the with-block")


_CALL_OPS = ("CALL", "CALL_KW", "CALL_FUNCTION_EX")
# NOTE: the other instructions PyTorch resumes after (its break_graph_if_unsupported ones).
_RESUMABLE_OPS = ("STORE_ATTR", "STORE_SUBSCR", "COMPARE_OP")


def except_block_break(code: types.CodeType, err: Unsupported) -> Unsupported:
    """The error that makes a frame run eagerly: ``err`` broke the graph inside an ``except``
    block of ``code`` (an exception the region raised and is handling cannot be resumed)."""
    return _skip_frame_error(
        "graph break inside an except block", err,
        f"the except block in {code.co_name} handles an exception raised in the compiled region; it "
        "cannot be resumed after a graph break, so the frame runs eagerly; the functions it calls "
        "are compiled as frames of their own",
        "move the graph break out of the except block")


def loop_break(code: types.CodeType, err: Unsupported) -> Unsupported:
    """The error that makes a frame run eagerly: ``err`` broke the graph inside a loop of ``code``."""
    return _skip_frame_error(
        "graph break in loop", err,
        f"a graph break inside a loop of {code.co_name} would break again on every iteration, so the "
        "frame runs eagerly (as in PyTorch); the functions it calls are compiled as frames of their own",
        "move the loop body into a function of its own, or the graph break out of the loop")


_TRUTH_JUMPS = {op for op in COND_JUMPS if op.endswith(("IF_TRUE", "IF_FALSE"))}


def _callable_slot(inst: bc.Inst, stack: list):
    """Stack index of the callable a CALL / CALL_KW / CALL_FUNCTION_EX is about to call."""
    if inst.opname in ("CALL", "CALL_KW"):
        n = inst.arg + (inst.opname == "CALL_KW")  # NOTE: CALL_KW's keyword names on top
        if len(stack) < n + 2:
            return None
        if bc.LAYOUT.null_after_callable:
            return len(stack) - n - 2
        return len(stack) - n - 1 if isinstance(stack[-n - 2], NullVT) else len(stack) - n - 2
    if inst.opname == "CALL_FUNCTION_EX":
        return len(stack) - 2 - (inst.arg & 1) - bc.LAYOUT.ex_call_null_slot
    return None


def simple_step(inst: bc.Inst, depth: int):
    """(operands popped, Python statement over them, stack slots pushed) for
    instructions the generated code can run itself at a graph break; else None."""
    from .operators import NB_OPS

    op, name = inst.opname, inst.argval
    if op in ("LOAD_METHOD", "LOAD_ATTR"):
        if not bc.is_method_load(inst):
            return 1, f"___r = {{0}}.{name}", ["___r"]
        return 1, f"___r = {{0}}.{name}", ["___r", None] if bc.LAYOUT.null_after_callable else [None, "___r"]
    if op == "BINARY_SUBSCR":
        return 2, "___r = {0}[{1}]", ["___r"]
    if op == "STORE_ATTR":
        return 2, f"{{1}}.{name} = {{0}}", []
    if op == "STORE_SUBSCR":
        return 3, "{1}[{2}] = {0}", []
    if op == "BINARY_OP":
        return 2, f"___r = ___ops[{inst.arg}]({{0}}, {{1}})", ["___r"]
    if op == "COMPARE_OP":
        return 2, f"___r = {{0}} {bc.compare_symbol(inst)} {{1}}", ["___r"]
    if op == "CONTAINS_OP":
        return 2, f"___r = {{0}} {'not in' if inst.arg else 'in'} {{1}}", ["___r"]
    if op == "UNARY_NOT":
        return 1, "___r = not {0}", ["___r"]
    return None


def _vt_of(out: OutputGraph, node) -> TensorVT:
    return TensorVT(node, node.meta.get("example_value"))


def compile_frame(ctx, fn: types.FunctionType, args: tuple, kwargs: dict):
    """Trace one call of ``fn``; returns (entry, why) generated functions."""
    check_python_version()
    if fn.__code__.co_flags & bc.UNSUPPORTED_FLAGS:
        unsupported(f"generator or coroutine function {fn.__qualname__}")
    bound = frame_signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    break_step, break_error = None, None
    recaptures = MAX_RECAPTURES
    for _ in range(MAX_RESTARTS + MAX_RECAPTURES):
        prev_grad = torch.is_grad_enabled()
        tx = RootTranslator(ctx, fn, bound, break_step, break_error)
        try:
            with _tracing_context(tx.output):
                tx.run()
        except Done:
            return _finish(ctx, fn, tx)
        except Restart as r:
            if break_step is not None:
                raise r.error
            break_step, break_error = r.step, r.error
        except RecaptureFrame as e:
            # NOTE: an autograd.Function whose capture failed half-way is now marked opaque
            # (variables/autograd_fn.py); the frame is captured again from its start.
            if recaptures == 0:
                raise Unsupported(f"{e.what}, and so do too many others in this frame",
                                  why=f"the frame was captured again {MAX_RECAPTURES} times",
                                  hint="the frame runs eagerly") from None
            recaptures -= 1
            continue
        finally:
            torch._C._set_grad_enabled(prev_grad)
            unwind_autocast(tx.output)
    raise break_error


@contextlib.contextmanager
def _tracing_context(output: OutputGraph):
    """torch's TracingContext of the frame's fake mode while its bytecode is traced (PyTorch's
    capture keeps one): inlined calls push their caller's frame on it (``calling_frame``)."""
    from torch._guards import TracingContext, tracing

    with tracing(TracingContext(output.fake_mode)), TracingContext.current_frame(None):
        yield


_VERSION_WARNED = False


def check_python_version() -> None:
    """Refuse an interpreter the opcode handlers were not tested on: warn once per
    process (a recorded fallback), then raise Unsupported for every frame (each runs
    eagerly, or the error reaches the user under fullgraph=True)."""
    global _VERSION_WARNED
    reason = bc.unsupported_version_reason()
    if reason is None:
        return
    if not _VERSION_WARNED:
        _VERSION_WARNED = True
        record_fallback("capture", "every compiled function", reason)
    err = Unsupported(f"capture on Python {'.'.join(map(str, bc.PY))}", why=reason,
                      hint=f"use Python {'.'.join(map(str, bc.OLDEST_TESTED))} to "
                           f"{'.'.join(map(str, bc.NEWEST_TESTED))} to compile")
    err.fallback_recorded = True  # NOTE: recorded once above; the frame cache must not record it per frame
    raise err


def _finish(ctx, fn, tx: RootTranslator):
    ns = base_namespace(tx.output, ctx)
    ns["___graph"] = tx.compiled
    guards = tx.output.guards
    if tx.output.marked_dims:
        check_constraints(tx.output.fake_mode.shape_env, tx.output.marked_dims, tx.output.symbols.human)
    if tx.output.fake_mode.shape_env is not None:
        from .dynamic import shape_guards

        from torch._guards import CompileContext

        listed = getattr(CompileContext.try_get(), "shape_env_guards", [])
        for expr, reason in shape_guards(tx.output.fake_mode.shape_env, tx.output.symbols):
            guards.shape(expr, reason)
            listed.append(expr)
    tx.output.frame_state.compiles += 1
    entry, why, _ = build_entry(fn, guards, tx.graph_args, tx.body, ns, fn.__qualname__)
    entry.__kiln_guards__ = list(guards.guards)
    entry.__kiln_id_matched__ = dict(guards.id_matched)
    entry.__kiln_export__ = getattr(tx, "export_info", None)
    return entry, why
