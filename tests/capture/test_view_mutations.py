"""Mutations through views under an AOT backend: written back through the view chain; a
mutation through ``as_strided`` of a view is refused (as PyTorch's compile refuses it: the
inverse of ``as_strided`` is not a write into the view before it)."""
from __future__ import annotations

import pytest
import torch

import kiln


@pytest.fixture(autouse=True)
def _reset():
    kiln.reset()
    yield


def test_mutation_through_as_strided_of_a_view_is_refused():
    def f(a):
        e = a.diagonal()
        e.as_strided((2,), (1,), 0).add_(1.0)
        return a

    with pytest.raises(RuntimeError, match="view chain of length 2, where view 1 was an as_strided"):
        kiln.compile(f, backend="aot_eager")(torch.randn(2, 4))


def test_mutation_through_as_strided_of_the_base_is_written_back():
    def f(a):
        a.as_strided((2,), (5,), 0).add_(1.0)
        return a * 2

    a = torch.randn(2, 4)
    expected_a = a.clone()
    expected = f(expected_a)
    got = kiln.compile(f, backend="aot_eager")(a)
    assert torch.equal(got, expected) and torch.equal(a, expected_a)


def test_mutation_through_a_view_of_as_strided_is_written_back():
    def f(a):
        a.as_strided((2, 2), (4, 1), 1)[0].mul_(3.0)
        return a + 1

    a = torch.randn(2, 4)
    expected_a = a.clone()
    expected = f(expected_a)
    got = kiln.compile(f, backend="aot_eager")(a)
    assert torch.equal(got, expected) and torch.equal(a, expected_a)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_mutation_through_diagonal_of_a_view_is_written_back(backend):
    # NOTE: inductor's decompositions make ``diagonal`` an ``as_strided``: not the user's.
    def f(a):
        a[1:].diagonal().add_(1.0)
        return a * 2

    a = torch.arange(12.).reshape(3, 4)
    expected_a = a.clone()
    expected = f(expected_a)
    got = kiln.compile(f, backend=backend)(a)
    assert torch.equal(got, expected) and torch.equal(a, expected_a)
