"""kiln.ops.autograd_function_apply: eager with and without autograd, on fakes, under make_fx,
and through AOT's joint trace (the backward body lands in the backward graph)."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from kiln.aot import aot_function
from kiln.ops import autograd_function_apply
from kiln.tracing import make_fx


def fwd(x, y):
    # NOTE: returns (outputs, saved); the backward is deliberately not the derivative
    return (x * y, x.sum()), (x, y)


def bwd(g, gs, x, y):
    return g * y * 10 + gs, g * x


def _ops(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_eager_runs_the_backward_body():
    x, y = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    out, s = autograd_function_apply(fwd, bwd, x, y, non_differentiable_idx=[1])
    assert out.requires_grad and not s.requires_grad and out.grad_fn is not None
    out.sum().backward()
    torch.testing.assert_close(x.grad, y.detach() * 10)
    torch.testing.assert_close(y.grad, x.detach())


def test_without_grad_only_the_forward_runs():
    x, y = torch.randn(3, requires_grad=True), torch.randn(3)
    with torch.no_grad():
        out, s = autograd_function_apply(fwd, bwd, x, y)
    assert not out.requires_grad
    torch.testing.assert_close(out, x.detach() * y)


def test_on_fake_tensors():
    with FakeTensorMode():
        x = torch.empty(2, 3, requires_grad=True)
        out, _ = autograd_function_apply(fwd, bwd, x, torch.empty(2, 3))
    assert out.shape == (2, 3) and out.requires_grad and not out.is_leaf


@pytest.mark.parametrize("mode", ["real", "fake", "symbolic"])
def test_make_fx_inlines_the_forward(mode):
    gm = make_fx(lambda x, y: autograd_function_apply(fwd, bwd, x, y)[0], tracing_mode=mode)(
        torch.randn(3), torch.randn(3))
    assert autograd_function_apply not in _ops(gm)
    assert torch.ops.aten.mul.Tensor in _ops(gm)


def test_aot_puts_the_backward_body_in_the_backward_graph():
    graphs = {}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = gm
            return gm

        return compiler

    f = aot_function(lambda x, y: autograd_function_apply(fwd, bwd, x, y)[0], fw_compiler=keep("fw"),
                     bw_compiler=keep("bw"))
    x, y = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    f(x, y).sum().backward()
    torch.testing.assert_close(x.grad, y.detach() * 10)
    bw_muls = [t for t in _ops(graphs["bw"]) if t == torch.ops.aten.mul.Tensor]
    assert len(bw_muls) >= 2  # g * y * 10 and g * x: the body, not autograd's derivative


def test_backward_body_must_give_one_gradient_per_operand():
    x = torch.randn(3, requires_grad=True)
    out, = autograd_function_apply(lambda a: ((a * 2,), ()), lambda g: (g, g), x)
    with pytest.raises(RuntimeError, match="one per operand"):
        out.sum().backward()
