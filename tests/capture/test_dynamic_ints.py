"""Dynamic ints: an int argument whose value changed between compiles becomes a symbolic
graph input (PyTorch's automatic dynamic for scalars), guarded by its type and by the
facts the trace used; dynamic=True makes ints symbolic at once, dynamic=False never."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import kiln
from kiln.testing import CompileCounter, CompileCounterWithBackend


@pytest.fixture(autouse=True)
def _reset():
    kiln.reset()
    yield


def _sym_inputs(gm):
    return [n for n in gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.SymInt)]


def scale_shift(x, n):
    return x * n + n


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_int_becomes_symbolic_after_its_value_changes(backend):
    cnt = CompileCounterWithBackend(backend)
    g = kiln.compile(scale_shift, backend=cnt)
    x = torch.randn(4)
    for n in range(1, 8):
        torch.testing.assert_close(g(x, n), scale_shift(x, n))
    assert cnt.frame_count == 2
    static, dynamic = cnt.graphs
    assert not _sym_inputs(static)
    (sym,) = _sym_inputs(dynamic)
    assert sym.meta["source"] == "L['n']"


def test_inductor_runs_an_int_input():
    cnt = CompileCounterWithBackend("inductor")
    g = kiln.compile(scale_shift, backend=cnt)
    x = torch.randn(8)
    for n in (2, 3, 5, -7, 0):
        torch.testing.assert_close(g(x, n), scale_shift(x, n))
    assert cnt.frame_count == 2


def test_dynamic_true_makes_ints_symbolic_from_the_first_compile():
    cnt = CompileCounterWithBackend("eager")
    g = kiln.compile(scale_shift, backend=cnt, dynamic=True)
    x = torch.randn(4)
    for n in (0, 1, 2, 100):  # NOTE: 0 and 1 are not specialised for ints (as in PyTorch)
        torch.testing.assert_close(g(x, n), scale_shift(x, n))
    assert cnt.frame_count == 1
    assert len(_sym_inputs(cnt.graphs[0])) == 2  # x's size and n


def test_dynamic_false_specialises_every_value():
    cnt = CompileCounter()
    g = kiln.compile(scale_shift, backend=cnt, dynamic=False)
    x = torch.randn(4)
    for n in range(1, 5):
        torch.testing.assert_close(g(x, n), scale_shift(x, n))
    assert cnt.frame_count == 4


def test_automatic_dynamic_off_keeps_ints_static():
    cnt = CompileCounter()
    g = kiln.compile(scale_shift, backend=cnt)
    x = torch.randn(4)
    with kiln.capture.config.patch(automatic_dynamic_shapes=False):
        for n in range(1, 5):
            torch.testing.assert_close(g(x, n), scale_shift(x, n))
    assert cnt.frame_count == 4


def branchy(x, n):
    if n > 3:
        return x + n
    return x - n


def test_python_branch_on_a_symbolic_int_is_guarded():
    cnt = CompileCounter()
    g = kiln.compile(branchy, backend=cnt)
    x = torch.randn(3)
    for n in (1, 2, 5, 6, 7, 0, -4, 3, 4):
        torch.testing.assert_close(g(x, n), branchy(x, n))
    # static n=1; symbolic with n <= 3 (n=2); symbolic with n > 3 (n=5): every later value hits
    assert cnt.frame_count == 3


def test_int_used_as_a_size():
    def f(x, n):
        return x.view(n, -1).sum(0) + torch.ones(n).sum()

    cnt = CompileCounterWithBackend("aot_eager")
    g = kiln.compile(f, backend=cnt)
    for n in (2, 4, 8, 16):
        x = torch.randn(32)
        torch.testing.assert_close(g(x, n), f(x, n))
    assert cnt.frame_count == 2


def test_int_in_a_list_argument():
    def f(x, dims):
        return x * dims[0] - dims[1]

    cnt = CompileCounter()
    g = kiln.compile(f, backend=cnt)
    x = torch.randn(3)
    for a in range(4):
        torch.testing.assert_close(g(x, [a, 7]), f(x, [a, 7]))
    assert cnt.frame_count == 2
    torch.testing.assert_close(g(x, [3, 8]), f(x, [3, 8]))  # the other int changed: once more
    assert cnt.frame_count == 3


def test_int_returned_and_computed_in_python():
    def f(x, n):
        return x + n, n * 2 + 1, n

    g = kiln.compile(f, backend="eager")
    x = torch.randn(2)
    for n in (1, 2, 9, -3):
        out, m, same = g(x, n)
        torch.testing.assert_close(out, x + n)
        assert m == n * 2 + 1 and type(m) is int
        assert same == n and type(same) is int


def test_int_crosses_a_graph_break():
    def f(x, n):
        y = x * n
        print("", end="")  # noqa: T201 - a graph break
        return y + n

    cnt = CompileCounter()
    g = kiln.compile(f, backend=cnt)
    x = torch.randn(3)
    for n in (1, 2, 3, 4):
        torch.testing.assert_close(g(x, n), f(x, n))
    # NOTE: two frames (root and resume), each compiled static once and symbolic once
    assert cnt.frame_count == 4


def test_a_float_or_bool_after_ints_is_a_guard_failure_not_a_wrong_answer():
    cnt = CompileCounter()
    g = kiln.compile(scale_shift, backend=cnt)
    x = torch.randn(3)
    for n in (1, 2, 3):
        g(x, n)
    assert cnt.frame_count == 2
    torch.testing.assert_close(g(x, 2.5), scale_shift(x, 2.5))
    torch.testing.assert_close(g(x, True), scale_shift(x, True))
    assert cnt.frame_count == 4


def test_range_over_a_symbolic_int_specialises():
    def f(x, n):
        for _ in range(n):
            x = x + 1
        return x

    cnt = CompileCounter()
    g = kiln.compile(f, backend=cnt)
    x = torch.zeros(2)
    for n in (1, 2, 3, 2):
        torch.testing.assert_close(g(x, n), f(x, n))
    assert cnt.frame_count == 3  # n=2 is guarded equal to 2 and hit again


class Scaled(torch.nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x):
        return x * self.k


def test_module_int_attributes_stay_static():
    m = Scaled(1)
    cnt = CompileCounterWithBackend("eager")
    g = kiln.compile(m, backend=cnt)
    x = torch.randn(3)
    for k in (1, 2, 3):
        m.k = k
        torch.testing.assert_close(g(x), x * k)
    assert cnt.frame_count == 3
    assert not any(_sym_inputs(gm) for gm in cnt.graphs)


K = 1


def uses_global(x):
    return x * K


def test_global_ints_stay_static():
    global K
    cnt = CompileCounterWithBackend("eager")
    g = kiln.compile(uses_global, backend=cnt)
    x = torch.randn(3)
    try:
        for K in (1, 2, 3):
            torch.testing.assert_close(g(x), x * K)
    finally:
        K = 1
    assert cnt.frame_count == 3
    assert not any(_sym_inputs(gm) for gm in cnt.graphs)


def test_numpy_shapes_from_an_int():
    # NOTE: PyTorch's test_graph_break_correctly_when_passing_numpy_ndarray_to_torch_function.
    def fn(x: int, y: torch.Tensor):
        ndarray = np.stack([np.ones([2, x])], axis=0)
        tensor = torch.as_tensor(ndarray, dtype=torch.long)
        tensor.unsqueeze_(0)
        return tensor + y

    cnt = CompileCounter()
    g = kiln.compile(fn, backend=cnt)
    for x in range(1, 10):
        y = torch.randn([1, 2, x])
        torch.testing.assert_close(g(x, y), fn(x, y))
    assert cnt.frame_count == 2


def test_export_keeps_int_inputs_static():
    def f(x, n):
        return x + n

    gm, _ = kiln.capture.export(f)(torch.ones(2), 3)
    assert not _sym_inputs(gm)
    torch.testing.assert_close(gm(torch.ones(2), 3)[0] if isinstance(gm(torch.ones(2), 3), (tuple, list))
                               else gm(torch.ones(2), 3), torch.ones(2) + 3)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_gradients_through_a_symbolic_int(backend):
    def f(x, n):
        return (x * n).sin().sum() + n

    cnt = CompileCounterWithBackend(backend)
    g = kiln.compile(f, backend=cnt)
    for n in (1, 2, 3, -2):
        x = torch.randn(4, requires_grad=True)
        xe = x.detach().clone().requires_grad_(True)
        out, ref = g(x, n), f(xe, n)
        out.backward()
        ref.backward()
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(x.grad, xe.grad)
    assert cnt.frame_count == 2
    assert _sym_inputs(cnt.graphs[1])


def test_inductor_size_from_an_int():
    def f(x, n):
        return x.view(n, -1).sum(0) * n

    cnt = CompileCounterWithBackend("inductor")
    g = kiln.compile(f, backend=cnt)
    for n in (2, 4, 8, 16):
        x = torch.randn(32)
        torch.testing.assert_close(g(x, n), f(x, n))
    assert cnt.frame_count == 2
