"""Counters of the code generator, with PyTorch's meaning.

``generated_kernel_count``: kernels generated (fused loops, not extern calls) since the
last ``reset()``; ``kiln.reset()`` resets it too.
"""
from __future__ import annotations

generated_kernel_count: int = 0
# graphs compiled to generated code, and graphs whose eager ATen run was kept instead
graphs_compiled: int = 0
graphs_kept_eager: int = 0


def reset() -> None:
    global generated_kernel_count, graphs_compiled, graphs_kept_eager
    generated_kernel_count = 0
    graphs_compiled = 0
    graphs_kept_eager = 0
