"""Tensors: a fake tensor (shape oracle) plus the fx node that produces it."""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..sources import Source
from .base import VT, ConstantVT, const_vt, unsupported
from .containers import TupleVT

# NOTE: metadata queries answer from the fake tensor and never enter the graph.
_META_METHODS = {
    "size", "dim", "ndimension", "numel", "nelement", "stride", "is_contiguous",
    "element_size", "get_device", "is_floating_point", "is_complex", "storage_offset",
}
_META_ATTRS = {
    "dtype", "device", "ndim", "requires_grad", "is_leaf", "is_cuda", "layout", "is_sparse",
    "is_quantized", "is_meta", "is_nested", "itemsize", "nbytes", "is_cpu", "is_mps", "is_xpu",
    "is_mkldnn", "is_sparse_csr", "is_xla", "is_ipu", "is_vulkan", "is_mtia", "is_maia",
}
_BREAKING_METHODS = {
    "item": "Tensor.item() reads data (data-dependent value)",
    "tolist": "Tensor.tolist() reads data",
    "numpy": "Tensor.numpy() with positional arguments",
    "data_ptr": "Tensor.data_ptr() is not available on fake tensors",
    "backward": "Tensor.backward() runs autograd inside the compiled region",
    "__bool__": "bool() of a tensor depends on its data",
    "untyped_storage": "storage access",
    "set_": "Tensor.set_ swaps storage",
    "register_hook": "register_hook on an intermediate tensor",
    "retain_grad": "retain_grad on a tensor",
}
_GRAPH_ATTRS = {"T", "mT", "H", "mH", "real", "imag"}
# NOTE: layout queries refused on a tensor whose fake's id is in ``output.layout_unknown``
# (the gradients a captured autograd.Function backward receives: variables/autograd_fn.py).
_LAYOUT_METHODS = {"stride", "is_contiguous", "storage_offset"}


class TensorVT(VT):
    def __init__(self, node, fake: torch.Tensor, source: Optional[Source] = None, pytype: type = torch.Tensor):
        self.node = node
        self.fake = fake
        self.source = source
        self.pytype = pytype

    def python_type(self) -> type:
        return self.pytype

    def truthy(self, tx) -> bool:
        unsupported("data-dependent branch on a tensor",
                    why="the condition depends on tensor values, unknown while tracing")

    def getattr(self, tx, name: str) -> VT:
        from .callables import BoundMethodVT

        if name == "shape":
            return self._meta(tx, "size", [])
        if name == "__class__":
            from .callables import ClassVT

            return ClassVT(self.pytype)
        if name in _META_ATTRS:
            return const_vt(getattr(self.fake, name))
        if name in _GRAPH_ATTRS:
            return tx.output.call_graph("call_function", getattr, [self, ConstantVT(name)], {})
        if name == "grad":
            return self._grad(tx)
        if name in ("data", "_base", "grad_fn", "_version"):
            unsupported(f"Tensor.{name}", why="autograd/storage state is not captured")
        if callable(getattr(torch.Tensor, name, None)):
            return BoundMethodVT(self, name)
        if not hasattr(self.fake, name):
            raise AttributeError(f"'Tensor' object has no attribute '{name}'")
        unsupported(f"Tensor attribute '{name}'")

    def _grad(self, tx) -> VT:
        """``x.grad`` as PyTorch's capture reads it: of a tensor from outside the region,
        the gradient it holds (a graph input, or None, guarded); of a leaf made in the
        region, None (nothing has run a backward into it)."""
        if self.source is None:
            if self.fake.grad_fn is None:
                return ConstantVT(None)
            unsupported("Tensor.grad of a non-leaf tensor made in the compiled region")
        real = next((v for _, v, vt, *_ in tx.output.inputs if vt is self), None)
        if not isinstance(real, torch.Tensor):
            unsupported(f"Tensor.grad of {self}")
        return tx.wrap(real.grad, self.source.attr("grad"))

    def setattr(self, tx, name: str, value: VT) -> None:
        if name == "data":
            return self._set_data(tx, value)
        super().setattr(tx, name, value)

    def _set_data(self, tx, value: VT) -> None:
        """``x.data = y`` as PyTorch's capture does it: ``Tensor.set_(x, y)`` under no_grad,
        then the version counter lowered by one (``.data =`` does not bump it in eager).
        The VT keeps its node: at run time the graph mutates the same tensor object (and
        functionalization replays ``set_`` on the input), so every reference to x, and
        ``x is z``, stays as it was."""
        if self.source is None:
            unsupported("setting Tensor.data on a tensor created in the compiled region",
                        why="only tensors from outside the region can have their .data set")
        if not isinstance(value, TensorVT):
            unsupported(f"setting Tensor.data to {value}")
        if self.fake.dtype != value.fake.dtype:
            unsupported("setting Tensor.data to a tensor of another dtype")
        out = tx.output
        _input_before(out, self, value)
        prior = out.grad_enabled
        out.set_grad_enabled(False)
        try:
            out.call_graph("call_function", torch.Tensor.set_, [self, value], {})
        finally:
            out.set_grad_enabled(prior)
        out.graph.call_function(lower_version_count_by_1, (self.node,))
        lower_version_count_by_1(self.fake)

    def call_method(self, tx, name: str, args: list, kwargs: dict) -> VT:
        if name in _LAYOUT_METHODS and id(self.fake) in tx.output.__dict__.get("layout_unknown", ()):
            unsupported(f"Tensor.{name}() of a gradient in a captured autograd.Function backward",
                        why="the layout of the gradient autograd hands to a backward is known only when it runs")
        if name in _META_METHODS:
            fa = [a.const() for a in args]
            fk = {k: v.const() for k, v in kwargs.items()}
            if fk:
                return const_vt(_concrete_all(getattr(self.fake, name)(*fa, **fk)))
            return self._meta(tx, name, fa)
        if name == "numpy" and not args and set(kwargs) <= {"force"}:
            from .numpy_vt import tensor_numpy

            return tensor_numpy(tx, self, bool(kwargs["force"].const()) if kwargs else False)
        if name == "register_hook" and self.source is not None and not kwargs and len(args) == 1:
            return tx.output.side_effects.register_hook(self, args[0])
        if name == "register_hook" and self.source is None and not kwargs and len(args) == 1:
            from .tensor_hooks import register_intermediate_hook

            return register_intermediate_hook(tx, self, args[0])
        if name in ("item", "tolist") and not args and not kwargs:
            from .scalars import tensor_item, tensor_tolist

            return tensor_item(tx, self) if name == "item" else tensor_tolist(tx, self)
        if name in _BREAKING_METHODS:
            unsupported(f"call to Tensor.{name}", why=_BREAKING_METHODS[name])
        if name == "type" and not args and not kwargs:
            return ConstantVT(self.fake.type())
        if name == "__getitem__":
            return tx.output.call_graph("call_function", _getitem(), [self, args[0]], {})
        return tx.output.call_graph("call_method", name, [self] + list(args), kwargs)

    def _meta(self, tx, name: str, args: list) -> VT:
        """A metadata answer (``size``, ``stride``, ``numel``...): constants, or symbolic sizes
        read by graph nodes (``x.size(0)``) when the dims are dynamic."""
        value = getattr(self.fake, name)(*args)
        graph = tx.output.graph
        whole: list = []  # NOTE: one ``x.stride()`` node for the items read of this call (as PyTorch)

        def make(i=None):
            if i is None:
                return graph.call_method(name, (self.node, *args))
            if name == "size" and not args:
                return graph.call_method(name, (self.node, i))
            import operator

            if not whole:
                whole.append(graph.call_method(name, (self.node, *args)))
            return graph.call_function(operator.getitem, (whole[0], i))

        return tx.output.sym_vt(value, make)

    def unpack(self, tx) -> list:
        if self.fake.dim() == 0:
            unsupported("iteration over a 0-d tensor")
        import operator

        return [tx.output.call_graph("call_function", operator.getitem, [self, ConstantVT(i)], {})
                for i in range(self.fake.shape[0])]

    def reconstruct(self, cg) -> str:
        return cg.tensor_expr(self)

    def __repr__(self) -> str:
        return f"TensorVT({self.node}, {tuple(self.fake.shape)})"


def _input_before(output, first: "TensorVT", second: "TensorVT") -> None:
    """Make ``first``'s placeholder (and its input entry) come before ``second``'s, as
    in PyTorch's graph for ``x.data = y``: it reads the object of a setattr before the
    value, kiln reads them in bytecode order (y first).  Backends that keep ``set_``
    write-backs in the graph (inductor) apply them in input order, and x's new value is
    y as it came in."""
    a, b = first.node, second.node
    if a.op != "placeholder" or b.op != "placeholder" or a.users or b.users:
        return
    order = {n: i for i, n in enumerate(output.graph.find_nodes(op="placeholder"))}
    if order[a] < order[b]:
        return
    ins = output.inputs
    ia = next((i for i, e in enumerate(ins) if e[2] is first), None)
    ib = next((i for i, e in enumerate(ins) if e[2] is second), None)
    if ia is None or ib is None:
        return
    b.prepend(a)
    ins.insert(ib, ins.pop(ia))


def lower_version_count_by_1(x: torch.Tensor) -> torch.Tensor:
    """Undo the version bump of the ``set_`` that stands for ``x.data = y`` (eager's
    ``.data =`` leaves the version counter alone; autograd checks it)."""
    version = x._version
    torch._C._autograd._unsafe_set_version_counter((x,), (max(version - 1, 0),))
    return x


def _concrete_all(v: Any) -> Any:
    from .symbolic import concrete

    if isinstance(v, (tuple, list)):
        return tuple(concrete(x) for x in v)
    return concrete(v)


def _getitem():
    import operator

    return operator.getitem


def fake_value(v: VT) -> Any:
    """VT -> the value a fake-tensor call sees (fake tensors, constants, nested)."""
    from .containers import ListVT, SliceVT
    from .numpy_vt import NdarrayVT, numpy_dtype_name

    if isinstance(v, (TensorVT, NdarrayVT)):
        return v.fake
    if hasattr(v, "sym"):
        return v.sym
    np_dtype = numpy_dtype_name(v)
    if np_dtype is not None:
        return np_dtype
    _no_numpy_scalar(v)
    if isinstance(v, (TupleVT, ListVT)):
        vals = [fake_value(i) for i in v.items]
        return vals if isinstance(v, ListVT) else (tuple(vals) if v.pytype is not torch.Size else torch.Size(vals))
    if isinstance(v, SliceVT):
        return slice(*(fake_value(p) for p in v.parts))
    if v.is_const():
        return v.const()
    unsupported(f"{v} passed to a torch function")


# NOTE: torch reads a Python scalar type passed as a dtype (``x.to(float)``) as this dtype;
# fx cannot print a class as an argument, so the graph gets the dtype itself.
_PY_TYPE_DTYPES = {float: torch.float64, int: torch.int64, bool: torch.bool, complex: torch.complex128}


def _no_numpy_scalar(v: VT) -> None:
    # NOTE: a NumPy scalar promotes differently from the Python number it equals (and fx
    # cannot print it): it is not put into graphs.
    if isinstance(v, ConstantVT) and type(v.value).__module__ == "numpy":
        unsupported(f"NumPy scalar {v.value!r} passed to a graph operation")


def node_value(v: VT) -> Any:
    """VT -> the fx argument (nodes, constants, nested)."""
    from .callables import ClassVT
    from .containers import ListVT, SliceVT

    from .numpy_vt import NdarrayVT, numpy_dtype_name

    if isinstance(v, ClassVT) and v.cls in _PY_TYPE_DTYPES:
        return _PY_TYPE_DTYPES[v.cls]
    if isinstance(v, NdarrayVT):
        return v.node
    np_dtype = numpy_dtype_name(v)
    if np_dtype is not None:
        return np_dtype
    _no_numpy_scalar(v)
    if isinstance(v, TensorVT) or hasattr(v, "sym"):
        return v.node
    if isinstance(v, (TupleVT, ListVT)):
        vals = [node_value(i) for i in v.items]
        return vals if isinstance(v, ListVT) else tuple(vals)
    if isinstance(v, SliceVT):
        return slice(*(node_value(p) for p in v.parts))
    return v.const()
