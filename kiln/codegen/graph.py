"""kiln.codegen.graph: a functional ATen graph -> buffers -> kernels -> a callable.

In:  ``gm`` (functional ATen fx graph from kiln.aot, decomposed with
     :func:`kiln.codegen.decompose.decomposition_table`), ``example_inputs`` (real or fake
     tensors, SymInts, ints).
Out: :func:`compile_aten_graph` returns a boxed callable ``f(args: list) -> list``
     (``_boxed_call = True``); it may clear ``args``.

Stages: :class:`GraphLowering` runs the lowering table over the nodes (ops without a
lowering become extern ATen calls), then :func:`kiln.codegen.schedule.schedule` groups
buffers into kernels, the target printer prints them, and :mod:`kiln.codegen.wrapper`
writes the Python that calls them.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Optional

import sympy
import torch
import torch.fx as fx

from kiln import exc
from kiln.codegen import ir
from kiln.codegen.ir import (Buffer, BufRef, Extern, InputBuffer, Pointwise, TensorValue,
                             contiguous_strides, make_vars, op_count, sympify_size)
from kiln.codegen.addmm_bias import unfuse_addmm_bias
from kiln.codegen.lowering import NotLowered, lowering_for
from kiln.passes import run_pipeline

aten = torch.ops.aten

# NOTE: a value read by more than one consumer is recomputed in each when its body has at
# most this many loads + ops; above it, it is stored once (a buffer) and loaded.
INLINE_MAX_OPS = 6
# NOTE: a lazy value whose body grows past this is stored, whatever its users, so that
# long chains do not build huge kernels.
REALIZE_MAX_OPS = 200

_SUPPORTED_DTYPES = {torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                     torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool}


def _sym_ops() -> dict:
    return {operator.add: operator.add, operator.sub: operator.sub, operator.mul: operator.mul,
            operator.floordiv: lambda a, b: ir.FloorDiv(sympy.sympify(a), sympy.sympify(b)),
            operator.neg: operator.neg, torch.sym_max: lambda a, b: sympy.Max(a, b),
            torch.sym_min: lambda a, b: sympy.Min(a, b)}


class GraphLowering:
    """Lowers one fx graph to buffers (see module docstring)."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list):
        self.gm = gm
        self.example_inputs = example_inputs
        self.buffers: dict[str, Buffer] = {}
        self.order: list[Buffer] = []          # kernels and externs in program order
        self.inputs: list[tuple[str, Any]] = []  # (arg name, Buffer | sympy symbol | None)
        self.env: dict[fx.Node, Any] = {}
        self.node: Optional[fx.Node] = None
        self.outputs: list = []
        self.shape_env = None
        self.var_to_val: dict = {}
        self._count = 0
        self._fakes: dict[int, tuple] = {}
        self._lazy_origins: list = []
        self.constants: dict[str, torch.Tensor] = {}
        self.constant_targets: dict[str, str] = {}   # constant name -> gm attribute path
        for x in example_inputs:
            se = None
            if isinstance(x, torch.Tensor) and hasattr(x, "fake_mode"):
                se = getattr(x.fake_mode, "shape_env", None)
            elif isinstance(x, torch.SymInt):
                se = x.node.shape_env
            if se is not None:
                self.shape_env = se
                self.var_to_val = dict(getattr(se, "backed_var_to_val", None) or se.var_to_val)
                break

    # ------------------------------------------------------------------ helpers for lowerings
    def fake(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            return a.meta.get("val")
        if isinstance(a, (list, tuple)):
            return type(a)(self.fake(x) for x in a)
        if isinstance(a, TensorValue):
            hit = self._fakes.get(id(a))
            if hit is None:
                raise NotLowered("no fake value")
            return hit[1]
        return a

    def _remember(self, v: Any, val: Any) -> None:
        if isinstance(v, TensorValue):
            self._fakes[id(v)] = (v, val)
        elif isinstance(v, (list, tuple)) and isinstance(val, (list, tuple)):
            for a, b in zip(v, val):
                self._remember(a, b)

    def size_hint(self, e: Any) -> int:
        e = sympy.sympify(e)
        if e.is_Integer:
            return int(e)
        v = e.xreplace(self.var_to_val)
        if not v.is_number:
            raise exc.CodegenError(f"no size hint for {e}")
        return int(v)

    def new_name(self, prefix: str = "buf") -> str:
        self._count += 1
        return f"{prefix}{self._count - 1}"

    def new_buffer(self, dtype, device, sizes, strides, body, origins=None) -> Buffer:
        buf = Buffer(self.new_name(), dtype, device, list(sizes), list(strides), body,
                     list(origins or self._origins()))
        self.buffers[buf.name] = buf
        if buf.is_kernel() or isinstance(buf.body, Extern):
            self.order.append(buf)
        return buf

    def _origins(self) -> list:
        """fx nodes a buffer made now comes from: the current node and the lazy values
        inlined into it."""
        out = list(self._lazy_origins)
        if self.node is not None and self.node.name not in out:
            out.append(self.node.name)
        return out

    def realize(self, tv: TensorValue, like: Any = None) -> TensorValue:
        """``tv`` stored in a buffer (contiguous, or ``like``'s strides when dense)."""
        if tv.strided is not None:
            return tv
        strides = contiguous_strides(tv.sizes)
        if isinstance(like, torch.Tensor) and _dense(like):
            strides = [sympify_size(s) for s in like.stride()]
        xv = make_vars("x", len(tv.sizes))
        body = Pointwise(list(tv.sizes), tv.load(xv))
        buf = self.new_buffer(tv.dtype, tv.device, tv.sizes, strides, body,
                              origins=tv.origins or None)
        return TensorValue.of_buffer(buf)

    # ------------------------------------------------------------------ the lowering
    def run(self) -> "GraphLowering":
        for i, node in enumerate(self.gm.graph.nodes):
            self.node = node
            if node.op == "placeholder":
                self.env[node] = self._placeholder(node, len(self.inputs))
                self._remember(self.env[node], node.meta.get("val"))
            elif node.op == "call_function":
                self.env[node] = self._call(node)
                self._remember(self.env[node], node.meta.get("val"))
            elif node.op == "output":
                self._output(node)
            elif node.op == "get_attr":
                self.env[node] = self._get_attr(node)
                self._remember(self.env[node], node.meta.get("val"))
            else:
                raise exc.CodegenError(f"unsupported node {node.op} {node.name}")
        self.node = None
        return self

    def _placeholder(self, node: fx.Node, i: int) -> Any:
        val = node.meta.get("val")
        if val is None and i < len(self.example_inputs):
            val = self.example_inputs[i]
        name = f"arg{i}"
        if isinstance(val, torch.Tensor):
            _check_tensor(val, node.name)
            sizes = [sympify_size(s) for s in val.shape]
            strides = [sympify_size(s) for s in val.stride()]
            buf = Buffer(name, val.dtype, val.device, sizes, strides, InputBuffer(name), [node.name])
            self.buffers[name] = buf
            self.inputs.append((name, buf))
            return TensorValue.of_buffer(buf)
        if isinstance(val, torch.SymInt):
            e = val.node.expr
            self.inputs.append((name, e))
            return e
        if isinstance(val, (torch.SymFloat, torch.SymBool)):
            # NOTE: a symbolic float input (an unspecialized float saved for backward) has
            # no value at compile time: taking it as a constant would bake in a SymFloat.
            raise exc.CodegenError(f"graph input {node.name} is a {type(val).__name__}")
        self.inputs.append((name, None))
        return val

    def _get_attr(self, node: fx.Node) -> Any:
        """A constant tensor of the graph: a buffer the wrapper holds."""
        obj = self.gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        if isinstance(obj, fx.GraphModule):
            from kiln.codegen.subgraphs import compile_subgraph

            return compile_subgraph(obj)
        if not isinstance(obj, torch.Tensor):
            raise exc.CodegenError(f"get_attr {node.target} is a {type(obj).__name__}")
        _check_tensor(obj, node.name)
        name = self.new_name("const")
        buf = Buffer(name, obj.dtype, obj.device, [sympify_size(s) for s in obj.shape],
                     [sympify_size(s) for s in obj.stride()], InputBuffer(name), [node.name])
        self.buffers[name] = buf
        self.constants[name] = obj
        self.constant_targets[name] = str(node.target)
        return TensorValue.of_buffer(buf)

    def _call(self, node: fx.Node) -> Any:
        target = node.target
        args = fx.node.map_arg(node.args, lambda n: self.env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self.env[n])
        if target is operator.getitem:
            return args[0][args[1]]
        sym = _sym_ops().get(target)
        if sym is not None and all(isinstance(a, (int, sympy.Basic)) for a in args):
            return sym(*args)
        if target in (aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default,
                      aten.sym_storage_offset.default):
            return _sym_query(target, args)
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            _check_tensor(val, node.name)
        fn = lowering_for(target)
        lazy: list = []
        for a in _flat(args) + _flat(tuple(kwargs.values())):
            if isinstance(a, TensorValue) and a.strided is None:
                lazy += [o for o in a.origins if o not in lazy]
        self._lazy_origins = lazy
        out = None
        if fn is not None:
            try:
                out = fn(self, *args, **kwargs)
                # NOTE: loaders run lazily; one probe here makes a lowering that cannot
                # handle these operands say so now (and become an extern), not later.
                for tv in (out if isinstance(out, (list, tuple)) else [out]):
                    if isinstance(tv, TensorValue):
                        tv.load(make_vars("x", len(tv.sizes)))
            except NotLowered:
                out = None
        if out is None:
            return self.extern(node, args, kwargs)
        return self._maybe_realize(node, out)

    def _maybe_realize(self, node: fx.Node, out: Any) -> Any:
        if isinstance(out, TensorValue):
            if out.strided is None:
                out.origins = self._origins()
            if out.strided is None:
                n = op_count(out.load(make_vars("x", len(out.sizes))))
                if n > REALIZE_MAX_OPS or (len(node.users) > 1 and n > INLINE_MAX_OPS):
                    out = self.realize(out)
        return out

    def extern(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        """Call the ATen op itself (inputs realized; outputs become buffers)."""
        target = node.target
        if not callable(target):
            raise exc.CodegenError(f"cannot call {target} of node {node.name}")
        # NOTE: other callables (higher-order ops such as with_effects) run as opaque
        # externs in program order.
        if isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable:
            raise exc.CodegenError(f"node {node.name} mutates its input ({target}); "
                                   "codegen takes functional graphs")
        conv = lambda a: self._extern_arg(a)  # noqa: E731
        cargs = tuple(_map(conv, args))
        ckw = {k: _map(conv, v) for k, v in kwargs.items()}
        ext = self.new_buffer(torch.float32, torch.device("cpu"), [], [], Extern(target, cargs, ckw))
        return self._extern_outputs(ext, node.meta.get("val"), ext.name)

    def _extern_arg(self, a: Any) -> Any:
        if isinstance(a, TensorValue):
            a = self.realize(a)
            return a.strided
        return a

    def _extern_outputs(self, ext: Buffer, val: Any, source: str) -> Any:
        if isinstance(val, torch.Tensor):
            sizes = [sympify_size(s) for s in val.shape]
            strides = [sympify_size(s) for s in val.stride()]
            buf = Buffer(self.new_name(), val.dtype, val.device, sizes, strides,
                         InputBuffer(source, ext.name), list(ext.origins))
            self.buffers[buf.name] = buf
            return TensorValue.of_buffer(buf)
        if isinstance(val, (list, tuple)):
            return type(val)(self._extern_outputs(ext, v, f"{source}[{i}]") for i, v in enumerate(val))
        if val is None:
            return None
        raise exc.CodegenError(f"extern {ext.body.op} returns {type(val).__name__}")

    def _output(self, node: fx.Node) -> None:
        outs = node.args[0]
        outs = outs if isinstance(outs, (list, tuple)) else (outs,)
        for o in outs:
            v = self.env[o] if isinstance(o, fx.Node) else o
            if isinstance(v, TensorValue):
                if v.strided is None:
                    v = self.realize(v, like=o.meta.get("val"))
                self.outputs.append(v.strided)
            else:
                self.outputs.append(v)


def _flat(a) -> list:
    if isinstance(a, (list, tuple)):
        return [y for x in a for y in _flat(x)]
    return [a]


def _map(fn, a):
    if isinstance(a, (list, tuple)):
        return type(a)(_map(fn, x) for x in a)
    return fn(a)


def _sym_query(target, args):
    x = args[0]
    if target is aten.sym_size.int:
        return x.sizes[args[1]]
    if target is aten.sym_numel.default:
        return ir.product(x.sizes)
    if x.strided is None:
        raise exc.CodegenError("stride of a computed value")
    if target is aten.sym_stride.int:
        return x.strided.strides[args[1]]
    return x.strided.offset


def _dense(t: torch.Tensor) -> bool:
    """True when ``t``'s strides are a permutation of contiguous strides (no overlap, no gap)."""
    # NOTE: never int() a SymInt here: that would guard on (specialize) its value.
    if not all(type(s) is int for s in list(t.shape) + list(t.stride())):
        return False
    sizes, strides = list(t.shape), list(t.stride())
    order = sorted(range(len(sizes)), key=lambda d: strides[d])
    expect = 1
    for d in order:
        if sizes[d] == 1:
            continue
        if strides[d] != expect:
            return False
        expect *= sizes[d]
    return True


def _check_tensor(val: torch.Tensor, where: str) -> None:
    if val.device.type not in ("cpu", "cuda"):
        raise exc.CodegenError(f"no codegen for device {val.device.type} (node {where})")
    if val.layout != torch.strided:
        raise exc.CodegenError(f"no codegen for layout {val.layout} (node {where})")
    if val.dtype not in _SUPPORTED_DTYPES:
        raise exc.CodegenError(f"no codegen for dtype {val.dtype} (node {where})")
    if val.is_quantized:
        raise exc.CodegenError(f"no codegen for quantized tensors (node {where})")


# NOTE: passes over the functional ATen graph before lowering (KILN_LOGS=codegen.<name>)
ATEN_PASSES = [
    unfuse_addmm_bias,
]


def compile_aten_graph(gm: fx.GraphModule, example_inputs: list) -> Callable:
    """Compile a functional ATen graph to generated kernels + a Python wrapper.

    Returns a boxed callable (``f(args) -> list``, ``_boxed_call = True``); raises
    :class:`kiln.exc.CodegenError` when the graph as a whole cannot be compiled (device,
    dtype, layout); ops without a lowering run as extern ATen calls.
    """
    from kiln.codegen import schedule as sched
    from kiln.codegen import wrapper

    from kiln.codegen import graph_cache

    gm = run_pipeline("codegen", gm, ATEN_PASSES)
    key = graph_cache.key_for(gm, list(example_inputs))
    hit = graph_cache.lookup(key, gm)
    if hit is not None:
        return hit
    lowered = GraphLowering(gm, list(example_inputs)).run()
    from kiln.codegen.triton.split import split_reductions

    split_reductions(lowered, lambda b: wrapper.device_target(b.device) == "triton")
    plan = sched.schedule(lowered)
    call = wrapper.build(lowered, plan)
    if getattr(call, "uses_triton", False):
        from kiln.codegen.triton.runtime import eager_on_kernel_error

        call = eager_on_kernel_error(call, gm)
    graph_cache.store(key, getattr(call, "cache_record", None))
    return call


__all__ = ["compile_aten_graph", "GraphLowering"]
