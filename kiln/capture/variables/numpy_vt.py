"""NumPy arrays, traced as torch ops (as PyTorch's capture does).

An ``NdarrayVT`` stands for a ``numpy.ndarray``; in the graph it is the torch tensor
holding the same data.  Every NumPy call, method, attribute, operator and subscript on
it becomes one graph node whose target (``NumpyCall``) runs the same-named function of
``torch._numpy`` (NumPy's API written in torch ops) on the tensors viewed as
``torch._numpy`` arrays, and hands tensors back.  So the graph holds only torch ops, and
backends compile NumPy code like any other.

In: arrays read from the caller (graph inputs fed by ``torch.as_tensor(arr)``, which
shares the array's memory, guarded as tensors), ``Tensor.numpy()`` of a graph tensor,
NumPy functions read from ``numpy`` / ``numpy.linalg`` / ``numpy.fft``.
Out: arrays returned or stored are rebuilt with ``tensor.numpy()``.

NOTE: what is not traced breaks the graph, with a reason: ``numpy.random`` (torch's
generator would give other numbers than NumPy's), data reads (``item``; ``tolist`` is the
tensor's ``tolist``, as in PyTorch), NumPy functions ``torch._numpy`` lacks.  Reductions
give 0-d arrays where NumPy gives NumPy scalars (equal values; PyTorch's capture does the
same).  ``Tensor.numpy()`` is a ``view_as`` node (the array is a view of the tensor's memory).
"""
from __future__ import annotations

import operator
import types
from typing import Any, Callable, Optional

import torch

from .base import VT, ConstantVT, const_vt, unsupported

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is optional
    np = None


def _tnp():
    import torch._numpy as tnp

    return tnp


# ---------------------------------------------------------------- graph targets
def _to_tnp(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return _tnp().ndarray(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_to_tnp(i) for i in x)
    return x


def _from_tnp(x: Any) -> Any:
    tnp = _tnp()
    if isinstance(x, tnp.ndarray):
        return x.tensor
    if isinstance(x, (list, tuple)):
        return type(x)(_from_tnp(i) for i in x)
    if isinstance(x, tnp.DType):
        return np.dtype(x.name)
    return x


_WRITING_OPS = frozenset({"setitem", "delitem", "iadd", "iand", "ifloordiv", "ilshift", "imod", "imul",
                          "imatmul", "ior", "ipow", "irshift", "isub", "itruediv", "ixor"})
_WRITING_METHODS = frozenset({"fill", "sort", "put", "resize", "itemset", "partition", "setflags",
                              "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__"})


class NumpyCall:
    """A graph target: ``fn`` over ``torch._numpy`` arrays, with tensors in and out.
    ``kind`` is "function" (``fn`` a torch._numpy function), "method" (``fn`` a method
    name), "attr" (an attribute name) or "op" (``fn`` an operator function)."""

    def __init__(self, kind: str, fn: Any, label: str):
        self.kind = kind
        self.fn = fn
        self.__name__ = self.__qualname__ = f"numpy_{label}"
        # NOTE: read by code that runs graphs on real inputs (the profitability check): an
        # in-place operator, a mutating method or an ``out=`` call writes its arguments.
        self.writes_inputs = (kind == "op" and label in _WRITING_OPS) or (kind == "method" and label in _WRITING_METHODS)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args = _to_tnp(args)
        kwargs = {k: _to_tnp(v) for k, v in kwargs.items()}
        if self.kind == "method":
            out = getattr(args[0], self.fn)(*args[1:], **kwargs)
        elif self.kind == "attr":
            out = getattr(args[0], self.fn)
        elif self.kind == "op" and not isinstance(args[0], _tnp().ndarray) and not any(
                isinstance(a, _tnp().ndarray) for a in args[1:]):
            out = self.fn(*[_tnp().asarray(a) for a in args], **kwargs)
        else:
            out = self.fn(*args, **kwargs)
        return _from_tnp(out)

    def __repr__(self) -> str:
        return self.__name__


_CALLS: dict = {}


def numpy_call(kind: str, fn: Any) -> NumpyCall:
    """The (cached) graph target for one NumPy function / method / attribute / operator."""
    key = (kind, fn)
    if key not in _CALLS:
        label = fn if isinstance(fn, str) else getattr(fn, "__name__", "fn")
        _CALLS[key] = NumpyCall(kind, fn, label)
    return _CALLS[key]


# ---------------------------------------------------------------- VTs
class NdarrayVT(VT):
    """A NumPy array: ``node`` / ``fake`` are the graph tensor holding its data."""

    def __init__(self, node, fake: torch.Tensor, np_source=None, tensor_source=None):
        self.node = node
        self.fake = fake
        self.np_source = np_source  # the array's own source, for an array read from the caller
        self.tensor_source = tensor_source  # the source of its tensor, when that is a graph input
        self.source = None

    def python_type(self) -> type:
        return np.ndarray

    def truthy(self, tx) -> bool:
        unsupported("truth value of a NumPy array", why="it depends on the array's data")

    def getattr(self, tx, name: str) -> VT:
        from .callables import BoundMethodVT

        if name in _BREAKING:
            unsupported(f"ndarray.{name}", why=_BREAKING[name])
        if name == "shape":
            return const_vt(tuple(self.fake.shape)) if not _symbolic(self.fake) else call(tx, "attr", name, [self])
        if name in ("ndim", "size", "itemsize", "nbytes", "dtype", "strides"):
            return _meta(self.fake, name)
        if name in _ATTRS_AS_NODES:
            return call(tx, "attr", name, [self])
        if hasattr(_tnp().ndarray, name) and callable(getattr(_tnp().ndarray, name)):
            return BoundMethodVT(self, name)
        unsupported(f"ndarray.{name}", why="torch._numpy has no such attribute")

    def call_method(self, tx, name: str, args: list, kwargs: dict) -> VT:
        if name == "tolist":
            # NOTE: as in PyTorch's capture, the tensor's own tolist (its rules on data reads).
            from .tensor import TensorVT

            return TensorVT(self.node, self.fake, self.tensor_source).call_method(tx, name, args, kwargs)
        if name in _BREAKING:
            unsupported(f"ndarray.{name}()", why=_BREAKING[name])
        if name == "__len__":
            return ConstantVT(len(self.fake))
        if name == "__getitem__":
            return call(tx, "op", operator.getitem, [self, args[0]])
        return call(tx, "method", name, [self] + list(args), kwargs)

    def unpack(self, tx) -> list:
        if self.fake.dim() == 0:
            unsupported("iteration over a 0-d array", why="eager raises TypeError")
        return [call(tx, "op", operator.getitem, [self, ConstantVT(i)]) for i in range(self.fake.shape[0])]

    def reconstruct(self, cg) -> str:
        # NOTE: always a new array over the tensor's memory, also for an array read from the
        # caller (as in PyTorch's capture): so a read-only input comes back writeable.
        from .tensor import TensorVT

        return f"{cg.obj(_to_numpy)}({cg.tensor_expr(TensorVT(self.node, self.fake, self.tensor_source))})"

    def __repr__(self) -> str:
        return f"NdarrayVT({self.node}, {tuple(self.fake.shape)})"


def numpy_dtype_name(v: VT) -> Optional[str]:
    """A NumPy dtype or scalar type (``np.float32``, ``np.dtype('int64')``) as its name, the
    spelling torch._numpy reads and fx can print; None for anything else."""
    if np is None:
        return None
    value = getattr(v, "cls", None) if type(v).__name__ == "ClassVT" else getattr(v, "value", None)
    if isinstance(value, np.dtype):
        return value.name
    if isinstance(value, type) and issubclass(value, np.generic) and value is not np.generic:
        try:
            return np.dtype(value).name
        except TypeError:
            return None
    return None


def _to_numpy(t: torch.Tensor):
    """A graph output that stands for a NumPy array, as the array."""
    return t.detach().cpu().numpy()


_BREAKING = {
    "item": "it reads the array's data",
    "tobytes": "it reads the array's data",
    "__array_interface__": "it exposes the array's memory",
    "ctypes": "it exposes the array's memory",
    "data": "it exposes the array's memory",
}
_ATTRS_AS_NODES = {"T", "real", "imag", "flat"}


def _symbolic(t: torch.Tensor) -> bool:
    from .symbolic import is_symbolic

    return any(is_symbolic(d) for d in t.shape)


def _meta(fake: torch.Tensor, name: str) -> VT:
    from .symbolic import concrete

    arr = _tnp().ndarray(fake)
    if name == "dtype":
        return ConstantVT(np.dtype(arr.dtype.name))
    return const_vt(concrete(getattr(arr, name)) if name != "strides" else tuple(concrete(s) for s in arr.strides))


def as_numpy_result(vt: VT) -> VT:
    """Tensors that came out of a NumpyCall node are arrays again."""
    from .containers import ListVT, TupleVT
    from .tensor import TensorVT

    if isinstance(vt, TensorVT):
        return NdarrayVT(vt.node, vt.fake, tensor_source=vt.source)
    if isinstance(vt, (TupleVT, ListVT)):
        return type(vt)([as_numpy_result(i) for i in vt.items])
    return vt


def call(tx, kind: str, fn: Any, args: list, kwargs: Optional[dict] = None) -> VT:
    """One NumPy operation as a graph node; its array results are NdarrayVTs."""
    args = [_scalar_as_array(tx, a) for a in args]
    kwargs = {k: _scalar_as_array(tx, v) for k, v in (kwargs or {}).items()}
    return as_numpy_result(tx.output.call_graph("call_function", numpy_call(kind, fn), args, kwargs))


def _scalar_as_array(tx, v: VT) -> VT:
    """A NumPy scalar operand of a NumPy operation, as the 0-d array it behaves as.

    NOTE: NumPy (2.x, NEP 50) promotes its scalars as arrays of their dtype, unlike Python
    numbers; a 0-d array made in the graph keeps that (and fx can print its parts)."""
    from .base import is_numpy_scalar
    from .containers import ListVT, TupleVT

    if isinstance(v, (TupleVT, ListVT)):
        return type(v)([_scalar_as_array(tx, i) for i in v.items])
    if isinstance(v, ConstantVT) and is_numpy_scalar(v.value) and v.value.dtype.kind in "biufc":
        t = tx.output.call_graph("call_function", _scalar_tensor,
                                 [ConstantVT(v.value.item()), ConstantVT(v.value.dtype.name)], {})
        return NdarrayVT(t.node, t.fake)
    return v


def _scalar_tensor(value: Any, dtype_name: str) -> torch.Tensor:
    """A 0-d tensor of a NumPy scalar's value and dtype (a graph target)."""
    return torch.tensor(value, dtype=_tnp().dtype(dtype_name).torch_dtype)


def numpy_op(tx, op: Callable, args: list) -> VT:
    """An operator with a NumPy array operand (``a + 1``, ``-a``, ``a < b``)."""
    from .tensor import TensorVT

    if any(isinstance(a, TensorVT) for a in args):
        unsupported(f"operator {op.__name__} between a NumPy array and a tensor",
                    why="which operand's rules apply depends on the operand order; not traced")
    return call(tx, "op", op, args)


def _static_names() -> set:
    """NumPy functions about dtypes, not arrays: run for real on constant arguments."""
    return {"issubdtype", "result_type", "promote_types", "can_cast", "finfo", "iinfo", "dtype",
            "isscalar", "min_scalar_type", "issubsctype"}


class NumpyStaticFnVT(VT):
    """A NumPy function of dtypes (``np.issubdtype``, ``np.finfo``...): called while tracing
    on constant arguments; its result is a constant of the program."""

    def __init__(self, fn: Any, source=None):
        self.fn = fn
        self.source = source

    def truthy(self, tx) -> bool:
        return True

    def call(self, tx, args: list, kwargs: dict) -> VT:
        from .pylib import _static

        vals = [_static_np(a) for a in args]
        kw = {k: _static_np(v) for k, v in kwargs.items()}
        return tx.wrap_static(self.fn(*vals, **kw))

    def reconstruct(self, cg) -> str:
        return cg.obj(self.fn)


def _static_np(v: VT) -> Any:
    if isinstance(v, NdarrayVT):
        unsupported("a NumPy dtype function applied to an array", why="only dtype arguments are constants")
    if v.is_const():
        return v.const()
    obj = getattr(v, "obj", None)
    if obj is not None and type(obj).__module__.startswith("numpy"):
        return obj
    unsupported(f"{v} passed to a NumPy dtype function")


class NumpyFnVT(VT):
    """A function of ``numpy`` (or ``numpy.linalg`` / ``numpy.fft``): calls become graph
    nodes running ``torch._numpy``'s function of the same name."""

    def __init__(self, fn: Any, tnp_fn: Any, source=None):
        self.fn = fn
        self.tnp_fn = tnp_fn
        self.source = source

    def python_type(self) -> type:
        return type(self.fn)

    def truthy(self, tx) -> bool:
        return True

    def call(self, tx, args: list, kwargs: dict) -> VT:
        from .containers import ListVT, TupleVT

        tnp = _tnp()
        if self.tnp_fn in (tnp.array, tnp.asarray) and len(args) == 1 and set(kwargs) <= {"dtype"} \
                and isinstance(args[0], (ListVT, TupleVT)) and args[0].items:
            items = [_scalar_as_array(tx, i) for i in args[0].items]
            if all(isinstance(i, NdarrayVT) for i in items):
                # NOTE: torch._numpy builds an array from a list of arrays by reading their
                # values; np.stack of them is the same array, traced.
                return call(tx, "function", tnp.stack, [ListVT(items)], kwargs)
        return call(tx, "function", self.tnp_fn, args, kwargs)

    def reconstruct(self, cg) -> str:
        return cg.obj(self.fn)

    def __repr__(self) -> str:
        return f"NumpyFnVT({getattr(self.fn, '__name__', self.fn)})"


_SUBMODULES = {"numpy": "", "numpy.linalg": "linalg", "numpy.fft": "fft", "numpy.core.numeric": "",
               "numpy.core.fromnumeric": "", "numpy._core.numeric": "", "numpy._core.fromnumeric": "",
               "numpy.lib.function_base": "", "numpy.lib._function_base_impl": "", "numpy.linalg._linalg": "linalg"}


def numpy_function(value: Any) -> Optional[Any]:
    """The torch._numpy function standing for the NumPy function ``value``, or None;
    ``numpy.random`` is never mapped (see the module's NOTE)."""
    if np is None:
        return None
    # NOTE: never ask an arbitrary object for __module__: a user __getattr__ would run.
    if not (isinstance(value, (type, types.BuiltinFunctionType, types.FunctionType))
            or type(value).__module__.startswith("numpy")):
        return None
    mod = getattr(value, "__module__", None) or ""
    name = getattr(value, "__name__", None)
    if mod.startswith("numpy") and name in _static_names():
        return NumpyStaticFnVT
    if isinstance(value, type):
        return None
    if not mod.startswith("numpy") or not isinstance(name, str) or mod.startswith("numpy.random"):
        return None
    sub = _SUBMODULES.get(mod)
    if sub is None:
        return None
    ns = _tnp() if not sub else getattr(_tnp(), sub, None)
    fn = getattr(ns, name, None)
    return fn if callable(fn) and not isinstance(fn, type) else None


def wrap_ndarray(tx, value: Any, source, guard: bool) -> VT:
    """An array read from the caller: a graph input fed by ``torch.as_tensor(arr)``."""
    from ..sources import CallSource, ObjectSource

    if not (value.dtype.isnative and value.dtype.kind in "biufc"):
        unsupported(f"a NumPy array of dtype {value.dtype}", why="torch has no such dtype")
    seen = tx.output.__dict__.setdefault("numpy_inputs", {})
    prev = seen.get(id(value))
    if prev is not None:
        # NOTE: the same array read twice is one input (the guard keeps them the same object).
        if prev[1] != source:
            tx.output.guards.alias(prev[1], source)
        return prev[0]
    if guard:
        tx.output.guards.type_of(source, value)
    t_src = NumpyTensorSource(source, tx.output.objects.name_of(array_tensor))
    tensor = array_tensor(value)
    vt = tx.output.add_tensor_input(tensor, t_src)
    out = NdarrayVT(vt.node, vt.fake, np_source=source, tensor_source=vt.source)
    seen[id(value)] = (out, source, value)
    return out


def array_tensor(a: Any) -> torch.Tensor:
    """``torch.as_tensor(a)`` (same memory); for a read-only array without torch's warning
    about it (the graph reads it, and writes to it raise in NumPy's own checks eagerly)."""
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.as_tensor(a)
    return torch.as_tensor(a)


def tensor_numpy(tx, t, force: bool = False) -> VT:
    """``tensor.numpy(force=...)``: the same data, now a NumPy array (``force``: detached
    and on the CPU first, as eager does)."""
    if force:
        t = tx.output.call_graph("call_method", "detach", [t], {})
        if t.fake.device.type != "cpu":
            t = tx.output.call_graph("call_method", "cpu", [t], {})
    if t.fake.requires_grad:
        unsupported("Tensor.numpy() of a tensor that requires grad", why="eager raises RuntimeError")
    if t.fake.device.type != "cpu":
        unsupported("Tensor.numpy() of a tensor not on the CPU", why="eager raises TypeError")
    if not force:
        # NOTE: the array is a view of the tensor's memory, so in the graph it is a view of
        # the tensor (as in PyTorch's capture): a region whose only op is ``.numpy()`` compiles.
        t = tx.output.call_graph("call_method", "view_as", [t, t], {})
    return NdarrayVT(t.node, t.fake, tensor_source=t.source)


def _from_numpy(tx, arr: VT, *rest: VT, **kwargs: VT) -> VT:
    """``torch.from_numpy(a)`` / ``torch.as_tensor(a)``: the array's tensor, sharing memory."""
    from .tensor import TensorVT

    if not isinstance(arr, NdarrayVT) or rest or kwargs:
        return None
    return TensorVT(arr.node, arr.fake)


# ---------------------------------------------------------------- sources
from dataclasses import dataclass  # noqa: E402

from ..sources import Source  # noqa: E402


@dataclass(frozen=True)
class NumpyTensorSource(Source):
    """The tensor sharing a NumPy array's memory: named ``L['a']`` (the array), read as
    ``torch.as_tensor(a)`` (``fn`` is the ``___cN`` name of ``torch.as_tensor``)."""

    of: Source
    fn: str

    def base(self) -> Source:
        return self.of

    def name(self) -> str:
        return self.of.name()

    def render(self, base_code: Optional[str]) -> str:
        return f"{self.fn}({base_code})"

    @property
    def identity_source(self) -> Source:
        """What identity guards compare: the array (each read makes a new tensor object)."""
        return self.of


__all__ = ["NdarrayVT", "NumpyFnVT", "NumpyCall", "numpy_function", "wrap_ndarray", "tensor_numpy"]
