"""Partitioners: split a joint forward+backward graph into two graphs.

In:  a joint GraphModule whose placeholders are ``primals_*`` (forward
     inputs) then ``tangents_*`` (incoming gradients), and whose output is a
     flat tuple ``(*forward_outputs, *input_gradients)``; `num_fwd_outputs`
     says where the forward outputs end.
Out: ``(fw_module, bw_module)``.  The forward returns
     ``(*forward_outputs, *saved_tensors, *saved_symints)``; the backward takes
     ``(*saved_tensors, *saved_symints, *tangents)`` and returns the gradients.

Two policies:
- ``default_partition`` saves every forward value the backward reads.
- ``min_cut_rematerialization_partition`` chooses what to save by a minimum
  cut: cheap ops (pointwise, views, reshapes) may be recomputed in the
  backward from fewer, or smaller, saved tensors.  This is the formulation of
  the AOT autograd design notes: a flow network from the forward inputs to the
  nodes the backward needs, each node split in two by an edge whose capacity
  is the bytes it would cost to save it, infinite edges where a value cannot
  be recomputed; the cut edges are the tensors to save.
"""
from __future__ import annotations

import math
import operator
from collections import deque
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx

aten = torch.ops.aten

# ---- graph helpers ---------------------------------------------------------


def _is_primal(n: fx.Node) -> bool:
    return n.op == "placeholder" and not n.name.startswith("tangents")


def _is_tangent(n: fx.Node) -> bool:
    return n.op == "placeholder" and n.name.startswith("tangents")


def _outputs(gm: fx.GraphModule) -> list:
    return list(pytree_flat(gm.graph.output_node().args[0]))


def pytree_flat(x: Any) -> Iterable:
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from pytree_flat(y)
    else:
        yield x


def _ancestors(roots: Iterable[Any], stop: Optional[set] = None) -> set:
    """Every node `roots` depend on (inclusive), not walking past `stop`."""
    stop = stop or set()
    seen: set = set()
    work = [r for r in roots if isinstance(r, fx.Node)]
    while work:
        n = work.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in stop:
            continue
        work.extend(n.all_input_nodes)
    return seen


def _is_sym(n: fx.Node) -> bool:
    return isinstance(n.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool))


def _has_side_effect(n: fx.Node) -> bool:
    schema = getattr(n.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable) or getattr(n.target, "__name__", "") == "with_effects"


def _forward_nodes(joint: fx.GraphModule, num_fwd_outputs: int) -> set:
    outs = _outputs(joint)
    tangents = {n for n in joint.graph.nodes if _is_tangent(n)}
    fwd = _ancestors(outs[:num_fwd_outputs])
    # NOTE: side-effecting forward ops whose results are unused still belong
    # to the forward (they were run by the user's forward).
    for n in joint.graph.nodes:
        if n.op == "call_function" and _has_side_effect(n) and not n.meta.get("autograd_backward"):
            if not (_ancestors([n]) & tangents):
                fwd |= _ancestors([n])
    return {n for n in fwd if n not in tangents}


# ---- building the two graphs -----------------------------------------------


def _extract(joint: fx.GraphModule, inputs: list, outputs: list, name: str) -> fx.GraphModule:
    """A new graph computing `outputs` from `inputs` (nodes of `joint`)."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in inputs:
        p = g.placeholder(n.name)
        p.meta = dict(n.meta)
        env[n] = p
    needed = _ancestors(outputs, stop=set(inputs))
    for n in joint.graph.nodes:
        if n in env or n not in needed or n.op in ("placeholder", "output"):
            if n.op == "placeholder" and n in needed and n not in env:
                raise RuntimeError(f"partition: {name} graph needs input {n.name} it was not given")
            continue
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[o] if isinstance(o, fx.Node) else o for o in outputs))
    g.eliminate_dead_code()
    return fx.GraphModule(joint, g, class_name=name)


def _split(joint: fx.GraphModule, num_fwd_outputs: int, saved: list) -> tuple:
    outs = _outputs(joint)
    primals = [n for n in joint.graph.nodes if _is_primal(n)]
    tangents = [n for n in joint.graph.nodes if _is_tangent(n)]
    # NOTE: tensors first, then SymInts, as the runtime wrapper expects.
    saved = [n for n in saved if not _is_sym(n)] + [n for n in saved if _is_sym(n)]
    fw = _extract(joint, primals, outs[:num_fwd_outputs] + saved, "GraphModule")
    bw = _extract(joint, saved + tangents, outs[num_fwd_outputs:], "GraphModule")
    fw.meta["num_saved_tensors"] = sum(1 for n in saved if not _is_sym(n))
    fw.meta["num_saved_symints"] = sum(1 for n in saved if _is_sym(n))
    return fw, bw


def _backward_reads(joint: fx.GraphModule, fwd: set, num_fwd_outputs: int) -> list:
    """Forward values that backward nodes read directly."""
    grads = _outputs(joint)[num_fwd_outputs:]
    bwd = _ancestors(grads) - fwd
    reads: dict[fx.Node, None] = {}
    for n in joint.graph.nodes:
        if n in bwd:
            for a in n.all_input_nodes:
                if a in fwd:
                    reads[a] = None
    for g in grads:
        if isinstance(g, fx.Node) and g in fwd:
            reads[g] = None
    return list(reads)


def default_partition(joint_module: fx.GraphModule, _joint_inputs: Any = None, *,
                      num_fwd_outputs: int) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Save every forward value the backward reads."""
    fwd = _forward_nodes(joint_module, num_fwd_outputs)
    saved = _backward_reads(joint_module, fwd, num_fwd_outputs)
    return _split(joint_module, num_fwd_outputs, saved)


# ---- min-cut ---------------------------------------------------------------

# NOTE: ops cheap enough to recompute in the backward rather than save.  The
# rule is per op (a table), and a graph-wide tag marks pointwise ATen ops.
_RECOMPUTABLE_VIEWS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.t.default,
    aten.transpose.int, aten.permute.default, aten.expand.default, aten.squeeze.dim,
    aten.squeeze.default, aten.unsqueeze.default, aten.slice.Tensor, aten.select.int,
    aten.alias.default, aten.detach.default, aten.clone.default, aten.squeeze.dims,
}
_RECOMPUTABLE_EXTRA = {
    aten.full.default, aten.zeros.default, aten.ones.default, aten.zeros_like.default,
    aten.ones_like.default, aten.full_like.default, aten.empty.memory_format,
    aten.scalar_tensor.default, aten.arange.default, aten.arange.start,
    aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.amax.default,
    aten.where.self, aten._to_copy.default, aten.convert_element_type.default
    if hasattr(aten, "convert_element_type") else aten._to_copy.default,
}


def _recomputable(n: fx.Node) -> bool:
    if n.op != "call_function":
        return False
    if n.target is operator.getitem:
        return _recomputable(n.args[0]) if isinstance(n.args[0], fx.Node) else True
    if _has_side_effect(n) or _is_random(n):
        return False
    if n.target in _RECOMPUTABLE_VIEWS or n.target in _RECOMPUTABLE_EXTRA:
        return True
    tags = getattr(n.target, "tags", ())
    return torch.Tag.pointwise in tags


def _is_random(n: fx.Node) -> bool:
    tags = getattr(n.target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags


def _size_bytes(n: fx.Node) -> float:
    v = n.meta.get("val")
    if isinstance(v, torch.Tensor):
        try:
            numel = int(v.numel())
        except Exception:  # NOTE: unbacked symbolic sizes: assume large
            numel = 1 << 20
        return max(numel * v.element_size(), 1)
    if isinstance(v, (list, tuple)):
        return sum(_size_bytes_val(x) for x in v) or 1
    return 1  # SymInts and other scalars are nearly free


def _size_bytes_val(v: Any) -> float:
    if isinstance(v, torch.Tensor):
        try:
            return int(v.numel()) * v.element_size()
        except Exception:
            return 1 << 20
    return 1


class _FlowGraph:
    """A small Dinic max-flow, enough for graphs of tens of thousands of nodes."""

    def __init__(self) -> None:
        self.adj: dict[Any, list[list]] = {}

    def add_edge(self, u: Any, v: Any, cap: float) -> None:
        a = [v, cap, None]
        b = [u, 0.0, a]
        a[2] = b
        self.adj.setdefault(u, []).append(a)
        self.adj.setdefault(v, []).append(b)

    def _bfs(self, s: Any, t: Any) -> Optional[dict]:
        level = {s: 0}
        q = deque([s])
        while q:
            u = q.popleft()
            for v, cap, _ in self.adj.get(u, ()):
                if cap > 0 and v not in level:
                    level[v] = level[u] + 1
                    q.append(v)
        return level if t in level else None

    def _dfs(self, u: Any, t: Any, f: float, level: dict, it: dict) -> float:
        if u == t:
            return f
        edges = self.adj.get(u, [])
        while it[u] < len(edges):
            e = edges[it[u]]
            v, cap, rev = e
            if cap > 0 and level.get(v) == level[u] + 1:
                d = self._dfs(v, t, min(f, cap), level, it)
                if d > 0:
                    e[1] -= d
                    rev[1] += d
                    return d
            it[u] += 1
        return 0.0

    def min_cut_source_side(self, s: Any, t: Any) -> set:
        while True:
            level = self._bfs(s, t)
            if level is None:
                break
            it = {u: 0 for u in self.adj}
            while self._dfs(s, t, math.inf, level, it) > 0:
                pass
        seen = {s}
        q = deque([s])
        while q:
            u = q.popleft()
            for v, cap, _ in self.adj.get(u, ()):
                if cap > 0 and v not in seen:
                    seen.add(v)
                    q.append(v)
        return seen


def min_cut_rematerialization_partition(
    joint_module: fx.GraphModule, _joint_inputs: Any = None, *, num_fwd_outputs: int,
    compiler: str = "kiln",
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Save the cheapest set of forward values from which backward can recompute."""
    fwd = _forward_nodes(joint_module, num_fwd_outputs)
    bw_reads = _backward_reads(joint_module, fwd, num_fwd_outputs)
    if not bw_reads:
        return _split(joint_module, num_fwd_outputs, [])
    saved = _choose_saved(fwd, set(bw_reads))
    return _split(joint_module, num_fwd_outputs, saved)


def _choose_saved(fwd: set, bw_reads: set) -> list:
    """Min cut between the forward's inputs and the values backward reads."""
    INF = math.inf
    SRC, SINK = "__source__", "__sink__"
    flow = _FlowGraph()
    for n in fwd:
        if n.op == "output":
            continue
        if n.op in ("placeholder", "get_attr"):
            flow.add_edge(SRC, (n, "in"), INF)
        elif not _recomputable(n):
            # NOTE: an op too costly (matmul, conv) or impure (random, effects)
            # to run again: its result is available only by saving it.
            flow.add_edge(SRC, (n, "in"), INF)
        flow.add_edge((n, "in"), (n, "out"), _size_bytes(n))
        if n in bw_reads:
            flow.add_edge((n, "out"), SINK, INF)
        for u in n.users:
            if u in fwd:
                flow.add_edge((n, "out"), (u, "in"), INF)
    reachable = flow.min_cut_source_side(SRC, SINK)
    saved = [n for n in fwd if (n, "in") in reachable and (n, "out") not in reachable]
    order = {n: i for i, n in enumerate(next(iter(fwd)).graph.nodes)}
    return sorted(saved, key=order.__getitem__)
