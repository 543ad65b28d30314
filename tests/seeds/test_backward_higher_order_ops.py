"""Seed 002 (test_backward_higher_order_ops), ported to kiln's API.

trace_wrapped for tensor backward hooks.  The spelling of the higher-order
op in printed graphs is kiln's (`kiln_ops_trace_wrapped_self_invoke`).
"""
import pytest
import torch

import kiln
from kiln.ops import trace_wrapped
from kiln.testing import normalize_gm
from kiln.tracing import make_fx


def _multiply(x):
    return x * x


def _multiply_invoke(grad):
    return trace_wrapped(grad, fn=_multiply)


def test_invoke_in_eager():
    x = torch.tensor([0.5, 0.5], requires_grad=True)
    y = torch.tensor([0.5, 0.5], requires_grad=True)

    def fn(x, y):
        x.register_hook(_multiply_invoke)
        return x * y

    out = fn(x, y)
    grad_out = torch.tensor([2.0, 2.0])
    out.backward(grad_out)
    assert torch.equal(x.grad, y * grad_out)


def test_invoke_in_pt2():
    for backend in ["eager", "aot_eager", "inductor"]:
        kiln.reset()
        x = torch.tensor([0.5, 0.5], requires_grad=True)
        y = torch.tensor([0.5, 0.5], requires_grad=True)

        def fn(x, y):
            x.register_hook(_multiply_invoke)
            return x * y

        fn = kiln.optimize(backend)(fn)
        out = fn(x, y)
        grad_out = torch.tensor([2.0, 2.0])
        out.backward(grad_out)
        assert torch.equal(x.grad, grad_out * y)


EXPECTED = '''\
class _multiply_invoke(torch.nn.Module):
    def forward(self, grad_1: "f32[2]"):
        trace_wrapped: "f32[2]" = kiln_ops_trace_wrapped_self_invoke(grad_1);  grad_1 = None
        return trace_wrapped
'''


def test_invoke_make_fx_forward_contrived():
    x = torch.tensor([0.5, 0.5], requires_grad=True)
    out = make_fx(_multiply_invoke)(x)
    assert torch.equal(out(x), torch.tensor([0.25, 0.25]))
    actual = normalize_gm(out.print_readable(False))
    assert actual == EXPECTED, actual


def test_invoke_make_bw():
    x = torch.tensor([0.5, 0.5], requires_grad=True)

    def fwd(x):
        z = x * x
        return z + z

    res = fwd(x)
    res.backward(torch.tensor([1.0, 1.0]))
    out = make_fx(_multiply_invoke)(x.grad)
    assert torch.equal(out(x.grad), torch.tensor([4.0, 4.0]))
    actual = normalize_gm(out.print_readable(False))
    assert actual == EXPECTED, actual


def test_invoke_in_pt2_compiled_autograd():
    from kiln import compiled_autograd

    graph = None

    def compiler_fn(gm):
        def inner_compiler(gm_, example_inputs_):
            nonlocal graph
            assert graph is None
            graph = gm_
            return kiln.backends.lookup_backend("inductor")(gm_, example_inputs_)

        return kiln.compile(gm, backend=inner_compiler, fullgraph=True, dynamic=True)

    for backend in ["eager", "aot_eager", "inductor"]:
        kiln.reset()
        x = torch.tensor([0.5, 0.5], requires_grad=True)
        y = torch.tensor([0.5, 0.5], requires_grad=True)

        def fn(x, y):
            x.register_hook(_multiply_invoke)
            return x + y

        fn = kiln.optimize(backend)(fn)
        out = fn(x, y)
        grad_out = torch.tensor([2.0, 2.0])
        with compiled_autograd.enable(compiler_fn):
            out.backward(grad_out)
        actual = normalize_gm(graph.print_readable(False))
        assert torch.equal(x.grad, grad_out * grad_out)
        # NOTE: PyTorch's graph takes the list ``inputs`` as one placeholder and unpacks it
        # (``getitem = l_inputs_[0]``); kiln's capture lifts each tensor of the list as its
        # own placeholder, named after its source (``L['inputs'][0]`` -> ``l_inputs_0_``).
        # The structure is the seed's: clone of the incoming gradient (y's fresh .grad),
        # the hook's trace_wrapped body inlined (grad * grad), clone of that (x's .grad).
        assert "torch.clone(l_inputs_0_)" in actual and "l_inputs_0_ * l_inputs_0_" in actual, actual
        # Nodes are named after the locals they are stored to (as in the seed: ``result``, ``new_grad``).
        assert "result: \"f32[s" in actual and "torch.clone(result)" in actual, actual
        assert "return (new_grad, new_grad_1)" in actual, actual
        graph = None


def test_invoke_in_pt2_compiled_autograd_graph_breaks():
    from kiln import compiled_autograd

    def _graph_breaking_fn(x):
        print("Boo!")
        return _multiply(x)

    def _graph_break_invoke(grad):
        return trace_wrapped(grad, fn=_graph_breaking_fn)

    def compiler_fn(gm):
        return kiln.compile(gm, backend="inductor", fullgraph=True, dynamic=True)

    for backend in ["eager", "aot_eager", "inductor"]:
        kiln.reset()
        x = torch.tensor([0.5, 0.5], requires_grad=True)
        y = torch.tensor([0.5, 0.5], requires_grad=True)

        def fn(x, y):
            x.register_hook(_graph_break_invoke)
            return x + y

        fn = kiln.optimize(backend, nopython=True)(fn)
        out = fn(x, y)
        grad_out = torch.tensor([2.0, 2.0])
        with pytest.raises(kiln.exc.Unsupported, match="print"):
            with compiled_autograd.enable(compiler_fn):
                out.backward(grad_out)
