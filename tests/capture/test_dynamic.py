"""Dynamic shapes in capture: automatic dynamic, dynamic=True/False, ShapeEnv guards,
SymInt graph inputs, sizes across graph breaks, and end-to-end runs with eager/aot_eager."""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

import kiln
from kiln.testing import CompileCounter, CompileCounterWithBackend

from entry_helpers import _entries  # noqa: E402


@pytest.fixture(autouse=True)
def _reset():
    kiln.reset()
    yield


def _sym_placeholders(gm):
    return [n for n in gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.SymInt)]


def f_view(x):
    return torch.sin(x).view(x.shape[0] * 2, -1) + x.size(1)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_automatic_dynamic_compiles_twice(backend):
    cnt = CompileCounterWithBackend(backend)
    g = kiln.compile(f_view, backend=cnt)
    for n in (4, 6, 10, 3, 17):
        x = torch.randn(n, 8)
        torch.testing.assert_close(g(x), f_view(x))
    assert cnt.frame_count == 2
    assert len(_entries(g)) == 2
    static, dynamic = cnt.graphs
    assert not _sym_placeholders(static)
    syms = _sym_placeholders(dynamic)
    assert len(syms) == 1  # only dim 0 changed; dim 1 stays static
    x_val = [n for n in dynamic.graph.nodes if n.op == "placeholder"][-1].meta["val"]
    assert isinstance(x_val.shape[0], torch.SymInt) and x_val.shape[1] == 8


def test_dynamic_true_compiles_once_and_specialises_one():
    cnt = CompileCounter()
    g = kiln.compile(f_view, backend=cnt, dynamic=True)
    for n in (4, 6, 10, 3):
        x = torch.randn(n, 8)
        torch.testing.assert_close(g(x), f_view(x))
    assert cnt.frame_count == 1
    x = torch.randn(1, 8)  # size 1 is specialised (like PyTorch's ShapeEnv): a new entry
    torch.testing.assert_close(g(x), f_view(x))
    assert cnt.frame_count == 2


def test_dynamic_false_is_static():
    cnt = CompileCounter()
    g = kiln.compile(f_view, backend=cnt, dynamic=False)
    for n in (4, 6, 10):
        x = torch.randn(n, 8)
        torch.testing.assert_close(g(x), f_view(x))
    assert cnt.frame_count == 3


def test_many_sizes_stay_under_cache_limit():
    cnt = CompileCounter()
    g = kiln.compile(lambda x: x * 2 + 1, backend=cnt)
    for n in range(2, 30):
        x = torch.randn(n)
        torch.testing.assert_close(g(x), x * 2 + 1)
    assert cnt.frame_count == 2


def test_branch_on_size_is_guarded():
    def f(x):
        if x.shape[0] > 5:
            return x + 1
        return x - 1

    cnt = CompileCounter()
    g = kiln.compile(f, backend=cnt, dynamic=True)
    for n in (4, 3, 5):
        x = torch.randn(n)
        torch.testing.assert_close(g(x), f(x))
    assert cnt.frame_count == 1
    for n in (8, 9, 2):
        x = torch.randn(n)
        torch.testing.assert_close(g(x), f(x))
    assert cnt.frame_count == 2


def test_python_use_of_size_specialises():
    def f(x):
        out = x
        for i in range(x.shape[0]):
            out = out + i
        return out

    cnt = CompileCounter()
    g = kiln.compile(f, backend=cnt, dynamic=True)
    for n in (3, 4, 3):
        x = torch.randn(n)
        torch.testing.assert_close(g(x), f(x))
    assert cnt.frame_count == 2


def test_duck_sizing_guards_equality():
    def f(x, y):
        return torch.cat([x, y]) * x.shape[0]

    cnt = CompileCounter()
    g = kiln.compile(f, backend=cnt, dynamic=True)
    a, b = torch.randn(4), torch.randn(4)
    torch.testing.assert_close(g(a, b), f(a, b))
    assert "y.size(0) == (x.size(0))" in _entries(g)[0].__kiln_source__
    a, b = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(g(a, b), f(a, b))
    assert cnt.frame_count == 1
    a, b = torch.randn(5), torch.randn(7)
    torch.testing.assert_close(g(a, b), f(a, b))
    assert cnt.frame_count == 2


def test_size_returned_and_live_across_graph_break():
    def f(x):
        n = x.shape[0] * 3
        y = x.sum() + n
        print("", end="")
        return x * n, n, y

    g = kiln.compile(f, backend="eager", dynamic=True)
    for k in (4, 6, 9):
        x = torch.randn(k, 2)
        out, n, y = g(x)
        eo, en, ey = f(x)
        assert n == en and type(n) is int
        torch.testing.assert_close(out, eo)
        torch.testing.assert_close(y, ey)


def test_guard_fail_reason_for_shape_guard():
    reasons = []

    def f(x):
        return x.view(2, -1) if x.shape[0] % 2 == 0 else x + 1

    g = kiln.optimize("eager", guard_fail_fn=lambda fail: reasons.append(fail.reason), dynamic=True)(f)
    g(torch.randn(4))
    g(torch.randn(6))
    assert reasons == []
    x = torch.randn(5)
    torch.testing.assert_close(g(x), f(x))
    assert reasons and "L['x'].size()[0]" in reasons[0]


def test_mlp_training_aot_eager():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    ref = copy.deepcopy(mlp)
    cnt = CompileCounterWithBackend("aot_eager")
    g = kiln.compile(mlp, backend=cnt)
    for n in (4, 6, 10, 3):
        x = torch.randn(n, 8, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        g(x).pow(2).sum().backward()
        ref(x2).pow(2).sum().backward()
        torch.testing.assert_close(x.grad, x2.grad)
        for p, q in zip(mlp.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
    assert cnt.frame_count == 2
    # parameters keep static shapes
    dyn_graph = cnt.graphs[1]
    assert len(_sym_placeholders(dyn_graph)) == 1


def _zoo():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "models"))
    import zoo

    return zoo


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_gpt2_varying_sequence_length(backend):
    pytest.importorskip("transformers")
    model, _, _ = _zoo().gpt2()
    cnt = CompileCounterWithBackend(backend)
    g = kiln.compile(model, backend=cnt)
    with torch.no_grad():
        for t in (16, 12, 20, 9):
            ids = torch.randint(0, 128, (2, t))
            torch.testing.assert_close(g(ids).logits, model(ids).logits)
    assert cnt.frame_count <= 2


def test_nanogpt_varying_sequence_length():
    model, _, _ = _zoo().nanogpt_generate_step()
    cnt = CompileCounterWithBackend("aot_eager")
    g = kiln.compile(model, backend=cnt)
    with torch.no_grad():
        for t in (16, 12, 9, 7):
            ids = torch.randint(0, 64, (2, t))
            torch.testing.assert_close(g(ids)[0], model(ids)[0])
    assert cnt.frame_count <= 2


def test_static_only_backend_keeps_static_shapes():
    # NOTE: TorchScript types untyped graph inputs as Tensors: sizes stay static for it.
    g = kiln.compile(f_view, backend="ts")
    for n in (4, 6, 10):
        x = torch.randn(n, 8)
        torch.testing.assert_close(g(x), f_view(x))
    assert len(_entries(g)) == 3


def test_strided_view_input_falls_back_to_static():
    def f(x):
        return (x * 2).sum(0) + x.shape[1]

    g = kiln.compile(f, backend="eager", dynamic=True)
    for n in (4, 6, 4):
        x = torch.randn(n, 5, 2)[..., 0]  # stride 10 is not a product of sizes
        torch.testing.assert_close(g(x), f(x))
    for n in (4, 6, 9):
        x = torch.randn(n, 5).t()
        torch.testing.assert_close(g(x), f(x))


def test_automatic_dynamic_can_be_turned_off():
    cnt = CompileCounter()
    g = kiln.compile(f_view, backend=cnt)
    with kiln.capture.config.patch(automatic_dynamic_shapes=False):
        for n in (4, 6, 10):
            x = torch.randn(n, 8)
            torch.testing.assert_close(g(x), f_view(x))
    assert cnt.frame_count == 3


def test_nanogpt_training_varying_sequence_length():
    model, _, _ = _zoo().nanogpt()
    ref = copy.deepcopy(model)
    cnt = CompileCounterWithBackend("aot_eager")
    g = kiln.compile(model, backend=cnt)
    for t in (16, 12, 9):
        ids = torch.randint(0, 64, (2, t + 1))
        a, b = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        loss, ref_loss = g(a, b)[1], ref(a, b)[1]
        loss.backward()
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4)
        model.zero_grad()
        ref.zero_grad()
    assert cnt.frame_count == 2
