"""kiln.ops.cond: eager, under make_fx in every mode, and through AOT (forward and backward)."""
import pytest
import torch

from kiln.aot.partition import min_cut_rematerialization_partition
from kiln.ops import checkpoint, cond, wrap
from kiln.tracing import make_fx

from hop_helpers import _aot, _calls  # noqa: E402

MODES = ["real", "fake", "symbolic"]


def _t(a, b):
    return (a.sin() * b,)


def _f(a, b):
    return (a.cos() + b,)



def test_eager_picks_the_branch():
    x, y = torch.randn(3), torch.randn(3)
    torch.testing.assert_close(cond(torch.tensor(True), _t, _f, (x, y))[0], x.sin() * y)
    torch.testing.assert_close(cond(torch.tensor(False), _t, _f, (x, y))[0], x.cos() + y)
    torch.testing.assert_close(cond(False, _t, _f, (x, y))[0], x.cos() + y)


def test_eager_grads():
    x = torch.randn(3, requires_grad=True)
    y = torch.randn(3)
    cond(torch.tensor(True), _t, _f, (x, y))[0].sum().backward()
    torch.testing.assert_close(x.grad, x.detach().cos() * y)


@pytest.mark.parametrize("mode", MODES)
def test_traces_both_branches_as_subgraphs(mode):
    def f(p, x, y):
        return cond(p, _t, _f, (x, y))

    x, y = torch.randn(3), torch.randn(3)
    gm = make_fx(f, tracing_mode=mode)(torch.tensor(True), x, y)
    (node,) = _calls(gm, cond)
    assert node.args[1].op == "get_attr" and node.args[2].op == "get_attr"
    assert [n.target for n in gm.true_graph_0.graph.nodes if n.op == "call_function"] == \
        [torch.ops.aten.sin.default, torch.ops.aten.mul.Tensor]
    torch.testing.assert_close(gm(torch.tensor(False), x, y)[0], x.cos() + y)
    torch.testing.assert_close(gm(torch.tensor(True), x, y)[0], x.sin() * y)


def test_closure_tensors_become_operands_of_both_branches():
    def f(p, x):
        z = x * 3  # a tensor of the outer trace, read by one branch only
        return cond(p, lambda a: (a + z,), lambda a: (a * 2,), (x,))

    x = torch.randn(3)
    gm = make_fx(f, tracing_mode="fake")(torch.tensor(True), x)
    (node,) = _calls(gm, cond)
    assert len(node.args[3]) == 2
    for sub in (gm.true_graph_0, gm.false_graph_0):
        assert len([n for n in sub.graph.nodes if n.op == "placeholder"]) == 2


def test_branches_must_match():
    def f(p, x):
        return cond(p, lambda a: (a.sum(),), lambda a: (a,), (x,))

    with pytest.raises(Exception, match="differs between branches"):
        make_fx(f, tracing_mode="fake")(torch.tensor(True), torch.randn(3))



@pytest.mark.parametrize("partition", [None, min_cut_rematerialization_partition])
@pytest.mark.parametrize("pred", [True, False])
def test_aot_forward_and_backward_conds(pred, partition):
    def f(p, x, y):
        return cond(p, _t, _f, (x, y))[0]

    g, graphs = _aot(f, partition)
    x = torch.randn(3, requires_grad=True)
    y = torch.randn(3, requires_grad=True)
    p = torch.tensor(pred)
    out = g(p, x, y)
    out.sum().backward()
    got = (x.grad.clone(), y.grad.clone())
    x.grad = y.grad = None
    ref = f(p, x, y)
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(got, (x.grad, y.grad))
    assert len(graphs) == 2 and all(len(_calls(gm, cond)) == 1 for gm in graphs)


def test_wrap_and_checkpoint_are_inlined():
    def f(x):
        return wrap(lambda a: a.sin(), x) + checkpoint(lambda a: a.cos(), x)

    gm = make_fx(f)(torch.randn(3))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.aten.sin.default, torch.ops.aten.cos.default, torch.ops.aten.add.Tensor]
    cos = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.cos.default)
    assert cos.meta["recompute"] == "must_recompute"


@pytest.mark.parametrize("partition", [None, min_cut_rematerialization_partition])
def test_checkpoint_region_is_recomputed_not_saved(partition):
    def f(x, w):
        return checkpoint(lambda a, b: torch.relu(a @ b).sin(), x, w).sum()

    g, graphs = _aot(f, partition)
    x = torch.randn(4, 4, requires_grad=True)
    w = torch.randn(4, 4, requires_grad=True)
    out = g(x, w)
    out.backward()
    got = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    f(x, w).backward()
    torch.testing.assert_close(got, (x.grad, w.grad))
    fw, bw = graphs
    saved = [n for n in bw.graph.nodes if n.op == "placeholder" and not n.name.startswith("tangents")]
    assert all(n.name.startswith("primals") for n in saved)
    assert any(n.target is torch.ops.aten.mm.default for n in bw.graph.nodes)
