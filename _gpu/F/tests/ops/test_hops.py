"""kiln's higher-order ops, in eager and under make_fx in every mode."""
import pytest
import torch

from kiln.ops import (
    HigherOrderOperator, get_effect, has_aliasing, is_effectful, new_token,
    register_effectful_op, strict_mode, trace_wrapped, unregister_effectful_op,
    with_effects,
)
from kiln.tracing import make_fx

MODES = ["real", "fake", "symbolic"]


def _calls(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


# ---- with_effects ----------------------------------------------------------

def test_with_effects_eager_prints_and_returns_token(capfd):
    tok, out = with_effects(new_token(), torch.ops.aten._print.default, "moo")
    assert isinstance(tok, torch.Tensor) and tok.numel() == 0
    assert out is None
    assert "moo" in capfd.readouterr().out


def test_with_effects_spreads_tuple_outputs():
    tok, vals, idx = with_effects(new_token(), torch.ops.aten.max.dim, torch.tensor([1., 5., 2.]), 0)
    assert vals.item() == 5.0 and idx.item() == 1


@pytest.mark.parametrize("mode", MODES)
def test_with_effects_traces_as_one_node(mode, capfd):
    def f(token, x):
        token, _ = with_effects(token, torch.ops.aten._print.default, "moo")
        y = x + x
        token, _ = with_effects(token, torch.ops.aten._print.default, "moo")
        return token, y

    gm = make_fx(f, tracing_mode=mode)(new_token(), torch.randn(3))
    nodes = _calls(gm, with_effects)
    assert len(nodes) == 2
    # the second effect consumes the token the first produced: a data dependence
    assert nodes[1].args[0].args[0] is nodes[0]
    capfd.readouterr()
    x = torch.randn(3)
    tok, y = gm(new_token(), x)
    assert capfd.readouterr().out.count("moo") == 2
    torch.testing.assert_close(y, x + x)


def test_with_effects_refuses_aliasing_ops():
    def f(token, x):
        return with_effects(token, torch.ops.aten.absolute_.default, x)

    with pytest.raises(AssertionError, match="Ops with aliasing is not supported"):
        make_fx(f)(torch.tensor([]), torch.tensor(4))
    with pytest.raises(AssertionError, match="Ops with aliasing is not supported"):
        f(torch.tensor([]), torch.tensor(4))


def test_effect_registry():
    assert is_effectful(torch.ops.aten._print.default)
    assert not is_effectful(torch.ops.aten.add.Tensor)
    assert has_aliasing(torch.ops.aten.add_.Tensor)
    with torch.library._scoped_library("kilnfx", "FRAGMENT") as lib:
        torch.library.define("kilnfx::log", "(Tensor x) -> Tensor", lib=lib)
        lib.impl("log", lambda x: x.clone(), "CompositeExplicitAutograd")
        op = torch.ops.kilnfx.log.default
        assert get_effect(op) is None
        register_effectful_op("kilnfx::log")
        try:
            assert is_effectful(op)
        finally:
            unregister_effectful_op(op)
        assert not is_effectful(op)


@pytest.mark.parametrize("mode", MODES)
def test_opaque_object_op_is_effectful_and_traced(mode):
    # NOTE: the seed's torchbind class lives in a C++ test library that the
    # wheel does not ship; the same path is an op taking an opaque object,
    # marked effectful, threaded through with_effects.
    with torch.library._scoped_library("kilnfx", "FRAGMENT") as lib:
        torch.library.define("kilnfx::takes_obj", "(Tensor x, int scale) -> Tensor", lib=lib)
        lib.impl("takes_obj", lambda x, s: x * s, "CompositeExplicitAutograd")
        op = torch.ops.kilnfx.takes_obj.default
        register_effectful_op(op)
        try:
            def f(token, x):
                token, y = with_effects(token, op, x, 3)
                return token, x + y

            gm = make_fx(f, tracing_mode=mode)(new_token(), torch.ones(2, 3))
            (node,) = _calls(gm, with_effects)
            assert node.args[1] is op
            _, out = gm(new_token(), torch.ones(2, 3))
            torch.testing.assert_close(out, torch.full((2, 3), 4.0))
        finally:
            unregister_effectful_op(op)


# ---- trace_wrapped ---------------------------------------------------------

def _square(x):
    return x * x


def test_trace_wrapped_eager_and_autograd():
    x = torch.tensor([0.5, 0.5], requires_grad=True)
    y = trace_wrapped(x, fn=_square)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize("mode", MODES)
def test_trace_wrapped_is_opaque_under_tracing(mode):
    calls = []

    def hook(g):
        calls.append(1)
        return g * 3

    gm = make_fx(lambda g: trace_wrapped(g, fn=hook), tracing_mode=mode)(torch.ones(2))
    if mode != "real":
        assert calls == []  # not run while tracing with fake tensors
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert len(nodes) == 1 and nodes[0].name == "trace_wrapped"
    calls.clear()
    torch.testing.assert_close(gm(torch.ones(2)), torch.full((2,), 3.0))
    assert calls == [1]


def test_trace_wrapped_bad_input():
    with pytest.raises(TypeError, match="needs a callable"):
        trace_wrapped(torch.ones(1), fn=None)


# ---- strict_mode -----------------------------------------------------------

def _body(a, b):
    return (a.sin() + b, a * b)


def test_strict_mode_eager():
    a, b = torch.randn(3), torch.randn(3)
    out = strict_mode(_body, (a, b))
    torch.testing.assert_close(out[0], a.sin() + b)


@pytest.mark.parametrize("mode", MODES)
def test_strict_mode_traces_subgraph(mode):
    def f(x):
        return strict_mode(_body, (x, x + 1))

    gm = make_fx(f, tracing_mode=mode)(torch.randn(3))
    (node,) = _calls(gm, strict_mode)
    sub = getattr(gm, node.args[0].target)
    assert isinstance(sub, torch.fx.GraphModule)
    assert torch.ops.aten.sin.default in [n.target for n in sub.graph.nodes]
    x = torch.randn(3)
    torch.testing.assert_close(gm(x)[0], f(x)[0])


def test_strict_mode_bad_operands():
    with pytest.raises(TypeError, match="tuple or list"):
        strict_mode(_body, torch.randn(3))


def test_unknown_dispatch_key():
    op = HigherOrderOperator("thing")
    with pytest.raises(ValueError, match="unknown HOP dispatch key"):
        op.py_impl("autograd_cpu")
