"""kiln.ops.map / map_impl: eager, under make_fx in every mode, through AOT (forward and
backward) and through codegen."""
import pytest
import torch

from kiln.aot.partition import min_cut_rematerialization_partition
from kiln.codegen import compile_fx, metrics
from kiln.ops import map as kmap
from kiln.ops import map_impl
from kiln.tracing import make_fx

from hop_helpers import _aot, _calls  # noqa: E402

MODES = ["real", "fake", "symbolic"]


def _body(a, b):
    return (a * b).sin() + b


def _ref(xs, y):
    return torch.stack([_body(x, y) for x in xs])



def test_eager_values_and_pytrees():
    xs, y = torch.randn(5, 3), torch.randn(3)
    torch.testing.assert_close(kmap(_body, xs, y), _ref(xs, y))

    def f(d, k):
        return {"s": d["a"] + d["b"][0] * k, "t": (d["a"].sum(),)}

    d = {"a": torch.randn(4, 2), "b": [torch.randn(4, 2)]}
    out = kmap(f, d, 3)
    torch.testing.assert_close(out["s"], d["a"] + d["b"][0] * 3)
    torch.testing.assert_close(out["t"][0], d["a"].sum(1))
    assert out["s"].is_contiguous()


def test_bad_xs_are_clear_errors():
    with pytest.raises(RuntimeError, match="Leading dimensions of mapped xs must be consistent"):
        kmap(lambda t: t[0] + t[1], (torch.randn(3, 2), torch.randn(4, 2)))
    with pytest.raises(RuntimeError, match="cannot be 0"):
        kmap(lambda t: t, torch.randn(0, 2))
    with pytest.raises(RuntimeError, match="can only consist of tensors"):
        kmap(lambda t: t[0], (torch.randn(3), 2))
    with pytest.raises(RuntimeError, match="must return tensors"):
        kmap(lambda t: 1, torch.randn(3))


def test_eager_grads():
    xs = torch.randn(5, 3, requires_grad=True)
    y = torch.randn(3, requires_grad=True)
    got = torch.autograd.grad(kmap(_body, xs, y).sum(), (xs, y))
    want = torch.autograd.grad(_ref(xs, y).sum(), (xs, y))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("mode", MODES)
def test_traces_one_map_impl_node(mode):
    xs, y = torch.randn(5, 3), torch.randn(3)
    gm = make_fx(lambda xs, y: kmap(_body, xs, y), tracing_mode=mode)(xs, y)
    (node,) = _calls(gm, map_impl)
    assert node.args[0].op == "get_attr" and len(node.args[1]) == 1 and len(node.args[2]) == 1
    assert "map" in node.name
    body = gm.map_body_graph_0
    assert len([n for n in body.graph.nodes if n.op == "placeholder"]) == 2
    xs2 = torch.randn(5, 3)
    torch.testing.assert_close(gm(xs2, y), _ref(xs2, y))


def test_closure_tensor_is_lifted_into_args():
    def f(xs, y):
        z = y * 2  # read by the body, not passed
        return kmap(lambda a: a + z, xs)

    xs, y = torch.randn(4, 3), torch.randn(3)
    gm = make_fx(f, tracing_mode="fake")(xs, y)
    (node,) = _calls(gm, map_impl)
    assert len(node.args[2]) == 1
    torch.testing.assert_close(gm(xs, y), xs + y * 2)



@pytest.mark.parametrize("partition", [None, min_cut_rematerialization_partition])
def test_aot_forward_and_backward_maps(partition):
    def f(xs, y):
        return kmap(_body, xs, y)

    g, graphs = _aot(f, partition)
    xs = torch.randn(5, 3, requires_grad=True)
    y = torch.randn(3, requires_grad=True)
    out = g(xs, y)
    got = torch.autograd.grad((out * out).sum(), (xs, y))
    ref = _ref(xs, y)
    want = torch.autograd.grad((ref * ref).sum(), (xs, y))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(got, want)
    assert len(graphs) == 2 and all(len(_calls(gm, map_impl)) == 1 for gm in graphs)


def test_aot_grad_with_int_arg_and_two_outputs():
    def f(xs, w):
        return kmap(lambda a, k, w: (a * k, (a @ w).relu()), xs, 3, w)

    g, _ = _aot(f)
    xs = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(3, 2, requires_grad=True)
    a, b = g(xs, w)
    got = torch.autograd.grad(a.sum() + b.sum(), (xs, w))
    want = torch.autograd.grad((xs * 3).sum() + (xs @ w).relu().sum(), (xs, w))
    torch.testing.assert_close(got, want)


def test_codegen_compiles_the_body_for_strided_slices():
    xs = torch.randn(3, 16).t()  # slices along dim 0 are strided
    y = torch.randn(3)
    gm = make_fx(lambda xs, y: kmap(_body, xs, y), tracing_mode="fake")(xs, y)
    metrics.reset()
    compiled = compile_fx(gm, [xs, y])
    assert metrics.generated_kernel_count > 0
    out = compiled(xs, y)
    torch.testing.assert_close(out[0] if isinstance(out, (list, tuple)) else out, _ref(xs, y))
