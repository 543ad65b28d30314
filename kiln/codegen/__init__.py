"""codegen/: the code generator — the stage that makes kiln faster than eager.

In:  a torch-level ``fx.GraphModule`` and example inputs (``compile_fx``, what the
     ``inductor`` backend calls), or one functional ATen graph from kiln.aot.
Out: a callable running generated kernels (C++/OpenMP on CPU), in the calling
     convention of what came in.

Invariants: results equal eager results (values within dtype tolerance, gradients,
input mutations); a graph codegen cannot handle, or one that times slower than its
ATen graph run eagerly, runs that ATen graph eagerly, recorded through
``kiln.fallbacks``.  Compiled kernels are cached as plain files under
``config.cache_dir`` (``KILN_CACHE_DIR``), keyed by content hashes.

Public: ``compile_fx(gm, example_inputs, mode=None, options=None)``, ``config``
(patchable settings), ``metrics`` (``generated_kernel_count``, ``reset()``).
"""
from kiln.codegen import config, metrics
from kiln.codegen.compile_fx import compile_fx

__all__ = ["compile_fx", "config", "metrics"]
