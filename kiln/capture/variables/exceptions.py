"""Exceptions raised and caught inside the compiled region, as in eager.

An ``ExceptionVT`` is an exception instance made while tracing: ``raise KeyError(k)`` in
user code, or a lookup eager would fail the same way (a missing key of a dict kiln
models).  Raising it raises :class:`ObservedException`; the translator running the
instruction looks the instruction up in its code's exception table (CPython 3.11+) and,
when a handler covers it, unwinds the stack to the handler's depth and jumps there, as the
interpreter does (``Translator.step``).  Without a handler the exception leaves the
inlined function into its caller's frame, and so on up.

NOTE: ``ObservedException`` is an ``Unsupported``: an exception no handler in the region
catches is a graph break at the instruction that raised it (the call into the function that
raised it, in the root frame), so eager raises it for real, with its traceback, and whatever
catches it outside the region sees eager's exception.  Only exceptions eager raises for
certain while running the same instructions are observed; anything else kiln cannot model
stays an ordinary graph break.
"""
from __future__ import annotations

from typing import Any, Optional

from kiln.exc import Unsupported

from .base import VT, ConstantVT, unsupported


class ExceptionVT(VT):
    """An exception instance of a class whose construction is plain (``BaseException``'s
    own ``__new__`` / ``__init__``): its type and ``args``; ``__cause__`` / ``__context__``."""

    def __init__(self, exc_type: type, args: list):
        self.exc_type = exc_type
        self.args = list(args)
        self.source = None
        self.attrs: dict = {"__cause__": ConstantVT(None), "__context__": ConstantVT(None),
                            "__suppress_context__": ConstantVT(False), "__traceback__": ConstantVT(None)}

    def python_type(self) -> type:
        return self.exc_type

    def truthy(self, tx) -> bool:
        return True

    def getattr(self, tx, name: str) -> VT:
        from .callables import ClassVT
        from .containers import TupleVT

        if name == "args":
            return TupleVT(list(self.args))
        if name == "__class__":
            return ClassVT(self.exc_type)
        if name in self.attrs:
            return self.attrs[name]
        unsupported(f"attribute '{name}' of a {self.exc_type.__name__} raised in the compiled region")

    def setattr(self, tx, name: str, value: VT) -> None:
        if name not in self.attrs:
            unsupported(f"setting attribute '{name}' on a {self.exc_type.__name__}")
        self.attrs[name] = value
        if name == "__cause__":
            self.attrs["__suppress_context__"] = ConstantVT(True)

    def reconstruct(self, cg) -> str:
        # NOTE: rebuilt (a new instance, equal type and args) when it outlives the region.
        return f"{cg.obj(self.exc_type)}({''.join(cg.expr(a) + ', ' for a in self.args)})"

    def __repr__(self) -> str:
        return f"ExceptionVT({self.exc_type.__name__}, {self.args})"


class ObservedException(Unsupported):
    """``exc`` (an ExceptionVT) is raised by the instruction being traced."""

    def __init__(self, exc: ExceptionVT):
        super().__init__(f"{exc.exc_type.__name__} raised in the compiled region",
                         why="no except block in the region catches it; it runs eagerly, where it is raised",
                         hint="")
        self.exc = exc


def plain_exception_class(cls: Any) -> bool:
    """``cls`` is an exception class whose instances are made by BaseException's C code
    (builtin exceptions, and user subclasses that define no ``__new__`` / ``__init__``)."""
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        return False
    for k in cls.__mro__:
        if k.__module__ == "builtins":
            return True
        if "__init__" in vars(k) or "__new__" in vars(k) or "__slots__" in vars(k):
            return False
    return True


def new_exception(tx, cls: type, args: list, kwargs: dict) -> VT:
    """``cls(*args)`` for a plain exception class."""
    if kwargs:
        unsupported(f"{cls.__name__}() with keyword arguments", why="BaseException takes no keyword arguments")
    return ExceptionVT(cls, args)


def raise_exception(exc: VT, cause: Optional[VT] = None) -> "NoReturn":  # noqa: F821
    """``raise exc [from cause]``: ``exc`` an exception VT or a plain exception class."""
    from .callables import ClassVT

    if isinstance(exc, ClassVT) and plain_exception_class(exc.cls):
        exc = ExceptionVT(exc.cls, [])
    if not isinstance(exc, ExceptionVT):
        unsupported(f"raise of {exc}", why="only exceptions made in the compiled region are raised there")
    if cause is not None:
        exc.setattr(None, "__cause__", ExceptionVT(cause.cls, []) if isinstance(cause, ClassVT) else cause)
    raise ObservedException(exc)


def raise_new(cls: type, *args: VT) -> "NoReturn":  # noqa: F821
    """Raise ``cls(*args)`` in the traced code, where eager raises it for certain."""
    raise ObservedException(ExceptionVT(cls, list(args)))


def matches(exc: VT, spec: VT) -> bool:
    """``except spec:`` catches ``exc`` (CHECK_EXC_MATCH)."""
    from .containers import TupleVT

    types_ = [spec] if not isinstance(spec, TupleVT) else list(spec.items)
    classes = []
    for t in types_:
        c = t.const() if t.is_const() else None
        if not (isinstance(c, type) and issubclass(c, BaseException)):
            unsupported(f"except {t}", why="catching classes that do not inherit from BaseException is not allowed")
        classes.append(c)
    return issubclass(exc.python_type(), tuple(classes))


__all__ = ["ExceptionVT", "ObservedException", "plain_exception_class", "new_exception", "raise_exception",
           "raise_new", "matches"]
