"""Context managers written as generators (``@contextlib.contextmanager``).

Calling the decorated function in the region gives a ``GeneratorCMVT``; ``__enter__`` runs
the generator's frame to its yield (the ``as`` value) and ``__exit__`` runs it on to its
end, both inline in the graph (``Translator.run_to_yield``). The suspended frame lives
only while tracing: such an object cannot be rebuilt at a graph break (that breaks
earlier, or runs the frame eagerly), and an exception inside the block is not modelled.
"""
from __future__ import annotations

import contextlib
import types

from .base import VT, ConstantVT, unsupported


def _helper_code():
    @contextlib.contextmanager
    def probe():
        yield

    return probe.__code__


# the code object shared by every function @contextlib.contextmanager returns
CONTEXTMANAGER_HELPER = _helper_code()


def generator_function(helper: types.FunctionType):
    """The generator function a ``@contextmanager`` helper wraps."""
    cells = dict(zip(helper.__code__.co_freevars, helper.__closure__ or ()))
    return cells["func"].cell_contents


class GeneratorCMVT(VT):
    """``contextlib._GeneratorContextManager`` made in the region."""

    def __init__(self, fn: types.FunctionType, args: list, kwargs: dict):
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.frame = None  # the generator's translator, once entered

    def python_type(self) -> type:
        return contextlib._GeneratorContextManager

    def call_method(self, tx, name: str, args: list, kwargs: dict) -> VT:
        if name == "__enter__" and not args and not kwargs:
            if self.frame is not None:
                unsupported("entering a @contextmanager object twice", why="eager raises RuntimeError")
            self.frame = tx.start_generator(self.fn, self.args, self.kwargs)
            yielded, value = self.frame.run_to_yield()
            if not yielded:
                unsupported(f"{self.fn.__qualname__} did not yield", why="eager raises RuntimeError")
            return value
        if name == "__exit__":
            return self.getattr(tx, "__exit__").call(tx, args, kwargs)
        unsupported(f"method {name} of a @contextmanager object")

    def getattr(self, tx, name: str) -> VT:
        if name == "__exit__":
            return GeneratorExitVT(self)
        unsupported(f"attribute {name} of a @contextmanager object")

    def call(self, tx, args: list, kwargs: dict) -> VT:
        # NOTE: used as a decorator (ContextDecorator): each call of the function runs in a
        # fresh context made from the same generator function and arguments.
        from .callables import NestedFunctionVT, UserFunctionVT

        if len(args) != 1 or kwargs or not isinstance(args[0], (UserFunctionVT, NestedFunctionVT)):
            unsupported(f"call to {self}", why="only a function to decorate is modelled")
        return DecoratedVT(self, args[0])

    def __repr__(self) -> str:
        return f"GeneratorCMVT({self.fn.__qualname__})"


class DecoratedVT(VT):
    """A function decorated with a @contextmanager object."""

    def __init__(self, cm: GeneratorCMVT, fn: VT):
        self.cm = cm
        self.fn = fn

    def python_type(self) -> type:
        return types.FunctionType

    def call(self, tx, args: list, kwargs: dict) -> VT:
        cm = GeneratorCMVT(self.cm.fn, self.cm.args, self.cm.kwargs)
        cm.call_method(tx, "__enter__", [], {})
        out = self.fn.call(tx, args, kwargs)
        cm.getattr(tx, "__exit__").call(tx, [ConstantVT(None)] * 3, {})
        return out


class GeneratorExitVT(VT):
    def __init__(self, cm: GeneratorCMVT):
        self.cm = cm

    def call(self, tx, args: list, kwargs: dict) -> VT:
        if any(not (a.is_const() and a.const() is None) for a in args) or kwargs:
            unsupported("an exception leaving a @contextmanager block")
        frame = self.cm.frame
        if frame is None:
            unsupported("__exit__ of a @contextmanager object that was not entered")
        frame.parent = tx
        yielded, _ = frame.run_to_yield()
        if yielded:
            unsupported(f"{self.cm.fn.__qualname__} yielded twice", why="eager raises RuntimeError: generator didn't stop")
        return ConstantVT(False)


def call_contextmanager(tx, helper: types.FunctionType, args: list, kwargs: dict) -> VT:
    return GeneratorCMVT(generator_function(helper), list(args), dict(kwargs))


# functions modelled by their code object (one code for many function objects)
CODE_MODELS = {CONTEXTMANAGER_HELPER: call_contextmanager}
