"""Debugging backends (all tagged ``debug``) and ExplainWithBackend.

In:  a torch-level ``fx.GraphModule`` and example inputs.
Out: a callable running it — as is (``eager``), through AOT autograd with no-op
     compilers (``aot_eager`` ...), or through TorchScript (``ts``, ``aot_ts``).

``ExplainWithBackend(backend)`` wraps another backend and records every graph it
is given, its ops and the graph-break reasons; ``output()`` gives an
:class:`ExplainOutput`, the same object ``kiln.explain`` returns.
"""
from __future__ import annotations

import dataclasses
import logging
import traceback
from typing import Any, Optional, Sequence

import torch

from kiln import fallbacks
from kiln.aot import default_partition, min_cut_rematerialization_partition, nop
from kiln.exc import KilnError

from .common import aot_autograd
from .registry import CompiledFn, CompilerFn, lookup_backend, register_debug_backend

log = logging.getLogger(__name__)


def _ignore_kwargs(backend: str, kwargs: dict[str, Any]) -> None:
    if kwargs:
        log.warning("%s backend ignoring extra kwargs %s", backend, kwargs)


@register_debug_backend
def eager(gm: torch.fx.GraphModule, example_inputs: list, **kwargs: Any) -> CompiledFn:
    """Run the captured graph as it is (its generated Python ``forward``)."""
    _ignore_kwargs("eager", kwargs)
    return gm.forward


@register_debug_backend
def eager_noexcept(gm: torch.fx.GraphModule, example_inputs: list, **kwargs: Any) -> CompiledFn:
    """Like ``eager``, but an exception inside the graph is re-raised as a KilnError
    that says it came from the generated graph (the original is its ``__cause__``)."""
    _ignore_kwargs("eager_noexcept", kwargs)

    def inner(*args: Any) -> Any:
        try:
            return gm(*args)
        except Exception as e:
            raise KilnError(
                "Unexpected exception when running generated GraphModule",
                why=f"{type(e).__name__}: {e}",
                where=_graph_frame(e),
                hint="run the function uncompiled to see whether the error is in your code",
            ) from e

    return inner


def _graph_frame(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def aot_eager(
    gm: torch.fx.GraphModule,
    example_inputs: list,
    fw_compiler: Optional[CompilerFn] = None,
    bw_compiler: Optional[CompilerFn] = None,
    **kwargs: Any,
) -> CompiledFn:
    """AOT autograd (functionalized joint graph, min-cut partition) with no-op compilers."""
    _ignore_kwargs("aot_eager", kwargs)
    return aot_autograd(
        fw_compiler=fw_compiler or nop,
        bw_compiler=bw_compiler or nop,
        partition_fn=min_cut_rematerialization_partition,
        keep_inference_input_mutations=True,
    )(gm, example_inputs)


register_debug_backend(name="aot_eager", compiler_fn=aot_eager)


def aot_eager_default_partitioner(gm: torch.fx.GraphModule, example_inputs: list, **kwargs: Any) -> CompiledFn:
    """``aot_eager`` with the default partitioner (save what the backward needs)."""
    _ignore_kwargs("aot_eager_default_partitioner", kwargs)
    return aot_autograd(
        fw_compiler=nop, partition_fn=default_partition, keep_inference_input_mutations=True
    )(gm, example_inputs)


register_debug_backend(name="aot_eager_default_partitioner", compiler_fn=aot_eager_default_partitioner)


def decomposition_table() -> dict:
    """The decompositions used by ``aot_eager_decomp_partition`` (PyTorch's core ATen set).

    NOTE: PyTorch uses inductor's table here; kiln's codegen table does not exist yet,
    and the core ATen set is the documented base of it.
    """
    from torch._decomp import core_aten_decompositions

    return dict(core_aten_decompositions())


def aot_eager_decomp_partition(gm: torch.fx.GraphModule, example_inputs: list, **kwargs: Any) -> CompiledFn:
    """AOT autograd with decompositions and the min-cut partitioner, no-op compilers:
    the graphs a code generator would see, run eagerly (for debugging codegen issues)."""
    _ignore_kwargs("aot_eager_decomp_partition", kwargs)
    return aot_autograd(
        fw_compiler=nop,
        bw_compiler=nop,
        decompositions=decomposition_table,
        partition_fn=min_cut_rematerialization_partition,
        config_patches={"unlift_effect_tokens": True},
    )(gm, example_inputs)


register_debug_backend(name="aot_eager_decomp_partition", compiler_fn=aot_eager_decomp_partition)


# --------------------------------------------------------------------------- explain


@dataclasses.dataclass
class BreakReason:
    """Why capture ended a graph: the reason and the user's stack at that point."""

    reason: str
    user_stack: list = dataclasses.field(default_factory=list)  # traceback.FrameSummary items
    graph_break: bool = True


@dataclasses.dataclass
class ExplainOutput:
    """What ``kiln.explain(fn)(*args)`` and ``ExplainWithBackend.output()`` return."""

    graphs: list
    graph_count: int
    graph_break_count: int
    break_reasons: list
    op_count: int
    ops_per_graph: Optional[list] = None
    out_guards: Optional[list] = None
    compile_times: Optional[str] = None
    # NOTE: kiln's addition: functions that could not be captured at all and ran eagerly, with why.
    eager_frames: list = dataclasses.field(default_factory=list)
    # NOTE: kiln's addition: every fallback to eager recorded during the explained call
    # (kiln.fallbacks.Fallback: stage, what, why, where), capture's, backends' and AOT's.
    fallbacks: list = dataclasses.field(default_factory=list)
    # NOTE: kiln's addition: graphs captured inside DDP's forward and how they were split at
    # its gradient buckets, or why not (kiln.backends.ddp_split.SplitRecord).
    ddp_splits: list = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"Graph Count: {self.graph_count}",
            f"Graph Break Count: {self.graph_break_count}",
            f"Op Count: {self.op_count}",
            "Break Reasons:",
        ]
        for idx, br in enumerate(self.break_reasons):
            lines.append(f"  Break Reason {idx + 1}:")
            lines.append(f"    Reason: {getattr(br, 'reason', br)}")
            lines.append("    User Stack:")
            lines.extend(f"      {fs}" for fs in getattr(br, "user_stack", ()) or ())
        if self.eager_frames:
            lines.append("Eager Frames:")
            lines.extend(f"  {why}" for why in self.eager_frames)
        if self.fallbacks:
            lines.append("Fallbacks:")
            lines.extend(f"  {fb}" for fb in self.fallbacks)
        if self.ddp_splits:
            lines.append("DDP Splits:")
            lines.extend(f"  {sp}" for sp in self.ddp_splits)
        if self.ops_per_graph is not None:
            lines.append("Ops per Graph:")
            for idx, ops in enumerate(self.ops_per_graph):
                lines.append(f"  Ops {idx + 1}:")
                lines.extend(f"    {op}" for op in ops)
        if self.out_guards is not None:
            lines.append("Out Guards:")
            for idx, guard in enumerate(self.out_guards):
                lines.append(f"  Guard {idx + 1}:")
                lines.append(f"    {guard}")
        if self.compile_times is not None:
            lines.append(f"Compile Times: {self.compile_times}")
        return "\n".join(lines) + "\n"


def graph_ops(gm: torch.fx.GraphModule) -> list:
    """Targets of the ``call_function`` nodes of ``gm`` (what explain counts as ops)."""
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


class ExplainWithBackend:
    """A backend that records graphs, ops and break reasons, then defers to ``backend``.

    Break reasons come from the capture stage in either of two ways: it sets
    ``gm.compile_subgraph_reason`` (an object with ``graph_break``, ``reason`` and
    ``user_stack``) on the graph it hands over, or it calls :meth:`record_break`.
    """

    def __init__(self, backend: Any) -> None:
        self.backend: CompilerFn = lookup_backend(backend)
        self.graphs: list[torch.fx.GraphModule] = []
        self.op_count = 0
        self.ops_per_graph: list[list] = []
        self.break_reasons: list = []
        self._fallbacks_since = fallbacks.mark()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list, **kwargs: Any) -> CompiledFn:
        self.graphs.append(gm)
        ops = graph_ops(gm)
        self.op_count += len(ops)
        self.ops_per_graph.append(ops)
        reason = getattr(gm, "compile_subgraph_reason", None)
        if reason is not None and getattr(reason, "graph_break", False):
            self.break_reasons.append(reason)
        return self.backend(gm, example_inputs, **kwargs)

    def record_break(self, reason: str, user_stack: Sequence[Any] = ()) -> None:
        """Hook for the capture stage: note one graph break and where it happened."""
        self.break_reasons.append(BreakReason(reason, list(user_stack)))

    def output(self) -> ExplainOutput:
        count = len(self.graphs)
        return ExplainOutput(
            graphs=self.graphs,
            graph_count=count,
            graph_break_count=max(count - 1, 0),
            break_reasons=self.break_reasons,
            op_count=self.op_count,
            ops_per_graph=self.ops_per_graph,
            fallbacks=fallbacks.recorded(self._fallbacks_since),
        )


__all__ = [
    "eager",
    "eager_noexcept",
    "aot_eager",
    "aot_eager_default_partitioner",
    "aot_eager_decomp_partition",
    "decomposition_table",
    "BreakReason",
    "ExplainOutput",
    "ExplainWithBackend",
    "graph_ops",
]
