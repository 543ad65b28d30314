"""The backend call of a symbolic graph, as under PyTorch's capture; aliased inputs.

In: a captured graph with symbolic shapes, about to go to a backend (its tensor inputs
may be views of one storage). Out: the backend call runs inside a
``torch._guards.TracingContext`` of the frame's fake mode, with each placeholder naming its source (``_dynamo_source``), as
PyTorch's capture does; torch's AOT autograd then decides which mutated aliased inputs
overlap with the ShapeEnv's guards suppressed and hands back one ``StorageOverlap``
record, which becomes one guard of the entry (``GuardSet.storage_overlap``).

Without this, AOT asks the ShapeEnv about every pair of views (sizes, storage offsets),
and each answer is a shape guard: ~3 guards per pair, 14,652 for 100 views, each
evaluated by sympy and then rendered into the entry (the "aliased views" compile cliff).

Invariant: the entry's guard recomputes which of those inputs overlap on each call and
holds only for the pattern the graph was compiled for; a different pattern recompiles.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch


def _storage_key(t: torch.Tensor) -> Optional[tuple]:
    try:
        st = t.untyped_storage()
        return (t.device, st.data_ptr()) if st.nbytes() else None
    except (RuntimeError, NotImplementedError):  # NOTE: tensors without storage (subclasses...)
        return None


def _extent(t: torch.Tensor) -> Optional[tuple]:
    """[first, last] element offsets ``t`` touches in its storage (None: no elements)."""
    if t.numel() == 0:
        return None
    first = t.storage_offset()
    return first, first + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))


def overlapping(tensors: tuple) -> frozenset:
    """Positions in ``tensors`` whose memory may overlap another one's; tensors of other
    storages never overlap.

    NOTE: two tensors overlap when the spans of storage they touch intersect: never
    "disjoint" for tensors that share memory; interleaved strided views count as
    overlapping (a pattern that differs from AOT's finer answer fails the guard: the
    entry recompiles or runs eagerly, never wrong)."""
    groups: dict = {}
    for i, t in enumerate(tensors):
        key = _storage_key(t)
        span = _extent(t) if key is not None else None
        if span is not None:
            groups.setdefault(key, []).append((span, i))
    out: set = set()
    for spans in groups.values():
        # NOTE: in a run of spans sorted by start, each starting before the run's furthest
        # end, every member overlaps another one: a run of two or more all overlap.
        spans.sort()
        run, end = [], -1
        for (lo, hi), i in spans + [((float("inf"), 0), None)]:
            if lo > end:
                if len(run) > 1:
                    out.update(run)
                run, end = [], -1
            run.append(i)
            end = max(end, hi)
    return frozenset(out)


def storage_overlap_holds(tensors: tuple, n_overlapping: int) -> bool:
    """The first ``n_overlapping`` of ``tensors`` overlap others, the rest overlap none."""
    return overlapping(tensors) == frozenset(range(n_overlapping))


@contextlib.contextmanager
def backend_tracing_context(gm: torch.fx.GraphModule, fake_mode, sources: dict) -> Iterator[list]:
    """Run the backend call of ``gm`` inside a TracingContext of ``fake_mode``, each
    placeholder named by its ``meta["source"]``; yields a list that holds, after the block,
    (overlapping, non-overlapping) lists of kiln Sources (``sources``: name -> Source) for
    each StorageOverlap torch's AOT recorded."""
    from torch._guards import StorageOverlap, TracingContext, tracing

    from .dynamic import _shape_env_source

    got: list = []
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    if any(True for _ in gm.parameters()) or any(True for _ in gm.buffers()):
        # NOTE: no context of its own: the backend must not see capture's (kept for the frame's
        # user stack), whose inputs are not this graph's.
        with tracing(None):
            yield got
        return
    by_torch: dict = {}
    for i, node in enumerate(placeholders):
        ts = _shape_env_source(node.meta.get("source") or f"<placeholder {i}: {node.name}>")
        by_torch[ts] = node.meta.get("source")
        node._dynamo_source = ts
    had_id = "dynamo_compile_id" in gm.meta
    gm.meta.setdefault("dynamo_compile_id", None)
    gm._param_name_to_source = {}
    ctx = TracingContext(fake_mode)
    try:
        with tracing(ctx):
            yield got
    finally:
        for node in placeholders:
            node.__dict__.pop("_dynamo_source", None)
        if not had_id:
            gm.meta.pop("dynamo_compile_id", None)
        gm.__dict__.pop("_param_name_to_source", None)
    for g in ctx.guards_context.aotautograd_guards:
        if isinstance(g, StorageOverlap):
            got.append(([sources[by_torch[s]] for s in g.overlapping_sources],
                        [sources[by_torch[s]] for s in g.non_overlapping_sources]))


__all__ = ["overlapping", "storage_overlap_holds", "backend_tracing_context"]
