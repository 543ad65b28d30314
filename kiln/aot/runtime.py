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

Everything that depends only on the traced metadata (which outputs are plain,
which inputs are written back, the calling convention of the compiled graph)
is worked out once, when the artifact is built; a call does only the work its
graph needs (no mutations and no aliased outputs: run the graph, return its
outputs).
"""
from __future__ import annotations

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
from kiln.tracing.autocast import without_autocast

DOUBLE_BACKWARD_ERROR = "torch.compile with aot_autograd does not currently support double backward"

_set_grad_enabled = torch._C._set_grad_enabled
_is_grad_enabled = torch._C.is_grad_enabled
_any_autocast = torch._C._is_any_autocast_enabled
_DisableAutocast = torch._C._DisableAutocast


def as_list_call(f: Callable) -> Callable:
    """``f`` as ``g(args_list) -> list/tuple``, whatever its calling convention
    (decided once, not per call)."""
    if getattr(f, "_boxed_call", False):
        if getattr(f, "_returns_sequence", False):
            return f

        def boxed(args: list):
            out = f(args)
            return out if isinstance(out, (list, tuple)) else [out]
        return boxed

    def unboxed(args: list):
        out = f(*args)
        return out if isinstance(out, (list, tuple)) else [out]
    return unboxed


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
        self.fw_call = as_list_call(fw)
        # NOTE: set grad mode after a call only when the function changed it
        # while traced; a function that leaves it alone must leave the caller's.
        after = meta.grad_enabled_after
        self.grad_after: Optional[bool] = None if after == meta.grad_enabled_before else after
        self.write_back = bool(meta.mutated_inputs or meta.final_metadata)
        self.outputs = _OutputPlan(meta)
        self.autograd_fn = _make_autograd_function(self) if bw_gm is not None else None
        self._apply = _fast_apply(self.autograd_fn) if self.autograd_fn is not None else None

    def compiled_backward(self) -> Callable:
        if self.bw is None:
            example = [n.meta.get("val") for n in self.bw_gm.graph.nodes if n.op == "placeholder"]
            with without_autocast():
                self.bw = self.bw_compiler(self.bw_gm, example)
        return self.bw

    def __call__(self, args: list) -> list:
        if _any_autocast():
            # NOTE: the graphs hold the casts autocast made when they were traced; applying
            # autocast again would cast what the program kept in full precision (as PyTorch's
            # runtime wrapper, which disables it around compiled graphs).
            with _DisableAutocast():
                return self._call(args)
        return self._call(args)

    def _call(self, args: list) -> list:
        meta = self.meta
        if self._apply is not None:
            fw_outs = self._apply(*args)
        else:
            T = meta.num_tokens
            inputs = [*[torch.empty(0) for _ in range(T)], *args] if T else list(args)
            # NOTE: no backward was traced: outputs must not require grad.
            prev = _is_grad_enabled()
            if prev:
                _set_grad_enabled(False)
            try:
                fw_outs = self.fw_call(inputs)
            finally:
                if prev:
                    _set_grad_enabled(True)
            if T:
                fw_outs = fw_outs[T:]
        if self.write_back:
            _write_back(meta, args, fw_outs)
        outs = self.outputs(args, fw_outs)
        if self.grad_after is not None:
            _set_grad_enabled(self.grad_after)
        return outs


def _fast_apply(fn: type) -> Callable:
    """``fn.apply`` without the Python layer of ``Function.apply`` when no
    functorch transform is active: that layer binds default arguments (only
    with a setup_context, which ``fn`` has not), unwraps dead functorch
    wrappers (done here too; args are tensors) and calls the C++ apply."""
    c_apply = super(torch.autograd.Function, fn).apply
    py_apply = fn.apply
    active = torch._C._are_functorch_transforms_active
    unwrap_if_dead = torch._C._functorch.unwrap_if_dead

    def unwrap(a):
        return unwrap_if_dead(a) if isinstance(a, torch.Tensor) else a

    def apply(*args):
        if active():
            return py_apply(*args)
        try:
            inputs = list(map(unwrap_if_dead, args))
        except TypeError:
            # NOTE: an int input (a dynamic int) is no tensor; the C map stays the
            # per-call path of the all-tensor graphs (hundreds of parameters)
            inputs = list(map(unwrap, args))
        return c_apply(*inputs)
    return apply


def _write_back(meta: AOTMeta, args: list, fw_outs) -> None:
    set_sources = None
    for k, i in enumerate(meta.mutated_inputs):
        inp, new = args[i], fw_outs[k]
        info = meta.fmeta.inputs[i]
        if info.mutates_storage and set_sources is None:
            set_sources = _set_sources(meta, args, fw_outs)
        if info.mutates_storage:
            new = set_sources.get(k, new)
        prev = _is_grad_enabled()
        if info.mutations_under_no_grad:
            _set_grad_enabled(False)
        try:
            if info.mutates_storage:
                inp.set_(new)
                continue
            if tuple(inp.shape) != tuple(new.shape):
                inp.resize_(new.shape)
            inp.copy_(new)
        finally:
            _set_grad_enabled(prev)
    for i, (size, stride, offset) in meta.final_metadata.items():
        if not meta.fmeta.inputs[i].mutates_storage:
            with torch.no_grad():
                args[i].as_strided_(size, stride, offset)


def _set_sources(meta: AOTMeta, args: list, fw_outs) -> dict:
    """The new values of inputs written back with ``set_`` that are themselves inputs
    written back with ``set_`` (``x.data = y; y.data = z``: x's new value is y as it came
    in): taken as aliases of their memory before any write-back, so that the order of
    the write-backs does not matter."""
    mutated = [args[i] for i in meta.mutated_inputs if meta.fmeta.inputs[i].mutates_storage]
    out = {}
    for k, i in enumerate(meta.mutated_inputs):
        new = fw_outs[k]
        if meta.fmeta.inputs[i].mutates_storage and any(new is m for m in mutated):
            with torch.no_grad():
                out[k] = new.detach()
    return out


class _OutputPlan:
    """Builds the user outputs from the graph's forward outputs (after tokens).

    Precomputed from the metadata: when every user output is a plain graph
    output in order (no mutated inputs, bases, constants or views), the graph's
    outputs are the user's."""

    def __init__(self, meta: AOTMeta):
        infos = meta.fmeta.outputs
        self.n_out = len(infos)
        self.n_mut = len(meta.mutated_inputs)
        self.n_plain = len(meta.plain_outputs)
        self.plain = list(meta.plain_outputs)
        self.constants = list(meta.constant_outputs.items())
        self.first = [(k, info.kind, info.base_index, info.chain) for k, info in enumerate(infos)
                      if info.kind in (IS_INPUT, ALIAS_OF_INPUT, ALIAS_OF_INTERMEDIATE)]
        self.second = [(k, info.base_index, info.chain) for k, info in enumerate(infos)
                       if info.kind == ALIAS_OF_OUTPUT]
        self.identity = (self.n_mut == 0 and meta.num_bases == 0 and not self.constants
                         and not self.first and not self.second
                         and self.plain == list(range(self.n_out)))

    def __call__(self, args: list, fw_outs) -> list:
        if self.identity:
            return fw_outs if type(fw_outs) is list else list(fw_outs)
        n_mut, n_plain = self.n_mut, self.n_plain
        outs: list = [None] * self.n_out
        for k, v in zip(self.plain, fw_outs[n_mut:n_mut + n_plain]):
            outs[k] = v
        for k, c in self.constants:
            outs[k] = c
        bases = fw_outs[n_mut + n_plain:]
        for k, kind, base_index, chain in self.first:
            if kind == IS_INPUT:
                outs[k] = args[base_index]
            elif kind == ALIAS_OF_INPUT:
                outs[k] = replay(args[base_index], chain)
            else:
                outs[k] = replay(bases[base_index], chain)
        for k, base_index, chain in self.second:
            outs[k] = replay(outs[base_index], chain)
        return outs


def _make_autograd_function(art: CompiledArtifact) -> type:
    meta = art.meta
    T = meta.num_tokens
    n_fw = T + meta.num_fw_outputs
    rg = list(meta.fw_out_requires_grad)
    non_diff_idx = [i for i, r in enumerate(rg) if not r]
    mutated_idx = list(meta.mutated_inputs)
    fakes = list(meta.fw_out_fakes)
    # NOTE: the backward graph was made (and its kernels chosen) under this mode.
    compiled_deterministic = torch.are_deterministic_algorithms_enabled()
    # NOTE: positions of non-tensor saved values (symints); fixed by the graph,
    # found at the first call.
    saved_layout: list = []

    class CompiledFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            outs = art.fw_call([*[torch.empty(0) for _ in range(T)], *args] if T else list(args))
            fw_outs, saved = outs[T:n_fw], outs[n_fw:]
            if mutated_idx:
                # NOTE: an input the wrapper writes back after this forward must not be
                # saved as itself (its version changes): save a copy of the old value.
                mutated = {id(args[i]) for i in mutated_idx}
                saved = [s.clone() if isinstance(s, torch.Tensor) and id(s) in mutated else s
                         for s in saved]
            if not saved_layout:
                saved_layout.append([i for i, s in enumerate(saved) if not isinstance(s, torch.Tensor)])
            non_tensor_pos = saved_layout[0]
            if non_tensor_pos:
                ctx.saved_non_tensors = [(i, saved[i]) for i in non_tensor_pos]
                ctx.num_saved = len(saved)
                ctx.save_for_backward(*[s for s in saved if isinstance(s, torch.Tensor)])
            else:
                ctx.saved_non_tensors = None
                ctx.save_for_backward(*saved)
            if non_diff_idx:
                non_diff = [fw_outs[i] for i in non_diff_idx if isinstance(fw_outs[i], torch.Tensor)]
                if non_diff:
                    ctx.mark_non_differentiable(*non_diff)
            return tuple(fw_outs)

        @staticmethod
        def backward(ctx, *grads):
            _refuse_in_functorch()
            _check_deterministic(compiled_deterministic)
            tangents = []
            for i, (g, r) in enumerate(zip(grads, rg)):
                if not r:
                    continue
                if g is None:
                    # NOTE: unreachable while grads are materialized (the default).
                    f = fakes[i]
                    g = torch.zeros(tuple(f.shape), dtype=f.dtype, device=f.device)
                tangents.append(g.contiguous())
            saved = _merge_saved(ctx)
            bw = art.compiled_backward()
            all_args = saved + tangents
            with without_autocast():
                if _is_grad_enabled() and any(
                        isinstance(t, torch.Tensor) and t.requires_grad for t in all_args):
                    grads_in = _BackwardNoDouble.apply(bw, *all_args)
                else:
                    grads_in = call_compiled(bw, all_args)
            result: list = [None] * art.num_inputs
            for i, g in zip(art.grad_map, grads_in):
                result[i] = g
            return tuple(result)

    # NOTE: compiled autograd traces this node's backward graph (bw_gm), not its compiled kernels.
    CompiledFunction._kiln_artifact = art
    return CompiledFunction


FUNCTORCH_BACKWARD_ERROR = (
    "It looks like you're trying to call a compiled backward function within vmap/grad/vjp, which isn't "
    "supported. Try calling vmap inside the compiled function, or skip compiling the backward function.")


def _refuse_in_functorch() -> None:
    # NOTE: a compiled backward reached from inside a torch.func transform would get functorch-
    # wrapped gradients the compiled graph cannot see through; PyTorch refuses it the same way.
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise RuntimeError(FUNCTORCH_BACKWARD_ERROR)


DETERMINISTIC_BACKWARD_ERROR = (
    "This compiled backward function is being run with torch.use_deterministic_algorithms(True), but it "
    "was previously generated during the forward function while torch.use_deterministic_algorithms(False) "
    "was set.")


def _check_deterministic(compiled_deterministic: bool) -> None:
    # NOTE: a backward compiled while nondeterministic algorithms were allowed may use them;
    # run under deterministic mode it would break the user's request silently (PyTorch refuses).
    if not compiled_deterministic and torch.are_deterministic_algorithms_enabled():
        raise RuntimeError(DETERMINISTIC_BACKWARD_ERROR)


def _merge_saved(ctx) -> list:
    if ctx.saved_non_tensors is None:
        return list(ctx.saved_tensors)
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
