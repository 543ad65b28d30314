"""The model zoo (tests/models/zoo.py) through kiln.aot.aot_module directly, with
PyTorch's core ATen decompositions and the min-cut partitioner: the graphs a code
generator sees, run eagerly, must give eager's outputs and parameter gradients."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.utils._pytree as pytree

from kiln.aot import aot_module, min_cut_rematerialization_partition, nop
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models"))
import zoo  # noqa: E402

_NAMES = [n for n in zoo.BUILDERS if not n.endswith("_train_step")]


def _float_leaves(out):
    return [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor) and o.dtype.is_floating_point]


@pytest.mark.parametrize("name", _NAMES)
def test_model_decomp_mincut_matches_eager(name):
    from torch._decomp import core_aten_decompositions

    torch.manual_seed(0)
    model, args, _ = zoo.BUILDERS[name]("tiny")
    assert isinstance(model, torch.nn.Module), f"zoo builder {name} must return a module"
    compiled_model = copy.deepcopy(model)
    compiled = aot_module(compiled_model, nop, partition_fn=min_cut_rematerialization_partition,
                          decompositions=dict(core_aten_decompositions()))
    torch.manual_seed(1)
    ref = _float_leaves(model(*args))
    torch.manual_seed(1)
    out = _float_leaves(compiled(*args))
    assert len(ref) == len(out)
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    sum(o.float().sum() for o in ref if o.requires_grad).backward()
    sum(o.float().sum() for o in out if o.requires_grad).backward()
    for (pname, p), q in zip(model.named_parameters(), compiled_model.parameters()):
        assert (p.grad is None) == (q.grad is None), pname
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4, msg=pname)
    for (bname, b), c in zip(model.named_buffers(), compiled_model.buffers()):
        torch.testing.assert_close(c, b, msg=bname)
