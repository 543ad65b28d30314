"""kiln.testing helpers behave as PyTorch's torch._dynamo.testing ones (compared directly)."""
from __future__ import annotations

import collections
import random
import unittest

import numpy as np
import pytest
import torch
import torch._dynamo.testing as dt
import torch._dynamo.utils as du

import kiln.testing as kt


def _graph():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x):
            y = self.lin(x).relu()
            return torch.sin(y) + y.sum()

    return torch.fx.symbolic_trace(M())


def test_compile_counter_counts_like_torch():
    gm = _graph()
    ours, theirs = kt.CompileCounter(), dt.CompileCounter()
    for counter in (ours, theirs):
        counter(gm, [])
        counter(gm, [])
    assert (ours.frame_count, ours.op_count) == (theirs.frame_count, theirs.op_count) == (2, 10)
    ours.clear()
    assert (ours.frame_count, ours.op_count) == (0, 0)


def test_compile_counter_returns_runnable():
    gm = _graph()
    x = torch.randn(2, 3)
    assert torch.equal(kt.CompileCounter()(gm, [x])(x), gm(x))


def test_compile_counter_with_backend():
    gm = _graph()
    cc = kt.CompileCounterWithBackend("eager")
    x = torch.randn(2, 3)
    fn = cc(gm, [x])
    assert torch.equal(fn(x), gm(x))
    assert cc.frame_count == 1 and cc.op_count == 5 and cc.graphs == [gm]
    cc.clear()
    assert cc.graphs == [] and cc.frame_count == 0


def test_compile_counter_works_as_torch_compile_backend():
    torch._dynamo.reset()
    cc = kt.CompileCounter()

    def f(x):
        return torch.sin(x) + torch.cos(x)

    x = torch.randn(4)
    assert kt.same(torch.compile(f, backend=cc)(x), f(x))
    assert cc.frame_count == 1 and cc.op_count == 3


SAME_CASES = [
    (torch.ones(3), torch.ones(3)),
    (torch.ones(3), torch.ones(3) + 1e-3),
    (torch.ones(3), torch.ones(3) + 1e-6),
    (torch.ones(3), torch.ones(3, dtype=torch.float64)),
    ([torch.ones(2), (1, 2.0)], [torch.ones(2), (1, 2.0)]),
    ([torch.ones(2)], [torch.ones(2), torch.ones(2)]),
    ({"a": torch.zeros(2), "b": 3}, {"a": torch.zeros(2), "b": 3}),
    ({"a": torch.zeros(2), "b": 3}, {"a": torch.zeros(2), "b": 4}),
    (1.5, 1.5 + 1e-7),
    (1.5, 1.6),
    ("x", "x"),
    (None, None),
    (torch.tensor([True, False]), torch.tensor([True, False])),
    (torch.tensor([True, False]), torch.tensor([True, True])),
    (torch.Size([2, 3]), (2, 3)),
    (collections.deque([1, 2]), [1, 2]),
    (torch.tensor([float("nan")]), torch.tensor([float("nan")])),
    (np.float32(1.0), np.float32(1.0)),
    (np.ones(3), np.ones(3)),
    ({1, 2}, {1, 2}),
]


@pytest.mark.parametrize("ref,res", SAME_CASES)
def test_same_agrees_with_torch(ref, res):
    assert kt.same(ref, res, log_error=lambda *a: None) == du.same(ref, res, log_error=lambda *a: None)


@pytest.mark.parametrize("kwargs", [{"tol": 1e-2}, {"equal_nan": True}, {"exact_dtype": False}, {"cos_similarity": True}])
def test_same_options_agree_with_torch(kwargs):
    cases = [
        (torch.ones(5), torch.ones(5) + 1e-3),
        (torch.tensor([float("nan"), 1.0]), torch.tensor([float("nan"), 1.0])),
        (torch.ones(3), torch.ones(3, dtype=torch.float64)),
        (torch.randn(50), torch.randn(50)),
    ]
    quiet = {"log_error": lambda *a: None}
    for ref, res in cases:
        assert kt.same(ref, res, **kwargs, **quiet) == du.same(ref, res, **kwargs, **quiet)


def test_same_fp64_reference():
    torch.manual_seed(0)
    fp64 = torch.randn(2000, dtype=torch.float64)
    ref = fp64.float() + torch.randn(2000) * 1e-3
    res_close = fp64.float() + torch.randn(2000) * 1e-3
    res_far = fp64.float() + torch.randn(2000) * 1e-1
    quiet = {"log_error": lambda *a: None}
    for res in (res_close, res_far):
        assert kt.same(ref, res, fp64, **quiet) == du.same(ref, res, fp64, **quiet)
    assert kt.same(ref, res_close, fp64, **quiet) and not kt.same(ref, res_far, fp64, **quiet)


def test_same_type_mismatch_raises():
    with pytest.raises(AssertionError):
        kt.same([1], 1)
    with pytest.raises(AssertionError):
        kt.same({"a": 1}, {"b": 1})


def test_normalize_gm_matches_torch():
    gm = _graph()
    text = gm.print_readable(False)
    assert kt.normalize_gm(text) == dt.normalize_gm(text)
    messy = "class A:\n    # a comment\n    def f(self):   \n\n\n\n        return 1\n"
    assert kt.normalize_gm(messy) == dt.normalize_gm(messy)
    assert "#" not in kt.normalize_gm(messy)


@pytest.mark.parametrize(
    "size,stride,dtype",
    [
        ((92, 4, 64), (1, 5888, 92), torch.float32),
        ((3, 4), (4, 1), torch.int64),
        ((0, 4), (4, 1), torch.float32),
        ((2, 3), (1, 2), torch.float16),
        ((5,), (2,), torch.bool),
    ],
)
def test_rand_strided_matches_torch(size, stride, dtype):
    ours, theirs = kt.rand_strided(size, stride, dtype), dt.rand_strided(size, stride, dtype)
    assert ours.shape == theirs.shape and ours.stride() == theirs.stride() and ours.dtype == theirs.dtype
    assert ours.untyped_storage().nbytes() == theirs.untyped_storage().nbytes()
    assert kt.rand_strided(size, stride, dtype, extra_size=3).untyped_storage().nbytes() == dt.rand_strided(
        size, stride, dtype, extra_size=3
    ).untyped_storage().nbytes()


def test_reset_rng_state_matches_torch():
    kt.reset_rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    dt.reset_rng_state()
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


class _Case(unittest.TestCase):
    def runTest(self):  # pragma: no cover - only used as an assertion holder
        pass


def test_compare_equal_outs_and_grads_passes_and_clears_grads():
    class F(torch.nn.Module):
        def forward(self, x, y):
            return (x * y + 1,)

    x = torch.randn(3, requires_grad=True)
    y = torch.randn(3, requires_grad=True)
    kt.compare_equal_outs_and_grads(_Case(), F(), F(), (x, y))
    assert x.grad is None and y.grad is None


def test_compare_equal_outs_and_grads_detects_difference():
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(AssertionError, match="grads"):
        # same value, different gradient: (t - t.detach()) is 0 but has gradient 1
        kt.compare_equal_outs_and_grads(
            None, lambda t: (t * 2).sum(), lambda t: (t * 2).sum() + (t - t.detach()).sum(), (x,)
        )


def test_outs_and_grads_like_torch():
    pytest.importorskip("expecttest")  # NOTE: torch's common_utils imports it
    from torch.testing._internal.common_utils import outs_and_grads as torch_outs_and_grads

    x = torch.randn(3, requires_grad=True)
    fn = lambda t: (t.sin(), t.cos().sum())  # noqa: E731
    o1, g1 = kt.outs_and_grads(fn, (x,), (x,))
    o2, g2 = torch_outs_and_grads(fn, (x,), (x,))
    assert kt.same(list(o1), list(o2)) and kt.same(g1, g2)
