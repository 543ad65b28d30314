"""kiln.codegen.config: switches of the code generator (patchable).

    from kiln.codegen import config
    with config.patch(profitability_check=False): ...
"""
from __future__ import annotations

import os

from kiln.settings import make_patch

# Which printer generates kernels for CPU tensors: "cpp" (C++/OpenMP) or "triton"
# (Triton kernels; on CPU tensors they run under TRITON_INTERPRET=1).
cpu_backend: str = "cpp"
# The C++ compiler: None uses $CXX when set, else the first of g++, clang++ that works.
cpp_compiler: str | None = None
# Optimisation flags; "-march=native" is added where the compiler accepts it.
# (-fno-math-errno and -fno-trapping-math are always added: see kiln.codegen.cpp.build.)
cpp_opt_flags: str = "-O3"
# Where compiled kernels and their sources live (plain files, keyed by content hash).
cache_dir: str = os.environ.get("KILN_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "kiln"))
# Keep each compiled ATen graph's wrapper and kernel source on disk: a later process
# compiling the same graph skips lowering and printing (kiln.codegen.graph_cache).
graph_cache: bool = True
# After compiling a graph, time it against the ATen graph run eagerly and keep the faster.
profitability_check: bool = True
# Upper bound on the time the profitability check may take per graph, in seconds.
profitability_budget_s: float = 0.5
# Keep measured decisions on disk (under cache_dir), so a later process does not time again.
profitability_cache: bool = True
# A graph that writes module state (BatchNorm's running statistics) is timed with that
# state copied and restored; above this many bytes of state it is not timed.
profitability_snapshot_bytes: int = 1 << 30
# mode="max-autotune" widens tile searches (Triton).
max_autotune: bool = False
# Worker processes that compile a graph's Triton kernels in parallel before their first
# launch (kiln.codegen.triton.pool); None: min(os.cpu_count(), 8); 1: no pool, each kernel
# compiles in-process at its first launch.  $KILN_COMPILE_THREADS sets it too.
compile_threads: int | None = (int(os.environ["KILN_COMPILE_THREADS"])
                               if os.environ.get("KILN_COMPILE_THREADS", "").strip() else None)

patch = make_patch(__name__)
