"""explain() and export(): capture reports and whole-graph capture."""
from __future__ import annotations

import inspect
import re
import operator
import types
from typing import Any, Callable

import torch
import torch.fx as fx

from kiln import fallbacks
from kiln.exc import Unsupported, user_location


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
        since = fallbacks.mark()
        compiled(*args, **kwargs)
        recorded = fallbacks.recorded(since)
        guards = []
        for w in ctx._wrappers.values():
            for e in w._kiln_cache.entries:
                guards.extend(getattr(e, "__kiln_guards__", []))
        out_cls = _output_cls()
        count = len(graphs)
        return out_cls(graphs=graphs, graph_count=count, graph_break_count=max(count - 1, 0),
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
        ctx = CompileContext(backend, "export", fullgraph=True)
        w = ctx.wrapper_for(target)
        w(*args, **kwargs)
        entry = w._kiln_cache.entries[0]
        gm = _rebuild(target, self_obj, captured[0] if captured else None, entry, args, kwargs)
        return gm, list(getattr(entry, "__kiln_guards__", []))

    if extra_args or extra_kwargs:
        return inner(*extra_args, **extra_kwargs)
    return inner


_ACCESS = re.compile(r"\.([A-Za-z_][A-Za-z_0-9]*)|\[('[^']*'|-?\d+)\]")


def _source_node(g: fx.Graph, name: str, value: Any, ph: dict, has_self: bool, consts: dict) -> fx.Node:
    m = re.match(r"L\['([^']+)'\]", name)
    if m is None or (m.group(1) not in ph and not (has_self and m.group(1) == "self")):
        # NOTE: tensors read from globals/closures become constants of the exported module.
        attr = f"_const_{len(consts)}"
        consts[attr] = value
        return g.get_attr(attr)
    base, rest = m.group(1), name[m.end():]
    steps = [(a, k) for a, k in _ACCESS.findall(rest)]
    if has_self and base == "self":
        path = []
        for attr, key in steps:
            if attr == "_modules":
                continue
            path.append(attr or key.strip("'"))
        return g.get_attr(".".join(path))
    node = ph[base]
    for attr, key in steps:
        node = g.call_function(getattr, (node, attr)) if attr else \
            g.call_function(operator.getitem, (node, key.strip("'") if key.startswith("'") else int(key)))
    return node


def _rebuild(fn, self_obj, gm, entry, args, kwargs) -> fx.GraphModule:
    """A GraphModule taking ``fn``'s user arguments, module state as attributes."""
    info = getattr(entry, "__kiln_export__", None)
    if info is None:
        raise Unsupported("export needs a single graph ending in a return", where=user_location())
    sources, ret, nodes = info
    params = list(inspect.signature(fn, follow_wrapped=False).parameters)[1 if self_obj is not None else 0:]
    g = fx.Graph()
    ph = {p: g.placeholder(p) for p in params}
    consts: dict = {}
    src_nodes = {s: _source_node(g, s, v, ph, self_obj is not None, consts) for s, v in sources}
    outs: tuple = ()
    if gm is not None:
        old = [n for n in gm.graph.nodes if n.op == "placeholder"]
        val_map = {o: src_nodes[s] for o, (s, _) in zip(old, sources)}
        outs = g.graph_copy(gm.graph, val_map)
    index = {n: i for i, n in enumerate(nodes)}

    def conv(vt):
        from .variables.containers import ListVT, TupleVT
        from .variables.tensor import TensorVT

        if isinstance(vt, TensorVT):
            return src_nodes[vt.source.name] if vt.node.op == "placeholder" else outs[index[vt.node]]
        if isinstance(vt, (TupleVT, ListVT)):
            vals = [conv(v) for v in vt.items]
            return vals if isinstance(vt, ListVT) else tuple(vals)
        if vt.is_const():
            return vt.const()
        raise Unsupported(f"export of a function returning {vt}", where=user_location())

    g.output(conv(ret))
    root = self_obj if self_obj is not None else torch.nn.Module()
    if consts:
        root = {**dict(root.named_modules()), **dict(root.named_parameters()), **dict(root.named_buffers()), **consts}
    return fx.GraphModule(root, g)
