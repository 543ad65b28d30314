"""Tracing the forward (inference) graph and the joint forward+backward graph.

Both run the user's function under a FunctionalizeMode pushed inside kiln's
make_fx, so the recorded graph is functional.  Graph inputs are
``[*tokens, *inputs]`` (joint: ``primals`` = that list, then ``tangents``);
forward outputs are ``[*tokens, *mutated inputs' new values, *plain user
outputs, *bases of aliased outputs]``; the joint graph appends the gradients
of the inputs that require grad and got one (``grad_map`` says which).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.fx as fx

from kiln import exc
from kiln.aot.collect import AOTMeta, fw_values, prepare_inputs, run_functionalized
from kiln.functionalize import describe_outputs
from kiln.passes import graph_pass, run_pipeline
from kiln.tracing import make_fx

aten = torch.ops.aten


def output_bases(mode, meta: AOTMeta, outs: list) -> list:
    """The intermediate bases the graph returns (none when exporting)."""
    if meta.export:
        return []
    return describe_outputs(mode, outs)[1]


def _check_consistent(meta: AOTMeta, bases: list, mode) -> None:
    if len(bases) != meta.num_bases or len(mode.tokens or []) != meta.num_tokens:
        raise exc.TracingError(
            "the function behaved differently in two traces",
            why="the number of aliased-output bases or effect tokens changed between the "
                "metadata pass and the graph trace",
            where=exc.user_location(),
            hint="make the function deterministic in its Python control flow",
        )


def token_fakes(meta: AOTMeta, fake_mode) -> list:
    with fake_mode:
        return [torch.empty(0) for _ in range(meta.num_tokens)]


def trace_forward(fn: Callable, meta: AOTMeta, fake_inputs: list, fake_mode,
                  decompositions: Optional[dict]) -> fx.GraphModule:
    """The functional forward graph: ``[*tokens, *inputs] -> [*tokens, *fw outputs]``."""
    T = meta.num_tokens

    def flat_fw(*args):
        tokens, inputs = list(args[:T]), list(args[T:])
        mode, outs = run_functionalized(fn, inputs, decompositions, tokens if T else None)
        bases = output_bases(mode, meta, outs)
        _check_consistent(meta, bases, mode)
        return (*(mode.tokens or []), *fw_values(mode, meta, outs, bases))

    gm = make_fx(flat_fw)(*token_fakes(meta, fake_mode), *fake_inputs)
    return finish_graph(gm)


def tangent_fakes(meta: AOTMeta, fake_mode) -> list:
    with fake_mode:
        return [torch.empty_like(v, memory_format=torch.contiguous_format)
                for v, rg in zip(meta.fw_out_fakes, meta.fw_out_requires_grad) if rg]


def trace_joint(fn: Callable, meta: AOTMeta, fake_inputs: list, fake_mode,
                decompositions: Optional[dict]) -> tuple[fx.GraphModule, list]:
    """The joint graph ``(primals, tangents) -> [*fw outputs, *grads]`` and grad_map
    (the input index of each gradient output)."""
    T = meta.num_tokens
    grad_map: list = []

    def joint(primals, tangents):
        tokens, inputs = list(primals[:T]), list(primals[T:])
        with torch.enable_grad():
            inputs_used = prepare_inputs(inputs, meta.clone_inputs)
            mode, outs = run_functionalized(fn, inputs_used, decompositions, tokens if T else None)
            bases = output_bases(mode, meta, outs)
            _check_consistent(meta, bases, mode)
            handles = [inputs_used[i] for i in meta.mutated_inputs]
            handles += [outs[k] for k in meta.plain_outputs] + [b.handle for b in bases]
            values = fw_values(mode, meta, outs, bases)
            diff = [h for h, rg in zip(handles, meta.fw_out_requires_grad) if rg]
            wrt_idx = [i for i, rg in enumerate(meta.input_requires_grad) if rg]
            grads = _grads(mode, diff, [inputs[i] for i in wrt_idx], list(tangents))
        out_grads = []
        for i, g in zip(wrt_idx, grads):
            if g is not None:
                grad_map.append(i)
                out_grads.append(mode.value_of(g))
        return (*(mode.tokens or []), *values, *out_grads)

    primals = [*token_fakes(meta, fake_mode), *fake_inputs]
    gm = make_fx(joint)(primals, tangent_fakes(meta, fake_mode))
    gm.graph._codegen = fx.graph.CodeGen()
    return finish_graph(gm), grad_map


def _grads(mode, outputs: list, wrt: list, tangents: list) -> list:
    usable = [(o, t) for o, t in zip(outputs, tangents) if o.requires_grad]
    if not usable or not wrt:
        return [None] * len(wrt)
    from kiln.aot import config
    from kiln.tracing.autocast import without_autocast

    # NOTE: the backward's autocast state (config.backward_pass_autocast says which).
    bw_autocast = without_autocast() if config.backward_pass_autocast == "off" else contextlib.nullcontext()
    try:
        with mode, bw_autocast:
            return list(torch.autograd.grad(
                [o for o, _ in usable], wrt, grad_outputs=[t for _, t in usable],
                allow_unused=True))
    except exc.KilnError:
        raise
    except Exception as e:  # noqa: BLE001 - report with the user's context
        if "does not require grad" in str(e) or "in-place operation" in str(e):
            raise
        raise exc.TracingError(
            "the backward of the function could not be traced",
            why=f"{type(e).__name__}: {e}",
            where=exc.user_location(),
            hint="check the backward of custom autograd.Functions / ops used here",
        ) from e


def _is_impure(node: fx.Node) -> bool:
    if node.op in ("placeholder", "output"):
        return True
    if node.op != "call_function":
        return False
    target = node.target
    schema = getattr(target, "_schema", None)
    if schema is not None and schema.is_mutable:
        return True
    name = getattr(target, "__name__", "")
    return name in ("with_effects", "_sink_tokens") or target is torch.ops.prims._sink_tokens.default \
        or target in _RUNTIME_ASSERTS


# NOTE: checks the graph makes at run time (``torch._check`` / ``assert`` on values read from
# tensor data, capture/variables/scalars.py): they return nothing and must stay.
_RUNTIME_ASSERTS = (aten._assert_scalar.default, aten._assert_async.default, aten._assert_async.msg)


def eliminate_dead_code(graph: fx.Graph) -> None:
    """Erase nodes nothing uses, keeping impure ones (own pass: fx's ``is_impure_node``
    argument does not exist in every supported torch)."""
    for node in reversed(list(graph.nodes)):
        if not node.users and not _is_impure(node):
            graph.erase_node(node)


@graph_pass("dce")
def functional_dce(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop dead nodes (views re-played but unused) and recompile."""
    eliminate_dead_code(gm.graph)
    gm.recompile()
    return gm


def finish_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """The traced functional graph through the ``functionalize`` stage's passes
    (``KILN_LOGS=functionalize`` prints it as traced and after each pass)."""
    return run_pipeline("functionalize", gm, [functional_dce], functional=True)
