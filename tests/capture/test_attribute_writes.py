"""Attribute writes in compiled code: ``x.data = y`` (captured as ``set_`` under no_grad,
through AOT and the backends).

Each test compares compiled with eager results (values, Python-side state, gradients)
and checks the frame and graph counts.
"""
from __future__ import annotations

import pytest
import torch

import kiln
from kiln.testing import CompileCounter, CompileCounterWithBackend


@pytest.fixture(autouse=True)
def _reset():
    kiln.reset()
    yield


# ---------------------------------------------------------------- x.data = y
def _set_data_then_add(x, y):
    x.data = y
    x.add_(1)
    return x


def _set_data_twice(x, y):
    x.data = y
    y.data = torch.zeros([0])
    return x


def _set_data_identity(x, y):
    z = x
    x.data = y
    y.data = torch.zeros([0])
    return torch.tensor(x is z)


def _set_data_after_read(x, y):
    w = y * 2  # y is read (and becomes a graph input) before x
    x.data = y
    y.data = torch.zeros([0])
    return x, w


def _inputs(requires_grad, second=None):
    a = torch.ones([6], requires_grad=requires_grad)
    b = (torch.arange(6.0) if second is None else second).requires_grad_(requires_grad)
    return a, b


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
@pytest.mark.parametrize("fn", [_set_data_then_add, _set_data_twice, _set_data_identity, _set_data_after_read],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_set_data_matches_eager(backend, fn, requires_grad):
    if fn is _set_data_then_add and requires_grad:
        pytest.skip("eager refuses add_ on a leaf that requires grad")
    cnt = CompileCounterWithBackend(backend)
    compiled = kiln.compile(fn, backend=cnt, fullgraph=True)
    for _ in range(3):
        ea, eb = _inputs(requires_grad)
        ca, cb = _inputs(requires_grad)
        out_e, out_c = fn(ea, eb), compiled(ca, cb)
        for e, c in [(ea, ca), (eb, cb)]:
            assert e.shape == c.shape and torch.equal(e.detach(), c.detach())
            assert (e.requires_grad, e.is_leaf) == (c.requires_grad, c.is_leaf)
        for e, c in zip(out_e if isinstance(out_e, tuple) else [out_e],
                        out_c if isinstance(out_c, tuple) else [out_c]):
            assert torch.equal(e.detach(), c.detach())
        if fn in (_set_data_then_add, _set_data_twice):
            assert out_c is ca  # the tensor passed in, as in eager
        if requires_grad:
            g = torch.randn(6)
            ea.backward(g)
            ca.backward(g.clone())
            torch.testing.assert_close(ea.grad, ca.grad)
    assert cnt.frame_count == 1


def test_set_data_shares_memory_and_keeps_the_version_counter():
    def fn(x, y):
        x.data = y
        return x * 1

    x, y = torch.zeros(3), torch.arange(3.0)
    compiled = kiln.compile(fn, backend="eager", fullgraph=True)
    out = compiled(x, y)
    assert x.data_ptr() == y.data_ptr() and torch.equal(out, y)
    assert x._version == 0  # `.data =` is no in-place op in eager: no bump


def test_set_data_graph_is_set_under_no_grad():
    cnt = CompileCounterWithBackend("eager")
    kiln.compile(_set_data_twice, backend=cnt, fullgraph=True)(*_inputs(True))
    (gm,) = cnt.graphs
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert calls.count(torch.Tensor.set_) == 2
    i = calls.index(torch.Tensor.set_)
    assert calls[i - 1] is torch._C._set_grad_enabled and calls[i + 1] is torch._C._set_grad_enabled
    # NOTE: x (the object of the first setattr) is the first placeholder, as in PyTorch's graph
    assert [n.name for n in gm.graph.find_nodes(op="placeholder")] == ["l_x_", "l_y_"]


def test_set_data_of_another_dtype_is_a_graph_break():
    cnt = CompileCounter()
    fn = kiln.compile(_set_data_twice, backend=cnt)
    x, y = torch.ones(2), torch.ones(2, dtype=torch.float64)
    out = fn(x, y)
    assert out is x and x.dtype == torch.float64 and y.numel() == 0


def test_set_data_graph_is_not_timed_by_the_profitability_check():
    from kiln.codegen import config, metrics

    with config.patch(profitability_check=True):
        compiled = kiln.compile(_set_data_after_read, backend="inductor", fullgraph=True)
        a, b = _inputs(False)
        out = compiled(a, b)
    assert a.shape == (6,) and torch.equal(a, torch.arange(6.0)) and b.numel() == 0
    torch.testing.assert_close(out[1], torch.arange(6.0) * 2)
    (d,) = metrics.profitability_decisions
    assert d.kept == "compiled" and "set_" in d.why
