"""aot_export_module / aot_export_joint_simple: one functional graph plus its signature.

The exported graph takes ``[*tokens, *parameters, *buffers, *user inputs]`` and
returns ``[*tokens, *mutated buffers, *mutated user inputs, *user outputs]``
(joint: then the gradients of parameters and of user inputs that require
grad, computed from the output at ``output_loss_index``).  With
``config.unlift_effect_tokens`` the graph makes its token itself
(``prims._make_token``) and sinks it (``prims._sink_tokens``) instead.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from kiln import exc
from kiln.aot import config
from kiln.aot.api import _module_state, fake_mode_for, functional_call
from kiln.aot.collect import collect_metadata, fw_values, prepare_inputs, run_functionalized
from kiln.aot.trace import _check_consistent, finish_graph, output_bases, token_fakes
from kiln.tracing import make_fx


@dataclass
class BackwardSignature:
    gradients_to_parameters: dict = field(default_factory=dict)
    gradients_to_user_inputs: dict = field(default_factory=dict)
    loss_output: str = ""


@dataclass
class GraphSignature:
    """Names of the exported graph's inputs and outputs and what they stand for."""

    parameters: list = field(default_factory=list)
    buffers: list = field(default_factory=list)
    user_inputs: list = field(default_factory=list)
    user_outputs: list = field(default_factory=list)
    inputs_to_parameters: dict = field(default_factory=dict)
    inputs_to_buffers: dict = field(default_factory=dict)
    buffers_to_mutate: dict = field(default_factory=dict)
    user_inputs_to_mutate: dict = field(default_factory=dict)
    in_spec: Any = None
    out_spec: Any = None
    backward_signature: Optional[BackwardSignature] = None
    input_tokens: list = field(default_factory=list)
    output_tokens: list = field(default_factory=list)
    # flat output index -> value, for outputs that are not tensors (not graph outputs)
    out_constants: dict = field(default_factory=dict)


def aot_export_module(mod: torch.nn.Module, args: Any, *, trace_joint: bool,
                      output_loss_index: Optional[int] = None, pre_dispatch: bool = False,
                      decompositions: Optional[dict] = None, kwargs: Optional[dict] = None,
                      fake_inputs: Optional[Callable[[list], tuple]] = None,
                      keep_grad_mode: bool = False,
                      ) -> tuple[fx.GraphModule, GraphSignature]:
    """Export ``mod(*args)`` as one functional ATen graph and its GraphSignature (inputs
    that are not tensors are specialised: the graph takes the tensors only).

    ``fake_inputs(state + flat user inputs) -> (fake mode, fakes)`` makes the traced
    inputs (kiln.export: symbolic dims); by default every input is a static fake.
    ``keep_grad_mode``: trace an inference graph in the caller's grad mode instead of
    under no_grad (kiln.export: kernels picked by grad mode, such as attention's, are then
    those the program runs with when called with gradients on)."""
    kwargs = kwargs or {}
    from kiln.ops.foreign import kiln_graph

    mod = kiln_graph(mod)
    names, values, param_names = _module_state(mod)
    flat_all, in_spec = pytree.tree_flatten((tuple(args), kwargs))
    # NOTE: inputs that are not tensors are constants of the graph (specialised)
    consts = {i: v for i, v in enumerate(flat_all) if not isinstance(v, torch.Tensor)}
    flat_user = [v for v in flat_all if isinstance(v, torch.Tensor)]
    n_state = len(values)
    out_spec_box: list = []

    def flat_fn(*tensors):
        given = iter(tensors[n_state:])
        leaves = [consts[i] if i in consts else next(given) for i in range(len(flat_all))]
        a, kw = pytree.tree_unflatten(leaves, in_spec)
        out = functional_call(mod, names, list(tensors[:n_state]), a, kw)
        flat_out, spec = pytree.tree_flatten(out)
        if not out_spec_box:
            out_spec_box.append(spec)
            out_spec_box.append({i: v for i, v in enumerate(flat_out) if not isinstance(v, torch.Tensor)})
        return flat_out

    all_inputs = values + flat_user
    if trace_joint and output_loss_index is None:
        raise exc.TracingError("aot_export_module(trace_joint=True) needs output_loss_index",
                               why="the backward is computed from one scalar loss output",
                               where=exc.user_location())
    grad_ctx = (torch.enable_grad() if trace_joint else
                contextlib.nullcontext() if keep_grad_mode else torch.no_grad())
    with grad_ctx:
        fake_mode, fakes = (fake_inputs or fake_mode_for)(all_inputs)
        meta = collect_metadata(flat_fn, fakes, fake_mode, decompositions,
                                [True] * len(fakes), export=True)
        gm, n_grads = _trace_export(flat_fn, meta, fakes, fake_mode, decompositions,
                                    output_loss_index if trace_joint else None)
    sig = _signature(gm, meta, names, param_names, n_state, len(flat_user), n_grads, trace_joint,
                     output_loss_index)
    sig.in_spec, sig.out_spec = in_spec, out_spec_box[0] if out_spec_box else None
    sig.out_constants = out_spec_box[1] if out_spec_box else {}
    if config.unlift_effect_tokens and meta.num_tokens:
        unlift_tokens(gm, meta.num_tokens)
        sig.input_tokens, sig.output_tokens = [], []
    return gm, sig


def _trace_export(flat_fn: Callable, meta, fakes: list, fake_mode, decompositions,
                  loss_index: Optional[int]) -> tuple[fx.GraphModule, list]:
    T = meta.num_tokens
    grad_of: list = []

    def export_fn(*args):
        tokens, inputs = list(args[:T]), list(args[T:])
        inputs_used = prepare_inputs(inputs, meta.clone_inputs) if loss_index is not None else inputs
        mode, outs = run_functionalized(flat_fn, inputs_used, decompositions, tokens if T else None)
        bases = output_bases(mode, meta, outs)
        _check_consistent(meta, bases, mode)
        vals = fw_values(mode, meta, outs, bases)
        grads = []
        if loss_index is not None:
            wrt = [i for i, t in enumerate(inputs) if t.requires_grad]
            with mode:
                gs = torch.autograd.grad(outs[loss_index], [inputs[i] for i in wrt], allow_unused=True)
            for i, g in zip(wrt, gs):
                if g is not None:
                    grad_of.append(i)
                    grads.append(mode.value_of(g))
        return (*(mode.tokens or []), *vals, *grads)

    gm = make_fx(export_fn)(*token_fakes(meta, fake_mode), *fakes)
    return finish_graph(gm), grad_of


def _signature(gm, meta, names, param_names, n_state, n_user, grad_of, trace_joint, loss_index):
    T = meta.num_tokens
    phs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    outs = [getattr(o, "name", str(o)) for o in out_node.args[0]]
    sig = GraphSignature()
    sig.input_tokens, sig.output_tokens = phs[:T], outs[:T]
    state_phs, user_phs = phs[T:T + n_state], phs[T + n_state:]
    for ph, name in zip(state_phs, names):
        if name in param_names:
            sig.parameters.append(name)
            sig.inputs_to_parameters[ph] = name
        else:
            sig.buffers.append(name)
            sig.inputs_to_buffers[ph] = name
    sig.user_inputs = list(user_phs)
    k = T
    for i in meta.mutated_inputs:
        if i < n_state:
            sig.buffers_to_mutate[outs[k]] = names[i]
        else:
            sig.user_inputs_to_mutate[outs[k]] = user_phs[i - n_state]
        k += 1
    n_user_out = len(meta.plain_outputs)
    sig.user_outputs = outs[k:k + n_user_out]
    k += n_user_out
    if trace_joint:
        bw = BackwardSignature()
        for i, name in zip(grad_of, outs[k:]):
            if i < n_state:
                bw.gradients_to_parameters[name] = names[i]
            else:
                bw.gradients_to_user_inputs[name] = user_phs[i - n_state]
        bw.loss_output = sig.user_outputs[loss_index]
        sig.backward_signature = bw
    return sig


def unlift_tokens(gm: fx.GraphModule, num_tokens: int) -> None:
    """Replace token inputs by ``prims._make_token()`` and token outputs by one
    ``prims._sink_tokens`` call."""
    g = gm.graph
    phs = [n for n in g.nodes if n.op == "placeholder"][:num_tokens]
    first = next(n for n in g.nodes if n.op != "placeholder")
    for ph in phs:
        with g.inserting_before(first):
            tok = g.call_function(torch.ops.prims._make_token.default, ())
        tok.meta = dict(ph.meta)
        ph.replace_all_uses_with(tok)
        g.erase_node(ph)
    out_node = next(n for n in reversed(g.nodes) if n.op == "output")
    outs = list(out_node.args[0])
    with g.inserting_before(out_node):
        g.call_function(torch.ops.prims._sink_tokens.default, (tuple(outs[:num_tokens]),))
    out_node.args = (tuple(outs[num_tokens:]),)
    gm.recompile()


def aot_export_joint_simple(func: Callable, args: Any, *, trace_joint: bool,
                            num_params_buffers: int = 0,
                            decompositions: Optional[dict] = None) -> fx.GraphModule:
    """A functional graph of ``func(*args)`` (trace_joint: forward and backward
    together, inputs ``(primals, tangents)``).  The function must not mutate
    its inputs nor return aliases of them."""
    from kiln.aot.trace import trace_forward, trace_joint as _trace_joint
    from kiln.ops.foreign import kiln_graph

    func = kiln_graph(func)  # NOTE: PyTorch's higher-order operators read as kiln's
    flat_args = list(args)
    if not isinstance(num_params_buffers, int) or not 0 <= num_params_buffers <= len(flat_args):
        raise exc.KilnError(
            f"aot_export_joint_simple(num_params_buffers={num_params_buffers!r}) with "
            f"{len(flat_args)} inputs",
            why="num_params_buffers counts the leading inputs that are parameters or buffers",
            where=exc.user_location(),
        )

    def flat_fn(*tensors):
        out = func(*tensors)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    fake_mode, fakes = fake_mode_for(flat_args)
    meta = collect_metadata(flat_fn, fakes, fake_mode, decompositions, [True] * len(fakes),
                            export=True)
    if meta.mutated_inputs:
        raise exc.FunctionalizationError(
            "aot_export_joint_simple needs a function that does not mutate its inputs",
            why="the 'simple' export has no runtime wrapper to replay the mutation",
            where=exc.user_location(),
            hint="use aot_export_module, or clone the inputs in the function",
        )
    if trace_joint:
        gm, _ = _trace_joint(flat_fn, meta, fakes, fake_mode, decompositions)
    else:
        with torch.no_grad():
            gm = trace_forward(flat_fn, meta, fakes, fake_mode, decompositions)
    # NOTE: as PyTorch: the first num_params_buffers inputs are parameters/buffers,
    # static for the compilers that read the graph (after any effect tokens).
    gm.meta["static_input_indices"] = [meta.num_tokens + i for i in range(num_params_buffers)]
    return gm
