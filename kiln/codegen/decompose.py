"""kiln.codegen.decompose: the decomposition table codegen graphs are traced with.

Out: :func:`decomposition_table` -> ``{OpOverload: Callable}``, kiln's selection from
``torch._decomp``: PyTorch's core-ATen set plus the composite ops the lowerings would
otherwise call as externs (softmax, log_softmax, layer/group/batch norm, gelu,
activations, and their backward ops).  What remains (mm, addmm, convolution, sdpa,
random ops, ...) runs as extern ATen calls; :mod:`kiln.codegen.addmm_bias` splits an
addmm whose bias add a following kernel can take.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch._decomp
from torch._decomp import core_aten_decompositions, get_decompositions

aten = torch.ops.aten

# NOTE: composite ops beyond the core set whose decompositions are pointwise + reductions
# (the lowerings fuse them into row kernels).
_EXTRA = [
    aten._softmax, aten._log_softmax, aten.native_layer_norm, aten.native_group_norm,
    aten.native_batch_norm, aten._native_batch_norm_legit_functional,
    aten._native_batch_norm_legit_no_training, aten.gelu, aten.hardtanh,
    aten.leaky_relu, aten.elu, aten.index_select, aten.linalg_vector_norm, aten.flip,
    aten.repeat, aten.diagonal, aten.cumsum,
]

# NOTE: kept as ATen calls: dropout's decomposition draws random numbers differently from
# eager (bernoulli_ vs rand), so results would differ for the same seed; cumsum's
# decomposition is a quadratic reduction.
_KEEP = {aten.native_dropout.default, aten.cumsum.default, aten.cumsum.out}


def _core() -> dict:
    # NOTE: core_aten_decompositions() also lists every CompositeImplicitAutograd op (~500,
    # found by walking the dispatcher: ~70 ms per process); those decompose by themselves
    # below autograd, where kiln.aot traces, so the post-autograd core set is the same table
    # for codegen.  The private name is checked; older torches get the public call.
    post_autograd = getattr(torch._decomp, "_core_aten_decompositions_post_autograd", None)
    return dict(post_autograd() if post_autograd is not None else core_aten_decompositions())


@functools.lru_cache(maxsize=1)
def _table() -> dict:
    table = _core()
    table.update(get_decompositions(_EXTRA))
    for op in _KEEP:
        table.pop(op, None)
    return table


def decomposition_table() -> dict[torch._ops.OpOverload, Callable]:
    """kiln's decomposition table (a copy; cached underneath)."""
    return dict(_table())


__all__ = ["decomposition_table"]
