"""backends/: the registry of compilers for captured graphs, and kiln's own backends.

In:  a torch-level ``torch.fx.GraphModule`` (from capture/, or any fx graph) and its
     example inputs (real or fake tensors, SymInts, Python scalars).
Out: a callable that runs the graph on inputs of the same kind, positionally.

Invariants: a backend is exactly PyTorch's custom-backend convention
``callable(gm, example_inputs) -> callable``, so PyTorch's own backends plug into kiln
and kiln's plug into PyTorch's own compiler as its ``backend=`` argument.  Results equal
eager results (values, gradients, input mutations); a backend that cannot do better
runs the graph eagerly and records that (``kiln.fallbacks.record_fallback``), never a
wrong answer.  ``call_backend`` is the one place a backend is called and its result checked.

Backends: ``eager``, ``eager_noexcept``, ``aot_eager``, ``aot_eager_default_partitioner``,
``aot_eager_decomp_partition``, ``ts``, ``aot_ts`` (all tagged ``debug``), ``inductor``,
``cudagraphs``, ``tvm``, and ``onnxrt`` where onnxruntime is installed.
"""
from __future__ import annotations

from .registry import (
    DEFAULT_BACKEND,
    CompiledFn,
    CompilerFn,
    backend_name,
    list_backends,
    lookup_backend,
    register_backend,
    register_debug_backend,
    register_experimental_backend,
)
from .common import AotAutograd, aot_autograd, call_backend, real_inputs

# NOTE: importing these modules registers their backends.
from . import debugging, torchscript, cudagraphs, onnxrt, tvm, inductor  # noqa: E402,F401
from .debugging import ExplainOutput, ExplainWithBackend  # noqa: E402

__all__ = [
    "DEFAULT_BACKEND",
    "register_backend",
    "register_debug_backend",
    "register_experimental_backend",
    "lookup_backend",
    "list_backends",
    "backend_name",
    "aot_autograd",
    "AotAutograd",
    "call_backend",
    "real_inputs",
    "ExplainOutput",
    "ExplainWithBackend",
    "CompilerFn",
    "CompiledFn",
]
