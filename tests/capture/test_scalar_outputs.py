"""Tensor data read into Python inside compiled code: ``Tensor.tolist()``, ``Tensor.item()``,
``torch._check*`` and ``assert`` on such values (capture/variables/scalars.py).

As in PyTorch's capture: ``tolist()`` of an integer tensor is always traced (one ``item``
node per element, an unbacked SymInt in Python); ``item()`` only under
``kiln.capture.config.capture_scalar_outputs``; a Python decision on such a value is a
graph break; unbacked values leave the graph as Python numbers.  kiln's inductor runs
graphs holding unbacked symbols through aot_eager, with the reason recorded.
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import kiln
from kiln.capture import config
from kiln.exc import TorchRuntimeError, Unsupported
from kiln.testing import CompileCounter, CompileCounterWithBackend

UNBACKED = "unbacked symbols"
BACKENDS = ["eager", "aot_eager",
            pytest.param("inductor", marks=pytest.mark.expect_fallback(UNBACKED))]


@pytest.fixture(autouse=True)
def _reset():
    kiln.reset()
    yield
    kiln.reset()


def _plain(src: str):
    """The function defined by ``src``, compiled outside this module: pytest rewrites the
    ``assert`` statements of test modules, and these tests are about plain ones."""
    ns: dict = {"torch": torch}
    exec(compile(src, "<scalar outputs test>", "exec"), ns)
    return ns["f"]


def _targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def times_four(x):
    out = []
    for i in x.tolist():
        out.append(i * 4)
    return out


# ---------------------------------------------------------------------------- tolist
@pytest.mark.parametrize("backend", BACKENDS)
def test_tolist_of_an_int_tensor_is_one_graph_for_every_value(backend):
    cnt = CompileCounterWithBackend(backend)
    f = kiln.compile(times_four, backend=cnt, fullgraph=True)
    for x in (torch.tensor([2, 1]), torch.tensor([7, -3]), torch.tensor([0, 5], dtype=torch.int32)):
        got = f(x)
        assert got == times_four(x) and all(type(v) is int for v in got)
    # NOTE: the int32 input is a new dtype (one recompile); new values never recompile
    assert cnt.frame_count == 2
    assert _targets(cnt.graphs[0]).count("item") == 2


def test_tolist_of_0d_and_nested_tensors():
    def f(x):
        return x.tolist()

    cnt = CompileCounter()
    g = kiln.compile(f, backend=cnt, fullgraph=True)
    assert g(torch.tensor(42)) == 42 and type(g(torch.tensor(42))) is int
    nested = torch.tensor([[[2, 1], [3, 4]], [[5, 6], [7, 8]]])
    assert g(nested) == nested.tolist()
    assert cnt.frame_count == 2


def test_elements_of_tolist_nothing_uses_leave_the_graph():
    def f(x):
        li = x.tolist()
        return li[0][1] + x

    cnt = CompileCounter()
    x = torch.tensor([[1, 2, 3], [4, 5, 6]])
    torch.testing.assert_close(kiln.compile(f, backend=cnt, fullgraph=True)(x), f(x))
    assert cnt.op_count == 4  # NOTE: x[0], x[0][1], item, add


def test_tolist_of_a_float_tensor_breaks_with_the_reason():
    def f(x):
        return [v * 2 for v in (x + 1).tolist()]

    x = torch.tensor([1.5, 2.5])
    ex = kiln.explain(f)(x)
    assert [r.reason for r in ex.break_reasons] == ["call to Tensor.tolist"]
    assert kiln.compile(f, backend="eager")(x) == f(x)
    with pytest.raises(Unsupported, match="torch.float32"):
        kiln.compile(f, backend="eager", fullgraph=True)(x)


# ---------------------------------------------------------------------------- item
def test_item_breaks_unless_capture_scalar_outputs():
    def f(a, b):
        return (a + b).sum().item()

    a, b = torch.randn(4), torch.randn(4)
    ex = kiln.explain(f)(a, b)
    assert [r.reason for r in ex.break_reasons] == ["call to Tensor.item"]
    with pytest.raises(Unsupported, match="capture_scalar_outputs"):
        kiln.compile(f, backend="eager", fullgraph=True)(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@config.patch(capture_scalar_outputs=True)
def test_item_is_captured_under_the_switch(backend):
    def f(a, b):
        return (a + b).sum().item()

    cnt = CompileCounterWithBackend(backend)
    g = kiln.compile(f, backend=cnt, fullgraph=True)
    for _ in range(3):
        a, b = torch.randn(10, 10), torch.randn(10, 10)
        got = g(a, b)
        assert type(got) is float and got == pytest.approx(f(a, b), rel=1e-5)
    assert cnt.frame_count == 1
    # NOTE: PyTorch's graph: add, sum, item, and scalar_tensor to return the float
    assert cnt.op_count == 4 and torch.scalar_tensor in _targets(cnt.graphs[0])


@config.patch(capture_scalar_outputs=True)
def test_backend_of_a_graph_reading_data_gets_fake_inputs_and_static_graphs_real_ones():
    seen = []

    def backend(gm, example_inputs):
        seen.append([type(x) for x in example_inputs])
        return gm

    kiln.compile(lambda x: x.sum().item(), backend=backend)(torch.randn(3))
    kiln.compile(lambda x: x.sum() + 1, backend=backend)(torch.randn(3))
    assert seen == [[FakeTensor], [torch.Tensor]]


@pytest.mark.parametrize("backend", BACKENDS)
@config.patch(capture_scalar_outputs=True)
def test_unbacked_sizes_in_factories_cat_and_slices(backend):
    def f(x, n, idx):
        y = n.item()
        torch._check_is_size(y)
        a, b = idx.tolist()
        z = torch.cat([x, torch.ones(y)]) * 2
        return z, torch.arange(0, y) + 1, torch.zeros(y, 2).sum(0), x[a:b].sum(), a + b

    cnt = CompileCounterWithBackend(backend)
    g = kiln.compile(f, backend=cnt, fullgraph=True)
    for y, idx in ((2, [0, 2]), (5, [1, 3]), (0, [2, 2])):
        args = (torch.randn(3), torch.tensor([y]), torch.tensor(idx))
        got, want = g(*args), f(*args)
        for u, v in zip(got, want):
            torch.testing.assert_close(u, v)
    assert cnt.frame_count == 1


@pytest.mark.parametrize("backend", BACKENDS)
@config.patch(capture_scalar_outputs=True)
def test_item_in_a_training_graph(backend):
    def f(x, w):
        s = (x * w).sum().item()
        return (x * w * s).sum()

    cnt = CompileCounterWithBackend(backend)
    g = kiln.compile(f, backend=cnt, fullgraph=True)
    x = torch.randn(5)
    w1, w2 = torch.randn(5, requires_grad=True), None
    w2 = w1.detach().clone().requires_grad_(True)
    g(x, w1).backward()
    f(x, w2).backward()
    torch.testing.assert_close(w1.grad, w2.grad)
    assert cnt.frame_count == 1


# ---------------------------------------------------------------------------- checks
@pytest.mark.parametrize("backend", BACKENDS)
@config.patch(capture_scalar_outputs=True)
def test_torch_check_is_a_runtime_assert(backend):
    def f(x):
        y = x.item()
        torch._check(y >= 0)
        torch._check(x.shape[0] == 1)
        return torch.arange(0, y)

    cnt = CompileCounterWithBackend(backend)
    g = kiln.compile(f, backend=cnt, fullgraph=True)
    torch.testing.assert_close(g(torch.tensor([3])), torch.arange(3))
    torch.testing.assert_close(g(torch.tensor([4])), torch.arange(4))
    with pytest.raises(RuntimeError, match="u0 >= 0"):
        g(torch.tensor([-1]))
    assert cnt.frame_count == 1
    assert torch.ops.aten._assert_scalar.default in _targets(cnt.graphs[0])


@pytest.mark.parametrize("backend", BACKENDS)
@config.patch(capture_scalar_outputs=True)
def test_assert_on_a_value_read_from_data_stays_in_the_graph(backend):
    f = _plain("def f(x):\n"
               "    v = x.sum().item()\n"
               "    assert v > -100.0, 'too small'\n"
               "    return x * 2\n")

    cnt = CompileCounterWithBackend(backend)
    g = kiln.compile(f, backend=cnt, fullgraph=True)
    torch.testing.assert_close(g(torch.ones(3)), torch.ones(3) * 2)
    with pytest.raises(RuntimeError, match="Runtime assertion failed"):
        g(torch.full((3,), -50.0))
    assert cnt.frame_count == 1


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_assert_on_a_tensor_condition_is_assert_async(backend):
    f = _plain("def f(x):\n"
               "    b = x.sin()\n"
               "    assert x[0] == 3, 'First dim need to be 3'\n"
               "    return x.cos() + b\n")

    cnt = CompileCounterWithBackend(backend)
    g = kiln.compile(f, backend=cnt, fullgraph=True)
    x = torch.tensor([3.0, 4.0, 5.0])
    torch.testing.assert_close(g(x), f(x))
    assert cnt.frame_count == 1 and cnt.op_count == 6
    assert torch._assert_async in _targets(cnt.graphs[0])
    with pytest.raises(RuntimeError, match="First dim need to be 3"):
        g(torch.tensor([1.0, 4.0, 5.0]))


# ---------------------------------------------------------------------------- data-dependent guards
@config.patch(capture_scalar_outputs=True)
def test_a_branch_on_a_value_read_from_data_breaks_with_the_reason():
    def f(x):
        y = x.item()
        torch._check_is_size(y)
        if y == 0:
            return x - 1
        return x + 1

    with pytest.raises(Unsupported, match=r"data-dependent guard on Eq\(u0, 0\)"):
        kiln.compile(f, backend="eager", fullgraph=True)(torch.tensor([3]))
    kiln.reset()
    cnt = CompileCounter()
    g = kiln.compile(f, backend=cnt)
    for v in (3, 0, 5):
        x = torch.tensor([v])
        torch.testing.assert_close(g(x), f(x))
    # NOTE: the first graph returns the condition; each branch is a resume function
    assert cnt.frame_count == 3
    ex = kiln.explain(f)(torch.tensor([3]))
    assert "data-dependent guard on Eq(u0, 0)" in ex.break_reasons[0].reason


@config.patch(capture_scalar_outputs=True)
def test_data_dependent_guard_inside_a_callee():
    # NOTE: PyTorch's test_unspec.py::test_data_dependent_evaluate_expr_graph_break
    def test(y):
        if y > 2:
            return True
        else:
            return False

    def fn(x):
        x = x + 1
        y = x.item()
        if test(y):
            return x * 2
        else:
            return x * 3

    cnt = CompileCounter()
    torch.testing.assert_close(kiln.compile(fn, backend=cnt)(torch.tensor([3.0])), torch.tensor([8.0]))
    assert (cnt.frame_count, cnt.op_count) == (2, 4)


@config.patch(capture_scalar_outputs=True)
def test_an_op_invalid_for_unbacked_sizes_raises_as_pytorch_does():
    def fn(x, y):
        z = y.item()
        return torch.cat([x, torch.ones(z)])

    g = kiln.compile(fn, backend="eager")
    # NOTE: eager skips the empty 1-d ones(0); for an unbacked size the compiled function
    # cannot, and raises (as torch.compile does)
    for v in (0, 1):
        with pytest.raises(TorchRuntimeError, match="cat"):
            g(torch.randn(2, 3), torch.tensor([v]))


@config.patch(capture_scalar_outputs=True)
def test_torch_tensor_of_traced_values():
    def fn(x, n):
        return torch.tensor([x, n.item()], dtype=torch.int64)

    cnt = CompileCounter()
    g = kiln.compile(fn, backend=cnt)
    torch.testing.assert_close(g(torch.tensor(20), torch.tensor([3])), torch.tensor([20, 3]))
    assert cnt.frame_count == 1


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@config.patch(capture_scalar_outputs=True)
def test_item_with_dynamic_shapes(backend):
    def f(x):
        n = x.max().item()
        return torch.zeros(n, x.shape[0]).sum(0) + n

    cnt = CompileCounterWithBackend(backend)
    g = kiln.compile(f, backend=cnt, dynamic=True)
    for x in (torch.tensor([1, 4, 2]), torch.tensor([7, 2, 2, 5])):
        torch.testing.assert_close(g(x), f(x))
    assert cnt.frame_count == 1


# ---------------------------------------------------------------------------- unbacked input sizes
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_mark_unbacked_dims_are_size_oblivious(backend):
    from torch.fx.experimental.symbolic_shapes import guard_size_oblivious

    def f(x):
        if guard_size_oblivious(x.size(0) != 1):
            return x + 3
        return x + 4

    x = torch.randn(1)
    x._dynamo_unbacked_indices = {0}  # NOTE: what torch._dynamo.mark_unbacked(x, 0) sets
    cnt = CompileCounterWithBackend(backend)
    g = kiln.compile(f, backend=cnt)
    # NOTE: PyTorch's answer: an unbacked size is never 1 to size-oblivious reasoning
    torch.testing.assert_close(g(x), x + 3)
    for n in (0, 5):
        y = torch.randn(n)
        torch.testing.assert_close(g(y), y + 3)
    assert cnt.frame_count == 1


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_automatic_dynamic_shapes_mark_as_unbacked(backend):
    def f(x):
        return x * x

    for mark, frames in (("dynamic", 4), ("unbacked", 2)):
        kiln.reset()
        cnt = CompileCounterWithBackend(backend)
        g = kiln.compile(f, backend=cnt)
        with config.patch(automatic_dynamic_shapes_mark_as=mark):
            for n in (3, 2, 1, 0):
                x = torch.randn(n)
                torch.testing.assert_close(g(x), x * x)
        # NOTE: backed symbols specialise sizes 0 and 1 (an entry each); unbacked ones do not
        assert cnt.frame_count == frames, mark
