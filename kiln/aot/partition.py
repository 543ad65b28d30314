"""Partitioners: split a joint forward+backward graph into a forward and a backward graph.

The joint graph's placeholders are ``primals_*`` then ``tangents_*``; its
output is ``[*forward outputs, *gradients]`` with ``num_fwd_outputs`` forward
outputs.  A partitioner returns ``(fw_module, bw_module)``:

* fw_module: primals -> ``[*forward outputs, *saved values]``
* bw_module: ``[*saved values, *tangents]`` -> gradients

``default_partition`` saves every forward value the backward uses.
``min_cut_rematerialization_partition`` chooses what to save by a min cut over
the joint graph: cheap ops (pointwise, views) may be recomputed in backward
from fewer saved tensors; expensive or random ops are always saved.
"""
from __future__ import annotations

import operator
import sys
from typing import Callable, Iterable, Optional

import torch
import torch.fx as fx

from kiln.aot.maxflow import INF, FlowGraph
from kiln.tracing.symbolic import size_hint

aten = torch.ops.aten


def _split_io(joint: fx.GraphModule, num_fwd_outputs: int):
    phs = [n for n in joint.graph.nodes if n.op == "placeholder"]
    primals = [n for n in phs if not n.name.startswith("tangents")]
    tangents = [n for n in phs if n.name.startswith("tangents")]
    out_node = next(n for n in reversed(joint.graph.nodes) if n.op == "output")
    outs = list(out_node.args[0])
    return primals, tangents, outs[:num_fwd_outputs], outs[num_fwd_outputs:]


def _ancestors(nodes: Iterable, stop: Optional[set] = None) -> set:
    seen: set = set()
    stack = [n for n in nodes if isinstance(n, fx.Node)]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if stop is not None and n in stop:
            continue
        stack.extend(n.all_input_nodes)
    return seen


def _descendants(nodes: Iterable) -> set:
    seen: set = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.users)
    return seen


def extract_graph(joint: fx.GraphModule, inputs: list, outputs: list, name: str) -> fx.GraphModule:
    """A GraphModule computing ``outputs`` from ``inputs`` (nodes of ``joint``)."""
    g = fx.Graph()
    env: dict = {}
    for n in inputs:
        ph = g.placeholder(n.name)
        ph.meta = dict(n.meta)
        env[n] = ph
    needed = _ancestors(outputs, stop=set(inputs))
    for n in joint.graph.nodes:
        if n in env or n not in needed or n.op == "output":
            continue
        if n.op == "placeholder":
            raise AssertionError(f"partition of {name}: {n.name} is needed but not an input")
        env[n] = g.node_copy(n, lambda x: env[x])
    g.output(tuple(env[o] if isinstance(o, fx.Node) else o for o in outputs))
    gm = fx.GraphModule(joint, g, class_name=name)
    return gm


def _with_getitems(fw_nodes: set) -> set:
    extra = set()
    for n in fw_nodes:
        if isinstance(n.meta.get("val"), (tuple, list)):
            extra.update(u for u in n.users if u.target is operator.getitem)
    return fw_nodes | extra


def _finish(joint, primals, tangents, fw_outs, bw_outs, saved):
    saved = [n for n in joint.graph.nodes if n in saved]  # graph order, deterministic
    fw = extract_graph(joint, primals, list(fw_outs) + saved, "GraphModule")
    bw = extract_graph(joint, saved + tangents, list(bw_outs), "GraphModule")
    fw.meta["num_saved"] = bw.meta["num_saved"] = len(saved)
    return fw, bw


def must_recompute(n: fx.Node) -> bool:
    """A forward node of an activation-checkpointed region (``meta["recompute"]``, set by
    kiln.ops.checkpoint's tracing): recomputed in backward, never saved.  Random ops are
    the exception: recomputing them would draw new numbers, so they are saved."""
    if n.meta.get("recompute") != "must_recompute" or n.op != "call_function":
        return False
    target = n.args[0].target if n.target is operator.getitem and isinstance(n.args[0], fx.Node) \
        else n.target
    if torch.Tag.nondeterministic_seeded in getattr(target, "tags", ()):
        return False
    # NOTE: the output of one region read by another region is that region's boundary:
    # saved (as PyTorch does), so that backward recomputes one region at a time.
    rid = n.meta.get("ac_graph_id")
    return not any(u.meta.get("recompute") == "must_recompute" and u.meta.get("ac_graph_id") != rid
                   for u in n.users)


def default_partition(joint_module: fx.GraphModule, _joint_inputs=None, *,
                      num_fwd_outputs: int, **kwargs) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Forward = what the forward outputs need; save every forward value backward uses
    (except nodes of checkpointed regions: backward recomputes those from what it saves)."""
    primals, tangents, fw_outs, bw_outs = _split_io(joint_module, num_fwd_outputs)
    fw_nodes = _with_getitems(_ancestors(fw_outs) | set(primals))
    # NOTE: sizes the backward reads off forward values are computed in forward
    # and saved as SymInts, rather than saving the whole tensor.
    tangent_side = _descendants(tangents)
    fw_nodes |= {n for n in _ancestors(bw_outs) if n not in tangent_side
                 and isinstance(n.meta.get("val"), torch.SymInt)}
    # NOTE: get_attr nodes (subgraphs of higher-order ops) are read by either graph, never saved.
    keep = {n for n in fw_nodes if not must_recompute(n) and n.op != "get_attr"}
    bw_needed = _ancestors(bw_outs, stop=keep)
    saved = set()
    for n in bw_needed:
        if n in keep and (n in bw_outs or any(u in bw_needed and u not in keep for u in n.users)):
            saved.add(n)
    return _finish(joint_module, primals, tangents, fw_outs, bw_outs, saved)


# NOTE: ops never recomputed in backward: expensive (matmuls, convolutions) or
# random (recomputing would draw new numbers).
_EXPENSIVE_PACKETS = {
    "mm", "bmm", "addmm", "baddbmm", "matmul", "convolution", "_convolution", "conv2d",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "native_dropout", "bernoulli", "rand",
    "randn", "rand_like", "randn_like", "randint", "normal", "uniform", "randperm",
    "_fused_dropout", "multinomial", "native_batch_norm", "_native_batch_norm_legit_functional",
    "_native_batch_norm_legit", "_native_batch_norm_legit_no_training", "native_layer_norm",
    "_lstm_mps", "lstm", "_thnn_fused_lstm_cell", "mkldnn_rnn", "sort", "topk", "cumsum",
    "_cdist_forward", "index_put", "scatter", "scatter_add", "embedding", "gather", "index",
    "nonzero", "_to_copy", "clone", "var_mean", "max", "min",
}


def _recomputable(n: fx.Node) -> bool:
    if n.op != "call_function":
        return False
    if n.target is operator.getitem:
        return _recomputable(n.args[0])
    packet = getattr(n.target, "overloadpacket", None)
    if packet is None:
        return False
    if packet.__name__ in _EXPENSIVE_PACKETS:
        return False
    tags = getattr(n.target, "tags", ())
    if torch.Tag.nondeterministic_seeded in tags:
        return False
    schema = n.target._schema
    if schema.is_mutable:
        return False
    if torch.Tag.pointwise in tags or torch.Tag.view_copy in tags:
        return True
    from kiln.functionalize import is_view_op

    return is_view_op(n.target) or packet.__name__ in _CHEAP_PACKETS


_CHEAP_PACKETS = {
    "sum", "mean", "amax", "amin", "expand", "view", "reshape", "permute", "t", "transpose",
    "squeeze", "unsqueeze", "slice", "select", "cat", "stack", "full", "zeros", "ones",
    "empty", "scalar_tensor", "arange", "full_like", "zeros_like", "ones_like", "empty_like",
    "slice_scatter", "select_scatter", "as_strided", "as_strided_scatter", "copy", "alias",
    "squeeze_copy", "unsqueeze_copy", "view_copy", "where", "fill", "detach", "neg", "sign",
}


# NOTE: public name of the default policy, for backends that narrow or widen it.
recomputable = _recomputable


def _size(n: fx.Node) -> float:
    val = n.meta.get("val")
    if isinstance(val, torch.Tensor):
        numel = size_hint(val.numel(), fallback=1 << 20)
        return float(max(numel, 1) * val.element_size())
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)):
        return 1.0
    return INF  # tuples: save their getitems instead


def min_cut_rematerialization_partition(joint_module: fx.GraphModule, _joint_inputs=None, *,
                                        num_fwd_outputs: int, compiler: str = "inductor",
                                        recomputable: Optional[Callable[[fx.Node], bool]] = None,
                                        **kwargs) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Save a minimum-size set of forward values; recompute cheap ops in backward.

    ``recomputable(node) -> bool`` is the policy of which ops backward may recompute
    (default :func:`recomputable`); a backend passes its own with ``functools.partial``
    (codegen: ops it fuses into kernels for free).
    """
    recomputable = recomputable or _recomputable
    primals, tangents, fw_outs, bw_outs = _split_io(joint_module, num_fwd_outputs)
    tangent_side = _descendants(tangents)
    fw_nodes = _with_getitems(_ancestors(fw_outs) | set(primals))
    needed = _ancestors(bw_outs)
    net = FlowGraph()
    # NOTE: inputs the runtime writes back after the forward are better not saved.
    banned = joint_module.meta.get("mutated_primals", set())
    keep = needed | fw_nodes  # NOTE: once, not per node (that was quadratic: 6 s on a 10k-node LSTM)
    for n in joint_module.graph.nodes:
        if n.op in ("output", "get_attr") or n in tangent_side or n not in keep:
            continue
        forced = must_recompute(n)
        cap = INF if forced else _size(n) + (1e15 if n.name in banned else 0.0)
        if n.op == "placeholder" or not (forced or recomputable(n)):
            net.add_edge("source", (n, "in"), INF)
        net.add_edge((n, "in"), (n, "out"), cap)
        for u in n.users:
            if u.op == "output":
                if n in bw_outs:
                    net.add_edge((n, "out"), "sink", INF)
            elif u in tangent_side:
                if u in needed:
                    net.add_edge((n, "out"), "sink", INF)
            elif u in needed or u in fw_nodes:
                net.add_edge((n, "out"), (u, "in"), INF)
    net.node("sink")
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 10 * len(net.adj) + 1000))
    try:
        _, reachable = net.min_cut("source", "sink")
    finally:
        sys.setrecursionlimit(old)
    saved = {key[0] for key in net.index
             if isinstance(key, tuple) and key[1] == "in" and key in reachable
             and (key[0], "out") not in reachable}
    return _finish(joint_module, primals, tangents, fw_outs, bw_outs, saved)


__all__ = ["default_partition", "min_cut_rematerialization_partition", "extract_graph", "recomputable",
           "must_recompute"]
