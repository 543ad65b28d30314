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


def _set_annotations(fn: NestedFunctionVT, annotations) -> None:
    if isinstance(annotations, TupleVT):
        # NOTE: CPython passes annotations as a flat tuple (name, value, name, value...).
        items = annotations.items
        fn.attrs["__annotations__"] = DictVT({items[i].const(): items[i + 1] for i in range(0, len(items), 2)})
    elif isinstance(annotations, DictVT):
        fn.attrs["__annotations__"] = annotations


def _set_closure(fn: NestedFunctionVT, closure) -> None:
    fn.closure = list(closure.items) if isinstance(closure, TupleVT) else []


def _set_defaults(fn: NestedFunctionVT, value) -> None:
    fn.defaults = value


def _set_kwdefaults(fn: NestedFunctionVT, value) -> None:
    fn.kwdefaults = value


# SET_FUNCTION_ATTRIBUTE's flag (3.13, the bits of the old MAKE_FUNCTION argument) -> setter
_FUNCTION_ATTRIBUTES = {0x01: _set_defaults, 0x02: _set_kwdefaults, 0x04: _set_annotations, 0x08: _set_closure}


class CallHandlers:
    # ---------------------------------------------------------- attributes
    @handles("LOAD_ATTR", max_version=(3, 11))
    def LOAD_ATTR(self, inst):
        obj = self.pop()
        self.push(_attr(self, obj, inst.argval))

    @handles("LOAD_ATTR", min_version=(3, 12), max_version=(3, 12))
    def LOAD_ATTR_312(self, inst):
        obj = self.pop()
        value = _attr(self, obj, inst.argval)
        if inst.arg & 1:
            self.push(NullVT())
        self.push(value)

    @handles("LOAD_ATTR", min_version=(3, 13))
    def LOAD_ATTR_313(self, inst):
        # NOTE: 3.13 pushes [callable, NULL]: the NULL goes above the (bound) value.
        obj = self.pop()
        self.push(_attr(self, obj, inst.argval))
        if inst.arg & 1:
            self.push(NullVT())

    @handles("LOAD_METHOD", max_version=(3, 11))
    def LOAD_METHOD(self, inst):
        obj = self.pop()
        value = _attr(self, obj, inst.argval)
        self.push(NullVT())
        self.push(value)

    @handles("LOAD_SUPER_ATTR", min_version=(3, 12), max_version=(3, 12))
    def LOAD_SUPER_ATTR(self, inst):
        value = self._super_attr(inst)
        if inst.arg & 1:
            self.push(NullVT())
        self.push(value)

    @handles("LOAD_SUPER_ATTR", min_version=(3, 13))
    def LOAD_SUPER_ATTR_313(self, inst):
        self.push(self._super_attr(inst))
        if inst.arg & 1:
            self.push(NullVT())

    def _super_attr(self, inst):
        from .variables.callables import SuperVT

        obj, cls = self.pop(), self.pop()
        self.pop()  # the global `super`
        return SuperVT(cls.const(), obj).getattr(self, inst.argval)

    @handles("STORE_ATTR")
    def STORE_ATTR(self, inst):
        obj = self.pop()
        value = self.pop()
        obj.setattr(self, inst.argval, value)

    @handles("DELETE_ATTR")
    def DELETE_ATTR(self, inst):
        self.pop().delattr(self, inst.argval)

    # ---------------------------------------------------------- calls
    @handles("KW_NAMES", max_version=(3, 12))
    def KW_NAMES(self, inst):
        self.kw_names = tuple(self.code.co_consts[inst.arg])

    @handles("CALL", max_version=(3, 12))
    def CALL(self, inst):
        kw_names, self.kw_names = self.kw_names, ()
        args = self.popn(inst.arg)
        b = self.pop()
        a = self.pop()
        if isinstance(a, NullVT):
            fn = b
        else:
            fn, args = a, [b] + args
        self._call_with_kw_names(fn, args, kw_names)

    def _call_with_kw_names(self, fn, args, kw_names):
        kwargs = {}
        if kw_names:
            kwargs = dict(zip(kw_names, args[len(args) - len(kw_names):]))
            args = args[: len(args) - len(kw_names)]
        self.push(fn.call(self, args, kwargs))

    @handles("CALL", min_version=(3, 13))
    def CALL_313(self, inst):
        self._call_313(inst.arg, ())

    @handles("CALL_KW", min_version=(3, 13))
    def CALL_KW(self, inst):
        # NOTE: 3.13 dropped KW_NAMES: the tuple of keyword names is the top operand.
        kw_names = tuple(self.pop().const())
        self._call_313(inst.arg, kw_names)

    def _call_313(self, nargs, kw_names):
        # NOTE: 3.13's operands are [callable, self_or_null, args...]; a non-NULL second
        # slot is the first argument (a method's self, or with-exit's first None).
        args = self.popn(nargs)
        self_or_null = self.pop()
        fn = self.pop()
        if not isinstance(self_or_null, NullVT):
            args = [self_or_null] + args
        self._call_with_kw_names(fn, args, kw_names)

    @handles("CALL_FUNCTION_EX", max_version=(3, 12))
    def CALL_FUNCTION_EX(self, inst):
        kwargs = self.pop() if inst.arg & 1 else DictVT({})
        args = self.pop()
        fn = self.pop()
        if self.stack and isinstance(self.stack[-1], NullVT):
            self.pop()
        self._call_ex(fn, args, kwargs)

    @handles("CALL_FUNCTION_EX", min_version=(3, 13))
    def CALL_FUNCTION_EX_313(self, inst):
        # NOTE: 3.13: [callable, NULL, args, kwargs?] (the NULL slot is always there).
        kwargs = self.pop() if inst.arg & 1 else DictVT({})
        args = self.pop()
        null = self.pop()
        fn = self.pop()
        if not isinstance(null, NullVT):
            unsupported("CALL_FUNCTION_EX with a self operand", why="CPython 3.13 always passes NULL there")
        self._call_ex(fn, args, kwargs)

    def _call_ex(self, fn, args, kwargs):
        if not isinstance(kwargs, DictVT):
            unsupported("** of a non-dict in a call")
        self.push(fn.call(self, args.unpack(self), dict(kwargs.items)))

    @handles("MAKE_FUNCTION", max_version=(3, 12))
    def MAKE_FUNCTION(self, inst):
        code = self.pop().const()
        flags = inst.arg
        closure = self.pop() if flags & 0x08 else None
        annotations = self.pop() if flags & 0x04 else None
        kwdefaults = self.pop() if flags & 0x02 else None
        defaults = self.pop() if flags & 0x01 else None
        cells = list(closure.items) if isinstance(closure, TupleVT) else []
        fn = NestedFunctionVT(code, self.f_globals, defaults, kwdefaults, cells, code.co_qualname)
        _set_annotations(fn, annotations)
        self.push(fn)

    @handles("MAKE_FUNCTION", min_version=(3, 13))
    def MAKE_FUNCTION_313(self, inst):
        # NOTE: 3.13 makes a bare function; SET_FUNCTION_ATTRIBUTE adds closure, defaults, ...
        code = self.pop().const()
        self.push(NestedFunctionVT(code, self.f_globals, None, None, [], code.co_qualname))

    @handles("SET_FUNCTION_ATTRIBUTE", min_version=(3, 13))
    def SET_FUNCTION_ATTRIBUTE(self, inst):
        fn = self.pop()
        value = self.pop()
        if not isinstance(fn, NestedFunctionVT) or inst.arg not in _FUNCTION_ATTRIBUTES:
            unsupported(f"SET_FUNCTION_ATTRIBUTE {inst.arg} on {fn}")
        _FUNCTION_ATTRIBUTES[inst.arg](fn, value)
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

