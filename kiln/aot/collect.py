"""The metadata pass: run the function once, functionalized, on fake tensors.

It finds what the traced graphs must return besides the user's outputs
(mutated inputs, bases of aliased outputs, effect tokens), which outputs need
gradients, and the grad mode the function leaves behind.
"""
from __future__ import annotations

import contextlib

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from kiln import exc
from kiln.functionalize import FunctionalizeMode, describe_outputs
from kiln.functionalize.metadata import PLAIN, FunctionalMetadata, OutputInfo


@dataclass
class AOTMeta:
    """What the runtime wrappers need to know about the traced function."""

    fmeta: FunctionalMetadata
    # per flat input: requires_grad, and whether the joint trace clones it first
    input_requires_grad: list = field(default_factory=list)
    clone_inputs: list = field(default_factory=list)
    # graph forward outputs after the tokens: mutated inputs, plain user outputs, bases
    mutated_inputs: list = field(default_factory=list)  # input indices (data/storage written back)
    plain_outputs: list = field(default_factory=list)   # user output indices returned by the graph
    num_bases: int = 0
    # per graph forward output (same order): requires grad (needs a tangent)
    fw_out_requires_grad: list = field(default_factory=list)
    fw_out_fakes: list = field(default_factory=list)
    final_metadata: dict = field(default_factory=dict)  # input index -> (size, stride, offset)
    constant_outputs: dict = field(default_factory=dict)  # output index -> python value
    grad_enabled_after: bool = True
    grad_enabled_before: bool = True  # grad mode when the function was traced
    num_tokens: int = 0
    # export: every tensor output is a graph output (no views regenerated at run time)
    export: bool = False
    # the function read a global/closure tensor that requires grad (its grad would be lost)
    external_requires_grad: bool = False
    # per user output: its shape as traced here (None for non-tensors)
    out_shapes: list = field(default_factory=list)
    # inputs whose mutation the inference graph applies itself (keep_inference_input_mutations)
    kept_input_mutations: list = field(default_factory=list)

    @property
    def any_mutated_inputs(self) -> bool:
        """Inputs written by the function, by the runtime or inside the graph."""
        return bool(self.mutated_inputs or self.kept_input_mutations)

    @property
    def num_fw_outputs(self) -> int:
        return len(self.mutated_inputs) + len(self.plain_outputs) + self.num_bases


def prepare_inputs(inputs: list, clone_flags: list) -> list:
    """Clone inputs that will be mutated while requiring grad (autograd refuses
    in-place ops on leaves); the clone is what the function sees."""
    return [x.clone() if flag else x for x, flag in zip(inputs, clone_flags)]


def run_functionalized(fn: Callable, inputs: list, decompositions: Optional[dict],
                       tokens: Optional[list], discover_tokens: bool = False):
    """Run ``fn(*inputs)`` under a fresh FunctionalizeMode; returns (mode, outs).

    Grad mode is restored afterwards; the mode's ``grad_after`` says what fn left.
    """
    mode = FunctionalizeMode(decompositions, tokens=tokens, discover_tokens=discover_tokens)
    for i, t in enumerate(inputs):
        if isinstance(t, torch.Tensor):
            mode.register_input(t, i)
        else:
            mode.register_non_tensor_input(i)
    grad_before = torch.is_grad_enabled()
    try:
        with mode:
            outs = fn(*inputs)
        mode.grad_after = torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(grad_before)
    if not isinstance(outs, (list, tuple)):
        outs = [outs]
    return mode, list(outs)


def _rg(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and bool(t.requires_grad)


def collect_metadata(fn: Callable, fake_inputs: list, fake_mode, decompositions: Optional[dict],
                     real_is_leaf: list, export: bool = False) -> AOTMeta:
    """Run fn functionalized on fakes and describe mutations, aliases and grads."""
    from kiln import fallbacks

    if not export and fallbacks.forced("aot"):
        # NOTE: the error AOT's eager fallback catches, so the forced run takes the real path.
        raise exc.UnsupportedOperatorError(f"AOT gave up on the graph: {fallbacks.FORCED_REASON}")
    from torch._dispatch.python import enable_python_dispatcher

    from kiln.tracing.make_fx import has_shape_env

    # NOTE: the Python dispatcher exactly where make_fx uses it (symbolic sizes), so that
    # this pass and the graph traces run the same kernels.
    dispatcher = enable_python_dispatcher() if has_shape_env(fake_mode) else contextlib.nullcontext()
    with dispatcher, fake_mode:
        # NOTE: an input that is not a tensor (an int captured as a SymInt) passes as is.
        pre_clone = [bool(_rg(t) and not leaf) for t, leaf in zip(fake_inputs, real_is_leaf)]
        input_requires_grad = [_rg(t) for t in fake_inputs]
        # NOTE: fresh leaves, so that autograd state set by in-place ops in this
        # pass does not leak into the fakes the graph traces use.
        fresh = [fresh_leaf(t) if isinstance(t, torch.Tensor) else t for t in fake_inputs]
        inputs = prepare_inputs(fresh, pre_clone)
        grad_before = torch.is_grad_enabled()
        mode, outs = run_functionalized(fn, inputs, decompositions, None, discover_tokens=True)
        infos, bases = describe_outputs(mode, outs)
        if export:
            infos = [OutputInfo(requires_grad=i.requires_grad, is_tensor=i.is_tensor) for i in infos]
            bases = []
        fmeta = FunctionalMetadata(inputs=mode.input_info, outputs=infos,
                                   num_intermediate_bases=len(bases),
                                   num_tokens=len(mode.tokens or []),
                                   grad_enabled_after=mode.grad_after)
        meta = AOTMeta(fmeta=fmeta, grad_enabled_after=mode.grad_after,
                       grad_enabled_before=grad_before, num_tokens=fmeta.num_tokens, export=export,
                       external_requires_grad=mode.external_requires_grad)
        meta.input_requires_grad = input_requires_grad
        meta.out_shapes = [tuple(o.shape) if isinstance(o, torch.Tensor) else None for o in outs]
        meta.mutated_inputs = [i for i, info in enumerate(mode.input_info)
                               if info.mutates_data or info.mutates_storage]
        for i, info in enumerate(mode.input_info):
            if info.mutates_metadata:
                h = inputs[i]
                meta.final_metadata[i] = (tuple(h.shape), tuple(h.stride()), h.storage_offset())
        meta.clone_inputs = [bool(rg and i in meta.mutated_inputs)
                             for i, (rg, pre) in enumerate(zip(meta.input_requires_grad, pre_clone))]
        fw_handles = [inputs[i] for i in meta.mutated_inputs]
        for k, (o, info) in enumerate(zip(outs, infos)):
            if not info.is_tensor and not _symbolic(o):
                meta.constant_outputs[k] = o
            elif info.kind == PLAIN:
                meta.plain_outputs.append(k)
                fw_handles.append(o)
        fw_handles.extend(b.handle for b in bases)
        meta.num_bases = len(bases)
        meta.fw_out_requires_grad = [isinstance(h, torch.Tensor) and bool(h.requires_grad) and _differentiable(h)
                                     for h in fw_handles]
        for k, i in enumerate(meta.mutated_inputs):
            # NOTE: a write-back done under no_grad is invisible to autograd (as in eager).
            if mode.input_info[i].mutations_under_no_grad:
                meta.fw_out_requires_grad[k] = False
        meta.fw_out_fakes = fw_values(mode, meta, outs, bases)
    return meta


def mutated_value(mode: FunctionalizeMode, i: int) -> torch.Tensor:
    """The value a mutated input ``i`` is written back with."""
    info = mode.input_info[i]
    if info.mutates_storage:
        return mode.current(info.storage_rec)
    return mode.inputs[i].value


def fw_values(mode: FunctionalizeMode, meta: AOTMeta, outs: list, bases: list) -> list:
    """The graph's forward outputs after the tokens, in AOTMeta order."""
    vals = [mutated_value(mode, i) for i in meta.mutated_inputs]
    vals += [mode.value_of(outs[k]) for k in meta.plain_outputs]
    vals += [b.value for b in bases]
    return vals


def _symbolic(v: Any) -> bool:
    """A SymInt/SymFloat/SymBool output with free symbols (a value read from tensor data, a
    size): the graph computes and returns it, it is no constant."""
    return isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)) and bool(v.node.expr.free_symbols)


def _differentiable(t: torch.Tensor) -> bool:
    return t.dtype.is_floating_point or t.dtype.is_complex


def fresh_leaf(t: torch.Tensor, requires_grad: Optional[bool] = None) -> torch.Tensor:
    """``t`` detached, with ``requires_grad`` (default: ``t``'s); it keeps ``t``'s ``item()``.

    NOTE: an unspecialized float comes as a 0-d tensor whose item() is the capture's
    SymFloat (a fake's ``item_memo``): a fresh fake would read a new unbacked symbol."""
    d = t.detach().requires_grad_(t.requires_grad if requires_grad is None else requires_grad)
    memo = getattr(t, "item_memo", None)
    if memo is not None:
        d.item_memo = memo
    return d
