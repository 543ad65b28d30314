"""PyTorch's OpInfo database through kiln.aot.aot_function (nop compilers), forward
and backward, against eager.

Two setups: nop compilers with the default partitioner ("nop"), and PyTorch's
core ATen decompositions with the min-cut partitioner ("decomp_mincut").
Default suite: the full sweep of every float32 CPU op (2 samples each) in the
"nop" setup (~45 s on 2 cores), and every 8th op in the "decomp_mincut" setup,
one test per op.  ``pytest -m slow tests/aot/test_opinfo_sweep.py`` runs the full
"decomp_mincut" sweep too.  A full sweep needs >= 95% of the samples eager runs to
match, no failing op outside KNOWN_FAILING, no fallback outside EAGER_FALLBACK_OPS.  Last full run (CPU, torch 2.13): 677 ops, 1312 samples,
1302 run by eager, 1302 match in both setups (41 of them, 22 ops, through the
eager fallback, see EAGER_FALLBACK_OPS).

Run it by hand with a report:  python tests/aot/sweep_lib.py --out sweep.json
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sweep_lib import decomp_mincut_kwargs, float32_ops, op_name, sweep  # noqa: E402

# NOTE: ops whose samples do not match eager, with the reason (kept empty when the
# whole sweep matches; the full sweep fails if an op outside this list fails).
KNOWN_FAILING: dict[str, str] = {}

# Ops kiln runs eagerly instead of compiling (config.fallback_to_eager_on_data_dependence),
# with the reason: data-dependent output shapes or values, data read by a C++ kernel
# while tracing, sparse layouts.  They match eager by construction; the slow sweep
# checks that no other op falls back.
EAGER_FALLBACK_OPS = {
    "allclose": "DataDependentOutputException: aten.allclose.default",
    "argwhere": "DynamicOutputShapeException: aten.nonzero.default",
    "combinations": "DynamicOutputShapeException: aten.masked_select.default",
    "corrcoef": "DataDependentOutputException: aten.equal.default",
    "cov": "DataDependentOutputException: aten.equal.default",
    "equal": "DataDependentOutputException: aten.equal.default",
    "index_fill": "cannot trace aten._unique.default with fake tensors",
    "index_put": "cannot trace aten.index.Tensor with fake tensors (boolean mask)",
    "item": "DataDependentOutputException: aten._local_scalar_dense.default",
    "linalg.lstsq": "DynamicOutputShapeException: aten.linalg_lstsq.default",
    "linalg.lstsq.grad_oriented": "DynamicOutputShapeException: aten.linalg_lstsq.default",
    "masked_select": "DynamicOutputShapeException: aten.masked_select.default",
    "narrow": "DataDependentOutputException: aten._local_scalar_dense.default (tensor start)",
    "nn.functional.ctc_loss": "DynamicOutputShapeException: aten._ctc_loss.default",
    "nn.functional.gaussian_nll_loss": "DataDependentOutputException: aten._local_scalar_dense.default",
    "nonzero": "DynamicOutputShapeException: aten.nonzero.default",
    "sparse.mm.reduce": "sparse CSR inputs are not traced",
    "sparse.sampled_addmm": "sparse CSR inputs are not traced",
    "tensor_split": "the C++ kernel reads the indices tensor's data while tracing",
    "to_sparse": "sparse outputs are not traced",
    "unique": "DynamicOutputShapeException: aten._unique2.default",
    "unique_consecutive": "DynamicOutputShapeException: aten.unique_consecutive.default",
}
if tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 13):
    # NOTE: torch 2.11's quantile checks its q tensor with aten.equal (a data read); 2.13's does not.
    EAGER_FALLBACK_OPS.update({k: "DataDependentOutputException: aten.equal.default (torch < 2.13)"
                               for k in ("quantile", "nanquantile")})

_OPS = None


def _ops():
    global _OPS
    if _OPS is None:
        _OPS = float32_ops()
    return _OPS


def _sampled_names():
    # NOTE: ops in KNOWN_FAILING are left out of the sample; the full sweep
    # reports them, with their reasons, and bounds how many there may be.
    return [op_name(op) for op in _ops()[::8] if op_name(op) not in KNOWN_FAILING]


def test_sweep_enumerates_quickly():
    ops = _ops()
    assert len(ops) > 500
    assert len({op_name(o) for o in ops}) == len(ops)


_SETUPS = {"nop": dict, "decomp_mincut": decomp_mincut_kwargs}


@pytest.mark.parametrize("setup", ["decomp_mincut"])
@pytest.mark.parametrize("name", _sampled_names())
def test_sampled_op_matches_eager(name, setup):
    op = next(o for o in _ops() if op_name(o) == name)
    report = sweep([op], aot_kwargs=_SETUPS[setup]())
    bad = [r for r in report.results if r.status in ("mismatch", "error")]
    assert not bad, "; ".join(f"[{r.index}] {r.status}: {r.reason}" for r in bad)
    new_fallbacks = set(report.fallback_ops()) - set(EAGER_FALLBACK_OPS)
    assert not new_fallbacks, {k: report.fallback_ops()[k] for k in new_fallbacks}


@pytest.mark.parametrize("setup", ["nop", pytest.param("decomp_mincut", marks=pytest.mark.slow)])
def test_full_sweep(setup):
    report = sweep(_ops(), aot_kwargs=_SETUPS[setup]())
    failing = report.failing_ops()
    unexpected = {k: v for k, v in failing.items() if k not in KNOWN_FAILING}
    assert report.rate() >= 0.95, f"match rate {report.rate():.1%}"
    assert not unexpected, unexpected
    new_fallbacks = set(report.fallback_ops()) - set(EAGER_FALLBACK_OPS)
    assert not new_fallbacks, {k: report.fallback_ops()[k] for k in new_fallbacks}
