"""Opcode handlers: attributes, calls, function creation, with-blocks."""
from __future__ import annotations

from .bytecode import handles
from .variables.base import NullVT, unsupported
from .variables.callables import NestedFunctionVT
from .variables.containers import DictVT, TupleVT


def _attr(tx, obj, name: str):
    try:
        return obj.getattr(tx, name)
    except AttributeError as e:
        unsupported(f"AttributeError: {e}", why="the attribute does not exist (eager raises it)")


class CallHandlers:
    # ---------------------------------------------------------- attributes
    @handles("LOAD_ATTR", max_version=(3, 11))
    def LOAD_ATTR(self, inst):
        obj = self.pop()
        self.push(_attr(self, obj, inst.argval))

    @handles("LOAD_ATTR", min_version=(3, 12))
    def LOAD_ATTR_312(self, inst):
        obj = self.pop()
        value = _attr(self, obj, inst.argval)
        if inst.arg & 1:
            self.push(NullVT())
        self.push(value)

    @handles("LOAD_METHOD", max_version=(3, 11))
    def LOAD_METHOD(self, inst):
        obj = self.pop()
        value = _attr(self, obj, inst.argval)
        self.push(NullVT())
        self.push(value)

    @handles("LOAD_SUPER_ATTR", min_version=(3, 12))
    def LOAD_SUPER_ATTR(self, inst):
        from .variables.callables import SuperVT

        obj, cls = self.pop(), self.pop()
        self.pop()  # the global `super`
        value = SuperVT(cls.const(), obj).getattr(self, inst.argval)
        if inst.arg & 1:
            self.push(NullVT())
        self.push(value)

    @handles("STORE_ATTR")
    def STORE_ATTR(self, inst):
        obj = self.pop()
        value = self.pop()
        obj.setattr(self, inst.argval, value)

    # ---------------------------------------------------------- calls
    @handles("KW_NAMES", max_version=(3, 12))
    def KW_NAMES(self, inst):
        self.kw_names = tuple(self.code.co_consts[inst.arg])

    @handles("CALL")
    def CALL(self, inst):
        kw_names, self.kw_names = self.kw_names, ()
        args = self.popn(inst.arg)
        b = self.pop()
        a = self.pop()
        if isinstance(a, NullVT):
            fn = b
        else:
            fn, args = a, [b] + args
        kwargs = {}
        if kw_names:
            kwargs = dict(zip(kw_names, args[len(args) - len(kw_names):]))
            args = args[: len(args) - len(kw_names)]
        self.push(fn.call(self, args, kwargs))

    @handles("CALL_FUNCTION_EX")
    def CALL_FUNCTION_EX(self, inst):
        kwargs = self.pop() if inst.arg & 1 else DictVT({})
        args = self.pop()
        fn = self.pop()
        if self.stack and isinstance(self.stack[-1], NullVT):
            self.pop()
        if not isinstance(kwargs, DictVT):
            unsupported("** of a non-dict in a call")
        self.push(fn.call(self, args.unpack(self), dict(kwargs.items)))

    @handles("MAKE_FUNCTION")
    def MAKE_FUNCTION(self, inst):
        code = self.pop().const()
        flags = inst.arg
        closure = self.pop() if flags & 0x08 else None
        annotations = self.pop() if flags & 0x04 else None
        kwdefaults = self.pop() if flags & 0x02 else None
        defaults = self.pop() if flags & 0x01 else None
        cells = list(closure.items) if isinstance(closure, TupleVT) else []
        fn = NestedFunctionVT(code, self.f_globals, defaults, kwdefaults, cells, code.co_qualname)
        if isinstance(annotations, TupleVT):
            # NOTE: CPython passes annotations as a flat tuple (name, value, name, value...).
            items = annotations.items
            fn.attrs["__annotations__"] = DictVT({items[i].const(): items[i + 1] for i in range(0, len(items), 2)})
        elif isinstance(annotations, DictVT):
            fn.attrs["__annotations__"] = annotations
        self.push(fn)

    # ---------------------------------------------------------- with
    @handles("BEFORE_WITH")
    def BEFORE_WITH(self, inst):
        ctx = self.pop()
        exit_fn = ctx.getattr(self, "__exit__")
        res = ctx.call_method(self, "__enter__", [], {})
        self.push(exit_fn)
        self.push(res)

    # ---------------------------------------------------------- errors
    @handles("LOAD_ASSERTION_ERROR")
    def LOAD_ASSERTION_ERROR(self, inst):
        self.push(self.wrap_static(AssertionError))

    @handles("RAISE_VARARGS")
    def RAISE_VARARGS(self, inst):
        unsupported("raise statement", why="exceptions raised in the compiled region run eagerly")
