"""Opcode handlers of ``try`` / ``except`` (CPython 3.11+: exception tables).

An exception raised by a traced instruction (:class:`~.variables.exceptions.ObservedException`)
is caught in ``Translator.step``: the code's exception table names the handler that covers
the instruction (its stack depth, whether it wants the raising offset), as CPython unwinds.
The handlers below then run the ``except`` blocks: the current exception is the one
``PUSH_EXC_INFO`` made current, restored by ``POP_EXCEPT``; ``CHECK_EXC_MATCH`` tests an
``except`` clause's classes; ``RERAISE`` and ``raise`` raise again.
"""
from __future__ import annotations

from typing import Optional

from kiln.exc import Unsupported

from .bytecode import handles, parse_exception_table
from .variables.base import VT, ConstantVT, unsupported
from .variables.exceptions import ExceptionVT, matches, raise_exception


class ExceptHandlers:
    current_exc: Optional[VT] = None   # the exception an except block is handling (sys.exception())

    def unwind_to_handler(self, inst, exc: ExceptionVT) -> bool:
        """Jump to the handler covering ``inst`` for ``exc`` (False: none in this frame)."""
        table = self.__dict__.get("_exc_table")
        if table is None:
            table = self._exc_table = parse_exception_table(self.code.co_exceptiontable)
        entry = next((e for e in table if e.start <= inst.offset <= e.end), None)
        if entry is None:
            return False
        i = self.idx[entry.target]
        if i + 1 < len(self.insts) and self.insts[i + 1].opname == "WITH_EXCEPT_START":
            # NOTE: a with-block's cleanup would call __exit__ with the exception; not modelled.
            # A plain graph break (no except in the region may catch it before __exit__ ran).
            raise Unsupported(f"{exc.exc_type.__name__} raised inside a with-block",
                              why="the context manager's __exit__ would handle it; it runs eagerly")
        del self.stack[entry.depth:]
        if entry.lasti:
            self.push(ConstantVT(inst.offset))
        self.push(exc)
        self.jump_to(entry.target)
        return True

    @handles("PUSH_EXC_INFO")
    def PUSH_EXC_INFO(self, inst):
        exc = self.pop()
        self.push(self.current_exc if self.current_exc is not None else ConstantVT(None))
        self.push(exc)
        self.current_exc = exc

    @handles("POP_EXCEPT")
    def POP_EXCEPT(self, inst):
        prev = self.pop()
        self.current_exc = None if isinstance(prev, ConstantVT) and prev.value is None else prev

    @handles("CHECK_EXC_MATCH")
    def CHECK_EXC_MATCH(self, inst):
        spec = self.pop()
        self.push(ConstantVT(matches(self.stack[-1], spec)))

    @handles("RERAISE")
    def RERAISE(self, inst):
        raise_exception(self.pop())

    @handles("RAISE_VARARGS")
    def RAISE_VARARGS(self, inst):
        if inst.arg == 0:
            t = self
            while t is not None and t.current_exc is None:
                t = t.parent
            if t is None:
                unsupported("raise with no active exception", why="eager raises RuntimeError")
            raise_exception(t.current_exc)
        cause = self.pop() if inst.arg == 2 else None
        raise_exception(self.pop(), cause)
