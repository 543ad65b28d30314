"""Opcode handlers: jumps, loops, returns."""
from __future__ import annotations

from .bytecode import handles
from .variables.base import ConstantVT, unsupported
from .variables.containers import IteratorVT
from .variables.scalars import assert_on_data
from .variables.symbolic import SymNodeVT
from .variables.tensor import TensorVT

_JUMP_311 = ("POP_JUMP_FORWARD_IF_TRUE", "POP_JUMP_BACKWARD_IF_TRUE", "POP_JUMP_FORWARD_IF_FALSE",
             "POP_JUMP_BACKWARD_IF_FALSE", "POP_JUMP_FORWARD_IF_NONE", "POP_JUMP_BACKWARD_IF_NONE",
             "POP_JUMP_FORWARD_IF_NOT_NONE", "POP_JUMP_BACKWARD_IF_NOT_NONE")
_JUMP_312 = ("POP_JUMP_IF_TRUE", "POP_JUMP_IF_FALSE", "POP_JUMP_IF_NONE", "POP_JUMP_IF_NOT_NONE")
COND_JUMPS = set(_JUMP_311) | set(_JUMP_312)


def _is_none(v) -> bool:
    return isinstance(v, ConstantVT) and v.value is None


def jump_taken(tx, opname: str, v) -> bool:
    """Whether a POP_JUMP_* instruction jumps for value ``v``."""
    if opname.endswith("IF_NOT_NONE"):
        return not _is_none(v)
    if opname.endswith("IF_NONE"):
        return _is_none(v)
    truth = v.truthy(tx)
    return truth if opname.endswith("IF_TRUE") else not truth


class ControlHandlers:
    @handles("JUMP_FORWARD", "JUMP_BACKWARD", "JUMP_BACKWARD_NO_INTERRUPT", "JUMP")
    def JUMP_FORWARD(self, inst):
        self.jump_to(inst.argval)

    @handles(*_JUMP_311, max_version=(3, 11))
    def POP_JUMP_311(self, inst):
        self._cond_jump(inst)

    @handles(*_JUMP_312, min_version=(3, 12))
    def POP_JUMP_312(self, inst):
        self._cond_jump(inst)

    def _cond_jump(self, inst):
        v = self.stack[-1]
        if isinstance(v, (TensorVT, SymNodeVT)) and assert_on_data(self, inst, v):
            return
        if isinstance(v, TensorVT) and not inst.opname.endswith("NONE"):
            self.on_tensor_branch(inst, v)
            return
        self.pop()
        if jump_taken(self, inst.opname, v):
            self.jump_to(inst.argval)

    def on_tensor_branch(self, inst, v):
        v.truthy(self)  # raises Unsupported (data-dependent branch)

    @handles("JUMP_IF_TRUE_OR_POP", "JUMP_IF_FALSE_OR_POP", max_version=(3, 11))
    def JUMP_IF_OR_POP(self, inst):
        v = self.stack[-1]
        truth = v.truthy(self)
        if truth == inst.opname.startswith("JUMP_IF_TRUE"):
            self.jump_to(inst.argval)
        else:
            self.pop()

    # ---------------------------------------------------------- loops
    @handles("GET_ITER")
    def GET_ITER(self, inst):
        v = self.pop()
        self.push(v if isinstance(v, IteratorVT) else IteratorVT(v.unpack(self)))

    def _for_iter_next(self):
        """The loop's next value, or None (iterator popped) when it is exhausted."""
        it = self.stack[-1]
        if not isinstance(it, IteratorVT):
            unsupported(f"iteration over {it}")
        v = it.next(self)
        if v is None:
            self.pop()
        return v

    @handles("FOR_ITER", max_version=(3, 11))
    def FOR_ITER(self, inst):
        v = self._for_iter_next()
        if v is None:
            self.jump_to(inst.argval)
        else:
            self.push(v)

    @handles("FOR_ITER", min_version=(3, 12), max_version=(3, 12))
    def FOR_ITER_312(self, inst):
        v = self._for_iter_next()
        if v is None:
            # NOTE: 3.12 jumps to the END_FOR and skips it (the iterator is popped).
            self.ip = self.idx[inst.argval] + 1
        else:
            self.push(v)

    @handles("FOR_ITER", min_version=(3, 13))
    def FOR_ITER_313(self, inst):
        v = self._for_iter_next()
        if v is None:
            # NOTE: 3.13 ends a loop with END_FOR (pops one) and POP_TOP (the iterator);
            # an exhausted FOR_ITER pops the iterator and skips both.
            self.ip = self.idx[inst.argval] + 2
        else:
            self.push(v)

    @handles("END_FOR", min_version=(3, 12), max_version=(3, 12))
    def END_FOR(self, inst):
        self.popn(2)

    @handles("END_FOR", min_version=(3, 13))
    def END_FOR_313(self, inst):
        self.pop()

    # ---------------------------------------------------------- return
    @handles("RETURN_VALUE")
    def RETURN_VALUE(self, inst):
        self.on_return(self.pop())

    def on_return(self, value):
        from .interpreter import ReturnSignal

        self.return_value = value
        raise ReturnSignal()

    # ---------------------------------------------------------- generators (inlined, fully unrolled)
    @handles("RETURN_GENERATOR")
    def RETURN_GENERATOR(self, inst):
        if self.generator_values is None and not self.suspend_on_yield:
            unsupported("generator frame compiled on its own")
        self.push(ConstantVT(None))

    @handles("YIELD_VALUE")
    def YIELD_VALUE(self, inst):
        if self.generator_values is None and not self.suspend_on_yield:
            unsupported("yield outside an inlined generator")
        v = self.pop()
        _disown(v)
        self.push(ConstantVT(None))  # the value sent back in: next() sends None
        if self.suspend_on_yield:
            from .interpreter import YieldSignal

            raise YieldSignal(v)  # a generator run step by step (Translator.run_to_yield)
        self.generator_values.append(v)

    # ---------------------------------------------------------- yield from (inlined generators)
    @handles("GET_YIELD_FROM_ITER")
    def GET_YIELD_FROM_ITER(self, inst):
        from .variables.containers import iterate

        self.push(iterate(self, self.pop()))

    def _send(self):
        """One step of ``yield from``: the next value of the iterator below the sent value,
        or None once it is exhausted."""
        sent = self.stack[-1]
        if not (isinstance(sent, ConstantVT) and sent.value is None):
            unsupported("generator.send() of a value", why="unrolled generators only take next()")
        it = self.stack[-2]
        if not isinstance(it, IteratorVT):
            unsupported(f"yield from {it}")
        return it.next(self)

    @handles("SEND", max_version=(3, 11))
    def SEND(self, inst):
        v = self._send()
        if v is None:
            self.pop()
            it = self.pop()
            self.push(getattr(it, "return_value", None) or ConstantVT(None))
            self.jump_to(inst.argval)
        else:
            self.stack[-1] = v

    @handles("SEND", min_version=(3, 12))
    def SEND_312(self, inst):
        v = self._send()
        if v is None:
            it = self.stack[-2]
            self.stack[-1] = getattr(it, "return_value", None) or ConstantVT(None)
            self.jump_to(inst.argval)
        else:
            self.stack[-1] = v

    @handles("END_SEND", min_version=(3, 12))
    def END_SEND(self, inst):
        v = self.pop()
        self.pop()
        self.push(v)

    # ---------------------------------------------------------- imports
    @handles("IMPORT_NAME")
    def IMPORT_NAME(self, inst):
        import sys

        fromlist, level = self.pop(), self.pop()
        name = inst.argval
        if level.const() != 0:
            # NOTE: a relative import resolves against the frame's package, as importlib does
            # (``__package__``, else ``__spec__.parent``, else ``__name__`` of a package).
            name = _resolve_relative(name, self.f_globals, level.const())
        if name is None or name not in sys.modules:
            unsupported(f"import of {inst.argval}", why="only already-imported modules are captured")
        mod = sys.modules[name]
        if not fromlist.const():
            mod = sys.modules[name.split(".")[0]] if level.const() == 0 else sys.modules[name]
        self.push(self.wrap_static(mod))

    @handles("IMPORT_FROM")
    def IMPORT_FROM(self, inst):
        self.push(self.stack[-1].getattr(self, inst.argval))

    @handles("GET_AWAITABLE", "SETUP_ANNOTATIONS",
             "LOAD_BUILD_CLASS",
             "DELETE_GLOBAL", "DELETE_DEREF", "SETUP_FINALLY")
    def UNSUPPORTED_OP(self, inst):
        unsupported(f"opcode {inst.opname}", why="this construct is not captured")


def _resolve_relative(name: str, f_globals: dict, level: int):
    """The absolute module name of ``from <level dots><name> import ...`` in a frame with
    these globals (None when the frame has no package to resolve against)."""
    import importlib.util

    package = f_globals.get("__package__")
    if package is None:
        spec = f_globals.get("__spec__")
        package = getattr(spec, "parent", None)
    if package is None and "__path__" in f_globals:
        package = f_globals.get("__name__")
    if not package:
        return None
    try:
        return importlib.util.resolve_name("." * level + name, package)
    except (ImportError, ValueError):
        return None


def _disown(v, depth: int = 0) -> None:
    """A yielded container is seen by the consumer: the generator may no longer mutate it
    (unrolled, the consumer would see the later state)."""
    if depth > 8 or not hasattr(v, "gen_owner"):
        return
    v.gen_owner = None
    items = v.items.values() if isinstance(v.items, dict) else v.items
    for i in list(items):
        _disown(i, depth + 1)
