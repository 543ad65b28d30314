"""Counters of the code generator, with PyTorch's meaning where PyTorch has one.

``generated_kernel_count``: kernels generated (fused loops, not extern calls) since the
last ``reset()``; ``kiln.reset()`` calls ``reset()`` too.

The others: graphs compiled to generated code (``graphs_compiled``) and graphs whose
eager ATen run was kept because it timed faster (``graphs_kept_eager``); C++ compiler
runs (``cpp_compile_count``), libraries loaded from disk (``cache_disk_hits``) or from
this process (``cache_memory_hits``), corrupt cache entries rebuilt
(``cache_corrupt_count``), ATen graphs rebuilt from the graph cache without lowering
(``graph_cache_hits``); Triton compile jobs sent to the worker pool
(``triton_compiles_submitted``, one per distinct kernel specialization), not sent because an
earlier process's compile is still in Triton's cache (``triton_compiles_skipped``), and
those that failed or timed out there, so the kernel compiled in-process
(``triton_pool_failures``); and ``profitability_decisions``, one
:class:`kiln.codegen.profitability.Decision` per graph timed (what ``KILN_LOGS=codegen``
prints).
"""
from __future__ import annotations

from typing import Any

generated_kernel_count: int = 0
graphs_compiled: int = 0
graphs_kept_eager: int = 0
cpp_compile_count: int = 0
cache_disk_hits: int = 0
cache_memory_hits: int = 0
cache_corrupt_count: int = 0
graph_cache_hits: int = 0
triton_compiles_submitted: int = 0
triton_compiles_skipped: int = 0
triton_pool_failures: int = 0
profitability_decisions: list[Any] = []


def reset() -> None:
    """Set every counter to zero and forget the recorded decisions."""
    global generated_kernel_count, graphs_compiled, graphs_kept_eager, cpp_compile_count
    global cache_disk_hits, cache_memory_hits, cache_corrupt_count, graph_cache_hits
    global triton_compiles_submitted, triton_compiles_skipped, triton_pool_failures
    generated_kernel_count = 0
    graphs_compiled = 0
    graphs_kept_eager = 0
    cpp_compile_count = 0
    cache_disk_hits = 0
    cache_memory_hits = 0
    cache_corrupt_count = 0
    graph_cache_hits = 0
    triton_compiles_submitted = 0
    triton_compiles_skipped = 0
    triton_pool_failures = 0
    profitability_decisions.clear()


def snapshot() -> dict[str, int]:
    """The counters now, as a dict (for tests and benchmarks)."""
    return {k: v for k, v in globals().items() if isinstance(v, int) and not k.startswith("_")}


__all__ = ["reset", "snapshot"]
