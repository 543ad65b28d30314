"""Eager copies of a frame whose calls go through a hook (kiln's stand-in for an eval-frame callback).

In: a code object and a ``hook(callable) -> callable``.  Out: a copy of the code object that
runs as the original does, except that the callable of every call it makes (``CALL``,
``CALL_KW``, ``CALL_FUNCTION_EX``) is first passed through ``hook``; or ``None`` when the code
cannot be rewritten (a generator, a stack shape the analysis below does not follow), and the
frame then runs as it is.

Why: PyTorch's capture sees every Python frame (PEP 523).  A frame it skips (a graph break
inside a loop of that frame) runs eagerly, and each function it calls is a frame of its own,
compiled.  kiln has no eval-frame hook; a skipped frame runs this copy of its code, whose hook
(``CompileContext.kwrap``) turns a user function into its compiled wrapper.

How: instructions are inserted right before each call (before its ``KW_NAMES`` / ``PRECALL``):
``SWAP d`` brings the callable, ``d`` slots deep, to the top, ``hook`` is called on it, and
``SWAP d`` puts it back.  Where the callable sits depends on whether the slot below it is
NULL (3.11/3.12: ``[NULL, f, args]`` or ``[f, self, args]``), which a small abstract
interpretation of the stack finds; method loads (``LOAD_METHOD``, ``LOAD_ATTR`` /
``LOAD_SUPER_ATTR`` with the method flag), whose NULL-or-not is only known at run time, are
replaced by the plain attribute load and ``PUSH_NULL; SWAP 2``.  3.13 keeps the callable in
the first slot always.  Jumps, the exception table and the location table are re-assembled.

``BEFORE_WITH`` calls the manager's ``__enter__`` (and the with-block's end its ``__exit__``) with
no call instruction of its own: before it, the manager is replaced by a ``_RoutedWith`` standing
for it, whose two methods call the manager's through ``hook``.

Invariants: every original instruction runs, in its order, with the same stack below the
inserted code; original code's line numbers and columns are kept (tracebacks point at the
user's lines).  Imports nothing from torch (the bytecode layer).
"""
from __future__ import annotations

import dis
import opcode
import types
from dataclasses import dataclass
from typing import Callable, Optional

from .bytecode import (LAYOUT, UNSUPPORTED_FLAGS, ExcEntry, assemble_exception_table,
                       parse_exception_table)

_OP = dis.opmap
_EXT = _OP["EXTENDED_ARG"]
_JREL = set(dis.hasjrel)
_HAS_PRECALL = "PRECALL" in _OP
# NOTE: 3.11 has a LOAD_METHOD opcode; from 3.12 it is a pseudo-instruction (numbered past 255)
# and LOAD_ATTR carries the method flag in its argument's low bit.
_ATTR_METHOD_FLAG = _OP.get("LOAD_METHOD", 256) > 255
_NO_FALLTHROUGH = {_OP[n] for n in ("JUMP_FORWARD", "JUMP_BACKWARD", "JUMP_BACKWARD_NO_INTERRUPT",
                                    "RETURN_VALUE", "RETURN_CONST", "RAISE_VARARGS", "RERAISE")
                   if n in _OP and _OP[n] < 256}
_RETURNS = {_OP[n] for n in ("RETURN_VALUE", "RETURN_CONST") if n in _OP}
_CALL_OPS = {_OP[n] for n in ("CALL", "CALL_KW", "CALL_FUNCTION_EX") if n in _OP}
_BEFORE_WITH = _OP.get("BEFORE_WITH", -1)


class RouteError(Exception):
    """The code cannot be rewritten; the caller runs the original."""


class _RoutedWith:
    """Stands for a context manager in a routed copy: ``__enter__`` / ``__exit__`` are the
    manager's own, looked up on its type (as ``with`` does) and passed through the hook."""

    __slots__ = ("_mgr", "_hook")

    def __init__(self, mgr: object, hook: Callable):
        self._mgr, self._hook = mgr, hook

    def __enter__(self):
        return self._hook(type(self._mgr).__enter__)(self._mgr)

    def __exit__(self, *exc):
        return self._hook(type(self._mgr).__exit__)(self._mgr, *exc)


def _routed_with(hook: Callable) -> Callable:
    def stand_in(mgr: object) -> object:
        # NOTE: a manager without the protocol is left as it is, so ``with`` raises its own error.
        tp = type(mgr)
        if not (hasattr(tp, "__enter__") and hasattr(tp, "__exit__")):
            return mgr
        return _RoutedWith(mgr, hook)
    return stand_in


def _ncache(op: int) -> int:
    ce = opcode._inline_cache_entries
    if isinstance(ce, dict):  # NOTE: 3.13 keys the table by name
        return ce.get(dis.opname[op], 0)
    return ce[op] if op < len(ce) else 0


@dataclass
class _Ins:
    start: int  # offset of the instruction's first code unit (its EXTENDED_ARGs included)
    end: int  # offset after it (its inline caches included)
    op: int
    arg: int
    target: Optional[int] = None  # jump target, an original offset

    @property
    def name(self) -> str:
        return dis.opname[self.op]


def decode(code: types.CodeType) -> list[_Ins]:
    """The instructions of ``code`` (EXTENDED_ARG folded in, caches skipped)."""
    raw = code.co_code
    out: list[_Ins] = []
    i = 0
    while i < len(raw):
        start, ext = i, 0
        while raw[i] == _EXT:
            ext = (ext | raw[i + 1]) << 8
            i += 2
        op, arg = raw[i], ext | raw[i + 1]
        i += 2 + 2 * _ncache(op)
        ins = _Ins(start, i, op, arg)
        if op in _JREL:
            ins.target = i - 2 * arg if "BACKWARD" in ins.name else i + 2 * arg
        out.append(ins)
    return out


def maybe_has_backedge(code: types.CodeType, offset: int) -> bool:
    """PyTorch's heuristic for "this instruction is inside a loop": some jump after the
    instruction at ``offset``, before the first return after it, goes back before it."""
    for ins in decode(code):
        if ins.start <= offset:
            continue
        if ins.op in _RETURNS:
            return False
        if ins.target is not None and ins.target <= offset:
            return True
    return False


# ---------------------------------------------------------------- stack analysis (3.11/3.12)
_N, _V, _X = "N", "V", "X"  # a slot holding NULL, a value, either (paths disagree)


def _effect(ins: _Ins, jump: bool) -> int:
    arg = ins.arg if ins.op >= dis.HAVE_ARGUMENT else None
    return dis.stack_effect(ins.op, arg, jump=jump)


def _transfer(ins: _Ins, tags: tuple, jump: bool) -> tuple:
    name = ins.name
    t = list(tags)

    def pop(n: int) -> None:
        if n > len(t):
            raise RouteError(f"stack underflow at {ins.start} {name}")
        del t[len(t) - n:]

    if name == "PUSH_NULL":
        t.append(_N)
    elif name == "LOAD_GLOBAL":
        t += [_N, _V] if ins.arg & 1 else [_V]
    elif name == "LOAD_METHOD" or (name == "LOAD_ATTR" and _ATTR_METHOD_FLAG and ins.arg & 1):
        pop(1)
        t += [_N, _V]  # NOTE: rewritten as the plain attribute load, PUSH_NULL, SWAP 2
    elif name == "LOAD_SUPER_ATTR":
        pop(3)
        t += [_N, _V] if ins.arg & 1 else [_V]
    elif name in ("PRECALL", "KW_NAMES"):
        pass
    elif name == "CALL":
        pop(ins.arg + 2)
        t.append(_V)
    elif name == "CALL_FUNCTION_EX":
        pop(3 + (ins.arg & 1))
        t.append(_V)
    elif name == "SWAP":
        if ins.arg > len(t):
            raise RouteError("SWAP below the stack")
        t[-1], t[-ins.arg] = t[-ins.arg], t[-1]
    elif name == "COPY":
        if ins.arg > len(t):
            raise RouteError("COPY below the stack")
        t.append(t[-ins.arg])
    else:
        # NOTE: every other instruction pops values only (NULLs are consumed by calls), so the
        # slots that stay keep their tags and what it pushes is a value.
        e = _effect(ins, jump)
        if e < 0:
            pop(-e)
        else:
            t += [_V] * e
    return tuple(t)


def _merge(a: tuple, b: tuple) -> tuple:
    if len(a) != len(b):
        raise RouteError("stack depths disagree at a join")
    return tuple(x if x == y else _X for x, y in zip(a, b))


def _null_below_callable(code: types.CodeType, insts: list[_Ins]) -> dict[int, str]:
    """For each CALL (by index): the tag of the slot below its callable-or-self slot."""
    at = {ins.start: i for i, ins in enumerate(insts)}
    handlers = parse_exception_table(code.co_exceptiontable)
    states: dict[int, tuple] = {0: ()}
    work = [0]
    out: dict[int, str] = {}

    def flow(i: Optional[int], tags: tuple) -> None:
        if i is None:
            raise RouteError("a jump into the middle of an instruction")
        old = states.get(i)
        new = tags if old is None else _merge(old, tags)
        if new != old:
            states[i] = new
            work.append(i)

    while work:
        i = work.pop()
        ins, tags = insts[i], states[i]
        if ins.name == "CALL":
            out[i] = tags[-(ins.arg + 2)] if len(tags) >= ins.arg + 2 else _X
        for h in handlers:
            if h.start <= ins.start <= h.end:
                if h.depth > len(tags):
                    raise RouteError("exception handler deeper than the stack")
                flow(at.get(h.target), tags[:h.depth] + (_V,) * (1 + h.lasti))
                break
        if ins.target is not None:
            flow(at.get(ins.target), _transfer(ins, tags, jump=True))
        if ins.op not in _NO_FALLTHROUGH and i + 1 < len(insts):
            flow(i + 1, _transfer(ins, tags, jump=False))
    return out


# ---------------------------------------------------------------- rewriting
@dataclass
class _New:
    op: int
    arg: int
    origin: int  # index of the original instruction whose position it reports
    target: Optional[int] = None  # original instruction index this jump goes to


def _wrap_top(origin: int, const_index: int) -> list[_New]:
    """``f`` on top of the stack -> ``hook(f)``."""
    def n(name, arg=0):
        return _New(_OP[name], arg, origin)

    if LAYOUT.null_after_callable:  # 3.13: [callable, NULL, args]
        seq = [n("LOAD_CONST", const_index), n("SWAP", 2), n("PUSH_NULL"), n("SWAP", 2)]
    else:  # 3.11/3.12: [NULL, callable, args]
        seq = [n("PUSH_NULL"), n("SWAP", 2), n("LOAD_CONST", const_index), n("SWAP", 2)]
    if _HAS_PRECALL:
        seq.append(n("PRECALL", 1))
    return seq + [n("CALL", 1)]


def _wrap_at(depth: int, origin: int, const_index: int) -> list[_New]:
    seq = _wrap_top(origin, const_index)
    if depth == 1:
        return seq
    swap = _New(_OP["SWAP"], depth, origin)
    return [swap] + seq + [_New(_OP["SWAP"], depth, origin)]


def _callable_depth(insts: list[_Ins], i: int, tags: dict) -> Optional[int]:
    """How deep below the top the callable of call ``insts[i]`` is, just before its prologue."""
    ins = insts[i]
    if ins.name == "CALL_FUNCTION_EX":
        return 2 + (ins.arg & 1) + LAYOUT.ex_call_null_slot
    if ins.name == "CALL_KW":  # NOTE: 3.13: the keyword names tuple is on top
        return ins.arg + 3
    if LAYOUT.null_after_callable:
        return ins.arg + 2
    if i not in tags:
        return None  # NOTE: unreachable (the original code before a resume function's target)
    tag = tags[i]
    if tag == _X:
        raise RouteError(f"cannot tell the callable of the call at offset {ins.start}")
    return ins.arg + 1 if tag == _N else ins.arg + 2


def _prologue(insts: list[_Ins], i: int) -> int:
    """Index of the first instruction of call ``i``'s prologue (KW_NAMES, PRECALL, the call)."""
    j = i
    if j > 0 and insts[j - 1].name == "PRECALL":
        j -= 1
    if j > 0 and insts[j - 1].name == "KW_NAMES":
        j -= 1
    return j


def _method_load(ins: _Ins) -> Optional[list]:
    """A method load as (plain load op, arg): it is then followed by PUSH_NULL, SWAP 2."""
    if LAYOUT.null_after_callable:
        return None
    if ins.name == "LOAD_METHOD":
        return [_OP["LOAD_ATTR"], ins.arg]
    if _ATTR_METHOD_FLAG and ins.name in ("LOAD_ATTR", "LOAD_SUPER_ATTR") and ins.arg & 1:
        return [ins.op, ins.arg & ~1]
    return None


def _nunits(arg: int) -> int:
    n = 1
    while arg > 0xFF:
        arg >>= 8
        n += 1
    return n


def _assemble(new: list[_New], label: list[int]) -> tuple[bytes, list[int]]:
    """Bytes of ``new`` and each new instruction's offset; jump args are solved for."""
    size = [_nunits(x.arg) for x in new]
    while True:
        offs, o = [], 0
        for x, s in zip(new, size):
            offs.append(o)
            o += 2 * (s + _ncache(x.op))
        grew = False
        for k, x in enumerate(new):
            if x.target is None:
                continue
            end = offs[k] + 2 * (size[k] + _ncache(x.op))
            dest = offs[label[x.target]]
            x.arg = (end - dest if "BACKWARD" in dis.opname[x.op] else dest - end) // 2
            if x.arg < 0:
                raise RouteError("a jump changed direction")
            if _nunits(x.arg) > size[k]:
                size[k] = _nunits(x.arg)
                grew = True
        if not grew:
            break
    out = bytearray()
    for x, s in zip(new, size):
        for shift in range(8 * (s - 1), 0, -8):
            out += bytes([_EXT, (x.arg >> shift) & 0xFF])
        out += bytes([x.op, x.arg & 0xFF])
        out += bytes(2 * _ncache(x.op))
    return bytes(out), offs


def _write_varint(out: list, val: int) -> None:
    while val >= 64:
        out.append(64 | (val & 63))
        val >>= 6
    out.append(val)


def _write_svarint(out: list, val: int) -> None:
    _write_varint(out, ((-val) << 1) | 1 if val < 0 else val << 1)


def _location_table(first_line: int, units: list) -> bytes:
    """co_linetable for per-code-unit positions (lineno, end_lineno, col, end_col)."""
    out: list = []
    line = first_line
    i = 0
    while i < len(units):
        pos = units[i]
        n = 1
        while n < 8 and i + n < len(units) and units[i + n] == pos:
            n += 1
        lineno, end_line, col, end_col = pos
        if lineno is None:
            out.append(0x80 | (15 << 3) | (n - 1))
        elif col is None:
            out.append(0x80 | (13 << 3) | (n - 1))
            _write_svarint(out, lineno - line)
            line = lineno
        else:
            out.append(0x80 | (14 << 3) | (n - 1))
            _write_svarint(out, lineno - line)
            _write_varint(out, max((end_line if end_line is not None else lineno) - lineno, 0))
            _write_varint(out, col + 1)
            _write_varint(out, end_col + 1 if end_col is not None else 0)
            line = lineno
        i += n
    return bytes(out)


def route_calls(code: types.CodeType, hook: Callable) -> types.CodeType:
    """A copy of ``code`` in which every call's callable goes through ``hook`` first.

    Raises RouteError when the code cannot be rewritten."""
    if code.co_flags & UNSUPPORTED_FLAGS:
        raise RouteError("generators and coroutines are not rewritten")
    insts = decode(code)
    if not any(ins.op in _CALL_OPS or ins.op == _BEFORE_WITH for ins in insts):
        return code
    tags = {} if LAYOUT.null_after_callable else _null_below_callable(code, insts)
    at = {ins.start: i for i, ins in enumerate(insts)}
    k = len(code.co_consts)
    prefix: dict[int, list] = {}
    for i, ins in enumerate(insts):
        depth = _callable_depth(insts, i, tags) if ins.op in _CALL_OPS else None
        if depth is not None:
            prefix.setdefault(_prologue(insts, i), []).extend(_wrap_at(depth, i, k))
        elif ins.op == _BEFORE_WITH:  # NOTE: the manager on top -> its stand-in (const k + 1)
            prefix.setdefault(i, []).extend(_wrap_top(i, k + 1))
    new: list[_New] = []
    label: list[int] = []
    for i, ins in enumerate(insts):
        label.append(len(new))
        new += prefix.get(i, [])
        meth = _method_load(ins)
        if meth is not None:
            new += [_New(meth[0], meth[1], i), _New(_OP["PUSH_NULL"], 0, i), _New(_OP["SWAP"], 2, i)]
            continue
        if ins.op == _EXT:
            raise RouteError("a lone EXTENDED_ARG")
        tgt = None
        if ins.target is not None:
            tgt = at.get(ins.target)
            if tgt is None:
                raise RouteError("a jump into the middle of an instruction")
        new.append(_New(ins.op, ins.arg, i, tgt))
    raw, offs = _assemble(new, label)
    # NOTE: each original instruction's new span starts at its label (inserted code included).
    span_start = [offs[label[i]] for i in range(len(insts))] + [len(raw)]

    def span_of(offset: int) -> int:
        for i, ins in enumerate(insts):
            if ins.start <= offset < ins.end:
                return i
        raise RouteError("exception table entry outside the code")

    entries = []
    for e in parse_exception_table(code.co_exceptiontable):
        first, last, tgt = span_of(e.start), span_of(e.end), at.get(e.target)
        if tgt is None or insts[first].start != e.start:
            raise RouteError("exception table entry not on an instruction boundary")
        entries.append(ExcEntry(span_start[first], span_start[last + 1] - 2, span_start[tgt], e.depth, e.lasti))
    positions = list(code.co_positions())
    units: list = []
    for x, o in zip(new, offs):
        ins = insts[x.origin]
        pos = positions[(ins.end - 2 * _ncache(ins.op) - 2) // 2]
        units.append(pos)
    # NOTE: expand to one position per code unit (EXTENDED_ARGs and caches included).
    per_unit: list = []
    for k2, pos in enumerate(units):
        end = offs[k2 + 1] if k2 + 1 < len(offs) else len(raw)
        per_unit += [pos] * ((end - offs[k2]) // 2)
    return code.replace(
        co_code=raw,
        co_consts=code.co_consts + (hook, _routed_with(hook)),
        co_stacksize=code.co_stacksize + 3,
        co_exceptiontable=assemble_exception_table(entries),
        co_linetable=_location_table(code.co_firstlineno, per_unit),
    )


def routed_function(fn: types.FunctionType, hook: Callable) -> Optional[types.FunctionType]:
    """A copy of ``fn`` whose calls go through ``hook`` (see module docstring), or None."""
    try:
        code = route_calls(fn.__code__, hook)
    except RouteError:
        return None
    out = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    out.__kwdefaults__ = fn.__kwdefaults__
    out.__qualname__ = fn.__qualname__
    return out


__all__ = ["route_calls", "routed_function", "maybe_has_backedge", "RouteError", "decode"]
