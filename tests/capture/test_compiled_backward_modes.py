"""Global modes a compiled backward checks when it runs: the deterministic-algorithms
setting it was compiled under."""
from __future__ import annotations

import itertools

import pytest
import torch

import kiln


@pytest.fixture
def restore_deterministic():
    prior = torch.are_deterministic_algorithms_enabled()
    prior_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(prior, warn_only=prior_warn)


def test_backward_under_deterministic_mode_compiled_without_it_raises(restore_deterministic):
    f = kiln.compile(lambda a, b: a + b, backend="aot_eager")
    for forward_mode, backward_mode in itertools.product([True, False], [True, False]):
        torch.use_deterministic_algorithms(forward_mode)
        a = torch.randn(10, requires_grad=True)
        res = f(a, 1)
        torch.use_deterministic_algorithms(backward_mode)
        if backward_mode and not forward_mode:
            with pytest.raises(RuntimeError, match=r"^This compiled backward function is being run with "
                                                   r"torch\.use_deterministic_algorithms\(True\)"):
                res.backward(torch.ones_like(res))
        else:
            res.backward(torch.ones_like(res))
            assert torch.equal(a.grad, torch.ones(10))
