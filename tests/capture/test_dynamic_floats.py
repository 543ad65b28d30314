"""Unspecialized floats: a float argument is a constant on the first compile and, once its
value changed, a graph input (a 0-d float64 tensor read back with ``.item()``), as PyTorch's
capture does with ``specialize_float=False``."""
import math

import pytest
import torch

import kiln
from kiln.testing import CompileCounter


def setup_function(_):
    kiln.reset()


def test_a_float_argument_becomes_dynamic_after_it_changed():
    cnt = CompileCounter()

    def f(x, y):
        if y == 5.0:
            return x + 2
        return x + y

    cf = kiln.compile(f, backend=cnt, fullgraph=True)
    x = torch.randn(3)
    for y, frames in [(2.0, 1), (3.0, 2), (4.0, 2), (4.5, 2), (5.0, 3)]:
        torch.testing.assert_close(cf(x, y), f(x, y))
        assert cnt.frame_count == frames, (y, cnt.frame_count)


def test_nan_is_a_constant_of_its_own_entry():
    cnt = CompileCounter()

    def f(x, y):
        return x * y

    cf = kiln.compile(f, backend=cnt)
    x = torch.randn(3)
    cf(x, 1.0)
    cf(x, 2.0)
    assert cnt.frame_count == 2
    torch.testing.assert_close(cf(x, math.nan), f(x, math.nan), equal_nan=True)
    assert cnt.frame_count == 3
    torch.testing.assert_close(cf(x, math.nan), f(x, math.nan), equal_nan=True)
    # NOTE: infinities pass the dynamic entry (as in PyTorch: only NaN is guarded out)
    torch.testing.assert_close(cf(x, math.inf), f(x, math.inf))
    torch.testing.assert_close(cf(x, 7.0), f(x, 7.0))
    assert cnt.frame_count == 3


def test_an_infinite_float_on_the_first_calls_is_a_constant():
    cnt = CompileCounter()

    def f(x, y):
        return x * y

    cf = kiln.compile(f, backend=cnt)
    x = torch.randn(3)
    torch.testing.assert_close(cf(x, math.inf), f(x, math.inf))
    torch.testing.assert_close(cf(x, -math.inf), f(x, -math.inf))
    torch.testing.assert_close(cf(x, math.inf), f(x, math.inf))
    assert cnt.frame_count == 2


def test_the_graph_takes_the_float_as_a_tensor_and_reads_it_with_item():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm

    def f(x, y):
        return x + y

    cf = kiln.compile(f, backend=backend)
    x = torch.randn(3)
    cf(x, 1.0)
    torch.testing.assert_close(cf(x, 2.5), x + 2.5)
    gm, example = graphs[-1]
    assert any(isinstance(e, torch.Tensor) and e.dim() == 0 and e.dtype == torch.float64 for e in example)
    assert [n.target for n in gm.graph.nodes if n.op == "call_method"] == ["item"]


def test_float_arithmetic_returned_to_python_is_computed_by_the_graph():
    cnt = CompileCounter()

    def f(x, y):
        return x * y, y * 2 + 1

    cf = kiln.compile(f, backend=cnt, fullgraph=True)
    x = torch.randn(3)
    cf(x, 1.0)
    out, z = cf(x, 3.0)
    assert type(z) is float and z == 7.0
    torch.testing.assert_close(out, x * 3.0)
    # NOTE: item, mul (tensor), mul and add (floats), scalar_tensor for the float output
    assert cnt.op_count == 1 + 5


def test_float_attributes_of_a_config_object_become_dynamic():
    class Cfg:
        def __init__(self) -> None:
            self.val = 0.5
            self.count = 3

    def fn(x, cfg):
        for _ in range(cfg.count):
            x = x + cfg.val
        return x

    cnt = CompileCounter()
    cf = kiln.compile(fn, backend=cnt)
    a, b = Cfg(), Cfg()
    a.val = 1.0
    v = cf(torch.zeros(1), a)
    v = cf(v, b)
    b.val = 2.0
    v = cf(v, b)
    assert v.item() == 3 + 1.5 + 6
    assert cnt.frame_count == 2


# NOTE: kiln's code generator does not take symbolic floats yet: the ATen graphs run eagerly.
@pytest.mark.expect_fallback("SymFloat")
def test_a_float_under_aot_eager_and_inductor():
    x = torch.randn(4, requires_grad=True)

    def f(x, y):
        return (x * y).sin() + y

    for backend in ("aot_eager", "inductor"):
        kiln.reset()
        cf = kiln.compile(f, backend=backend)
        for y in (0.5, 1.5, 2.5):
            got = cf(x, y)
            torch.testing.assert_close(got, f(x, y))
            (g,) = torch.autograd.grad(got.sum(), x)
            (e,) = torch.autograd.grad(f(x, y).sum(), x)
            torch.testing.assert_close(g, e, msg=lambda m: f"{backend} {y} {g} {e}")


def test_an_int_passed_where_a_float_was_recompiles():
    cnt = CompileCounter()

    def f(x, y):
        return x + y

    cf = kiln.compile(f, backend=cnt)
    x = torch.ones(2, dtype=torch.int64)
    cf(x, 1.0)
    cf(x, 2.0)
    got = cf(x, 3)
    assert got.dtype == torch.int64 and got.tolist() == [4, 4]
