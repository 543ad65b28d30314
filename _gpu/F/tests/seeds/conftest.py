"""What the seed ports share: a clean compiler and grad mode around every test,
and seed 001's helper op body."""
import pytest
import torch

import kiln


@pytest.fixture(autouse=True)
def _reset():
    kiln.reset()
    prev = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(prev)
    kiln.reset()


def maybe_dupe_op(x):
    """Seed 001's op: returns the same tensor twice for small inputs."""
    y = x + 1
    z = x + 2
    if x.numel() < 5:
        return y, y
    return y, z
