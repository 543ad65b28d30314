"""``Tensor.register_hook`` on tensors made inside the compiled region, kept in the graph.

A traceable hook becomes a ``register_hook`` node with the hook's body as a subgraph:
eager backends register it for real, AOT traces it into the backward graph. Gradients
equal eager's; a hook that cannot be traced is a graph break with the reason (the hook
is then registered eagerly on the graph's output), never a wrong gradient.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import kiln
from kiln.exc import Unsupported
from kiln.ops.register_hook import register_hook
from kiln.testing import CompileCounter, CompileCounterWithBackend

BACKENDS = ["eager", "aot_eager", "inductor"]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _reset():
    kiln.reset()


def grads(fn, args, loss=lambda out: out.sum()):
    for a in args:
        a.grad = None
    out = fn(*args)
    loss(out).backward()
    return out, [a.grad.clone() for a in args]


def check(fn, *shapes, backend="eager", frames=1, device="cpu", loss=lambda out: out.sum(), tol=None):
    torch.manual_seed(0)
    args = [torch.randn(*s, device=device, requires_grad=True) for s in shapes]
    cnt = CompileCounterWithBackend(backend)
    out, got = grads(kiln.compile(fn, backend=cnt), args, loss)
    ref, want = grads(fn, args, loss)
    kw = {} if tol is None else dict(rtol=tol, atol=tol)
    torch.testing.assert_close(out, ref, **kw)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **kw)
    assert cnt.frame_count == frames
    return cnt


def scale(x):
    y = x * 2
    y.register_hook(lambda g: g * 3)
    return y.sin()


def closes_over_intermediate(x, w):
    y = x @ w
    z = torch.sigmoid(y)
    y.register_hook(lambda g: g * z.detach() + 1)
    return (y * y).sum(dim=0)


def two_hooks_in_order(x):
    y = x.cos()
    y.register_hook(lambda g: g * 2)
    y.register_hook(lambda g: g + 1)
    return y * x


def hook_returns_none(x):
    y = x.exp()
    y.register_hook(lambda g: None)
    return y * 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn,shapes", [(scale, [(4, 4)]), (closes_over_intermediate, [(4, 4), (4, 4)]),
                                       (two_hooks_in_order, [(5,)]), (hook_returns_none, [(3, 2)])])
def test_traceable_hooks_stay_in_the_graph(fn, shapes, backend):
    cnt = check(fn, *shapes, backend=backend)
    targets = [n.target for n in cnt.graphs[0].graph.nodes if n.op == "call_function"]
    assert register_hook in targets
    assert kiln.explain(fn)(*[torch.randn(*s, requires_grad=True) for s in shapes]).graph_break_count == 0


def test_the_hook_runs_in_the_backward_graph():
    """Under AOT the hook's body is part of the backward graph, not of the forward."""
    from kiln.backends import aot_autograd

    graphs = []

    def keep(gm, example):
        graphs.append(gm)
        return gm

    def f(x):
        y = x * 2
        y.register_hook(lambda g: g.neg())
        return y.sum()

    x = torch.randn(3, requires_grad=True)
    kiln.compile(f, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))(x).backward()
    assert torch.equal(x.grad, torch.full((3,), -2.0))
    fw, bw = graphs
    assert not any(n.target is torch.ops.aten.neg.default for n in fw.graph.nodes)
    assert any(n.target is torch.ops.aten.neg.default for n in bw.graph.nodes)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_hooked_tensor_returned_and_used_after_the_graph(backend):
    """The hook sees the whole gradient of the tensor, from inside and outside the graph."""
    def f(x):
        y = x * 3
        y.register_hook(lambda g: g * 10)
        return y, (y * y).sum()

    x = torch.randn(4, requires_grad=True)
    y, s = kiln.compile(f, backend=backend)(x)
    (s + y.sum() * 2).backward()
    got = x.grad.clone()
    x.grad = None
    y, s = f(x)
    (s + y.sum() * 2).backward()
    torch.testing.assert_close(got, x.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hook_inside_a_module_forward(backend):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            h.register_hook(lambda g: g.clamp(-0.1, 0.1))
            return self.b(h)

    torch.manual_seed(0)
    net, ref = Net(), Net()
    ref.load_state_dict(net.state_dict())
    x = torch.randn(16, 8)
    kiln.compile(net, backend=backend)(x).pow(2).sum().backward()
    ref(x).pow(2).sum().backward()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_hook_inside_an_autocast_region(backend):
    def f(x, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = x @ w
            y.register_hook(lambda g: g * 0.5)
            return (y @ w).float()

    # NOTE: eager casts w to bf16 once (autocast's cache) and sums its two gradients in bf16;
    # traced graphs cast it per use (no cache while tracing, as in PyTorch): bf16 tolerance.
    check(f, (8, 8), (8, 8), backend=backend, tol=2e-2)


def test_untraceable_hooks_break_the_graph_with_a_reason():
    seen = []

    def records(x):
        y = x * 2
        y.register_hook(lambda g: seen.append(g))
        return (y * x).sum()

    def prints(x):
        y = x * 2

        def h(g):
            print("grad", g.shape)
            return g + 1

        y.register_hook(h)
        return (y * x).sum()

    for fn, why in ((records, "SideEffects"), (prints, "print")):
        x = torch.randn(4, requires_grad=True)
        ex = kiln.explain(fn)(x)
        assert ex.graph_break_count == 1
        assert "register_hook" in ex.break_reasons[0].reason and why in ex.break_reasons[0].reason
        kiln.reset()
        seen.clear()
        check(fn, (4,), backend="aot_eager", frames=2, loss=lambda out: out)
        assert len(seen) == (2 if fn is records else 0)  # the compiled run's hook and eager's
        with pytest.raises(Unsupported, match="register_hook"):
            kiln.compile(fn, backend="eager", fullgraph=True)(x)


def test_hook_on_a_tensor_without_grad_raises_as_eager():
    def f(x):
        y = x * 2
        y.register_hook(lambda g: g)
        return y

    x = torch.randn(3)
    with pytest.raises(RuntimeError, match="doesn't require gradient"):
        f(x)
    with pytest.raises(RuntimeError, match="doesn't require gradient"):
        kiln.compile(f, backend="eager")(x)


def test_hook_changing_the_gradient_shape_is_refused():
    def f(x):
        y = x * 2
        y.register_hook(lambda g: g.sum())
        return y.sum()

    x = torch.randn(3, requires_grad=True)
    with pytest.raises(Unsupported, match="gradient like its input"):
        kiln.compile(f, backend="eager", fullgraph=True)(x)


@pytest.mark.expect_fallback("handle of a hook registered inside the compiled region")
def test_removing_the_handle_runs_the_frame_eagerly():
    def f(x):
        y = x * 2
        h = y.register_hook(lambda g: g * 100)
        h.remove()
        return (y * 3).sum()

    x = torch.randn(3, requires_grad=True)
    cnt = CompileCounter()
    kiln.compile(f, backend=cnt)(x).backward()
    assert torch.equal(x.grad, torch.full((3,), 6.0))


@CUDA
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_traceable_hooks(backend):
    check(closes_over_intermediate, (16, 16), (16, 16), backend=backend, device="cuda")
    kiln.reset()
    check(two_hooks_in_order, (32,), backend=backend, device="cuda")
