"""Objects built inside the compiled region: instances of plain Python classes.

In: a call of a user class (``Foo(x)``, ``DynamicCache(config=c)``, an ``nn.Module``
subclass built in ``forward``, ``object.__new__(cls)`` in a ``__new__``).  Out: a
``NewObjectVT`` holding the class and the instance's attributes as VTs: ``__new__`` and
``__init__`` are inlined, attribute reads and writes happen on the VT (no real object
exists while tracing), methods and properties are inlined, ``isinstance`` / ``type()``
answer from the class.

After the graph the object is rebuilt in generated code (``reconstruct``) only where a
live value reaches it (returned, stored into an object, list or global that existed
before, passed on at a graph break): ``object.__new__(cls)`` then its final attributes,
written without running any of its code again (as PyTorch's capture does for the
objects its side-effect tracking creates, ``track_object_new``).

What is not modelled breaks the graph at the construction, with a reason
(``build_refusal``): a custom metaclass, a C base class or a C ``__new__`` other than
``object.__new__``, ``__del__``, a custom ``__getattribute__``, abstract methods.
``__slots__`` of plain member descriptors are attributes like any other.
"""
from __future__ import annotations

import collections.abc
import functools
import inspect
import types
from typing import Any, Callable, Optional

from kiln.exc import Unsupported

from .base import VT, ConstantVT, unsupported
from .callables import ClassVT, UserMethodVT

_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class defined in Python
_METACLASS_MODULES = ("builtins", "abc", "typing", "typing_extensions")
_MISSING = object()


# ---------------------------------------------------------------- which classes
def build_refusal(cls: type) -> Optional[str]:
    """Why instances of ``cls`` cannot be built in the region (None: they can)."""
    meta = type(cls)
    if meta.__module__ not in _METACLASS_MODULES or getattr(meta, "__call__") is not type.__call__:
        return f"its metaclass {meta.__qualname__} is custom (its __call__/__new__ is user code)"
    if getattr(cls, "__abstractmethods__", None):
        return "it has abstract methods (eager raises TypeError)"
    for klass in cls.__mro__[:-1]:
        if not klass.__flags__ & _HEAPTYPE:
            return f"it has the C base class {klass.__qualname__} (its instance layout is C code's)"
    new = inspect.getattr_static(cls, "__new__")
    if not isinstance(new, staticmethod) and new is not object.__new__:
        return "its __new__ is C code"
    if inspect.getattr_static(cls, "__del__", None) is not None:
        return "it defines __del__ (a finalizer capture cannot order)"
    getattribute = inspect.getattr_static(cls, "__getattribute__")
    if getattribute is not object.__getattribute__ and not isinstance(getattribute, types.FunctionType):
        return "its __getattribute__ is C code"
    for klass in cls.__mro__[:-1]:
        for name, member in vars(klass).items():
            if name == "__weakref__":
                continue
            if isinstance(member, types.MemberDescriptorType) and name not in _slots_of(klass):
                return f"its attribute {name} is a C member descriptor"
    return None


def _slots_of(klass: type) -> tuple:
    slots = vars(klass).get("__slots__", ())
    return (slots,) if isinstance(slots, str) else tuple(slots)


def _has_dict(cls: type) -> bool:
    """Instances of ``cls`` have a ``__dict__`` (some class in its MRO has no ``__slots__``,
    or names ``__dict__`` in them)."""
    return any("__slots__" not in vars(k) or "__dict__" in _slots_of(k) for k in cls.__mro__[:-1])


def _slot_names(cls: type) -> set:
    return {n for k in cls.__mro__[:-1] for n in _slots_of(k) if n not in ("__dict__", "__weakref__")}


class MissingAttribute(Unsupported, AttributeError):
    """An attribute an object built in the region does not have.

    NOTE: an AttributeError for ``hasattr`` / ``getattr(o, n, default)`` to catch, even
    from inside inlined frames (a custom ``__getattribute__``); anywhere else it is the
    graph break eager's AttributeError calls for (capture does not catch exceptions)."""

    def __init__(self, cls: type, name: str):
        super().__init__(f"AttributeError: '{cls.__name__}' object has no attribute '{name}'",
                         why="the attribute does not exist (eager raises AttributeError)",
                         hint="check the attribute name, or accept the graph break")


# ---------------------------------------------------------------- the variable
class NewObjectVT(VT):
    """An instance of ``pytype`` created in the compiled region (see the module docstring).

    ``attrs`` holds the instance's own attributes (its ``__dict__`` and its slots) as VTs.
    """

    # NOTE: read by is_same / hash_key: a new object is its own identity (never the same
    # object as anything read from the caller, nor as another new object).
    built_in_region = True

    def __init__(self, pytype: type):
        from .containers import running_generator

        self.pytype = pytype
        self.attrs: dict[str, VT] = {}
        self.source = None
        self.slots = _slot_names(pytype)
        self.has_dict = _has_dict(pytype)
        self.made_in = running_generator()  # NOTE: a generator may mutate what it made itself

    def python_type(self) -> type:
        return self.pytype

    def is_module(self) -> bool:
        import torch

        return issubclass(self.pytype, torch.nn.Module)

    # ------------------------------------------------------------ attributes
    def getattr(self, tx, name: str) -> VT:
        """``obj.name``: the class's Python ``__getattribute__`` (inlined) or object's, then
        its Python ``__getattr__`` on a miss."""
        hook = _class_lookup(self.pytype, "__getattribute__")
        try:
            if isinstance(hook, types.FunctionType):
                return tx.inline_function(hook, [self, ConstantVT(name)], {})
            return self.raw_getattr(tx, name)
        except AttributeError:
            fallback = _class_lookup(self.pytype, "__getattr__")
            if self.is_module():
                from .new_modules import is_module_getattr, module_table_attr

                if is_module_getattr(fallback):
                    # NOTE: nn.Module.__getattr__: its parameters, buffers and submodules.
                    found = module_table_attr(self, name)
                    if found is not None:
                        return found
                    raise
            if not isinstance(fallback, types.FunctionType):
                raise
        return tx.inline_function(fallback, [self, ConstantVT(name)], {})

    def raw_getattr(self, tx, name: str) -> VT:
        """``object.__getattribute__(obj, name)``: data descriptors, the instance's own
        attributes, then the class's; ``MissingAttribute`` on a miss."""
        if name == "__class__":
            return ClassVT(self.pytype)
        if name == "__dict__":
            if not self.has_dict:
                raise MissingAttribute(self.pytype, name)
            from .instance_dict import InstanceDictVT

            return InstanceDictVT(self)
        static = _class_lookup(self.pytype, name)
        if _is_data_descriptor(static):
            return _get_descriptor(tx, self, name, static)
        if name in self.attrs:
            return self.attrs[name]
        if static is not _MISSING:
            return _get_class_attr(tx, self, name, static)
        raise MissingAttribute(self.pytype, name)

    def setattr(self, tx, name: str, value: VT) -> None:
        _models()
        hook = _class_lookup(self.pytype, "__setattr__")
        special = method_model(hook)
        if special is not None:
            special(tx, self, ConstantVT(name), value)
        elif isinstance(hook, types.FunctionType):
            tx.inline_function(hook, [self, ConstantVT(name), value], {})
        else:
            self.store(tx, name, value)

    def store(self, tx, name: str, value: VT) -> None:
        """``object.__setattr__(self, name, value)``: a data descriptor's setter, else the
        instance's own attribute."""
        static = _class_lookup(self.pytype, name)
        if _is_data_descriptor(static) and not isinstance(static, types.MemberDescriptorType):
            fset = getattr(static, "fset", None)
            if not isinstance(fset, types.FunctionType):
                unsupported(f"setting {self.pytype.__qualname__}.{name} (a descriptor without a Python setter)")
            tx.inline_function(fset, [self, value], {})
            return
        if name not in self.slots and not self.has_dict:
            unsupported(f"setting {name} on a {self.pytype.__qualname__} (not one of its __slots__)",
                        why="eager raises AttributeError")
        self._check_generator(tx)
        self.attrs[name] = value

    def delattr(self, tx, name: str) -> None:
        """``del obj.name`` / ``delattr(obj, name)``: the class's ``__delattr__``, or object's."""
        _models()
        hook = _class_lookup(self.pytype, "__delattr__")
        special = method_model(hook)
        if special is not None:
            special(tx, self, ConstantVT(name))
        elif isinstance(hook, types.FunctionType):
            tx.inline_function(hook, [self, ConstantVT(name)], {})
        else:
            self.delete(tx, name)

    def delete(self, tx, name: str) -> None:
        """``object.__delattr__(self, name)``."""
        if name not in self.attrs:
            unsupported(f"deleting the missing attribute {name}", why="eager raises AttributeError")
        self._check_generator(tx)
        del self.attrs[name]

    def _check_generator(self, tx) -> None:
        from .containers import _RUNNING_GENERATORS, no_mutation_in_generator

        if self.made_in is not None and any(self.made_in is g for g in _RUNNING_GENERATORS):
            return
        no_mutation_in_generator(tx, None)

    # ------------------------------------------------------------ protocols
    def call(self, tx, args: list, kwargs: dict) -> VT:
        if self.is_module():
            from .new_modules import call_module

            return call_module(tx, self, args, kwargs)
        fn = _class_lookup(self.pytype, "__call__")
        if isinstance(fn, types.FunctionType):
            return tx.inline_function(fn, [self] + list(args), kwargs)
        unsupported(f"call to a {self.pytype.__qualname__} object (no Python __call__)")

    def truthy(self, tx) -> bool:
        for name in ("__bool__", "__len__"):
            method = _class_lookup(self.pytype, name)
            if method is _MISSING:
                continue
            if not isinstance(method, types.FunctionType):
                unsupported(f"truth value of a {self.pytype.__qualname__} object")
            out = tx.inline_function(method, [self], {})
            return out.truthy(tx) if name == "__bool__" else bool(out.const())
        return True

    def unpack(self, tx) -> list:
        from .containers import iterate

        method = _class_lookup(self.pytype, "__iter__")
        model = ITER_MODELS.get(method) if _hashable(method) else None
        if model is not None:
            return model(tx, self)
        if not isinstance(method, types.FunctionType):
            return super().unpack(tx)
        out = tx.inline_function(method, [self], {})
        if isinstance(out, NewObjectVT):
            unsupported(f"iteration over {self.pytype.__qualname__} through an iterator object of its own")
        return iterate(tx, out).unpack(tx)

    def binop(self, tx, op: Callable, other: VT) -> Optional[VT]:
        """``self <op> other`` through the class's own operator methods (user_operators.py)."""
        from .user_operators import user_binop

        return user_binop(tx, self, self.pytype, op, other, reflected=False)

    def rbinop(self, tx, op: Callable, other: VT) -> Optional[VT]:
        from .user_operators import user_binop

        return user_binop(tx, self, self.pytype, op, other, reflected=True)

    def hash_key(self) -> Any:
        """The object as a dict key / set member: by identity, when its class keeps
        ``object``'s ``__hash__`` and ``__eq__``."""
        from .hashing import Ident

        if self.pytype.__hash__ is not object.__hash__ or self.pytype.__eq__ is not object.__eq__:
            unsupported(f"a {self.pytype.__qualname__} built in the compiled region used as a dict key",
                        why="its class defines __hash__ or __eq__ (user code)")
        return Ident(self)

    # ------------------------------------------------------------ code
    def reconstruct(self, cg) -> str:
        # NOTE: the name is bound before the attributes are written, so that an attribute
        # that refers back to the object (a parent pointer) finds it.
        built = cg.built(self)
        if built is not None:
            return built
        name = cg.container(self, f"{cg.obj(object.__new__)}({cg.obj(self.pytype)})")
        in_dict = {k: v for k, v in self.attrs.items() if k not in self.slots}
        in_slots = {k: v for k, v in self.attrs.items() if k in self.slots}
        parts = []
        for table in (in_dict, in_slots):
            parts.append("{" + ", ".join(f"{k!r}: {cg.expr(v)}" for k, v in table.items()) + "}")
        if in_dict or in_slots:
            cg.line(f"{cg.obj(fill_object)}({name}, {parts[0]}, {parts[1]})")
        return name

    def __repr__(self) -> str:
        return f"NewObjectVT({self.pytype.__qualname__})"


def fill_object(obj: Any, in_dict: dict, in_slots: dict) -> None:
    """Generated code's rebuild of an object made in the region: its final attributes,
    written without running the class's own ``__setattr__`` or descriptors."""
    if in_dict:
        obj.__dict__.update(in_dict)
    for k, v in in_slots.items():
        object.__setattr__(obj, k, v)


def _sequence_iter(tx, obj: VT) -> list:
    """``collections.abc.Sequence.__iter__``: ``self[0]``, ``self[1]``, ... until IndexError.

    NOTE: read as ``self[i] for i in range(len(self))``: the Sequence contract (its
    ``__len__`` and ``__getitem__`` agree), which ``reversed()`` and ``index()`` of the ABC
    rely on too; capture cannot raise and catch the IndexError that ends the loop."""
    n = obj.call_method(tx, "__len__", [], {})
    if not n.is_const():
        unsupported(f"iteration over a {obj.python_type().__qualname__} of a length that is not a constant")
    return [obj.call_method(tx, "__getitem__", [ConstantVT(i)], {}) for i in range(n.const())]


# NOTE: library __iter__ methods whose own code ends on a caught exception, by function.
ITER_MODELS: dict[Any, Callable] = {collections.abc.Sequence.__iter__: _sequence_iter}


# ---------------------------------------------------------------- class lookups
def _class_lookup(cls: type, name: str) -> Any:
    try:
        return inspect.getattr_static(cls, name)
    except AttributeError:
        return _MISSING


def _hashable(v: Any) -> bool:
    try:
        hash(v)
    except TypeError:
        return False
    return True


def _is_data_descriptor(attr: Any) -> bool:
    if attr is _MISSING or isinstance(attr, (types.FunctionType, staticmethod, classmethod)):
        return False
    t = type(attr)
    return hasattr(t, "__set__") or hasattr(t, "__delete__")


def _get_descriptor(tx, obj: NewObjectVT, name: str, attr: Any) -> VT:
    if isinstance(attr, types.MemberDescriptorType):  # a slot
        if name not in obj.attrs:
            raise MissingAttribute(obj.pytype, name)
        return obj.attrs[name]
    if isinstance(attr, property):
        if attr.fget is None:
            raise AttributeError(f"property '{name}' of '{obj.pytype.__name__}' object has no getter")
        return tx.wrap_static(attr.fget).call(tx, [obj], {})
    unsupported(f"attribute {name} of a {obj.pytype.__qualname__}: a {type(attr).__name__} descriptor")


def _get_class_attr(tx, obj: NewObjectVT, name: str, attr: Any) -> VT:
    """A non-data attribute found on the class: methods bind, values read (guarded)."""
    if isinstance(attr, types.FunctionType):
        return UserMethodVT(attr, obj)
    if isinstance(attr, staticmethod):
        return tx.wrap_static(attr.__func__)
    if isinstance(attr, classmethod):
        return UserMethodVT(attr.__func__, ClassVT(obj.pytype))
    if isinstance(attr, functools.cached_property):
        value = tx.wrap_static(attr.func).call(tx, [obj], {})
        obj.store(tx, name, value)
        return value
    if hasattr(type(attr), "__get__") and not isinstance(attr, type):
        unsupported(f"attribute {name} of a {obj.pytype.__qualname__}: a {type(attr).__name__} descriptor")
    owner = next(k for k in obj.pytype.__mro__ if name in vars(k))
    return tx.wrap(attr, tx.output.objects.source(owner).attr(name))


# ---------------------------------------------------------------- construction
def construct(tx, cls: type, args: list, kwargs: dict) -> VT:
    """``cls(*args, **kwargs)`` in the region: ``__new__`` then ``__init__``, both inlined."""
    from .list_subclass import construct_list_subclass, is_modelled_list_subclass

    if is_modelled_list_subclass(cls):
        return construct_list_subclass(tx, cls, args, kwargs)
    why = build_refusal(cls)
    if why is not None:
        unsupported(f"constructing an instance of {cls.__qualname__}: {why}",
                    why="only instances of plain Python classes are built in the compiled region")
    new = inspect.getattr_static(cls, "__new__")
    if isinstance(new, staticmethod):
        obj = tx.inline_function(new.__func__, [ClassVT(cls)] + list(args), kwargs)
    else:
        obj = NewObjectVT(cls)
    if not (isinstance(obj, NewObjectVT) and issubclass(obj.pytype, cls)):
        if isinstance(obj.python_type(), type) and issubclass(obj.python_type(), cls):
            unsupported(f"{cls.__qualname__}.__new__ returned an object that already existed",
                        why="type.__call__ would run __init__ on it again; not modelled")
        return obj  # NOTE: as type.__call__: __init__ runs only on an instance of cls
    run_init(tx, obj, cls, args, kwargs, new_is_object=not isinstance(new, staticmethod))
    return obj


def run_init(tx, obj: NewObjectVT, cls: type, args: list, kwargs: dict, new_is_object: bool) -> None:
    _models()
    init = inspect.getattr_static(cls, "__init__")
    model = method_model(init)
    if model is not None:
        model(tx, obj, *args, **kwargs)
    elif isinstance(init, types.FunctionType):
        out = tx.inline_function(init, [obj] + list(args), kwargs)
        if not (isinstance(out, ConstantVT) and out.value is None):
            unsupported(f"{cls.__qualname__}.__init__ returned a value", why="eager raises TypeError")
    elif init is object.__init__:
        if (args or kwargs) and new_is_object:
            unsupported(f"{cls.__qualname__}() takes no arguments", why="eager raises TypeError")
    else:
        unsupported(f"constructing an instance of {cls.__qualname__}",
                    why=f"its __init__ is a {type(init).__name__}, not Python code")


def _object_new(tx, cls: VT, *rest: VT, **kwargs: VT) -> VT:
    """``object.__new__(cls)``: a new, empty instance of a buildable class."""
    c = cls.const() if cls.is_const() else None
    if not isinstance(c, type):
        unsupported("object.__new__ of something that is not a class", why="eager raises TypeError")
    if rest or kwargs:
        unsupported("object.__new__() with extra arguments", why="eager raises TypeError")
    why = build_refusal(c)
    if why is not None:
        unsupported(f"object.__new__({c.__qualname__}): {why}",
                    why="only instances of plain Python classes are built in the compiled region")
    return NewObjectVT(c)


def _new_only(fn_name: str) -> Callable:
    def check(obj: VT) -> NewObjectVT:
        if not isinstance(obj, NewObjectVT):
            unsupported(f"{fn_name} on {obj}", why="only objects built in the compiled region are modelled")
        return obj

    return check


def _object_setattr(tx, obj: VT, name: VT, value: VT) -> VT:
    from .objects import DataclassVT, UserObjectVT

    if isinstance(obj, DataclassVT):
        obj.store(tx, name.const(), value)
    elif type(obj) is UserObjectVT:
        obj.raw_store(tx, name.const(), value)  # NOTE: an object from outside: replayed
    else:
        _new_only("object.__setattr__")(obj).store(tx, name.const(), value)
    return ConstantVT(None)


def _object_getattribute(tx, obj: VT, name: VT) -> VT:
    return _new_only("object.__getattribute__")(obj).raw_getattr(tx, name.const())


def _object_delattr(tx, obj: VT, name: VT) -> VT:
    _new_only("object.__delattr__")(obj).delete(tx, name.const())
    return ConstantVT(None)


def _delattr_builtin(tx, obj: VT, name: VT) -> VT:
    obj.delattr(tx, name.const())
    return ConstantVT(None)


def _object_init(tx, obj: VT, *args: VT, **kwargs: VT) -> VT:
    new = _new_only("object.__init__")(obj)
    if args or kwargs:
        # NOTE: object.__init__ takes extra arguments only when __new__ is overridden and
        # __init__ is not (CPython's excess_args rule); an explicit call never does.
        unsupported(f"object.__init__() of {new.pytype.__qualname__} with arguments", why="eager raises TypeError")
    return ConstantVT(None)


def _list_init(tx, obj: VT, *args: VT, **kwargs: VT) -> VT:
    from .list_subclass import list_init

    return list_init(tx, obj, *args, **kwargs)


# NOTE: object's own slot methods, called explicitly (``object.__setattr__(self, ...)`` in a
# frozen dataclass, ``object.__new__(cls)`` in a ``__new__``) or through ``super()``.
OBJECT_METHODS: dict[Any, Callable] = {
    object.__new__: _object_new,
    object.__setattr__: _object_setattr,
    object.__getattribute__: _object_getattribute,
    object.__delattr__: _object_delattr,
    object.__init__: _object_init,
    list.__init__: _list_init,  # NOTE: a list subclass built in the region (list_subclass.py)
    delattr: _delattr_builtin,
}

# Python __init__ / __setattr__ functions of library base classes that capture models
# (filled by new_modules.py: nn.Module's).
INIT_MODELS: dict[Any, Callable] = {}
_SETATTR_MODELS: dict[Any, Callable] = {}


def super_call(tx, sup, name: str, args: list, kwargs: dict) -> Optional[VT]:
    """``super().name(...)`` that resolves to one of ``object``'s own methods, on an object
    built in the region (or ``super().__new__(cls)`` in a ``__new__``); None otherwise."""
    owner = sup.obj.cls if isinstance(sup.obj, ClassVT) else sup.obj.python_type()
    mro = owner.__mro__
    if sup.cls not in mro:
        return None
    for klass in mro[mro.index(sup.cls) + 1:]:
        if name in vars(klass):
            fn = vars(klass)[name]
            break
    else:
        return None
    if name == "__new__" and fn is object.__new__:
        return _object_new(tx, *args, **kwargs)
    if not isinstance(sup.obj, NewObjectVT) and fn is not object.__setattr__:
        return None
    handler = OBJECT_METHODS.get(fn) if _hashable(fn) else None
    if handler is None:
        return None
    return handler(tx, sup.obj, *args, **kwargs)


def _models() -> None:
    if not INIT_MODELS:
        from . import new_modules

        new_modules.register(INIT_MODELS, _SETATTR_MODELS)


def method_model(fn: Any) -> Optional[Callable]:
    """The model of a library method modelled on objects built in the region
    (``nn.Module.__init__`` ...), or None."""
    from .new_modules import unpatched

    _models()
    if not _hashable(fn):
        return None
    fn = unpatched(fn)
    if fn in INIT_MODELS:
        return INIT_MODELS[fn]
    from .new_modules import MODULE_FUNCTIONS

    return _SETATTR_MODELS.get(fn) or MODULE_FUNCTIONS.get(fn)


def library_functions() -> dict:
    """Entries for pylib's function table: object's slot methods and modelled inits."""
    from . import new_modules

    from .deepcopy_vt import FUNCTIONS as deepcopy_functions

    _models()
    out = dict(OBJECT_METHODS)
    out.update(deepcopy_functions)
    out.update(INIT_MODELS)
    out.update(_SETATTR_MODELS)
    out.update(new_modules.MODULE_FUNCTIONS)
    return out


def prefer_inlined_init(cls: type) -> bool:
    """A dataclass whose construction is user code beyond storing its fields (its own
    ``__init__``, a ``__post_init__``, ``__slots__``): built as a ``NewObjectVT`` with its
    code inlined, rather than as a ``DataclassVT`` of its fields."""
    from .library_types import library_model

    if library_model(cls) is not None:
        return False
    import dataclasses

    init = inspect.getattr_static(cls, "__init__", None)
    generated = isinstance(init, types.FunctionType) and init.__code__.co_filename == "<string>"
    factories = any(f.default_factory is not dataclasses.MISSING for f in dataclasses.fields(cls))
    return not generated or factories or hasattr(cls, "__post_init__") or "__slots__" in vars(cls)


__all__ = ["NewObjectVT", "build_refusal", "construct", "fill_object", "super_call", "library_functions",
           "prefer_inlined_init", "OBJECT_METHODS", "INIT_MODELS"]
