"""The dispatch-level tracer: a TorchDispatchMode that records ATen calls on an fx.Graph.

Every tensor the traced function touches is mapped to the fx.Node that
produced it.  An op call is recorded as one ``call_function`` node whose target
is the ATen ``OpOverload``; its outputs (run for real, or on fake tensors) are
mapped to that node, or to ``getitem`` nodes for tuple outputs.
"""
from __future__ import annotations

import contextlib
import operator
from typing import Any, Callable, Iterator, Optional

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.utils._python_dispatch import TorchDispatchMode

from kiln import exc
from kiln.tracing.symbolic import SymNodeBuilder

_TRACER_STACK: list["Tracer"] = []


def current_tracer() -> Optional["Tracer"]:
    """The innermost active kiln tracer, or None."""
    return _TRACER_STACK[-1] if _TRACER_STACK else None


def _is_sym(x: Any) -> bool:
    return isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool))


_LIFT_FROM: list = []
_RECOMPUTE_REGIONS: list = []


@contextlib.contextmanager
def recompute_region(region_id: int) -> Iterator[None]:
    """Forward nodes recorded inside are tagged ``meta["recompute"] = "must_recompute"`` and
    ``meta["ac_graph_id"] = region_id``: an activation-checkpointed region, whose values
    the partitioners recompute in backward instead of saving."""
    _RECOMPUTE_REGIONS.append(region_id)
    try:
        yield
    finally:
        _RECOMPUTE_REGIONS.pop()


@contextlib.contextmanager
def lifting_from(outer: "Tracer") -> Iterator[list]:
    """Traces started inside take the tensors of ``outer``'s trace they read as new
    inputs (placeholders after their own); yields the list of those tensors, in order."""
    lifted: list = []
    _LIFT_FROM.append((outer, lifted))
    try:
        yield lifted
    finally:
        _LIFT_FROM.pop()


class Tracer:
    """Holds the graph being built and the value -> node maps."""

    def __init__(self, fake_mode: Optional[FakeTensorMode], decomposition_table=None):
        self.graph = fx.Graph()
        self.fake_mode = fake_mode
        self.decomposition_table = dict(decomposition_table or {})
        # NOTE: keyed by id() with the tensor kept alive alongside, so that a
        # freed tensor's id cannot be reused for another tensor mid-trace.
        self._tensor_nodes: dict[int, tuple[torch.Tensor, fx.Node]] = {}
        self.constants: dict[str, Any] = {}
        self.syms = SymNodeBuilder(self.graph)
        self._meta_mode: Optional[FakeTensorMode] = None
        self.mode = TracingMode(self)
        # NOTE: a trace nested in another (a strict_mode body) takes the outer trace's
        # tensors it reads as extra inputs, not as constants (see lifting_from)
        self._lift_from = _LIFT_FROM[-1] if _LIFT_FROM else None

    # ---- value <-> node -------------------------------------------------
    def bind(self, value: Any, node: fx.Node) -> None:
        """Map `value` (tensor or SymInt) to `node` and fill the node's meta."""
        if isinstance(value, torch.Tensor):
            self._tensor_nodes[id(value)] = (value, node)
        elif _is_sym(value):
            self.syms.register_bound(node, value)
        node.meta["val"] = self.meta_val(value)
        if isinstance(value, torch.Tensor):
            try:
                node.meta["tensor_meta"] = _extract_tensor_metadata(node.meta["val"])
            except Exception:  # NOTE: sparse / opaque tensors have no metadata
                pass

    def freeze_meta(self, t: torch.Tensor) -> None:
        """Before ``t``'s own sizes/strides change in place (``squeeze_``, ``t_``): the node
        that produced ``t`` keeps, as its ``meta['val']``, an alias with ``t``'s metadata now
        (the meta of a node must describe its value when it ran, not ``t``'s later shape)."""
        node = self.node_of_tensor(t)
        if node is None or node.meta.get("val") is not t:
            return
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            node.meta["val"] = t.as_strided(t.shape, t.stride(), t.storage_offset())

    def node_of_tensor(self, t: torch.Tensor) -> Optional[fx.Node]:
        entry = self._tensor_nodes.get(id(t))
        if entry is not None and entry[0] is t:
            return entry[1]
        return None

    def proxy_of(self, value: Any) -> Any:
        """The fx argument standing for `value`: a node, or the constant itself."""
        if isinstance(value, torch.Tensor):
            node = self.node_of_tensor(value)
            return node if node is not None else self.lift_constant(value)
        if _is_sym(value):
            return self.syms.node_for(value)
        if isinstance(value, torch.ScriptObject):
            return self.lift_constant(value, prefix="_torchbind_obj")
        return value

    def proxy_tree(self, tree: Any) -> Any:
        return pytree.tree_map(self.proxy_of, tree)

    def _lift_input(self, value: torch.Tensor) -> fx.Node:
        first = next((n for n in self.graph.nodes if n.op != "placeholder"), None)
        n_ph = sum(1 for n in self.graph.nodes if n.op == "placeholder")
        ctx = self.graph.inserting_before(first) if first is not None else contextlib.nullcontext()
        with ctx:
            node = self.graph.placeholder(f"arg{n_ph}_1")
        self.bind(value, node)
        self._lift_from[1].append(value)
        return node

    def lift_constant(self, value: Any, prefix: str = "_tensor_constant") -> fx.Node:
        """Register a value created outside the trace as a graph attribute (a tensor of
        the enclosing trace, inside :func:`lifting_from`: a new input)."""
        if (isinstance(value, torch.Tensor) and self._lift_from is not None
                and self._lift_from[0].node_of_tensor(value) is not None):
            return self._lift_input(value)
        name = f"{prefix}{sum(1 for k in self.constants if k.startswith(prefix))}"
        stored = value
        if isinstance(value, torch.Tensor) and isinstance(value, FakeTensor):
            raise exc.TracingError(
                "a fake tensor from another trace was used as a constant",
                why="fake tensors cannot be stored in a GraphModule",
                where=exc.user_location(),
                hint="pass the tensor as an input of the traced function",
            )
        self.constants[name] = stored
        node = self.graph.get_attr(name)
        if isinstance(value, torch.Tensor):
            traced_val = value
            if self.fake_mode is not None:
                traced_val = self.fake_mode.from_tensor(value, static_shapes=True)
            self.bind(traced_val, node)
            # the fake version (if any) is what ops will see from now on
            self._tensor_nodes[id(value)] = (value, node)
            if traced_val is not value:
                self._tensor_nodes[id(traced_val)] = (traced_val, node)
        else:
            node.meta["val"] = value
        return node

    def meta_val(self, value: Any) -> Any:
        """A metadata-only copy of `value` for node.meta['val']."""
        if isinstance(value, FakeTensor):
            return value
        if isinstance(value, torch.Tensor):
            if value.is_sparse or value.layout != torch.strided:
                return value
            if self._meta_mode is None:
                self._meta_mode = FakeTensorMode(allow_non_fake_inputs=True)
            with self._meta_mode:
                out = torch.empty_strided(
                    value.shape, value.stride(), dtype=value.dtype, device=value.device
                )
            out.requires_grad_(value.requires_grad)
            return out
        return value

    # ---- recording --------------------------------------------------------
    def record(self, target: Callable, args: tuple, kwargs: dict, out: Any,
               name: Optional[str] = None) -> fx.Node:
        """Record `target(*args, **kwargs)` whose real/fake result is `out`."""
        node = self.graph.create_node(
            "call_function", target, self.proxy_tree(tuple(args)),
            self.proxy_tree(dict(kwargs)), name=name,
        )
        _stamp_meta(node, target)
        self.bind_outputs(node, out)
        return node

    def bind_outputs(self, node: fx.Node, out: Any) -> None:
        if isinstance(out, (tuple, list)):
            node.meta["val"] = [self.meta_val(o) for o in out]
            for i, o in enumerate(out):
                if isinstance(o, torch.Tensor) or _is_sym(o):
                    item = self.graph.create_node(
                        "call_function", operator.getitem, (node, i), {}, name="getitem"
                    )
                    self.bind(o, item)
                elif isinstance(o, (tuple, list)):
                    item = self.graph.create_node(
                        "call_function", operator.getitem, (node, i), {}, name="getitem"
                    )
                    self.bind_outputs(item, o)
        elif isinstance(out, torch.Tensor) or _is_sym(out):
            self.bind(out, node)
        else:
            node.meta["val"] = out

    def add_subgraph(self, gm: fx.GraphModule, prefix: str) -> fx.Node:
        """Store a subgraph module on the root and return its get_attr node."""
        i = 0
        while f"{prefix}{i}" in self.constants:
            i += 1
        name = f"{prefix}{i}"
        self.constants[name] = gm
        return self.graph.get_attr(name)

    def __enter__(self) -> "Tracer":
        _TRACER_STACK.append(self)
        return self

    def __exit__(self, *a: Any) -> None:
        _TRACER_STACK.remove(self)


def _stamp_meta(node: fx.Node, target: Any) -> None:
    """Record the ATen op and the autograd sequence number on the node.

    NOTE: forward and backward ops that belong together share a sequence
    number: in forward it is the number of the grad_fn just created for the
    op (autograd creates it before the op reaches the Python dispatcher); in
    backward it is the number of the autograd node being run.
    """
    if isinstance(target, torch._ops.OpOverload):
        node.meta["original_aten"] = target
    bw_node = torch._C._current_autograd_node()
    if bw_node is not None:
        node.meta["seq_nr"] = bw_node._sequence_nr()
        node.meta["autograd_backward"] = True
    else:
        node.meta["seq_nr"] = torch.autograd._get_sequence_nr() - 1
        if _RECOMPUTE_REGIONS:
            node.meta["recompute"] = "must_recompute"
            node.meta["ac_graph_id"] = _RECOMPUTE_REGIONS[-1]


def _node_name(func: Any) -> str:
    packet = getattr(func, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(func, "__name__", "op")


# NOTE: these exceptions come from FakeTensorMode when an op cannot run on
# metadata alone; they are turned into kiln errors that name the op and the
# user's line instead of surfacing from deep inside the fake tensor machinery.
def _fake_mode_errors() -> tuple[type, ...]:
    from torch._subclasses import fake_tensor as ft

    names = ("UnsupportedOperatorException", "DataDependentOutputException",
             "DynamicOutputShapeException", "UnsupportedFakeTensorException")
    return tuple(getattr(ft, n) for n in names if hasattr(ft, n))


def _has_traced_value(out: Any) -> bool:
    return any(isinstance(x, torch.Tensor) or _is_sym(x) for x in pytree.tree_leaves(out))


def _worth_recording(func: Any, out: Any) -> bool:
    """Ops returning only Python metadata (prim.device, is_contiguous) are not
    recorded: their result is baked into the trace as a constant.  Ops that
    return nothing are kept, since they run only for their effect."""
    if out is None or _has_traced_value(out):
        return True
    schema = getattr(func, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


class TracingMode(TorchDispatchMode):
    """Records every ATen op that reaches the Python dispatcher."""

    kiln_hop_key = "trace"

    def __init__(self, tracer: Tracer):
        super().__init__()
        self.tracer = tracer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracer = self.tracer
        decomp = tracer.decomposition_table.get(func)
        if decomp is not None:
            with self:
                r = decomp(*args, **kwargs)
                if r is not NotImplemented:
                    return r
        if func is torch.ops.aten.lift_fresh.default:
            # NOTE: torch.tensor(...) inside the function: a fresh constant.
            t = args[0]
            if tracer.node_of_tensor(t) is None:
                tracer.lift_constant(t)
            return t
        args, kwargs = self._fakeify_constants(args, kwargs)
        try:
            out = func(*args, **kwargs)
        except _fake_mode_errors() as e:
            kind = type(e).__name__
            cls = exc.DataDependentError if "DataDependent" in kind or "Dynamic" in kind \
                else exc.UnsupportedOperatorError
            raise cls(
                f"cannot trace {func} with {'fake' if tracer.fake_mode else 'real'} tensors",
                why=f"{kind}: {e}",
                where=exc.user_location(),
                hint="use tracing_mode='real', or give the op a meta kernel "
                     "(torch.library.register_fake)",
            ) from e
        if _worth_recording(func, out):
            tracer.record(func, args, kwargs, out, name=_node_name(func))
        return out

    def _fakeify_constants(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Real tensors from outside the trace become lifted constants (fake mode)."""
        tracer = self.tracer
        if tracer.fake_mode is None:
            return args, kwargs

        def conv(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor):
                node = tracer.node_of_tensor(x)
                if node is None:
                    node = tracer.lift_constant(x)
                fake = node.meta["val"]
                tracer._tensor_nodes[id(fake)] = (fake, node)
                return fake
            return x

        return pytree.tree_map(conv, args), pytree.tree_map(conv, kwargs)
