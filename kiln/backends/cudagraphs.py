"""The ``cudagraphs`` backend: record the graph's CUDA work once, replay it per call.

In:  an ``fx.GraphModule`` and example inputs.
Out: a callable.  With CUDA inputs, each distinct input signature (shapes, strides,
     dtypes, devices, non-tensor values) is captured into a ``torch.cuda.CUDAGraph``
     over static input buffers; a call copies its inputs in, replays, copies back the
     inputs the graph mutates, and returns fresh copies of the outputs (so a later call
     never overwrites an earlier result).  When autograd is needed the forward and
     backward graphs come from AOT autograd and each is captured the same way.
     Without CUDA inputs there is nothing to capture: the graph runs eagerly, and that
     is recorded as a fallback (kiln.fallbacks; warned once).
"""
from __future__ import annotations

import logging
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


def _signature(args: Sequence[Any]) -> tuple:
    return tuple(
        (tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else ("py", a)
        for a in args
    )


class _Recorded:
    """One captured CUDA graph over static input buffers."""

    def __init__(self, fn: Callable, args: Sequence[Any]) -> None:
        self.static_inputs = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
        self.mutated = self._warm_up(fn)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_outputs = fn(*self.static_inputs)

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
        for dst, src in zip(self.static_inputs, args):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        self.graph.replay()
        for i in self.mutated:
            args[i].copy_(self.static_inputs[i])
        return pytree.tree_map_only(torch.Tensor, lambda t: t.clone(), self.static_outputs)


def cudagraphify(fn: Callable, example_inputs: Sequence[Any]) -> CompiledFn:
    """Wrap ``fn`` (taking tensors positionally) so CUDA calls replay recorded graphs.

    A signature whose capture fails (e.g. CPU work inside) runs eagerly from then on,
    recorded as a fallback naming the reason.
    """
    recorded: dict[tuple, Optional[_Recorded]] = {}

    def run(*args: Any) -> Any:
        if device_from_inputs(args).type != "cuda":
            return fn(*args)
        key = _signature(args)
        if key not in recorded:
            recorded[key] = _record_or_none(fn, args)
        entry = recorded[key]
        return fn(*args) if entry is None else entry(list(args))

    return run


def _record_or_none(fn: Callable, args: Sequence[Any]) -> Optional[_Recorded]:
    try:
        return _Recorded(fn, args)
    except Exception as e:  # NOTE: capture limits (sync ops, CPU tensors); eager stays right
        record_fallback("backend", "cudagraphs", f"could not record a CUDA graph ({e}); running eagerly")
        return None


def _needs_autograd(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> bool:
    if not torch.is_grad_enabled():
        return False
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)] + list(gm.parameters())
    return any(t.requires_grad for t in tensors)


def _cudagraph_compiler(gm: torch.fx.GraphModule, example_inputs: list) -> CompiledFn:
    return cudagraphify(gm, example_inputs)


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


__all__ = ["cudagraphs", "cudagraphify"]
