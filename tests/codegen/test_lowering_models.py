"""The model zoo through kiln's code generator, forward and backward: outputs and
parameter gradients match eager, nothing falls back, and kernels were generated."""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from models import zoo  # noqa: E402
from models.test_models import flatten, scalar_loss  # noqa: E402

import kiln  # noqa: E402
from kiln.backends import aot_autograd  # noqa: E402
from kiln.codegen import metrics  # noqa: E402
from kiln.codegen.decompose import decomposition_table  # noqa: E402
from kiln.codegen.graph import compile_aten_graph  # noqa: E402

FAST = ["nanogpt", "resnet_train", "bert"]
SLOW = [n for n in zoo.BUILDERS if n not in FAST and n != "nanogpt_train_step"]


def _backend():
    return aot_autograd(fw_compiler=compile_aten_graph, bw_compiler=compile_aten_graph,
                        decompositions=decomposition_table())


def _run(name: str) -> None:
    # NOTE: transformers is a declared test dependency: a missing one fails here.
    eager, inputs, _ = zoo.build(name)
    model, _, _ = zoo.build(name)
    kiln.reset()
    metrics.reset()
    compiled = kiln.compile(model, backend=_backend())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        want = eager(*inputs)
        got = compiled(*inputs)
        scalar_loss(want).backward()
        scalar_loss(got).backward()
    fallbacks = [str(w.message).splitlines()[0] for w in caught if str(w.message).startswith("kiln")]
    assert not fallbacks, fallbacks
    assert metrics.generated_kernel_count > 0
    for i, (g, w) in enumerate(zip(flatten(got), flatten(want))):
        if isinstance(w, torch.Tensor):
            torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4, msg=lambda m: f"output {i}: {m}")
    params = dict(model.named_parameters())
    for pname, p in eager.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(params[pname].grad, p.grad, rtol=1e-3, atol=1e-4,
                                       msg=lambda m: f"grad {pname}: {m}")


@pytest.mark.parametrize("name", FAST)
def test_model_through_codegen(name: str) -> None:
    _run(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_model_through_codegen_slow(name: str) -> None:
    _run(name)
