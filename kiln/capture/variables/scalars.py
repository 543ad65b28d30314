"""Tensor data read into Python: ``Tensor.tolist()``, ``Tensor.item()`` and ``torch._check*``.

In:  a TensorVT whose values the code reads as Python numbers (``for i in x.tolist()``,
     ``y = x.item()``), and checks on such numbers (``torch._check(y >= 0)``).
Out: graph nodes (``item`` per element, ``aten._assert_scalar`` per check) and SymNodeVTs
     of *unbacked* symbols (``u0``, ``zuf0``): values the ShapeEnv knows nothing about but
     their range, as PyTorch's capture makes them (fake ``aten._local_scalar_dense``).

Rules (PyTorch's): ``tolist()`` of an integer tensor is always captured, of any other
dtype a graph break; ``item()`` is a graph break unless ``config.capture_scalar_outputs``.

Invariants:
- A static compile has no ShapeEnv until its first data read; then its fake mode gets
  one (``scalar_outputs``): input shapes stay exactly as specialised as before.
- An unbacked value reaches code after the graph as a graph output (ints and bools as
  they are; floats as a float64 0-d tensor read back with ``.item()``, as PyTorch
  returns them), never rebuilt from input sizes (``graph_scalar``).
- A Python decision on an unbacked value (``if y > 2``, ``int(y)``, a guard a fake call
  needs) is a graph break naming the expression (``symbolic.concrete``).
- ``torch._check(cond)`` / ``assert cond`` on an unbacked condition becomes an
  ``aten._assert_scalar`` node: it is checked when the graph runs, after AOT too.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch

from .base import VT, ConstantVT, unsupported
from .containers import ListVT, TupleVT
from .symbolic import SymNodeVT, has_unbacked
from .tensor import TensorVT

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


def scalar_outputs(output) -> None:
    """Let fake ``item()`` calls of this frame (and the backend's traces of its graph,
    which share the fake mode) return unbacked symbols: a ShapeEnv if there was none."""
    from ..dynamic import STATIC_ONLY_BACKENDS

    backend = getattr(output.ctx, "backend_name", None)
    if backend in STATIC_ONLY_BACKENDS:
        unsupported("tensor data read into Python (Tensor.item / tolist / mark_unbacked)",
                    why=f"the {backend} backend compiles graphs of static sizes only")
    mode = output.fake_mode
    if mode.shape_env is None:
        from ..dynamic import new_shape_env

        mode.shape_env = new_shape_env(scalar_outputs=True)
        mode.static_shapes = False  # NOTE: as a mode made with a ShapeEnv (inputs pass their own)
    mode.allow_scalar_outputs = True
    output.reads_data = True  # NOTE: the graph is symbolic: its backend gets fake inputs


def tensor_item(tx, t: TensorVT) -> VT:
    """``t.item()``: an unbacked scalar under ``config.capture_scalar_outputs``, else a break."""
    from .. import config

    if not config.capture_scalar_outputs:
        unsupported("call to Tensor.item",
                    why="Tensor.item() reads tensor data (kiln.capture.config.capture_scalar_outputs=True "
                        "captures it as a symbolic value)")
    return _item(tx, t)


def _item(tx, t: TensorVT) -> VT:
    from .symbolic import concrete

    if concrete(t.fake.numel()) != 1:
        unsupported("Tensor.item() of a tensor with more than one element",
                    why="eager raises: only one-element tensors convert to Python scalars")
    if t.fake.dtype.is_complex:
        unsupported("Tensor.item() of a complex tensor", why="complex values are not symbolic")
    scalar_outputs(tx.output)
    return tx.output.call_graph("call_method", "item", [t], {})


def tensor_tolist(tx, t: TensorVT) -> VT:
    """``t.tolist()`` of an integer tensor: ``t[i][j].item()`` per element, nested lists."""
    if t.fake.dtype not in _INT_DTYPES:
        unsupported("call to Tensor.tolist", why=f"Tensor.tolist() of a {t.fake.dtype} tensor reads its data "
                                                  "(only integer tensors are captured, as unbacked ints)")
    return _tolist(tx, t)


def _tolist(tx, t: TensorVT) -> VT:
    from .symbolic import concrete

    if t.fake.dim() == 0:
        return _item(tx, t)
    items = []
    for i in range(concrete(t.fake.shape[0])):
        row = tx.output.call_graph("call_function", operator.getitem, [t, ConstantVT(i)], {})
        row.node.meta["kiln_tolist"] = True  # NOTE: dropped with its items if nothing uses them
        items.append(_tolist(tx, row))
        # NOTE: the row reads are plain indexing of the tensor on the way to its items; as in
        # PyTorch's graph they carry no example value (the printed graph shows no type).
        row.node.meta.pop("example_value", None)
    return ListVT(items)


# ---------------------------------------------------------------------------- checks
def _assert(tx, cond: SymNodeVT) -> None:
    """``aten._assert_scalar(cond, msg)`` in the graph (the fake call records the fact)."""
    msg = f"Runtime assertion failed for expression {cond.sym.node.expr} on node '{cond.node.name}'"
    tx.output.call_graph("call_function", torch.ops.aten._assert_scalar.default, [cond, ConstantVT(msg)], {})


def _check_cond(tx, cond: VT, fn_name: str) -> Optional[VT]:
    """A constant or unbacked condition of ``torch._check*``: None once handled."""
    if isinstance(cond, ConstantVT) and type(cond.value) is bool:
        if not cond.value:
            unsupported(f"{fn_name}() of a condition that is False", why="eager raises; it runs eagerly")
        return None
    if isinstance(cond, SymNodeVT) and isinstance(cond.sym, torch.SymBool) and has_unbacked(cond.sym):
        _assert(tx, cond)
        return None
    return cond


def torch_check(tx, cond: Optional[VT] = None, message: Optional[VT] = None, **kwargs) -> VT:
    """``torch._check(cond, message)``: nothing for a true constant, a runtime assert for a
    condition on unbacked values (its message names the expression, as PyTorch's does);
    other conditions go into the graph as the call itself."""
    cond = cond if cond is not None else kwargs.pop("cond", None)
    message = message if message is not None else kwargs.pop("message", None)
    if cond is None or kwargs:
        unsupported("torch._check() with unexpected arguments")
    rest = _check_cond(tx, cond, "torch._check")
    if rest is None:
        return ConstantVT(None)
    args = [rest] + ([message] if message is not None else [])
    return tx.output.call_graph("call_function", torch._check, args, {})


def torch_check_is_size(tx, i: VT, **kwargs) -> VT:
    """``torch._check_is_size(i)``: ``i >= 0`` checked at run time, and ``i`` advised to be a
    size (size-oblivious reasoning in later fake calls; the node does the same for AOT)."""
    if kwargs:
        unsupported("torch._check_is_size() with keyword arguments")
    if isinstance(i, SymNodeVT) and has_unbacked(i.sym):
        from ..operators import binary_op

        _check_cond(tx, binary_op(tx, operator.ge, i, ConstantVT(0)), "torch._check_is_size")
    elif isinstance(i, ConstantVT):
        _check_cond(tx, ConstantVT(bool(i.value >= 0)), "torch._check_is_size")
        return ConstantVT(None)
    return tx.output.call_graph("call_function", torch._check_is_size, [i], {})


def torch_tensor(tx, *args, **kwargs) -> VT:
    """``torch.tensor(data)``: data holding traced tensors or symbolic values
    (``torch.tensor([x, y.item()])``) is built by ``torch._refs.tensor`` (stacks the
    elements, never reads them), as in PyTorch's capture; anything else as it is."""
    data = args[0] if args else kwargs.get("data")
    fn = torch._refs.tensor if isinstance(data, (ListVT, TupleVT)) and _holds_traced(data) else torch.tensor
    return tx.output.call_graph("call_function", fn, list(args), dict(kwargs))


def _holds_traced(v: VT) -> bool:
    if isinstance(v, (ListVT, TupleVT)):
        return any(_holds_traced(i) for i in v.items)
    return isinstance(v, (TensorVT, SymNodeVT))


def shape_oracle_functions() -> dict:
    """``guard_size_oblivious`` and friends (torch.fx.experimental.symbolic_shapes) called in
    user code: answered while tracing by the ShapeEnv, as PyTorch's capture does (inlined, a
    value read from data would have no answer; size-oblivious reasoning gives one)."""
    import torch.fx.experimental.symbolic_shapes as ss

    names = ("guard_size_oblivious", "statically_known_true", "guard_or_false", "guard_or_true",
             "definitely_true", "definitely_false")
    return {getattr(ss, n): _oracle(getattr(ss, n)) for n in names if hasattr(ss, n)}


def _oracle(fn):
    def run(tx, *args, **kwargs):
        import warnings

        from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

        from .symbolic import data_dependent
        from .tensor import fake_value

        if len(args) != 1 or kwargs:
            unsupported(f"{fn.__name__}() with {len(args)} arguments")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return ConstantVT(bool(fn(fake_value(args[0]))))
        except GuardOnDataDependentSymNode as e:
            data_dependent(e)

    return run


def assert_on_data(tx, inst, cond: VT) -> bool:
    """``assert cond, msg`` on a tensor or an unbacked condition: the graph asserts it at run
    time (``torch._assert_async`` / ``aten._assert_scalar``) and tracing goes on past the
    ``raise``, as PyTorch's capture rewrites it.  False: not such an assert."""
    msg = _assert_message(tx, inst)
    if msg is None:
        return False
    if isinstance(cond, TensorVT):
        if not isinstance(cond.fake.numel(), int) or cond.fake.numel() != 1:
            return False  # NOTE: eager's bool() of it raises: the branch breaks instead
        tx.output.call_graph("call_function", torch._assert_async, [cond, ConstantVT(msg)], {})
    elif isinstance(cond, SymNodeVT) and isinstance(cond.sym, torch.SymBool) and has_unbacked(cond.sym):
        _assert(tx, cond)
    else:
        return False
    tx.pop()
    tx.jump_to(inst.argval)
    return True


def _assert_message(tx, inst) -> Optional[str]:
    """The message of the ``assert`` a POP_JUMP_IF_TRUE at ``inst`` guards ("assertion
    error" when it has none), or None when what follows is not an assert's raise."""
    if not inst.opname.endswith("IF_TRUE"):
        return None
    rest = tx.insts[inst.index + 1:inst.index + 6]
    if not rest or rest[0].opname != "LOAD_ASSERTION_ERROR":
        return None
    if len(rest) > 1 and rest[1].opname == "RAISE_VARARGS":
        return "assertion error"
    names = [i.opname for i in rest[1:]]
    if names and names[0] == "LOAD_CONST" and isinstance(rest[1].argval, str) and "RAISE_VARARGS" in names:
        between = names[1:names.index("RAISE_VARARGS")]
        if all(n in ("CALL", "PRECALL", "CALL_FUNCTION") for n in between):
            return rest[1].argval
    return None


__all__ = ["scalar_outputs", "tensor_item", "tensor_tolist", "torch_check", "torch_check_is_size", "torch_tensor",
           "assert_on_data"]
