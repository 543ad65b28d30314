"""Callables: user functions (inlined), bound methods, builtins, torch functions."""
from __future__ import annotations

import inspect
import types
from typing import Any, Optional

from ..sources import CallSource, Source
from .base import VT, ConstantVT, const_vt, unsupported


class BoundMethodVT(VT):
    """``obj.name`` where obj is a VT that answers ``call_method``."""

    def __init__(self, obj: VT, name: str):
        self.obj = obj
        self.name = name

    def python_type(self) -> type:
        return types.MethodType

    def call(self, tx, args: list, kwargs: dict) -> VT:
        return self.obj.call_method(tx, self.name, args, kwargs)

    def reconstruct(self, cg) -> str:
        return f"({cg.expr(self.obj)}).{self.name}"

    def __repr__(self) -> str:
        return f"BoundMethodVT({self.obj}.{self.name})"


class ConstMethodVT(VT):
    """A method of an immutable constant (``"{}".format``, ``(1).__add__``)."""

    def __init__(self, value: Any, name: str):
        self.value = value
        self.name = name

    def call(self, tx, args: list, kwargs: dict) -> VT:
        fa = [a.const() for a in args]
        fk = {k: v.const() for k, v in kwargs.items()}
        return const_vt(getattr(self.value, self.name)(*fa, **fk))

    def reconstruct(self, cg) -> str:
        return f"({cg.const_expr(self.value)}).{self.name}"


class UserFunctionVT(VT):
    """A Python function of the user's; calls are inlined."""

    def __init__(self, fn: types.FunctionType, source: Optional[Source] = None):
        self.fn = fn
        self.source = source

    def python_type(self) -> type:
        return types.FunctionType

    def call(self, tx, args: list, kwargs: dict) -> VT:
        if getattr(self.fn, "_kiln_disable", False):
            unsupported(f"call to {self.fn.__qualname__}, disabled by kiln.disable")
        if getattr(self.fn, "_torchdynamo_disable", False):
            # NOTE: torch.compiler.disable / torch._dynamo.disable marks the function the same way.
            unsupported(f"call to {self.fn.__qualname__}, disabled by torch.compiler.disable")
        if getattr(self.fn, "_dynamo_marked_constant", False) and all(
                a.is_const() for a in list(args) + list(kwargs.values())):
            return _constant_result(self.fn, args, kwargs)
        from .pylib import library_function

        special = _py_special().get(self.fn) or library_function(self.fn)
        if special is not None:
            return special(tx, *args, **kwargs)
        from .generator_cm import CODE_MODELS

        by_code = CODE_MODELS.get(getattr(self.fn, "__code__", None))
        if by_code is not None:
            return by_code(tx, self.fn, args, kwargs)
        if getattr(self, "by_code", False):
            return tx.inline_function(self.fn, args, kwargs, source=self.source)
        # NOTE: a function wrapped by PyTorch's own torch.compile / torch._dynamo.run() is
        # inlined as the function it wraps (``_torchdynamo_inline``), as PyTorch's capture does.
        fn = getattr(self.fn, "_kiln_orig", None) or inspect.getattr_static(self.fn, "_torchdynamo_inline", self.fn)
        return tx.inline_function(fn, args, kwargs)

    def getattr(self, tx, name: str) -> VT:
        if name in ("__name__", "__qualname__", "__module__", "__doc__", "__code__"):
            return ConstantVT(getattr(self.fn, name))
        if name in ("__defaults__", "__kwdefaults__", "__wrapped__", "__dict__", "__globals__", "__annotations__",
                    "__type_params__"):  # NOTE: functools.wraps copies __type_params__ since 3.12
            return tx.wrap_static(getattr(self.fn, name))
        return super().getattr(tx, name)

    def reconstruct(self, cg) -> str:
        return self.source.code() if self.source is not None else cg.obj(self.fn)

    def __repr__(self) -> str:
        return f"UserFunctionVT({self.fn.__qualname__})"


class UserMethodVT(VT):
    """A user function bound to a tracked object (module or user object)."""

    def __init__(self, fn: types.FunctionType, obj: VT):
        self.fn = fn
        self.obj = obj

    def python_type(self) -> type:
        return types.MethodType

    def call(self, tx, args: list, kwargs: dict) -> VT:
        from .new_objects import method_model

        special = method_model(self.fn)  # NOTE: nn.Module.__init__ / __setattr__ of a module built in the region
        if special is not None:
            return special(tx, self.obj, *args, **kwargs)
        return tx.inline_function(self.fn, [self.obj] + list(args), kwargs)

    def getattr(self, tx, name: str) -> VT:
        # NOTE: ``m.__func__`` / ``m.__self__``, as bound methods give them (the kernels
        # library that transformers uses reads ``module.forward.__func__`` in forward)
        if name == "__func__":
            return UserFunctionVT(self.fn)
        if name == "__self__":
            return self.obj
        if name in ("__name__", "__qualname__", "__module__", "__doc__"):
            return ConstantVT(getattr(self.fn, name))
        return super().getattr(tx, name)

    def reconstruct(self, cg) -> str:
        return f"{cg.obj(types.MethodType)}({cg.obj(self.fn)}, {cg.expr(self.obj)})"

    def __repr__(self) -> str:
        return f"UserMethodVT({self.fn.__qualname__})"


class CellVT(VT):
    """A closure cell created in a traced frame (holds a VT)."""

    def __init__(self, value: Optional[VT] = None):
        self.value = value

    def reconstruct(self, cg) -> str:
        # NOTE: a new cell object holding the value, shared by every closure rebuilt in the
        # same code and, for a cell of the frame at a graph break, by its resume function
        # (which receives the cell itself); refused where no one says who goes on using it.
        live = getattr(cg, "live_cells", None)
        if live is None:
            unsupported("a closure over a cell of the frame that goes on after the graph break",
                        why="the rebuilt closure would not see the resumed frame's later writes")
        body = "" if self.value is None else cg.expr(self.value)
        return cg.container(self, f"{cg.obj(types.CellType)}({body})")


class RealCellVT(VT):
    """A real closure cell of an enclosing (already running) function."""

    def __init__(self, cell):
        self.cell = cell

    def reconstruct(self, cg) -> str:
        return cg.obj(self.cell)


class NestedFunctionVT(VT):
    """A function created by MAKE_FUNCTION while tracing (a closure)."""

    def __init__(self, code, fn_globals: dict, defaults: Optional[VT], kwdefaults: Optional[VT],
                 closure: Optional[list], qualname: str):
        self.code = code
        self.fn_globals = fn_globals
        self.defaults = defaults
        self.kwdefaults = kwdefaults
        self.closure = closure or []
        self.qualname = qualname
        self.attrs: dict = {}  # attributes set while tracing (functools.wraps, fn.__name__ = ...)

    def python_type(self) -> type:
        return types.FunctionType

    def call(self, tx, args: list, kwargs: dict) -> VT:
        return tx.inline_nested(self, args, kwargs)

    def getattr(self, tx, name: str) -> VT:
        if name in self.attrs:
            return self.attrs[name]
        if name in ("__name__", "__qualname__"):
            return ConstantVT(self.code.co_name if name == "__name__" else self.qualname)
        if name == "__code__":
            return ConstantVT(self.code)
        if name == "__annotations__":
            from .containers import DictVT

            self.attrs[name] = DictVT({})
            return self.attrs[name]
        if name == "__module__":
            return ConstantVT(self.fn_globals.get("__name__"))
        if name == "__doc__":
            # NOTE: a function's first constant is its docstring, or None when it has none.
            first = self.code.co_consts[0] if self.code.co_consts else None
            return ConstantVT(first if isinstance(first, str) else None)
        return super().getattr(tx, name)

    def setattr(self, tx, name: str, value: VT) -> None:
        # NOTE: the function exists only inside the region (it cannot be rebuilt in generated
        # code), so its attributes are only ever read while tracing.
        self.attrs[name] = value

    def reconstruct(self, cg) -> str:
        # NOTE: rebuilt (made again from its code, globals, defaults and cells, as MAKE_FUNCTION
        # does) only when its cells are real ones of an enclosing function (shared, as in
        # eager) and it has no keyword defaults or attributes set while tracing: cells of the
        # traced frame do not exist as objects, and new ones would miss its later writes.
        # Cells made by traced frames that have returned are rebuilt as new cells (CellVT).
        if not all(isinstance(c, (RealCellVT, CellVT)) for c in self.closure):
            return super().reconstruct(cg)
        done = cg.built(self)
        if done is not None:
            return done
        defaults = cg.expr(self.defaults) if self.defaults is not None else "None"
        closure = "(" + "".join(f"{cg.expr(c)}, " for c in self.closure) + ")" if self.closure else "None"
        extra = {k: cg.expr(v) for k, v in self.attrs.items()
                 if k != "__annotations__" or getattr(v, "items", None)}
        kwdefaults = cg.expr(self.kwdefaults) if self.kwdefaults is not None else None
        name = cg.container(self, f"{cg.obj(types.FunctionType)}({cg.obj(self.code)}, {cg.obj(self.fn_globals)}, "
                                  f"{self.code.co_name!r}, {defaults}, {closure})")
        cg.line(f"{name}.__qualname__ = {self.qualname!r}")
        if kwdefaults is not None:
            cg.line(f"{name}.__kwdefaults__ = {kwdefaults}")
        for k, v in extra.items():
            cg.line(f"setattr({name}, {k!r}, {v})")
        return name

    def __repr__(self) -> str:
        return f"NestedFunctionVT({self.qualname})"


class BuiltinVT(VT):
    """A Python builtin; behaviour comes from the table in builtins.py."""

    def __init__(self, fn: Any, source: Optional[Source] = None):
        self.fn = fn
        self.source = source

    def python_type(self) -> type:
        return type(self.fn)

    def call(self, tx, args: list, kwargs: dict) -> VT:
        from .builtins import call_builtin

        return call_builtin(tx, self.fn, args, kwargs)

    def reconstruct(self, cg) -> str:
        return cg.obj(self.fn)

    def __repr__(self) -> str:
        return f"BuiltinVT({getattr(self.fn, '__name__', self.fn)})"


class TorchFnVT(VT):
    """A torch function, Tensor method, op overload or autograd.Function.apply:
    calls become graph nodes (special ones are handled in torch_fns.py)."""

    def __init__(self, fn: Any, source: Optional[Source] = None):
        self.fn = fn
        self.source = source

    def python_type(self) -> type:
        return type(self.fn)

    def call(self, tx, args: list, kwargs: dict) -> VT:
        from .torch_fns import call_torch

        return call_torch(tx, self.fn, args, kwargs)

    def getattr(self, tx, name: str) -> VT:
        attr = getattr(self.fn, name)
        return tx.wrap_static(attr)

    def reconstruct(self, cg) -> str:
        return cg.obj(self.fn)

    def __repr__(self) -> str:
        return f"TorchFnVT({getattr(self.fn, '__name__', self.fn)})"


class PyModuleVT(VT):
    """A Python module object (``torch``, ``math``, a user module)."""

    def __init__(self, mod: types.ModuleType, source: Optional[Source] = None):
        self.mod = mod
        self.source = source

    def python_type(self) -> type:
        return types.ModuleType

    def getattr(self, tx, name: str) -> VT:
        pending = self.__dict__.get("pending")
        if pending and name in pending:
            return pending[name]
        try:
            value = getattr(self.mod, name)
        except AttributeError:
            unsupported(f"module '{self.mod.__name__}' has no attribute '{name}'")
        if is_library_module(self.mod) or self.source is None:
            return tx.wrap_static(value)
        return tx.wrap(value, self.source.attr(name))

    def setattr(self, tx, name: str, value: VT) -> None:
        """``mod.name = value`` (a module global, a config flag): a side effect replayed
        after the graph, as PyTorch's capture does; later reads in the region see it.
        From the first write on, every read of the module in this frame is this VT."""
        self.__dict__.setdefault("pending", {})[name] = value
        tx.output.wrapped_objects[id(self.mod)] = (self.mod, self)
        tx.output.side_effects.track_attr(self, name, value)

    def reconstruct(self, cg) -> str:
        return cg.obj(self.mod)


def pending_class_attr(tx, cls: type, name: str) -> Optional[VT]:
    """The value the traced code wrote to ``name`` on ``cls`` or a class it inherits from
    (first in the MRO), or None."""
    for klass in getattr(cls, "__mro__", ()):
        entry = tx.output.wrapped_objects.get(id(klass))
        if entry is not None and entry[0] is klass and isinstance(entry[1], ClassVT):
            pending = entry[1].__dict__.get("pending")
            if pending and name in pending:
                return pending[name]
        if name in vars(klass):
            return None
    return None


def is_library_module(mod: types.ModuleType) -> bool:
    name = getattr(mod, "__name__", "") or ""
    root = name.split(".")[0]
    return root in _LIBRARY_ROOTS


_LIBRARY_ROOTS = {"torch", "math", "operator", "kiln", "functools", "itertools", "builtins",
                  "collections", "typing", "numbers", "warnings", "inspect", "functorch"}


def _constant_result(fn: Any, args: list, kwargs: dict) -> VT:
    """A call of a function marked as returning a constant (PyTorch's ``assume_constant_result``
    sets ``_dynamo_marked_constant``; transformers marks its install and version probes so):
    run now on the constant arguments, its result a constant of the graph (not guarded, as in
    PyTorch: the mark says it never changes)."""
    from .base import const_vt, is_const_value

    out = fn(*[a.const() for a in args], **{k: v.const() for k, v in kwargs.items()})
    if not (is_const_value(out) or isinstance(out, tuple) and all(is_const_value(o) for o in out)):
        unsupported(f"{fn.__qualname__}, marked as returning a constant, returned a {type(out).__name__}",
                    why="only Python constants can be assumed constant")
    return const_vt(out)


class ClassVT(VT):
    """A class object."""

    def __init__(self, cls: type, source: Optional[Source] = None):
        self.cls = cls
        self.source = source

    def python_type(self) -> type:
        return type(self.cls)

    def is_const(self) -> bool:
        return True

    def const(self) -> Any:
        return self.cls

    def truthy(self, tx) -> bool:
        # NOTE: a class is true unless its metaclass says otherwise (enum classes have __len__).
        return bool(self.cls) if type(self.cls) is not type else True

    def getattr(self, tx, name: str) -> VT:
        import torch

        pending = self.__dict__.get("pending")
        if pending and name in pending:
            return pending[name]
        if name == "apply" and issubclass(self.cls, torch.autograd.Function):
            from .autograd_fn import AutogradApplyVT

            return AutogradApplyVT(self.cls)
        value = getattr(self.cls, name)
        if isinstance(value, types.FunctionType):
            return tx.wrap_static(value)
        from .base import is_const_value

        if self.source is not None and is_const_value(value) \
                and (self.cls.__module__ or "").split(".")[0] not in _LIBRARY_ROOTS:
            # NOTE: a constant class attribute of a user class (``Tracker.generation``) is
            # guarded: a later write to it recompiles, as in PyTorch's capture.
            return tx.wrap(value, self.source.attr(name))
        return tx.wrap_static(value)

    def setattr(self, tx, name: str, value: VT) -> None:
        """``Cls.name = value``: a side effect replayed after the graph (PyTorch's capture
        does the same); later reads in the region, through the class or its instances, see
        it.  From the first write on, every read of the class in this frame is this VT."""
        if type(self.cls).__setattr__ is not type.__setattr__:
            unsupported(f"setting attribute '{name}' on {self.cls.__name__}",
                        why="its metaclass defines __setattr__")
        self.__dict__.setdefault("pending", {})[name] = value
        tx.output.wrapped_objects[id(self.cls)] = (self.cls, self)
        tx.output.side_effects.track_attr(self, name, value)

    def call(self, tx, args: list, kwargs: dict) -> VT:
        from .builtins import call_builtin_type

        return call_builtin_type(tx, self.cls, args, kwargs)

    def reconstruct(self, cg) -> str:
        return cg.obj(self.cls)

    def __repr__(self) -> str:
        return f"ClassVT({self.cls.__name__})"


_APPLIES: dict = {}


def autograd_apply(cls: type):
    """A plain function calling ``cls.apply`` (fx cannot name the bound classmethod)."""
    fn = _APPLIES.get(cls)
    if fn is None:
        def fn(*args, **kwargs):
            return cls.apply(*args, **kwargs)

        fn.__name__ = fn.__qualname__ = f"{cls.__name__}_apply"
        _APPLIES[cls] = fn
    return fn


class PartialVT(VT):
    """A functools.partial object."""

    def __init__(self, func: VT, args: list, kwargs: dict, source: Optional[Source] = None):
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.source = source

    def call(self, tx, args: list, kwargs: dict) -> VT:
        return self.func.call(tx, self.args + list(args), {**self.kwargs, **kwargs})

    def reconstruct(self, cg) -> str:
        if self.source is not None:
            return self.source.code()
        import functools

        parts = [cg.expr(self.func)] + [cg.expr(a) for a in self.args]
        parts += [f"{k}={cg.expr(v)}" for k, v in self.kwargs.items()]
        return f"{cg.obj(functools.partial)}({', '.join(parts)})"


class SuperVT(VT):
    """``super()`` inside an inlined method."""

    def __init__(self, cls: type, obj: VT):
        self.cls = cls
        self.obj = obj

    def getattr(self, tx, name: str) -> VT:
        # NOTE: inside a classmethod, super()'s second argument is the class itself.
        owner = self.obj.cls if isinstance(self.obj, ClassVT) else self.obj.python_type()
        mro = owner.__mro__
        if self.cls not in mro:
            unsupported(f"super({self.cls.__name__}, ...) of an object that is not an instance of it")
        for klass in mro[mro.index(self.cls) + 1:]:
            if name in vars(klass):
                attr = vars(klass)[name]
                if isinstance(attr, types.FunctionType):
                    return UserMethodVT(attr, self.obj)
                if isinstance(attr, staticmethod):
                    return tx.wrap_static(attr.__func__)
                if isinstance(attr, classmethod):
                    return UserMethodVT(attr.__func__, self.obj if isinstance(self.obj, ClassVT) else ClassVT(owner))
                from .base import is_const_value

                if is_const_value(attr):
                    # NOTE: a class attribute (``super().a``): its value, guarded on the class
                    # that holds it (a later ``A.a = 5`` recompiles).
                    return tx.wrap(attr, tx.output.objects.source(klass).attr(name))
                return BoundMethodVT(self, name)
        unsupported(f"super() has no attribute {name}")

    def call_method(self, tx, name: str, args: list, kwargs: dict) -> VT:
        from .objects import UserObjectVT, dict_item, dict_keys

        obj = self.obj
        if isinstance(obj, UserObjectVT) and isinstance(obj.obj, dict) and obj.source is not None \
                and name in ("get", "__getitem__", "__contains__") and self.cls in type(obj.obj).__mro__:
            k = args[0].const()
            present = k in dict_keys(tx, obj)
            if name == "__contains__":
                return ConstantVT(present)
            if present:
                return dict_item(tx, obj, k)
            if name == "get":
                return args[1] if len(args) > 1 else ConstantVT(None)
        from .new_objects import super_call

        out = super_call(tx, self, name, args, kwargs)  # NOTE: object's own methods on a new object
        if out is not None:
            return out
        unsupported(f"call to super().{name} (a builtin method)")

    def reconstruct(self, cg) -> str:
        return f"super({cg.obj(self.cls)}, {cg.expr(self.obj)})"


class WeakRefVT(VT):
    """A weakref.ref: calling it reads the referent (guarded like any source)."""

    def __init__(self, ref, source: Optional[Source]):
        self.ref = ref
        self.source = source

    def call(self, tx, args: list, kwargs: dict) -> VT:
        if args or kwargs or self.source is None:
            unsupported("call of a weak reference")
        return tx.wrap(self.ref(), CallSource(self.source))


def _signature(tx, fn: VT, **kwargs) -> VT:
    """inspect.signature of a user function or method: its parameters as constants."""
    import inspect

    from .containers import DictVT

    if isinstance(fn, UserMethodVT):
        params = list(inspect.signature(fn.fn, **{k: v.const() for k, v in kwargs.items()}).parameters.items())[1:]
    elif isinstance(fn, UserFunctionVT):
        params = list(inspect.signature(fn.fn, **{k: v.const() for k, v in kwargs.items()}).parameters.items())
    else:
        unsupported(f"inspect.signature of {fn}")
    return SignatureVT(DictVT({k: ConstantVT(p) for k, p in params}))


class SignatureVT(VT):
    def __init__(self, parameters: VT):
        self.parameters = parameters

    def getattr(self, tx, name: str) -> VT:
        if name == "parameters":
            return self.parameters
        unsupported(f"Signature.{name}")


_PY_SPECIAL: dict = {}


def _py_special() -> dict:
    if not _PY_SPECIAL:
        import inspect

        from .dataclasses_vt import FUNCTIONS as dataclass_functions

        _PY_SPECIAL[inspect.signature] = _signature
        _PY_SPECIAL.update(dataclass_functions)
    return _PY_SPECIAL


def _always_true(self, tx) -> bool:
    return True


# NOTE: functions, methods, classes and partials define neither __bool__ nor __len__:
# they are always true (`if self.act:` on a module attribute holding torch.relu).
for _cls in (BoundMethodVT, ConstMethodVT, UserFunctionVT, UserMethodVT, NestedFunctionVT, BuiltinVT,
             TorchFnVT, PyModuleVT, PartialVT):
    _cls.truthy = _always_true
