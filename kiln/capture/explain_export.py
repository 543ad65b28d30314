"""explain() and export(): capture reports and whole-graph capture."""
from __future__ import annotations

import inspect
import operator
import types
from typing import Any, Callable

import torch
import torch.fx as fx

from kiln import fallbacks
from kiln.exc import Unsupported, user_location

from .sources import AttrSource, ItemSource, LocalSource, ModuleEntrySource, ModuleTableSource, SizeSource, Source


def _output_cls():
    # NOTE: imported here, not at the top: kiln.backends registers every backend when
    # imported, which `import kiln.capture` should not pay for.
    from kiln.backends.debugging import ExplainOutput

    return ExplainOutput


def explain(fn: Callable, *extra_args: Any, **extra_kwargs: Any) -> Callable:
    """``explain(fn)(*args)`` -> ExplainOutput (graph_count, graph_break_count, op_count,
    break_reasons, graphs, ops_per_graph, out_guards, eager_frames, fallbacks) of compiling ``fn`` on
    ``args``; ``fallbacks`` lists the kiln.fallbacks records made during the call."""

    def inner(*args: Any, **kwargs: Any):
        from .api import _apply
        from .cache import CompileContext

        graphs: list = []
        ops_per_graph: list = []
        reasons: list = []

        def backend(gm, example_inputs):
            graphs.append(gm)
            ops_per_graph.append([n.target for n in gm.graph.nodes if n.op == "call_function"])
            r = getattr(gm, "compile_subgraph_reason", None)
            if r is not None and r.graph_break:
                reasons.append(r)
            return gm.forward

        ctx = CompileContext(backend, "explain")
        compiled = _apply(ctx, fn)
        from kiln.backends import ddp_split

        since, split_since = fallbacks.mark(), ddp_split.mark()
        compiled(*args, **kwargs)
        recorded = fallbacks.recorded(since)
        splits = ddp_split.recorded_splits(split_since)
        guards = []
        for w in ctx._wrappers.values():
            for e in w._kiln_cache.entries:
                guards.extend(getattr(e, "__kiln_guards__", []))
        out_cls = _output_cls()
        count = len(graphs)
        # NOTE: the parts of a graph split at DDP's buckets are graphs the backend compiled,
        # not graph breaks: each split graph counts once towards the breaks.
        captured = sum(1 for g in graphs if g.meta.get("kiln_ddp_part", (0,))[0] == 0)
        return out_cls(graphs=graphs, graph_count=count, graph_break_count=max(captured - 1, 0),
                       ddp_splits=splits,
                       break_reasons=reasons, op_count=sum(len(o) for o in ops_per_graph),
                       ops_per_graph=ops_per_graph, out_guards=guards, eager_frames=list(ctx.eager_frames),
                       fallbacks=recorded)

    if extra_args or extra_kwargs:
        return inner(*extra_args, **extra_kwargs)
    return inner


def export(fn: Callable, *extra_args: Any, **extra_kwargs: Any) -> Callable:
    """``export(fn)(*args)`` -> (GraphModule, guards): one graph for the whole call,
    callable like ``fn`` (module parameters become attributes); raises Unsupported
    when the function cannot be captured whole."""

    def inner(*args: Any, **kwargs: Any):
        return capture_whole(fn, args, kwargs)

    if extra_args or extra_kwargs:
        return inner(*extra_args, **extra_kwargs)
    return inner


def capture_whole(fn: Callable, args: tuple, kwargs: dict, *, dynamic: Any = None) -> tuple:
    """(GraphModule, guards) of ``fn(*args, **kwargs)`` captured as one graph
    (``dynamic``: as ``kiln.compile``'s); raises Unsupported at a graph break."""
    from .cache import CompileContext

    captured: list = []

    def backend(gm, example_inputs):
        captured.append(gm)
        return gm.forward

    target = fn
    self_obj = None
    if isinstance(fn, torch.nn.Module):
        self_obj, target = fn, type(fn).forward
        args = (fn,) + tuple(args)
    ctx = CompileContext(backend, "export", fullgraph=True, dynamic=dynamic)
    w = ctx.wrapper_for(target)
    w(*args, **kwargs)
    entry = w._kiln_cache.entries[0]
    gm = _rebuild(target, self_obj, captured[0] if captured else None, entry, args, kwargs)
    return gm, list(getattr(entry, "__kiln_guards__", []))


def _source_node(g: fx.Graph, src: Source, value: Any, ph: dict, has_self: bool, consts: dict) -> fx.Node:
    """The graph node that reads ``src`` in the exported graph, built by walking the source tree:
    module state becomes ``get_attr`` of its path, a read of an argument becomes getattr /
    getitem nodes, anything else (globals, closures) a constant of the exported module."""
    chain = list(reversed(src.chain()))  # root first
    root, steps = chain[0], chain[1:]
    known = isinstance(root, LocalSource) and all(type(s) in _READ for s in steps)
    if known and has_self and root.local == "self" and all(_STEPS[type(s)] is not None for s in steps):
        return g.get_attr(".".join(p for s in steps for p in _STEPS[type(s)](s)))
    if known and root.local in ph:
        node = ph[root.local]
        for s in steps:
            node = _READ[type(s)](g, node, s)
        return node
    # NOTE: tensors read from globals/closures become constants of the exported module.
    attr = f"_const_{len(consts)}"
    consts[attr] = value
    return g.get_attr(attr)


# NOTE: each access step that export can follow -> the attribute path it adds under
# ``self`` (a module's ``_modules`` table is part of how a child is read, not of its name) ...
_STEPS = {
    AttrSource: lambda s: [] if s.attr_name == "_modules" else [s.attr_name],
    ModuleTableSource: lambda s: [],
    ModuleEntrySource: lambda s: [s.key],
    ItemSource: lambda s: [str(s.key)],
    SizeSource: None,
}
# ... and the node that reads it from an argument.
_READ = {
    AttrSource: lambda g, n, s: g.call_function(getattr, (n, s.attr_name)),
    ModuleTableSource: lambda g, n, s: n,
    ModuleEntrySource: lambda g, n, s: g.call_function(getattr, (n, s.key)),
    ItemSource: lambda g, n, s: g.call_function(operator.getitem, (n, s.key)),
    SizeSource: lambda g, n, s: g.call_method("size", (n, s.dim)),
}


def _rebuild(fn, self_obj, gm, entry, args, kwargs) -> fx.GraphModule:
    """A GraphModule taking ``fn``'s user arguments, module state as attributes."""
    info = getattr(entry, "__kiln_export__", None)
    if info is None:
        raise Unsupported("export needs a single graph ending in a return", where=user_location())
    sources, ret, nodes = info
    sig_params = list(inspect.signature(fn, follow_wrapped=False).parameters.values())
    sig_params = sig_params[1 if self_obj is not None else 0:]
    g = fx.Graph()
    # NOTE: defaults stay defaults, so the graph is callable as fn is
    # NOTE: ``*args`` and ``**kwargs`` stay star placeholders, so the graph takes the
    # call's remaining positional and keyword arguments as ``fn`` does
    ph = {}
    for p in sig_params:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            ph[p.name] = g.placeholder(f"*{p.name}")
        elif p.kind is inspect.Parameter.VAR_KEYWORD:
            ph[p.name] = g.placeholder(f"**{p.name}")
        elif p.default is inspect.Parameter.empty:
            ph[p.name] = g.placeholder(p.name)
        else:
            ph[p.name] = g.placeholder(p.name, default_value=p.default)
    consts: dict = {}
    src_nodes = {s: _source_node(g, s, v, ph, self_obj is not None, consts) for s, v in sources}
    outs: tuple = ()
    if gm is not None:
        old = [n for n in gm.graph.nodes if n.op == "placeholder"]
        val_map = {o: src_nodes[s] for o, (s, _) in zip(old, sources)}
        outs = g.graph_copy(gm.graph, val_map)
        consts.update(dict(gm.named_children()))  # subgraphs of higher-order ops
    index = {n: i for i, n in enumerate(nodes)}

    def conv(vt):
        from .variables.base import VT
        from .variables.containers import ListVT, TupleVT
        from .variables.objects import DataclassVT
        from .variables.symbolic import SymNodeVT, has_unbacked
        from .variables.tensor import TensorVT

        if isinstance(vt, TensorVT):
            return src_nodes[vt.source] if vt.node.op == "placeholder" else outs[index[vt.node]]
        if isinstance(vt, SymNodeVT) and has_unbacked(vt.sym):
            # NOTE: a value read from tensor data, a graph output (a float as a 0-d tensor)
            wrapped = vt.node.meta.get("kiln_scalar_output")
            return g.call_method("item", (outs[index[wrapped]],)) if wrapped is not None else outs[index[vt.node]]
        if isinstance(vt, (TupleVT, ListVT)):
            vals = [conv(v) for v in vt.items]
            return vals if isinstance(vt, ListVT) else tuple(vals)
        if isinstance(vt, DataclassVT):
            # NOTE: a model output (a dataclass) is built by the graph from its fields
            fields = {k: conv(v) if isinstance(v, VT) else v for k, v in vt.fields.items()}
            return g.call_function(vt.cls, (), fields)
        if vt.is_const():
            return vt.const()
        raise Unsupported(f"export of a function returning {vt}", where=user_location())

    g.output(conv(ret))
    root = self_obj if self_obj is not None else torch.nn.Module()
    if consts:
        root = {**dict(root.named_modules()), **dict(root.named_parameters()), **dict(root.named_buffers()), **consts}
    return fx.GraphModule(root, g)
