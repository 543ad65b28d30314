"""The ``cudagraphs`` backend: record the graph's CUDA work once, replay it per call.

In:  an ``fx.GraphModule`` and example inputs.
Out: a callable.  With CUDA inputs, each distinct input signature (shapes, strides,
     dtypes, devices, non-tensor values) is captured into a ``torch.cuda.CUDAGraph``
     over static input buffers; a call copies its inputs in, replays, copies back the
     inputs the graph mutates, and returns the outputs in the recording's memory, with
     no copy.  A later call never overwrites an earlier result: while one is still
     referenced (its storage's use count says so), calls run the graph's code directly,
     without the CUDA graph, into fresh memory.  When autograd is needed the forward and
     backward graphs come from AOT autograd and each is captured the same way.
     Without CUDA inputs there is nothing to capture: the graph runs eagerly, and that
     is recorded as a fallback (kiln.fallbacks; warned once).
"""
from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, Optional, Sequence

import torch
import torch.utils._pytree as pytree

from kiln.fallbacks import record_fallback

from .common import aot_autograd, device_from_inputs, real_inputs
from .registry import CompiledFn, register_backend

log = logging.getLogger(__name__)

_warned_not_cuda = False


def _warn_not_cuda() -> None:
    # NOTE: recorded at every compile (tests see each one), warned about once per process.
    global _warned_not_cuda
    record_fallback("backend", "cudagraphs",
                    "the inputs are not CUDA tensors, so there is no CUDA work to record; "
                    "the graph runs eagerly", warn=not _warned_not_cuda)
    _warned_not_cuda = True


def _signature(args: Sequence[Any], static: frozenset) -> tuple:
    # NOTE: a static input (a parameter or buffer) is recorded in place: its address is its
    # signature (a replaced parameter records anew), and the per-call path, which this is,
    # skips building its shape and strides (a model passes hundreds of parameters).
    return tuple(
        ("py", a) if not isinstance(a, torch.Tensor) else
        a.data_ptr() if i in static else (tuple(a.shape), a.stride(), a.dtype, a.device)
        for i, a in enumerate(args)
    )


class _Recorded:
    """One captured CUDA graph over static input buffers.

    Inputs listed in ``static`` (parameters, buffers) are recorded in place, never copied;
    the others are copied into buffers of their own before each replay, unless they already
    are those buffers.  Memory comes from ``pool``, shared by a function's recordings.
    """

    def __init__(self, fn: Callable, args: Sequence[Any], static: frozenset, pool: Any,
                 mutated: frozenset = frozenset()) -> None:
        global recordings_made
        self.copied = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and i not in static]
        self.static_inputs = [a.detach().clone() if i in self.copied else a for i, a in enumerate(args)]
        # NOTE: generated kernels write inputs without moving version counters: the caller
        # names the inputs its graph mutates; the warm-up finds those ATen ops mutate.
        self.mutated = sorted(set(self._warm_up(fn)) | {i for i in mutated if i in self.copied})
        recordings_made += 1
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.static_outputs = fn(*self.static_inputs)
        self.flat_outputs, self.spec = pytree.tree_flatten(self.static_outputs)
        # NOTE: the memory a replay writes: the outputs' storages.  Their use counts now are
        # ours alone; any more at a later call means a result handed out is still alive.
        self.storages = [t.untyped_storage() for t in self.flat_outputs if isinstance(t, torch.Tensor)]
        self.base_uses = [_uses(st) for st in self.storages]

    def results_alive(self) -> bool:
        """Whether a result of an earlier replay (or a view of one) is still referenced."""
        return any(_uses(st) != n for st, n in zip(self.storages, self.base_uses))

    def _warm_up(self, fn: Callable) -> list[int]:
        # NOTE: a warm-up run on a side stream (as CUDA graph capture requires) also tells
        # which inputs the graph mutates: their version counters move.
        tensors = [(i, a) for i, a in enumerate(self.static_inputs) if isinstance(a, torch.Tensor)]
        before = {i: a._version for i, a in tensors}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        return [i for i, a in tensors if a._version != before[i]]

    def __call__(self, args: Sequence[Any]) -> Any:
        """Replay for ``args``; returns the outputs, in the recording's memory (no copy), or
        MISSING while an earlier replay's results are alive (a replay would overwrite them)."""
        if self.results_alive():
            return MISSING
        static = self.static_inputs
        for i in self.copied:
            if args[i].data_ptr() != static[i].data_ptr():
                static[i].copy_(args[i])
        self.graph.replay()
        for i in self.mutated:
            if args[i] is not static[i]:
                args[i].copy_(static[i])
        # NOTE: fresh tensor objects over the recording's memory (``detach`` is no view and
        # copies nothing); their references are what results_alive counts.
        return pytree.tree_unflatten([t.detach() if isinstance(t, torch.Tensor) else t
                                      for t in self.flat_outputs], self.spec)


MISSING = object()


def _uses(storage: Any) -> int:
    return torch._C._storage_Use_Count(storage._cdata)


def _symbolic(example_inputs: Sequence[Any]) -> bool:
    for x in example_inputs:
        if isinstance(x, torch.SymInt):
            return True
        if isinstance(x, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in (*x.shape, *x.stride())):
            return True
    return False


# NOTE: how many CUDA graphs were recorded in this process (tests and benchmarks read deltas).
recordings_made = 0


def cudagraphify(fn: Callable, example_inputs: Sequence[Any], static_input_indices: Sequence[int] = (),
                 label: str = "cudagraphs", mutated_input_indices: Sequence[int] = ()) -> CompiledFn:
    """Wrap ``fn`` (taking tensors positionally) so CUDA calls replay recorded graphs.

    ``static_input_indices``: inputs that keep their memory from call to call (parameters
    and buffers): recorded in place, never copied.  ``mutated_input_indices``: inputs
    the function writes (copied back after each replay).  One recording per input signature,
    all from one private memory pool.  Inputs with symbolic sizes (dynamic shapes) are
    not recorded: the function runs without CUDA graphs, recorded as a fallback; so does a
    signature whose capture fails (e.g. CPU work inside).
    """
    if _symbolic(example_inputs):
        record_fallback("backend", label, "the graph has dynamic shapes, and a CUDA graph replays one "
                        "shape; it runs without CUDA graphs (compile with dynamic=False to record one "
                        "graph per shape)")
        return fn
    given = frozenset(static_input_indices)
    mutated = frozenset(mutated_input_indices)
    recorded = _Recordings()
    pool: list = []
    found: list = []   # [frozenset]: the inputs static at the first CUDA call

    def run(*args: Any) -> Any:
        if device_from_inputs(args).type != "cuda":
            return fn(*args)
        if not found:
            found.append(given | _parameters(args))
        static = found[0]
        key = _signature(args, static)
        entry = recorded.get(key, False)
        if entry is False:
            if not pool:
                pool.append(torch.cuda.graph_pool_handle())
            entry = recorded[key] = _record_or_none(fn, args, static, pool[0], label, mutated)
        if entry is None:
            return fn(*args)
        out = entry(list(args))
        # NOTE: results of an earlier replay still held (``out = f(x)`` in a loop holds the
        # last one while the next call runs): this call runs the compiled code directly, as
        # without CUDA graphs, into fresh memory, so nothing a caller holds is overwritten.
        return fn(*args) if out is MISSING else out

    run.recordings = recorded  # type: ignore[attr-defined]  # NOTE: for tests and explain
    _all.add(recorded)
    return run


def _parameters(args: Sequence[Any]) -> frozenset:
    """Positions of ``args`` that are ``nn.Parameter``s: static inputs too.

    NOTE: capture passes a module's parameters to its graph as inputs, and a backend
    below kiln.aot's ``aot_autograd`` (``num_params_buffers=0``) is not told which they
    are: each replay then copied every weight into the recording's own buffer (a ViT-B/16
    or BERT inference step: hundreds of copies, slower than no CUDA graph at all).  A
    parameter that moves gets a recording of its own (its address is in the signature)."""
    return frozenset(i for i, a in enumerate(args) if isinstance(a, torch.nn.Parameter))


class _Recordings(dict):
    """signature -> recording (None: that signature runs without CUDA graphs).  Hashed by
    identity, so a WeakSet can hold it."""

    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:
        return self is other


# NOTE: every cudagraphify's recordings, weakly: live_recordings() counts them (tests, bench).
_all: "weakref.WeakSet[_Recordings]" = weakref.WeakSet()


def live_recordings() -> int:
    """How many CUDA graphs the cudagraphified functions of this process hold."""
    return sum(1 for rec in _all for e in rec.values() if e is not None)


def _record_or_none(fn: Callable, args: Sequence[Any], static: frozenset, pool: Any,
                    label: str, mutated: frozenset) -> Optional[_Recorded]:
    try:
        return _Recorded(fn, args, static, pool, mutated)
    except Exception as e:  # NOTE: capture limits (sync ops, CPU tensors); eager stays right
        record_fallback("backend", label, f"could not record a CUDA graph ({type(e).__name__}: {e}); "
                        "running without CUDA graphs")
        return None


def _needs_autograd(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> bool:
    if not torch.is_grad_enabled():
        return False
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)] + list(gm.parameters())
    return any(t.requires_grad for t in tensors)


def _cudagraph_compiler(gm: torch.fx.GraphModule, example_inputs: list) -> CompiledFn:
    return cudagraphify(gm, example_inputs, gm.meta.get("static_input_indices", ()))


@register_backend(name="cudagraphs")
def cudagraphs(gm: torch.fx.GraphModule, example_inputs: list, **kwargs: Any) -> CompiledFn:
    """Replay recorded CUDA graphs (see the module docstring); eager on CPU inputs."""
    if kwargs:
        log.warning("cudagraphs backend ignoring extra kwargs %s", kwargs)
    if device_from_inputs(example_inputs).type != "cuda" or not torch.cuda.is_available():
        _warn_not_cuda()
        return gm.forward
    if _needs_autograd(gm, example_inputs):
        # NOTE: a recorded graph has no autograd history; AOT autograd splits forward and
        # backward into plain graphs that can each be recorded.
        return aot_autograd(
            fw_compiler=_cudagraph_compiler,
            bw_compiler=_cudagraph_compiler,
            keep_inference_input_mutations=False,
        )(gm, example_inputs)
    return cudagraphify(gm.forward, real_inputs(example_inputs))


def mutated_inputs(gm: torch.fx.GraphModule) -> list[int]:
    """Positions of ``gm``'s placeholders that an ATen op in it writes (``copy_`` of an
    input mutation kept in the graph, any op whose schema marks the argument written)."""
    out = []
    for i, p in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        for u in p.users:
            schema = getattr(u.target, "_schema", None)
            if schema is None:
                continue
            for arg, a in zip(schema.arguments, u.args):
                if a is p and arg.alias_info is not None and arg.alias_info.is_write:
                    out.append(i)
                    break
            else:
                continue
            break
    return out


__all__ = ["cudagraphs", "cudagraphify", "mutated_inputs", "live_recordings"]
