"""The graph under construction: fx nodes, fake tensors, inputs, side effects.

In: symbolic calls from the interpreter.  Out: a torch-level fx.GraphModule
(call_function / call_method nodes of torch functions, operator.* and Tensor
methods; one placeholder per distinct input tensor, named after its source)
handed to the backend, plus the bookkeeping the entry writer (entry_source.py) needs.
"""
from __future__ import annotations

import contextlib

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher
from kiln.exc import Unsupported
from kiln.passes import checking, log_graph, verify_graph

from . import stats
from .dynamic import (NO_DYNAMIC_INT_BACKENDS, FrameState, SymbolTable, fake_with_dims, int_may_be_dynamic,
                      marked_unbacked, new_fake_mode, symbolic_float, symbolic_int, tensor_shape_checks)
from .guards import GuardSet
from .marked_dims import apply_marks, check_in_range
from .overlap import backend_tracing_context
from .sources import FloatTensorSource, ObjectTable, SizeSource, Source
from .variables.base import VT, ConstantVT, DeletedVT, const_vt, unsupported
from .variables.containers import ListVT, TupleVT
from .variables.symbolic import SYM_TYPES, SymNodeVT, concrete, has_unbacked, is_symbolic
from .variables.tensor import TensorVT, fake_value, node_value


@dataclass
class GraphCompileReason:
    """Why a graph was compiled (PyTorch's name and fields)."""

    reason: str
    user_stack: list = field(default_factory=list)
    graph_break: bool = True


class SideEffects:
    """Python-state mutations seen while tracing, replayed after the graph."""

    def __init__(self, output: "OutputGraph"):
        self.output = output
        self.containers: list = []
        self.attrs: list = []  # (obj_vt, name, value_vt)
        self.globals: dict = {}  # name -> (source, vt)
        self.hooks: list = []  # (tensor_vt, fn_vt, handle_name)
        self.cells: dict = {}  # id(real cell) -> (cell, index of its write in attrs)
        self.cell_writes = 0  # every cell write counts in size(), a rewrite too

    def track(self, vt: VT) -> None:
        if all(c is not vt for c in self.containers):
            self.containers.append(vt)

    def track_attr(self, obj: VT, name: str, value: VT, raw: bool = False) -> None:
        """``raw``: an ``object.__setattr__`` write (what a class's own ``__setattr__``, inlined,
        came down to): replayed past the class's ``__setattr__``."""
        if raw:
            self.__dict__.setdefault("raw_attrs", set()).add(len(self.attrs))
        self.attrs.append((obj, name, value))

    def store_cell(self, cell, target, value: VT) -> None:
        """A write to a real closure cell (``nonlocal x; x = ...`` in any traced frame):
        replayed as ``cell.cell_contents = value``; later reads see ``value``."""
        self.cell_writes += 1
        entry = self.cells.get(id(cell))
        if entry is None:
            self.cells[id(cell)] = (cell, len(self.attrs))
            self.attrs.append((target, "cell_contents", value))
        else:
            self.attrs[entry[1]] = (target, "cell_contents", value)

    def pending_cell(self, cell) -> Optional[VT]:
        entry = self.cells.get(id(cell))
        return None if entry is None else self.attrs[entry[1]][2]

    def store_global(self, source: Source, name: str, value: VT) -> None:
        self.globals[name] = (source, value)

    def register_hook(self, tensor: TensorVT, fn: VT) -> VT:
        from .variables.objects import HandleVT

        name = f"___h{len(self.hooks)}"
        self.hooks.append((tensor, fn, name))
        return HandleVT(name)

    def size(self) -> tuple:
        return (len(self.containers), len(self.attrs), len(self.globals), len(self.hooks),
                sum(len(c.items) for c in self.containers), self.cell_writes)

    def values(self) -> list:
        vals = [v for _, _, v in self.attrs] + [v for _, v in self.globals.values()]
        vals += [f for _, f, _ in self.hooks] + [t for t, _, _ in self.hooks]
        for c in self.containers:
            vals += list(c.items.values()) if isinstance(c.items, dict) else list(c.items)
            vals += list(getattr(c, "key_vts", {}).values())
        return vals

    def emit_replay(self, cg) -> None:
        """Read every new value into temps first, then mutate (sources may alias)."""
        n = [0]

        def temp(expr: str) -> str:
            name = f"___v{n[0]}"
            n[0] += 1
            cg.line(f"{name} = {expr}")
            return name

        targets = [temp(c.source.code()) for c in self.containers]
        conts = []
        for c in self.containers:
            if hasattr(c, "replay_value"):
                conts.append(temp(c.replay_value(cg)))
            else:
                conts.append(temp("[" + ", ".join(cg.expr(i) for i in c.items) + "]"))
        attrs = [(temp(o.source.code() if o.source is not None else cg.expr(o)), name, temp(cg.expr(v)))
                 for o, name, v in self.attrs]
        globs = [(src.code(), temp(cg.expr(v))) for src, v in self.globals.values()]
        hooks = [(temp(cg.expr(t)), temp(cg.expr(fn)), h) for t, fn, h in self.hooks]
        for c, tgt, new in zip(self.containers, targets, conts):
            if hasattr(c, "replay_apply"):
                cg.line(c.replay_apply(tgt, new))
            else:
                cg.line(f"{tgt}[:] = {new}")
        raw = self.__dict__.get("raw_attrs", ())
        for i, ((obj, name, value), (_, _, vt)) in enumerate(zip(attrs, self.attrs)):
            if isinstance(vt, DeletedVT):
                cg.line(f"delattr({obj}, {name!r})")
            elif i in raw:
                cg.line(f"{cg.obj(object.__setattr__)}({obj}, {name!r}, {value})")
            else:
                cg.line(f"setattr({obj}, {name!r}, {value})")
        for expr, value in globs:
            cg.line(f"{expr} = {value}")
        for t, fn, h in hooks:
            cg.line(f"{h} = {t}.register_hook({fn})")


class FakeCallError(Unsupported, RuntimeError):
    """A torch call failed on fake tensors (a RuntimeError under fullgraph, else a graph break)."""


def _raise_on_unbacked(name: str, e: Exception, fargs: list, fkw: dict) -> None:
    """A torch call that raised RuntimeError on fake tensors with sizes read from tensor data
    raises it to the caller (``kiln.exc.TorchRuntimeError``), as PyTorch's capture does: such
    a size stands for any value (``cat`` of a 2-d tensor and ``ones(u0)`` fails even where
    eager would skip an empty ``ones(0)``), so eager's answer is not the compiled one."""
    import torch.utils._pytree as pytree

    from kiln.exc import TorchRuntimeError

    if type(e) is not RuntimeError:
        return
    leaves = pytree.tree_leaves((fargs, fkw))
    if not any(has_unbacked(s) for x in leaves if isinstance(x, torch.Tensor)
               for s in (*x.shape, x.storage_offset())) and not any(has_unbacked(x) for x in leaves):
        return
    raise TorchRuntimeError(f"call to {name} failed on fake tensors with data-dependent sizes: {e}",
                            why="the sizes come from tensor data (Tensor.item() / tolist()) and the "
                                "operation is invalid for some of their values",
                            hint="use torch._check() to state what holds for them") from e


def _placeholder_name(name: str) -> str:
    """PyTorch's placeholder name for a source name: ``L['x']`` -> ``L_x_``."""
    n = re.sub(r"[^0-9a-zA-Z_]", "_", name)
    return re.sub(r"_+", "_", n) + ("_" if not n.endswith("_") else "")


class OutputGraph:
    def __init__(self, ctx, root_globals: dict, frame_state: Optional[FrameState] = None, marked: bool = False):
        self.ctx = ctx
        self.root_globals = root_globals
        self.graph = fx.Graph()
        self.frame_state = frame_state or FrameState()
        # NOTE: a ShapeEnv only where a dim may be symbolic (dynamic=True, or a
        # recompile under automatic dynamic): static compiles stay exactly as before.
        from . import config

        dynamic = getattr(ctx, "dynamic", None)
        # NOTE: ``marked``: an argument has dims marked dynamic (mark_dynamic) by the user.
        self.fake_mode = new_fake_mode(dynamic is True or (dynamic is not False and marked)
                                       or (dynamic is None and self.frame_state.compiles > 0
                                           and config.automatic_dynamic_shapes))
        self.symbols = SymbolTable()
        self.size_nodes: dict = {}  # sympy.Symbol -> its placeholder
        self.int_inputs: dict = {}  # source name -> SymNodeVT of an int input (dynamic ints)
        self.module_sources: set = set()  # names of sources holding nn.Modules (their ints stay static)
        # NOTE: as in PyTorch's own capture, reading data pointers of fake tensors is an error here.
        self.fake_mode._allow_unsafe_data_ptr_access = False
        self.objects = ObjectTable()
        self.wrapped_objects: dict = {}  # id -> (object, VT): one VT per mutable object read (builder.wrap)
        self.guards = GuardSet(self.objects)
        self.side_effects = SideEffects(self)
        self.inputs: list = []  # (source, real_value, TensorVT)
        self._by_id: dict[int, TensorVT] = {}
        self.initial_grad = torch.is_grad_enabled()
        self.grad_enabled = self.initial_grad
        self.guards.grad_mode(self.initial_grad)
        self.guards.autocast()
        self.guards.global_state()
        self.module_params: set = set()
        self.marked_dims: list = []  # (name, symbol, min, max) of dims marked with mark_dynamic

    # ------------------------------------------------------------ inputs
    def add_tensor_input(self, value: torch.Tensor, source: Source, from_module: bool = False) -> TensorVT:
        swapped = self.__dict__.get("tensor_overrides")
        if swapped and id(value) in swapped:
            return swapped[id(value)]  # NOTE: functional_call's given tensors (variables/functorch.py)
        prev = self._by_id.get(id(value))
        if prev is not None:
            if prev.source.name() != source.name():
                self.guards.alias(prev.source, source)
            return prev
        dims = self.frame_state.dynamic_dims(getattr(self.ctx, "dynamic", None), source.name(), value,
                                             isinstance(value, torch.nn.Parameter) or _is_buffer(source))
        marked = {}
        if not from_module:
            dims = marked_unbacked(self, value, dims)
            if getattr(self.ctx, "dynamic", None) is not False:
                dims, marked = apply_marks(value, dims)
                for d, (lo, hi, _) in marked.items():
                    check_in_range(f"{source.name()}.size()[{d}]", value.shape[d], lo, hi)
        fake = fake_with_dims(self.fake_mode, value, dims, marked)
        self._note_marked(source, fake, marked)
        checks = None
        if any(is_symbolic(d) for d in list(fake.shape) + list(fake.stride())):
            checks = tensor_shape_checks(source, fake, self.symbols)
            if checks is None:
                # NOTE: strides not expressible over the sizes (a strided view of a bigger
                # tensor): this input keeps static shapes.
                fake = fake_with_dims(self.fake_mode, value, None)
        if checks is not None:
            self.guards.tensor(source, value, checks[:2], marks=not from_module)
            for i, sym in checks[2]:
                self._add_size_input(source, i, sym)
        else:
            self.guards.tensor(source, value, marks=not from_module)
        node = self._make_placeholder(source.name())
        node.meta["example_value"] = fake
        node.meta["source"] = source.name()
        vt = TensorVT(node, fake, source, type(value))
        self._by_id[id(value)] = vt
        self.inputs.append((source, value, vt, from_module))
        return vt

    def _note_marked(self, source: Source, fake: torch.Tensor, marked: dict) -> None:
        """Remember the symbols of dims marked with mark_dynamic (their constraints are checked
        when the trace is done)."""
        for d, (lo, hi, constrained) in marked.items():
            size = fake.shape[d]
            if constrained and is_symbolic(size):
                self.marked_dims.append((f"{source.name()}.size()[{d}]", size.node.expr, lo, hi))

    def _add_size_input(self, source: Source, dim: int, sym: torch.SymInt) -> None:
        """A graph input for a new size symbol (PyTorch's ``s0: Sym(s0)`` placeholders)."""
        src = SizeSource(source, dim)
        node = self._make_placeholder(str(sym.node.expr))
        node.meta["example_value"] = node.meta["val"] = sym
        node.meta["source"] = src.name()
        vt = SymNodeVT(node, sym)
        self.size_nodes[sym.node.expr] = node
        self.inputs.append((src, sym, vt, True))

    def add_int_input(self, value: int, source: Source) -> Optional[VT]:
        """An int read from the caller as a symbolic graph input (``L_n_: Sym(s0)``), when
        automatic dynamic (or dynamic=True) makes it one; None: it stays a constant.

        Guarded on its type; every fact the trace used (``n > 4``, ``n >= 0`` for a
        size) is a ShapeEnv guard printed over ``n`` itself.
        """
        return self._add_scalar_input(value, source, symbolic_int)

    def add_float_input(self, value: float, source: Source) -> Optional[VT]:
        """A float read from the caller as a graph input (PyTorch's unspecialized float),
        under the same automatic-dynamic rule as ints; None: it stays a constant.

        As in PyTorch, the graph takes it as a 0-d float64 tensor (``L_y_: f64[]``, every
        backend takes tensors) and reads it back with ``.item()`` as a backed SymFloat.
        NOTE: NaN and infinities stay constants (the ShapeEnv cannot reason about them);
        an entry with a float symbol guards ``not math.isnan``."""
        if math.isnan(value) or math.isinf(value):
            return None
        return self._add_scalar_input(value, source, symbolic_float, self._float_tensor_input)

    def _float_tensor_input(self, name: str, sym: Any, source: Source) -> VT:
        """The graph input of a float symbol: a 0-d float64 tensor read back with item()."""
        real = torch.tensor(sym.node.hint, dtype=torch.float64)
        fake = self.fake_mode.from_tensor(real, static_shapes=True)
        # NOTE: the fake's item() is the input's own symbol (as PyTorch's FloatTensorSource),
        # not a new unbacked one: backends tracing the graph see the same SymFloat.
        fake.item_memo = sym
        node = self._make_placeholder(self._unique_placeholder(name))
        node.meta["example_value"] = node.meta["val"] = fake
        node.meta["source"] = name
        tsrc = FloatTensorSource(source)
        self.inputs.append((tsrc, real, TensorVT(node, fake, tsrc), True))
        item = self.graph.call_method("item", (node,))
        item.meta["example_value"] = sym
        vt = SymNodeVT(item, sym)
        self.size_nodes[sym.node.expr] = item
        return vt

    def _scalar_may_be_dynamic(self, value, source: Source) -> bool:
        """Whether the int/float at ``source`` becomes a graph input now (automatic dynamic)."""
        # NOTE: the frame state records the value on the static first compile too.
        return not (getattr(self.ctx, "backend_name", None) in NO_DYNAMIC_INT_BACKENDS
                    or not int_may_be_dynamic(source, self.module_sources)
                    or not self.frame_state.int_is_dynamic(getattr(self.ctx, "dynamic", None), source.name(), value)
                    or self.fake_mode.shape_env is None)

    def _unique_placeholder(self, name: str) -> str:
        """``name``, or ``name_1``...: a closure cell of an inlined function is named like a
        local (``L['x']``), and a placeholder (an argument of the graph's forward) is unique."""
        taken = {n.target for n in self.graph.find_nodes(op="placeholder")}
        ph_name, i = name, 0
        while _placeholder_name(ph_name) in taken:
            i += 1
            ph_name = f"{name}_{i}"
        return ph_name

    def _add_scalar_input(self, value, source: Source, make_sym: Callable,
                          make_input: Optional[Callable] = None) -> Optional[VT]:
        """The int/float at ``source`` as a graph input (a new symbol), the VT it already is,
        or None (a constant). ``make_input(name, sym, source)`` builds the input's nodes
        (default: the symbol itself is the placeholder)."""
        name = source.name()
        known = self.int_inputs.get(name)
        if known is not None:
            return known
        if not self._scalar_may_be_dynamic(value, source):
            return None
        sym = make_sym(self.fake_mode.shape_env, value, name)
        self.symbols.add(sym.node.expr, source.code(), name)
        self.guards.type_of(source, value)
        vt = (make_input or self._symbol_input)(name, sym, source)
        self.int_inputs[name] = vt
        return vt

    def _symbol_input(self, name: str, sym: Any, source: Source) -> VT:
        """The graph input of an int symbol: the placeholder is the SymInt."""
        node = self._make_placeholder(self._unique_placeholder(name))
        node.meta["example_value"] = node.meta["val"] = sym
        node.meta["source"] = name
        vt = SymNodeVT(node, sym)
        self.size_nodes[sym.node.expr] = node
        self.inputs.append((source, sym, vt, True))
        return vt

    def sym_vt(self, value: Any, make_node: Callable) -> VT:
        """A VT for a metadata answer: a constant, or a SymNodeVT (``make_node()`` builds its node)."""
        if isinstance(value, (tuple, list)):
            return TupleVT([self.sym_vt(v, lambda i=i: make_node(i)) for i, v in enumerate(value)],
                           pytype=type(value) if isinstance(value, torch.Size) else tuple)
        if not is_symbolic(value):
            return const_vt(concrete(value))
        if isinstance(value, torch.SymBool):
            return ConstantVT(concrete(value))
        node = self.size_nodes.get(value.node.expr)
        if node is None:
            node = make_node()
            node.meta["example_value"] = value
        return SymNodeVT(node, value)

    def has_symbols(self) -> bool:
        # NOTE: values read from tensor data (variables/scalars.py) are unbacked symbols.
        return bool(self.size_nodes) or getattr(self, "reads_data", False)

    def _make_placeholder(self, source_name: str) -> fx.Node:
        name = _placeholder_name(source_name)
        last = None
        for n in self.graph.nodes:
            if n.op == "placeholder":
                last = n
        if last is None:
            first = next(iter(self.graph.nodes), None)
            if first is None:
                return self.graph.placeholder(name)
            with self.graph.inserting_before(first):
                return self.graph.placeholder(name)
        with self.graph.inserting_after(last):
            return self.graph.placeholder(name)

    def read_inputs_first(self, vts: list) -> None:
        """Move the graph inputs of ``vts`` before every input that no node has used yet.

        NOTE: PyTorch's capture makes an argument a graph input when it is first used, not
        when it is loaded: ``functional_call(model, params, (x,))`` reads the given tensors
        (swapping them into the module) before ``x`` reaches an op, so they come first in
        its graph's signature.  kiln makes an input at the load; a caller that knows it reads
        ``vts`` now (before the inputs loaded earlier are used) moves them up here.  Only
        for graphs without size symbols (their placeholders stay beside their tensors)."""
        if self.has_symbols() or any(not isinstance(e[2], TensorVT) for e in self.inputs):
            return
        moving = {vt.node for vt in vts if isinstance(vt, TensorVT) and vt.node.op == "placeholder"}
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        if {e[2].node for e in self.inputs} != set(placeholders):
            return  # a subgraph's tracer (a transform's body): its placeholders are its arguments
        anchor = next((p for p in placeholders if not p.users and p not in moving), None)
        if anchor is None:
            return
        for p in placeholders[placeholders.index(anchor) + 1:]:
            if p in moving:
                anchor.prepend(p)
        order = {n: i for i, n in enumerate(n for n in self.graph.nodes if n.op == "placeholder")}
        self.inputs.sort(key=lambda e: order[e[2].node])

    # ------------------------------------------------------------ grad mode
    def set_grad_enabled(self, mode: bool) -> None:
        if mode == self.grad_enabled:
            return
        self.grad_enabled = mode
        torch._C._set_grad_enabled(mode)
        self.graph.call_function(torch._C._set_grad_enabled, (mode,)).meta["stack_trace"] = None

    # ------------------------------------------------------------ calls
    def call_graph(self, kind: str, target: Any, args: list, kwargs: dict) -> VT:
        fargs = [fake_value(a) for a in args]
        fkw = {k: fake_value(v) for k, v in kwargs.items()}
        try:
            res = self._fake_call(kind, target, fargs, fkw)
        except Unsupported:
            raise
        except Exception as e:  # noqa: BLE001 - any failure on fake tensors becomes a graph break
            name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
            _raise_on_unbacked(name, e, fargs, fkw)
            raise FakeCallError(f"call to {name} failed on fake tensors: {type(e).__name__}: {e}",
                                why="the operation cannot be traced with fake tensors (data-dependent or "
                                    "unsupported); without fullgraph it runs eagerly",
                                hint="use fullgraph=False, or make the operation traceable") from e
        node = self.graph.create_node(kind, target, tuple(node_value(a) for a in args),
                                      {k: node_value(v) for k, v in kwargs.items()})
        return self._wrap_result(res, node)

    def _fake_call(self, kind: str, target: Any, fargs: list, fkw: dict) -> Any:
        # NOTE: with a ShapeEnv, as in PyTorch's capture, fake calls go through the Python
        # dispatcher: some C++ composite kernels read sizes() and would specialise symbolic
        # sizes to their hints (one recompile per new length); their Python decompositions do not.
        with self.fake_mode, (enable_python_dispatcher() if self.fake_mode.shape_env is not None
                              else contextlib.nullcontext()):
            if kind == "call_method":
                return getattr(fargs[0], target)(*fargs[1:], **fkw)
            return target(*fargs, **fkw)

    def _wrap_result(self, res: Any, node: fx.Node) -> VT:
        import operator

        if isinstance(res, torch.Tensor):
            node.meta["example_value"] = res
            return TensorVT(node, res)
        if isinstance(res, SYM_TYPES) and is_symbolic(res) and (not isinstance(res, torch.SymBool) or has_unbacked(res)):
            node.meta["example_value"] = res
            return SymNodeVT(node, res)
        if isinstance(res, (tuple, list)) and any(isinstance(r, torch.Tensor) or is_symbolic(r) for r in res):
            node.meta["example_value"] = res
            items = []
            for i, r in enumerate(res):
                if isinstance(r, torch.Tensor) or is_symbolic(r):
                    items.append(self._wrap_result(r, self.graph.call_function(operator.getitem, (node, i))))
                else:
                    items.append(const_vt(r))
            if isinstance(res, list):
                return ListVT(items)
            # NOTE: named results (torch.return_types.max...) keep their class: `.values` works.
            return TupleVT(items, pytype=type(res) if type(res) is not tuple else None)
        if res is None:
            return ConstantVT(None)
        self.graph.erase_node(node)
        if isinstance(res, torch.Size):
            return const_vt(torch.Size([concrete(r) for r in res]))
        return const_vt(concrete(res))

    # ------------------------------------------------------------ compile
    def op_count(self) -> int:
        return sum(1 for n in self.graph.nodes if n.op in ("call_function", "call_method", "call_module"))

    def compile(self, outputs: list, reason: GraphCompileReason) -> Optional[Callable]:
        """Finish the graph with ``outputs`` (TensorVTs) and run the backend."""
        from .variables.autocast import finish_graph

        # NOTE: autocast regions still open are closed at the graph's end (and entered again
        # by the generated code after it); the backend sees the state the frame started with.
        finish_graph(self)
        # NOTE: as in PyTorch: a graph ending at a break inside grad-mode with-blocks leaves
        # them (their resume enters them again), so it ends in the mode it started in; a graph
        # ending at the frame's return leaves the mode the code set (no restoring node; kiln's
        # AOT records the mode a graph leaves, grad_enabled_after, and sets it after each call).
        if reason.graph_break and self.grad_enabled != self.initial_grad:
            self.graph.call_function(torch._C._set_grad_enabled, (self.initial_grad,))
        self.graph.output(tuple(o.node for o in outputs))
        self._drop_unused_sizes()
        self._drop_grad_flips()
        if self.op_count() == 0 and not outputs:
            return None
        from .variables.subgraph import attached

        root = torch.nn.Module()
        for name, sub in attached(self, self.graph).items():  # higher-order ops' subgraphs
            root.add_module(name, sub)
        gm = fx.GraphModule(root, self.graph)
        _default_source_fn_stack(gm)
        gm.compile_subgraph_reason = reason
        gm.meta["kiln_sources"] = [s.name() for s, *_ in self.inputs]
        stats.graph_compiled(self.graph)
        log_graph("capture", "output_graph", gm)
        if checking():
            verify_graph(gm, after="capture.output_graph")
        if self.has_symbols():
            # NOTE: symbolic graphs get fake example inputs (sizes as SymInts of this
            # frame's ShapeEnv) so that backends trace them for every size the guards allow.
            example = [vt.fake if isinstance(vt, TensorVT) else v for _, v, vt, _ in self.inputs]
            for n in self.graph.find_nodes(op="placeholder"):
                n.meta["val"] = n.meta.get("example_value")
        else:
            example = [v for _, v, *_ in self.inputs]
        # NOTE: the backend sees the grad mode the frame started with (the graph
        # itself switches it where the code did), as PyTorch restores global
        # state before compiling; AOT decides on a backward from it.
        prior = torch.is_grad_enabled()
        torch._C._set_grad_enabled(self.initial_grad)
        try:
            if not self.has_symbols():
                # NOTE: not capture's TracingContext (its frames, its fake mode's other inputs).
                from torch._guards import tracing

                with tracing(None):
                    return self.ctx.run_backend(gm, example)
            # NOTE: symbolic shapes: the backend runs in a TracingContext as under PyTorch's
            # capture; for views of one storage, torch's AOT autograd then decides which
            # overlap under one StorageOverlap guard, not a shape guard per pair of views.
            with backend_tracing_context(gm, self.fake_mode, {s.name(): s for s, *_ in self.inputs}) as got:
                compiled = self.ctx.run_backend(gm, example)
            for over, non_over in got:
                self.guards.storage_overlap(over, non_over)
            return compiled
        finally:
            torch._C._set_grad_enabled(prior)

    def _drop_grad_flips(self) -> None:
        """Two adjacent grad-mode switches that undo each other (``_set_grad_enabled(False)``
        then ``(True)``), as PyTorch's capture drops them: a region that only enters and
        leaves ``no_grad`` has no graph."""
        grad = self.initial_grad
        nodes = list(self.graph.nodes)
        for a, b in zip(nodes, nodes[1:]):
            if a.target is torch._C._set_grad_enabled and a.args == (not grad,) and not a._erased:
                grad = a.args[0]
                if b.target is torch._C._set_grad_enabled and b.args == (not grad,) and not b._erased:
                    grad = b.args[0]
                    self.graph.erase_node(a)
                    self.graph.erase_node(b)

    def _drop_unused_sizes(self) -> None:
        """Size reads and size arithmetic whose values were only used in Python (specialised),
        the element reads of ``tolist()`` whose values nothing used, and unused element reads
        of an op's tuple result (``x.min(0).values`` leaves ``indices`` unread), as PyTorch's
        capture drops them."""
        import operator

        for n in reversed(list(self.graph.nodes)):
            if n.op in ("call_function", "call_method") and not n.users \
                    and (isinstance(n.meta.get("example_value"), SYM_TYPES) or n.meta.get("kiln_tolist")
                         or n.target is operator.getitem):
                self.graph.erase_node(n)


def _is_buffer(source: Source) -> bool:
    """``source`` reads a module's buffer (``m._buffers[key]``).

    NOTE: PyTorch keeps the shapes of parameters and buffers static under
    force_parameter_static_shapes (their sources are UnspecializedParamBufferSource)."""
    from .sources import ModuleEntrySource

    return isinstance(source, ModuleEntrySource) and source.table == "_buffers"


def _default_source_fn_stack(gm: fx.GraphModule) -> None:
    """``meta["source_fn_stack"]`` of every call node that has none: ``[(node name, target)]``.

    NOTE: PyTorch records it on each call it captures; nodes in a higher-order op's body
    already carry the op in front (variables/hops.py ``_tag_source``); the bodies of
    ``torch.func`` transforms have none in front, as PyTorch traces those inline."""
    for mod in gm.modules():
        graph = getattr(mod, "graph", None)
        if not isinstance(graph, fx.Graph):
            continue
        for node in graph.nodes:
            if node.op.startswith("call") and "source_fn_stack" not in node.meta:
                node.meta["source_fn_stack"] = [(node.name, node.target)]

