"""kiln.ops.while_loop: eager, under make_fx in every mode, functionalized, through AOT
(forward and backward) and through codegen."""
import pytest
import torch

import kiln
from kiln.aot.partition import min_cut_rematerialization_partition
from kiln.codegen import compile_fx, metrics
from kiln.ops import while_loop
from kiln.tracing import make_fx

from hop_helpers import _aot, _calls  # noqa: E402

MODES = ["real", "fake", "symbolic"]


def _cond(i, x, w):
    return i < 3


def _body(i, x, w):
    return i + 1, (x * w).sin()


def _unrolled(x, w, n=3):
    for _ in range(n):
        x = (x * w).sin()
    return x


def _loop(i, x, w):
    return while_loop(_cond, _body, (i, x), (w,))



def test_eager_runs_until_cond_is_false():
    x, w = torch.randn(4), torch.randn(4)
    i, y = _loop(torch.tensor(0), x, w)
    assert i.item() == 3
    torch.testing.assert_close(y, _unrolled(x, w))


def test_eager_loop_that_never_runs_returns_clones():
    x, w = torch.randn(4), torch.randn(4)
    i0 = torch.tensor(5)
    i, y = _loop(i0, x, w)
    torch.testing.assert_close(y, x)
    assert y is not x and y.data_ptr() != x.data_ptr() and i is not i0


def test_eager_int_carry_and_python_bool_cond():
    out = while_loop(lambda n, x: n < 4, lambda n, x: (n + 1, x * 2), (0, torch.ones(2)))
    assert out[0] == 4
    torch.testing.assert_close(out[1], torch.full((2,), 16.0))


def test_eager_grads_flow_through_every_iteration():
    x = torch.randn(4, requires_grad=True)
    w = torch.randn(4, requires_grad=True)
    _, y = _loop(torch.tensor(0), x, w)
    got = torch.autograd.grad(y.sum(), (x, w))
    want = torch.autograd.grad(_unrolled(x, w).sum(), (x, w))
    torch.testing.assert_close(got, want)


def test_body_output_mismatch_is_a_clear_error():
    bad = lambda i, x: (i + 1, x.sum())  # noqa: E731
    with pytest.raises(kiln.exc.Unsupported, match=r"body_fn output 1 has shape=\[\].*carried input 1 has "
                                                    r"shape=\[3\]"):
        while_loop(lambda i, x: i < 2, bad, (torch.tensor(0), torch.randn(3)))
    with pytest.raises(kiln.exc.Unsupported, match="returns 1 values but there are 2 carried inputs"):
        make_fx(lambda i, x: while_loop(lambda i, x: i < 2, lambda i, x: (i + 1,), (i, x)),
                tracing_mode="fake")(torch.tensor(0), torch.randn(3))
    with pytest.raises(kiln.exc.Unsupported, match="dtype=torch.float64"):
        make_fx(lambda i, x: while_loop(lambda i, x: i < 2, lambda i, x: (i + 1, x.double()), (i, x)),
                tracing_mode="symbolic")(torch.tensor(0), torch.randn(3))


def test_cond_must_return_a_boolean_scalar():
    with pytest.raises(RuntimeError, match="cond_fn must return a boolean scalar tensor"):
        while_loop(lambda x: x, lambda x: (x,), (torch.randn(3),))
    with pytest.raises(RuntimeError, match="carried_inputs must be a tuple or list"):
        while_loop(lambda x: x.sum() > 0, lambda x: (x,), torch.randn(3))


def test_int_carry_under_fake_tracing_says_what_to_do():
    with pytest.raises(kiln.exc.Unsupported, match="int carried input"):
        make_fx(lambda x: while_loop(lambda n, x: n < 2, lambda n, x: (n + 1, x), (0, x)),
                tracing_mode="fake")(torch.randn(3))


@pytest.mark.parametrize("mode", MODES)
def test_traces_one_node_with_two_subgraphs(mode):
    i, x, w = torch.tensor(0), torch.randn(4), torch.randn(4)
    gm = make_fx(_loop, tracing_mode=mode)(i, x, w)
    (node,) = _calls(gm, while_loop)
    assert node.args[0].op == "get_attr" and node.args[1].op == "get_attr"
    assert [n.target for n in gm.while_loop_body_graph_0.graph.nodes if n.op == "call_function"] == \
        [torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor, torch.ops.aten.sin.default]
    assert len(node.args[2]) == 2 and len(node.args[3]) == 1
    for start in (0, 1, 5):
        got = gm(torch.tensor(start), x, w)
        want = _loop(torch.tensor(start), x, w)
        torch.testing.assert_close(tuple(got), want)


def test_closure_tensors_become_additional_inputs():
    def f(i, x):
        z = x * 3  # a tensor of the outer trace, read by the body only

        return while_loop(lambda i, a: i < 2, lambda i, a: (i + 1, a + z), (i, x))

    i, x = torch.tensor(0), torch.randn(3)
    gm = make_fx(f, tracing_mode="fake")(i, x)
    (node,) = _calls(gm, while_loop)
    assert len(node.args[3]) == 1
    for sub in (gm.while_loop_cond_graph_0, gm.while_loop_body_graph_0):
        assert len([n for n in sub.graph.nodes if n.op == "placeholder"]) == 3
    torch.testing.assert_close(gm(i, x)[1], x + 2 * (x * 3))


def test_same_tensor_as_carry_and_additional_input():
    x = torch.randn(4)
    gm = make_fx(_loop, tracing_mode="fake")(torch.tensor(0), x, x)
    torch.testing.assert_close(gm(torch.tensor(0), x, x)[1], _unrolled(x, x))



def _grads(out, wrt):
    gs = torch.autograd.grad(out.sum(), wrt, allow_unused=True)
    return tuple(torch.zeros_like(w) if g is None else g for g, w in zip(gs, wrt))


@pytest.mark.parametrize("partition", [None, min_cut_rematerialization_partition])
@pytest.mark.parametrize("start", [0, 2, 3])
def test_aot_forward_and_backward_loops(start, partition):
    def f(i, x, w):
        return _loop(i, x, w)[1]

    g, graphs = _aot(f, partition)
    x = torch.randn(4, requires_grad=True)
    w = torch.randn(4, requires_grad=True)
    i = torch.tensor(start)
    out = g(i, x, w)
    got = _grads(out, (x, w))
    ref = f(i, x, w)
    want = _grads(ref, (x, w))  # NOTE: w is unused when the loop never runs: zeros
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(got, want)
    assert len(graphs) == 2 and all(_calls(gm, while_loop) for gm in graphs)


def test_aot_grad_of_additional_input_only():
    def f(i, x, w):
        return _loop(i, x, w)[1]

    g, _ = _aot(f)
    x = torch.randn(4)
    w = torch.randn(4, requires_grad=True)
    (got,) = torch.autograd.grad(g(torch.tensor(0), x, w).sum(), (w,))
    (want,) = torch.autograd.grad(_unrolled(x, w).sum(), (w,))
    torch.testing.assert_close(got, want)


def test_functionalized_body_with_inplace_ops_on_its_own_tensors():
    def body(i, x):
        y = x.clone()
        y.mul_(2).add_(1)
        return i + 1, y

    def f(i, x):
        return while_loop(lambda i, x: i < 3, body, (i, x))[1]

    g, graphs = _aot(f)
    x = torch.randn(3, requires_grad=True)
    out = g(torch.tensor(0), x)
    torch.testing.assert_close(out, ((x * 2 + 1) * 2 + 1) * 2 + 1)
    for gm in graphs:
        for name, sub in gm.named_children():
            assert not any(str(n.target).endswith("_.Tensor") or str(n.target).endswith("_.Scalar")
                           for n in sub.graph.nodes), name


def test_functionalized_body_that_writes_its_input_is_refused():
    def body(i, x):
        x.add_(1)
        return i + 1, x.clone()

    def f(i, x):
        return while_loop(lambda i, x: i < 3, body, (i, x))[1]

    g, _ = _aot(f)
    with pytest.raises(kiln.exc.FunctionalizationError, match="mutates its input"):
        g(torch.tensor(0), torch.randn(3, requires_grad=True))


def test_codegen_compiles_the_subgraphs():
    i, x, w = torch.tensor(0), torch.randn(64), torch.randn(64)
    gm = make_fx(_loop, tracing_mode="fake")(i, x, w)
    metrics.reset()
    compiled = compile_fx(gm, [i, x, w])
    assert metrics.generated_kernel_count > 0
    for start in (0, 2):
        torch.testing.assert_close(tuple(compiled(torch.tensor(start), x, w)), _loop(torch.tensor(start), x, w))


def test_codegen_body_returning_another_layout():
    # the body returns a transpose: the carry is copied back into its first layout
    def f(i, x):
        return while_loop(lambda i, x: i < 3, lambda i, x: (i + 1, x.t() * 2 + 1), (i, x))

    x = torch.randn(8, 8)
    gm = make_fx(f, tracing_mode="fake")(torch.tensor(0), x)
    compiled = compile_fx(gm, [torch.tensor(0), x])
    want = x
    for _ in range(3):
        want = want.t() * 2 + 1
    torch.testing.assert_close(tuple(compiled(torch.tensor(0), x))[1], want)
    torch.testing.assert_close(f(torch.tensor(0), x)[1], want)
