"""testing/: helpers that kiln's tests (and users' tests) use, with the meaning of
PyTorch's dynamo testing helpers of the same names.

In:  graphs, callables, results.  Out: counts, booleans, normalized strings, tensors.
Invariants: nothing here changes global state except :func:`reset_rng_state`.
"""
from __future__ import annotations

from .counters import (
    AotEagerAndRecordGraphs,
    CompileCounter,
    CompileCounterWithBackend,
    EagerAndRecordGraphs,
    count_ops,
)
from .compare import compare_equal_outs_and_grads, outs_and_grads, same
from .fallbacks import fallback_mismatch
from .helpers import (
    expectedFailureDynamic,
    normalize_gm,
    rand_strided,
    reduce_to_scalar_loss,
    remove_trailing_space,
    reset_rng_state,
    strip_comment,
)

__all__ = [
    "CompileCounter",
    "CompileCounterWithBackend",
    "EagerAndRecordGraphs",
    "AotEagerAndRecordGraphs",
    "count_ops",
    "fallback_mismatch",
    "same",
    "compare_equal_outs_and_grads",
    "outs_and_grads",
    "normalize_gm",
    "strip_comment",
    "remove_trailing_space",
    "rand_strided",
    "reduce_to_scalar_loss",
    "reset_rng_state",
    "expectedFailureDynamic",
]
