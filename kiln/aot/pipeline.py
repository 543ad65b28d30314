"""AOT autograd's steps as named graph passes (run by ``kiln.passes.run_pipeline``).

In:  the functional graph traced by aot/trace.py (stage ``functionalize``, whose
     passes run inside the trace): the joint forward+backward graph when gradients
     are needed, else the inference graph; plus the AOTOptions and AOTMeta.
Out: after ``aot.partition``, an ``AOTGraphs`` module: its submodules ``fw_graph``
     (primals -> ``[*forward outputs, *saved]``) and ``bw_graph`` (``[*saved,
     *tangents]`` -> gradients), and a root graph that calls one then the other (so
     it computes what the joint graph computed, and KILN_LOGS prints both graphs).
     After ``aot.compile``, ``gm.meta["compiled"]`` is the forward (or inference)
     graph's compiled callable.  The backward graph is compiled lazily by the runtime.

    training:  aot.joint -> aot.partition -> aot.compile
    inference: aot.inference -> [aot.keep_input_mutations] -> aot.compile

``KILN_LOGS=aot`` prints the graph after every step, ``KILN_LOGS=aot.partition``
only the forward and backward graphs.  Invariants: the graphs are functional
(``KILN_CHECK=1`` verifies it), except for ``aot.keep_input_mutations``, which
writes the inputs it names in ``gm.meta["kept_input_mutations"]``.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx

from kiln import exc
from kiln.aot.collect import AOTMeta
from kiln.aot.meta import propagate_meta
from kiln.aot.options import AOTOptions
from kiln.passes import GraphPass, graph_pass

aten = torch.ops.aten


def _placeholders(gm: fx.GraphModule) -> list:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def example_inputs(gm: fx.GraphModule) -> list:
    """The fake values of ``gm``'s inputs (what a compiler is given as example inputs)."""
    return [n.meta.get("val") for n in _placeholders(gm)]


# ---------------------------------------------------------------------------- training
def joint_pass(meta: AOTMeta) -> GraphPass:
    """aot.joint: metadata on every node; the primals the function mutates, by name."""

    @graph_pass("joint")
    def joint(gm: fx.GraphModule) -> fx.GraphModule:
        propagate_meta(gm)
        phs = _placeholders(gm)
        gm.meta["mutated_primals"] = {phs[meta.num_tokens + i].name for i in meta.mutated_inputs}
        return gm

    return joint


def split_module(fw_gm: fx.GraphModule, bw_gm: fx.GraphModule, num_fwd_outputs: int) -> fx.GraphModule:
    """The ``AOTGraphs`` module calling ``fw_graph`` then ``bw_graph`` (see module docstring)."""
    fw_out = fw_gm.graph.output_node().args[0]
    bw_phs = _placeholders(bw_gm)
    n_saved = len(fw_out) - num_fwd_outputs
    tangents = bw_phs[n_saved:]
    if n_saved < 0 or any(not p.name.startswith("tangents") for p in tangents):
        raise exc.KilnError(
            "the partition function returned graphs that do not fit together",
            why=f"the forward graph returns {len(fw_out)} values ({num_fwd_outputs} outputs, then the "
                f"saved values) but the backward graph takes {len(bw_phs)} inputs "
                f"(expected {max(n_saved, 0)} saved values, then tangents)",
            where=exc.user_location(),
            hint="a partition_fn returns fw: primals -> [*outputs, *saved] and "
                 "bw: [*saved, *tangents] -> grads",
        )
    g = fx.Graph()
    fw_args = [g.placeholder(p.name) for p in _placeholders(fw_gm)]
    tan_args = [g.placeholder(p.name) for p in tangents]
    for new, old in zip(fw_args + tan_args, _placeholders(fw_gm) + tangents):
        new.meta = dict(old.meta)
    fw_call = g.call_module("fw_graph", tuple(fw_args))
    fw_vals = [g.call_function(operator.getitem, (fw_call, i)) for i in range(len(fw_out))]
    bw_call = g.call_module("bw_graph", tuple(fw_vals[num_fwd_outputs:] + tan_args))
    g.output((tuple(fw_vals[:num_fwd_outputs]), bw_call))
    root = torch.nn.Module()
    root.fw_graph = fw_gm
    root.bw_graph = bw_gm
    return fx.GraphModule(root, g, class_name="AOTGraphs")


def partition_pass(partition_fn: Callable, num_fwd_outputs: int) -> GraphPass:
    """aot.partition: ``partition_fn`` splits the joint graph into forward and backward."""

    @graph_pass("partition")
    def partition(joint: fx.GraphModule) -> fx.GraphModule:
        fw_gm, bw_gm = partition_fn(joint, None, num_fwd_outputs=num_fwd_outputs)
        return split_module(fw_gm, bw_gm, num_fwd_outputs)

    return partition


# ---------------------------------------------------------------------------- inference
@graph_pass("inference")
def inference_pass(gm: fx.GraphModule) -> fx.GraphModule:
    """aot.inference: metadata on every node of the inference graph."""
    propagate_meta(gm)
    return gm


def keep_input_mutations_pass(meta: AOTMeta) -> GraphPass:
    """aot.keep_input_mutations: the inference graph writes mutated inputs itself.

    For each input whose data (only: not its storage or sizes) the function writes,
    the graph ends with ``aten.copy_(input, new_value)`` and no longer returns the new
    value; ``meta.mutated_inputs`` then lists only the mutations the runtime applies
    and ``meta.kept_input_mutations`` those the graph applies.  NOTE: as PyTorch's
    keep_inference_input_mutations: backends (CUDA graphs, fused kernels) then see the
    write and can do it in place, instead of a separate copy after the call.
    """

    @graph_pass("keep_input_mutations")
    def keep_input_mutations(gm: fx.GraphModule) -> fx.GraphModule:
        T = meta.num_tokens
        phs = _placeholders(gm)
        out_node = gm.graph.output_node()
        outs = list(out_node.args[0])
        kept, stay = [], []
        for k, i in enumerate(meta.mutated_inputs):
            info = meta.fmeta.inputs[i]
            ph, new = phs[T + i], outs[T + k]
            val, new_val = ph.meta.get("val"), getattr(new, "meta", {}).get("val")
            same_shape = (isinstance(val, torch.Tensor) and isinstance(new_val, torch.Tensor)
                          and tuple(val.shape) == tuple(new_val.shape))
            if info.mutates_data and not info.mutates_storage and not info.mutates_metadata \
                    and i not in meta.final_metadata and same_shape:
                kept.append((k, i, ph, new))
            else:
                stay.append(k)
        if not kept:
            return gm
        with gm.graph.inserting_before(out_node):
            for _, _, ph, new in kept:
                gm.graph.call_function(aten.copy_.default, (ph, new))
        drop = {T + k for k, *_ in kept}
        out_node.args = (tuple(o for j, o in enumerate(outs) if j not in drop),)
        gm.meta["kept_input_mutations"] = {ph.name for _, _, ph, _ in kept}
        meta.kept_input_mutations = [i for _, i, _, _ in kept]
        meta.mutated_inputs = [meta.mutated_inputs[k] for k in stay]
        meta.fw_out_requires_grad = [r for j, r in enumerate(meta.fw_out_requires_grad)
                                     if j not in {k for k, *_ in kept}]
        meta.fw_out_fakes = [v for j, v in enumerate(meta.fw_out_fakes)
                             if j not in {k for k, *_ in kept}]
        gm.recompile()
        propagate_meta(gm)
        return gm

    return keep_input_mutations


# ---------------------------------------------------------------------------- compile
def compile_pass(compiler: Callable, num_tokens: int, num_params_buffers: int) -> GraphPass:
    """aot.compile: the forward (or inference) graph through its compiler.

    The graph's ``meta["static_input_indices"]`` lists the inputs that are parameters
    or buffers (after the effect tokens), as PyTorch records them for its compilers."""

    @graph_pass("compile")
    def compile_(gm: fx.GraphModule) -> fx.GraphModule:
        target = getattr(gm, "fw_graph", gm)
        target.meta["static_input_indices"] = list(range(num_tokens, num_tokens + num_params_buffers))
        gm.meta["compiled"] = compiler(target, example_inputs(target))
        return gm

    return compile_


def training_pipeline(options: AOTOptions, meta: AOTMeta) -> list[GraphPass]:
    """The passes from the joint graph to a compiled forward graph (and a backward graph)."""
    return [
        joint_pass(meta),
        partition_pass(options.partition_fn, meta.num_tokens + meta.num_fw_outputs),
        compile_pass(options.fw_compiler, meta.num_tokens, options.num_params_buffers),
    ]


def inference_pipeline(options: AOTOptions, meta: AOTMeta) -> list[GraphPass]:
    """The passes from the inference graph to its compiled callable."""
    return [
        inference_pass,
        *([keep_input_mutations_pass(meta)] if options.keep_inference_input_mutations else []),
        compile_pass(options.inference_compiler, meta.num_tokens, options.num_params_buffers),
    ]


__all__ = ["training_pipeline", "inference_pipeline", "split_module", "example_inputs"]
