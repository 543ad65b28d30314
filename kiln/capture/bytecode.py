"""Bytecode utilities for capture: decoding, handler registry, resume code.

In: a ``types.CodeType``.  Out: decoded instruction lists, opcode handler
tables filtered by CPython version, and new code objects that start in the
middle of an existing function ("resume functions").

This module imports nothing from torch, so the bytecode layer can be tested on
any CPython (3.11, 3.12 and 3.13 are served).
"""
from __future__ import annotations

import dis
import sys
import types
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

PY = sys.version_info[:2]

# NOTE: the CPython versions the opcode handlers were tested on (CI: 3.11, the GPU
# machine: 3.12; 3.13 with PyPI's torch wheel for it).  Bytecode changes between minor
# versions (3.13 reshuffled the stack layouts of calls and loads), so a handler claims
# only these versions, and capture refuses any other interpreter (the frame runs
# eagerly) instead of guessing a layout.
OLDEST_TESTED = (3, 11)
NEWEST_TESTED = (3, 13)

CO_VARARGS = 0x04  # noqa: used by interpreter.bind_args
CO_VARKEYWORDS = 0x08
CO_GENERATOR = 0x20
CO_COROUTINE = 0x80
CO_ASYNC_GENERATOR = 0x200
CO_ITERABLE_COROUTINE = 0x100
UNSUPPORTED_FLAGS = CO_GENERATOR | CO_COROUTINE | CO_ASYNC_GENERATOR | CO_ITERABLE_COROUTINE


# ---------------------------------------------------------------- handlers
def handles(*opnames: str, min_version: tuple = OLDEST_TESTED, max_version: tuple = NEWEST_TESTED):
    """Mark a method as the handler of ``opnames`` on CPython min..max (inclusive).

    The defaults are the oldest and newest versions tested: a handler never claims
    a version it was not run on.

    NOTE: version differences live here, on the handler, never as scattered
    ``sys.version_info`` checks inside handlers.
    """

    def deco(fn: Callable) -> Callable:
        regs = getattr(fn, "_kiln_opcodes", [])
        regs.append((opnames, tuple(min_version), tuple(max_version)))
        fn._kiln_opcodes = regs
        return fn

    return deco


def build_dispatch(cls: type, version: tuple = PY) -> dict[str, str]:
    """opname -> method name, for every handler on ``cls`` serving ``version``."""
    table: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        for name, fn in vars(klass).items():
            for opnames, lo, hi in getattr(fn, "_kiln_opcodes", ()):
                if lo <= version <= hi:
                    for op in opnames:
                        table[op] = name
    return table


def unsupported_version_reason(version: Optional[tuple] = None) -> Optional[str]:
    """Why capture cannot run on CPython ``version`` (default: this interpreter), or None."""
    v = tuple(version if version is not None else PY)[:2]
    if OLDEST_TESTED <= v <= NEWEST_TESTED:
        return None
    lo, hi = (".".join(map(str, t)) for t in (OLDEST_TESTED, NEWEST_TESTED))
    side = "newer" if v > NEWEST_TESTED else "older"
    return (f"Python {'.'.join(map(str, v))} is {side} than the versions kiln's bytecode handlers were "
            f"tested on ({lo} to {hi}); its bytecode may lay out the stack differently, so "
            f"compiled functions run eagerly")


@dataclass(frozen=True)
class StackLayout:
    """The stack conventions of one CPython version that code outside the handlers
    (the graph-break code in convert.py, resume code here) relies on."""

    # 3.11/3.12: a call's operands are [NULL | method, callable | self, args...];
    # 3.13: [callable | method, NULL | self, args...] (the NULL is pushed after the callable).
    null_after_callable: bool
    # 3.13: CALL_FUNCTION_EX always has the NULL slot next to the callable.
    ex_call_null_slot: bool
    # 3.13: POP_JUMP_IF_TRUE/FALSE read an exact bool (TO_BOOL or COMPARE_OP's bool flag
    # converts first), so an eager jump must be handed bool(value).
    jump_wants_bool: bool
    # 3.13: closures are built with LOAD_FAST of the cell's slot (LOAD_CLOSURE is a
    # pseudo-instruction), so LOAD_FAST indexes past the varnames move with them.
    closure_via_load_fast: bool


_LAYOUTS = {
    (3, 11): StackLayout(False, False, False, False),
    (3, 12): StackLayout(False, False, False, False),
    (3, 13): StackLayout(True, True, True, True),
}


def stack_layout(version: Optional[tuple] = None) -> StackLayout:
    """The ``StackLayout`` of CPython ``version`` (default: this interpreter).

    An untested version gets the newest tested layout; capture refuses to run there
    anyway (``unsupported_version_reason``)."""
    v = tuple(version if version is not None else PY)[:2]
    return _LAYOUTS.get(v, _LAYOUTS[NEWEST_TESTED])


LAYOUT = stack_layout()


def compare_symbol(inst: "Inst") -> str:
    """The operator of a COMPARE_OP (``'<'``), without 3.13's ``bool(...)`` marker
    (its flag that the result is converted to bool for a jump)."""
    sym = inst.argval
    if isinstance(sym, str) and sym.startswith("bool(") and sym.endswith(")"):
        return sym[5:-1]
    return sym


def is_method_load(inst: "Inst") -> bool:
    """Whether a LOAD_ATTR / LOAD_METHOD pushes a method pair (NULL-or-self below the value).

    NOTE: 3.12 folded LOAD_METHOD into LOAD_ATTR, flagged by the low bit of its argument
    (3.13 keeps the flag; it pushes the NULL above the value instead of below).
    """
    if inst.opname == "LOAD_METHOD":
        return True
    return inst.opname == "LOAD_ATTR" and PY >= (3, 12) and bool(inst.arg & 1)


# ---------------------------------------------------------------- decoding
@dataclass
class Inst:
    """One decoded instruction (caches dropped)."""

    opname: str
    arg: Optional[int]
    argval: object
    offset: int
    lineno: Optional[int]
    index: int = 0

    def __repr__(self) -> str:
        return f"{self.offset} {self.opname} {self.argval!r}"


def decode(code: types.CodeType) -> tuple[list[Inst], dict[int, int]]:
    """Instructions of ``code`` and a map offset -> index."""
    out: list[Inst] = []
    line = code.co_firstlineno
    for i, ins in enumerate(dis.get_instructions(code)):
        pos = getattr(ins, "positions", None)
        if pos is not None and pos.lineno is not None:
            line = pos.lineno
        out.append(Inst(ins.opname, ins.arg, ins.argval, ins.offset, line, i))
    return out, {ins.offset: ins.index for ins in out}


# ---------------------------------------------------------------- exception table
@dataclass
class ExcEntry:
    start: int
    end: int  # inclusive offset of the last covered instruction
    target: int
    depth: int
    lasti: bool


def _enc_varint(n: int) -> list[int]:
    b = [n & 63]
    n >>= 6
    while n > 0:
        b.append(n & 63)
        n >>= 6
    b.reverse()
    for i in range(len(b) - 1):
        b[i] |= 64
    return b


def _dec_varint(it) -> int:
    b = next(it)
    val = b & 63
    while b & 64:
        val <<= 6
        b = next(it)
        val |= b & 63
    return val


def parse_exception_table(tab: bytes) -> list[ExcEntry]:
    it = iter(tab)
    out = []
    try:
        while True:
            start = _dec_varint(it) * 2
            length = _dec_varint(it) * 2
            target = _dec_varint(it) * 2
            dl = _dec_varint(it)
            out.append(ExcEntry(start, start + length - 2, target, dl >> 1, bool(dl & 1)))
    except StopIteration:
        return out


def assemble_exception_table(entries: Iterable[ExcEntry]) -> bytes:
    b: list[int] = []
    for e in entries:
        first = _enc_varint(e.start // 2)
        first[0] |= 1 << 7
        b.extend(first)
        b.extend(_enc_varint((e.end - e.start + 2) // 2))
        b.extend(_enc_varint(e.target // 2))
        b.extend(_enc_varint((e.depth << 1) + int(e.lasti)))
    return bytes(b)


def in_try_block(code: types.CodeType, offset: int) -> bool:
    return any(e.start <= offset <= e.end for e in parse_exception_table(code.co_exceptiontable))


# ---------------------------------------------------------------- resume code
class ResumeCodeError(Exception):
    """The resume code object could not be built (caller falls back to eager)."""


def _emit(op: str, arg: int = 0) -> list[int]:
    opc = dis.opmap[op]
    out: list[int] = []
    ext = [(arg >> s) & 0xFF for s in (24, 16, 8)]
    started = False
    for e in ext:
        if e or started:
            started = True
            out += [dis.opmap["EXTENDED_ARG"], e]
    return out + [opc, arg & 0xFF]


_DEREF_OPS = {"LOAD_DEREF", "STORE_DEREF", "DELETE_DEREF", "LOAD_CLOSURE", "MAKE_CELL",
              "LOAD_CLASSDEREF", "LOAD_FROM_DICT_OR_DEREF"}


def _shift_deref_args(co_code: bytes, shift: int, first: int) -> bytes:
    """Add ``shift`` to localsplus indexes >= ``first`` (cell-only and free variables
    move when varnames grow; cells that are also varnames keep their slot)."""
    if shift == 0:
        return co_code
    code = bytearray(co_code)
    ops = _DEREF_OPS | ({"LOAD_FAST"} if LAYOUT.closure_via_load_fast else set())
    deref = {dis.opmap[o] for o in ops if o in dis.opmap}
    ext = dis.opmap["EXTENDED_ARG"]
    for i in range(0, len(code), 2):
        if code[i] in deref:
            if i >= 2 and code[i - 2] == ext:
                raise ResumeCodeError("extended cell index")
            if code[i + 1] < first:
                continue
            new = code[i + 1] + shift
            if new > 255:
                raise ResumeCodeError("too many cell variables")
            code[i + 1] = new
    return bytes(code)


def _no_location_table(units: int) -> bytes:
    # NOTE: "no columns" entries with line delta 0: the prefix reports the def line,
    # so tracebacks through resume functions always have a line number.
    out = []
    while units > 0:
        n = min(units, 8)
        out += [0x80 | (13 << 3) | (n - 1), 0]
        units -= n
    return bytes(out)


@dataclass
class ResumeSpec:
    """What the resume function receives: every original varname (positional),
    then one argument per non-NULL stack slot, then cell-only variables.

    Every cell variable of the frame arrives as the cell object itself (a varname's argument
    is its cell; a cell-only one has an argument of its own), as PyTorch's resume functions
    get the frame's cells: a closure made before the break shares them with the rest."""

    code: types.CodeType
    target: int  # offset in the original code to continue at
    stack_nulls: tuple  # per stack slot: True where the slot holds NULL
    dead: tuple  # varnames to delete before jumping (unbound/dead at the break)
    cell_only: tuple  # cellvars not in co_varnames, passed as an argument of their own
    name: str
    # NOTE: stack slots of with-blocks the resume function enters again: the argument is a
    # context manager, and the prologue runs BEFORE_WITH on it (its __exit__ lands in the
    # slot), as PyTorch's resume functions re-enter grad-mode blocks (ReenterWith).
    reentered: tuple = ()

    @property
    def prefix(self) -> str:
        # NOTE: a resume function of a resume function already has ___stack names.
        gen = 0
        while any(v.startswith(f"___s{gen}_") for v in self.code.co_varnames):
            gen += 1
        return f"___s{gen}_"

    @property
    def stack_args(self) -> list[str]:
        p = self.prefix
        return [f"{p}{i}" for i, n in enumerate(self.stack_nulls) if not n]

    @property
    def cell_args(self) -> list[str]:
        return [f"{self.prefix}cell_{c}" for c in self.cell_only]

    @property
    def argnames(self) -> list[str]:
        return list(self.code.co_varnames) + self.stack_args + self.cell_args


def _parameter_names(varnames: list, cellvars: tuple) -> list:
    """The resume function's parameters are the frame's varnames; a name that is no Python
    identifier (pytest's rewritten asserts make ``@py_assert1`` locals) is renamed, which
    changes nothing else: locals are read by index."""
    return [n if n.isidentifier() or n in cellvars else f"___local{i}" for i, n in enumerate(varnames)]


def make_resume_code(spec: ResumeSpec) -> types.CodeType:
    """A code object that rebuilds the stack from arguments and jumps to ``target``."""
    code = spec.code
    if code.co_flags & UNSUPPORTED_FLAGS:
        raise ResumeCodeError("generators and coroutines are not resumable")
    extra = spec.stack_args + spec.cell_args
    stack_args = iter(spec.stack_args)
    varnames = list(code.co_varnames) + extra
    nvar = len(varnames)
    cells = [c for c in code.co_cellvars]
    localsplus = varnames + [c for c in cells if c not in code.co_varnames] + list(code.co_freevars)
    pre: list[int] = []
    if code.co_freevars:
        pre += _emit("COPY_FREE_VARS", len(code.co_freevars))
    # NOTE: no MAKE_CELL: a cell variable's slot receives the caller's cell object (a varname's
    # through its argument, a cell-only one stored into its slot), which LOAD_DEREF / STORE_DEREF
    # and closures then use as the original frame would have.
    for c, arg in zip(spec.cell_only, spec.cell_args):
        pre += _emit("LOAD_FAST", varnames.index(arg))
        pre += _emit("STORE_FAST", localsplus.index(c))
    pre += _emit("RESUME", 0)
    for name in spec.dead:
        pre += _emit("DELETE_FAST", varnames.index(name))
    for i, is_null in enumerate(spec.stack_nulls):
        pre += _emit("PUSH_NULL") if is_null else _emit("LOAD_FAST", varnames.index(next(stack_args)))
        if i in spec.reentered:
            pre += _emit("BEFORE_WITH") + _emit("POP_TOP")  # NOTE: ctx -> ctx.__exit__ (entered)
    jump = _emit("JUMP_FORWARD", spec.target // 2)
    pre += jump
    plen = len(pre)  # bytes
    body = _shift_deref_args(code.co_code, len(extra), len(code.co_varnames))
    entries = parse_exception_table(code.co_exceptiontable)
    for e in entries:
        e.start += plen
        e.end += plen
        e.target += plen
    out = code.replace(
        co_code=bytes(pre) + body,
        co_varnames=tuple(_parameter_names(varnames, code.co_cellvars)),
        co_argcount=nvar,
        co_posonlyargcount=0,
        co_kwonlyargcount=0,
        co_nlocals=nvar,
        co_flags=code.co_flags & ~(CO_VARARGS | CO_VARKEYWORDS),
        co_stacksize=code.co_stacksize + 2,
        co_linetable=_no_location_table(plen // 2) + code.co_linetable,
        co_exceptiontable=assemble_exception_table(entries),
        co_name=spec.name,
        co_qualname=spec.name,
    )
    cell_args = {c: c for c in cells if c in code.co_varnames}
    cell_args.update(zip(spec.cell_only, spec.cell_args))
    _CELL_ARGS[out] = cell_args
    return out


# NOTE: resume code object -> {cell variable: the parameter its cell object arrives in}.
_CELL_ARGS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def resume_cell_args(code: types.CodeType) -> dict:
    """For a resume function's code: each cell variable and the parameter holding its cell."""
    return _CELL_ARGS.get(code, {})


_LOCAL_READS = ("LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_AND_CLEAR", "DELETE_FAST", "LOAD_FAST__LOAD_FAST")
# NOTE: 3.13's superinstructions name two locals (argval is a pair); both count as read
# (for STORE_FAST_LOAD_FAST only the second is, but keeping one more alive is harmless).
_PAIR_READS = ("LOAD_FAST_LOAD_FAST", "STORE_FAST_LOAD_FAST")


def in_loop_body(insts: list[Inst], offset: int) -> bool:
    """Whether ``offset`` lies between a backward jump's target and the jump (a loop body)."""
    return any((ins.opname.startswith("JUMP_BACKWARD") or ins.opname.startswith("POP_JUMP_BACKWARD"))
               and isinstance(ins.argval, int) and ins.argval <= offset < ins.offset for ins in insts)


def loads_after(insts: list[Inst], offset: int) -> Optional[set]:
    """Names possibly read at or after ``offset``; None when the code loops
    (then every local is treated as live)."""
    names: set = set()
    for ins in insts:
        if ins.opname.startswith("JUMP_BACKWARD") or ins.opname.startswith("POP_JUMP_BACKWARD"):
            return None
        if ins.offset >= offset and ins.opname in _LOCAL_READS:
            names.add(ins.argval)
        elif ins.offset >= offset and ins.opname in _PAIR_READS:
            names.update(ins.argval)
    return names


__all__ = [
    "handles", "build_dispatch", "Inst", "decode", "ExcEntry", "parse_exception_table",
    "assemble_exception_table", "in_try_block", "ResumeSpec", "make_resume_code", "resume_cell_args",
    "ResumeCodeError", "loads_after", "in_loop_body", "PY", "UNSUPPORTED_FLAGS", "OLDEST_TESTED", "NEWEST_TESTED",
    "unsupported_version_reason", "is_method_load", "StackLayout", "stack_layout", "LAYOUT",
    "compare_symbol",
]
