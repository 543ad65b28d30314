"""Runtime wrappers: make compiled graphs behave like the eager function.

``CompiledArtifact`` holds the compiled forward (and the backward graph,
compiled lazily at the first backward).  Calling it:

1. creates effect tokens (and drops the returned ones),
2. runs the forward inside an ``autograd.Function`` when gradients are needed
   (its backward runs the compiled backward; double backward raises),
3. writes mutated inputs back (``copy_``; under no_grad when the function
   mutated them under no_grad; ``as_strided_`` / ``set_`` for metadata),
4. regenerates outputs that alias inputs or other outputs as real views,
5. leaves grad mode as the function left it.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.fx as fx

from kiln.aot.collect import AOTMeta
from kiln.aot.compilers import call_compiled
from kiln.functionalize.metadata import (
    ALIAS_OF_INPUT,
    ALIAS_OF_INTERMEDIATE,
    ALIAS_OF_OUTPUT,
    IS_INPUT,
)
from kiln.functionalize.views import replay

DOUBLE_BACKWARD_ERROR = "torch.compile with aot_autograd does not currently support double backward"


class CompiledArtifact:
    """Compiled graphs plus the metadata to run them as eager would."""

    def __init__(self, meta: AOTMeta, fw: Callable, *, bw_gm: Optional[fx.GraphModule] = None,
                 bw_compiler: Optional[Callable] = None, grad_map: Optional[list] = None,
                 num_inputs: int = 0):
        self.meta = meta
        self.fw = fw
        self.bw_gm = bw_gm
        self.bw_compiler = bw_compiler
        self.bw: Optional[Callable] = None
        self.grad_map = grad_map or []
        self.num_inputs = num_inputs
        self.autograd_fn = _make_autograd_function(self) if bw_gm is not None else None

    def compiled_backward(self) -> Callable:
        if self.bw is None:
            example = [n.meta.get("val") for n in self.bw_gm.graph.nodes if n.op == "placeholder"]
            self.bw = self.bw_compiler(self.bw_gm, example)
        return self.bw

    def __call__(self, args: list) -> list:
        meta = self.meta
        if self.autograd_fn is not None:
            fw_outs = list(self.autograd_fn.apply(*args))
        else:
            tokens = [torch.empty(0) for _ in range(meta.num_tokens)]
            # NOTE: no backward was traced: outputs must not require grad.
            with torch.no_grad():
                fw_outs = call_compiled(self.fw, tokens + list(args))[meta.num_tokens:]
        _write_back(meta, args, fw_outs)
        outs = _user_outputs(meta, args, fw_outs)
        torch.set_grad_enabled(meta.grad_enabled_after)
        return outs


def _write_back(meta: AOTMeta, args: list, fw_outs: list) -> None:
    for k, i in enumerate(meta.mutated_inputs):
        inp, new = args[i], fw_outs[k]
        info = meta.fmeta.inputs[i]
        ctx = torch.no_grad() if info.mutations_under_no_grad else contextlib.nullcontext()
        with ctx:
            if info.mutates_storage:
                inp.set_(new)
                continue
            if tuple(inp.shape) != tuple(new.shape):
                inp.resize_(new.shape)
            inp.copy_(new)
    for i, (size, stride, offset) in meta.final_metadata.items():
        if not meta.fmeta.inputs[i].mutates_storage:
            with torch.no_grad():
                args[i].as_strided_(size, stride, offset)


def _user_outputs(meta: AOTMeta, args: list, fw_outs: list) -> list:
    n_mut = len(meta.mutated_inputs)
    plain = fw_outs[n_mut:n_mut + len(meta.plain_outputs)]
    bases = fw_outs[n_mut + len(meta.plain_outputs):]
    infos = meta.fmeta.outputs
    outs: list = [None] * len(infos)
    for k, v in zip(meta.plain_outputs, plain):
        outs[k] = v
    for k, c in meta.constant_outputs.items():
        outs[k] = c
    for k, info in enumerate(infos):
        if info.kind == IS_INPUT:
            outs[k] = args[info.base_index]
        elif info.kind == ALIAS_OF_INPUT:
            outs[k] = _regenerate(args[info.base_index], info.chain)
        elif info.kind == ALIAS_OF_INTERMEDIATE:
            outs[k] = _regenerate(bases[info.base_index], info.chain)
    for k, info in enumerate(infos):
        if info.kind == ALIAS_OF_OUTPUT:
            outs[k] = _regenerate(outs[info.base_index], info.chain)
    return outs


def _regenerate(base: torch.Tensor, chain: tuple) -> torch.Tensor:
    out = replay(base, chain)
    return out


def _make_autograd_function(art: CompiledArtifact) -> type:
    meta = art.meta
    T = meta.num_tokens
    n_fw = T + meta.num_fw_outputs
    rg = list(meta.fw_out_requires_grad)

    class CompiledFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            tokens = [torch.empty(0) for _ in range(T)]
            outs = call_compiled(art.fw, tokens + list(args))
            fw_outs, saved = outs[T:n_fw], outs[n_fw:]
            # NOTE: an input the wrapper writes back after this forward must not be
            # saved as itself (its version changes): save a copy of the old value.
            mutated = {id(args[i]) for i in meta.mutated_inputs}
            saved = [s.clone() if isinstance(s, torch.Tensor) and id(s) in mutated else s for s in saved]
            ctx.saved_non_tensors = [(i, s) for i, s in enumerate(saved) if not isinstance(s, torch.Tensor)]
            ctx.num_saved = len(saved)
            ctx.save_for_backward(*[s for s in saved if isinstance(s, torch.Tensor)])
            non_diff = [o for o, r in zip(fw_outs, rg) if isinstance(o, torch.Tensor) and not r]
            if non_diff:
                ctx.mark_non_differentiable(*non_diff)
            ctx.fw_meta = [(tuple(o.shape), o.dtype, o.device) if isinstance(o, torch.Tensor) else None
                           for o in fw_outs]
            return tuple(fw_outs)

        @staticmethod
        def backward(ctx, *grads):
            tangents = []
            for g, r, m in zip(grads, rg, ctx.fw_meta):
                if not r:
                    continue
                if g is None:
                    g = torch.zeros(m[0], dtype=m[1], device=m[2])
                tangents.append(g.contiguous())
            saved = _merge_saved(ctx)
            bw = art.compiled_backward()
            all_args = saved + tangents
            if torch.is_grad_enabled() and any(
                    isinstance(t, torch.Tensor) and t.requires_grad for t in all_args):
                grads_in = _BackwardNoDouble.apply(bw, *all_args)
            else:
                grads_in = call_compiled(bw, all_args)
            result: list = [None] * art.num_inputs
            for i, g in zip(art.grad_map, grads_in):
                result[i] = g
            return tuple(result)

    return CompiledFunction


def _merge_saved(ctx) -> list:
    tensors = iter(ctx.saved_tensors)
    non_tensors = dict(ctx.saved_non_tensors)
    return [non_tensors[i] if i in non_tensors else next(tensors) for i in range(ctx.num_saved)]


class _BackwardNoDouble(torch.autograd.Function):
    """Runs the compiled backward; differentiating through it raises (as PyTorch does)."""

    @staticmethod
    def forward(ctx, bw, *args):
        return tuple(call_compiled(bw, list(args)))

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)
