"""kiln.aot's API: compilers, lazy backward, double backward, grad mode, export
signatures, partitioners, node metadata, config, errors."""
from __future__ import annotations

import pytest
import torch

from kiln import exc
from kiln.exc import FallbackWarning
from kiln.aot import (
    DOUBLE_BACKWARD_ERROR,
    aot_export_joint_simple,
    aot_export_module,
    aot_function,
    aot_module,
    aot_module_simplified,
    config,
    default_partition,
    make_boxed_func,
    min_cut_rematerialization_partition,
    nop,
)

aten = torch.ops.aten


@pytest.fixture(autouse=True)
def _grad_mode():
    prev = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(prev)


class Recorder:
    """A compiler that keeps the graphs it was given."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return make_boxed_func(gm)


def test_backward_is_compiled_lazily():
    fw, bw = Recorder(), Recorder()
    f = aot_function(lambda x: x.sin().sum(), fw, bw)
    x = torch.randn(3, requires_grad=True)
    out = f(x)
    assert len(fw.graphs) == 1 and len(bw.graphs) == 0
    out.backward()
    assert len(bw.graphs) == 1
    torch.testing.assert_close(x.grad, x.cos())
    f(x).backward()
    assert len(fw.graphs) == 1 and len(bw.graphs) == 1  # cached


def test_inference_graph_when_no_grad_needed():
    fw = Recorder()
    f = aot_function(lambda x: x * 2, fw)
    out = f(torch.randn(3))
    assert not out.requires_grad
    assert not any("tangents" in n.name for n in fw.graphs[0].graph.nodes)


def test_duplicate_args_are_deduplicated():
    fw = Recorder()
    f = aot_function(lambda a, b: a * b, fw)
    x = torch.randn(3, requires_grad=True)
    out = f(x, x)
    out.sum().backward()
    assert len([n for n in fw.graphs[0].graph.nodes if n.op == "placeholder"]) == 1
    torch.testing.assert_close(x.grad, 2 * x.detach())


def test_double_backward_raises_and_single_backward_works():
    for grad_output in (torch.tensor(1.0, requires_grad=True), None):
        f = aot_function(lambda x: x.sin().exp(), nop)
        x = torch.tensor(1.0, requires_grad=True)
        y = f(x)
        (gx,) = torch.autograd.grad(y, x, create_graph=True, grad_outputs=grad_output)
        with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD_ERROR):
            torch.autograd.grad(gx, x)
    x = torch.tensor(1.0, requires_grad=True)
    (gx,) = torch.autograd.grad(f(x), x, create_graph=False)
    torch.testing.assert_close(gx, x.cos() * x.sin().exp())


def test_grad_mode_change_leaks_out_like_eager():
    def f(x):
        y = x * x
        torch.set_grad_enabled(False)
        return y.clone(), y

    torch.set_grad_enabled(True)
    x = torch.ones(3, requires_grad=True) * 3
    y_ref = f(x)
    assert torch.is_grad_enabled() is False
    torch.set_grad_enabled(True)
    y = aot_function(f, nop)(x)
    assert torch.is_grad_enabled() is False
    torch.set_grad_enabled(True)
    assert y_ref[0].grad_fn is None and y[0].grad_fn is None
    assert y_ref[1].grad_fn is not None and y[1].grad_fn is not None
    g = torch.tensor([-1.0, 2.0, 0.0])
    ref = sum(y_ref[1].grad_fn(g))
    got = sum(t for t in y[1].grad_fn.apply(None, g) if t is not None)
    torch.testing.assert_close(ref, got)


def test_min_cut_saves_fewer_tensors_than_default_with_equal_grads():
    def chain(x):
        return x.sin().cos().mul(2).exp().tanh()

    results = {}
    for name, part in (("default", default_partition), ("min_cut", min_cut_rematerialization_partition)):
        fw = Recorder()
        x = torch.randn(1000, requires_grad=True)
        with torch.no_grad():
            x.copy_(torch.linspace(-1, 1, 1000))
        aot_function(chain, fw, partition_fn=part)(x).sum().backward()
        out_node = fw.graphs[0].graph.output_node()
        results[name] = (len(out_node.args[0]) - 1, x.grad.clone())
    assert results["min_cut"][0] < results["default"][0]
    torch.testing.assert_close(results["min_cut"][1], results["default"][1])


def test_node_meta_original_aten_and_seq_nr():
    fw, bw = Recorder(), Recorder()
    f = aot_function(lambda x, w: (x @ w).relu().sum(), fw, bw)
    x, w = torch.randn(2, 3), torch.randn(3, 4, requires_grad=True)
    f(x, w).backward()
    fw_nodes = [n for n in fw.graphs[0].graph.nodes if n.op == "call_function"]
    bw_nodes = [n for n in bw.graphs[0].graph.nodes if n.op == "call_function"]
    assert all("original_aten" in n.meta and "seq_nr" in n.meta for n in fw_nodes + bw_nodes)
    mm = next(n for n in fw_nodes if n.target is aten.mm.default)
    assert any(n.meta["seq_nr"] == mm.meta["seq_nr"] for n in bw_nodes if n.target is aten.mm.default)


def test_config_patch_context_and_decorator():
    assert config.unlift_effect_tokens is False
    with config.patch(unlift_effect_tokens=True):
        assert config.unlift_effect_tokens is True
    assert config.unlift_effect_tokens is False

    @config.patch("debug_assert", True)
    def inner():
        return config.debug_assert

    assert inner() is True and config.debug_assert is False
    with pytest.raises(AttributeError, match="no option"):
        with config.patch(not_an_option=1):
            pass


def test_aot_module_tracks_parameter_updates():
    torch.manual_seed(0)
    mod = torch.nn.Linear(3, 2)
    compiled = aot_module(mod, nop)
    x = torch.randn(4, 3)
    compiled(x).sum().backward()
    g = mod.weight.grad.clone()
    mod.zero_grad()
    mod(x).sum().backward()
    torch.testing.assert_close(g, mod.weight.grad)
    with torch.no_grad():
        mod.weight.add_(1)
    torch.testing.assert_close(compiled(x), mod(x))


def test_aot_module_simplified_checks_duplicates():
    class M(torch.nn.Module):
        def forward(self, a, b):
            return (a + b,)

    x = torch.randn(3)
    f = aot_module_simplified(M(), [x, x], nop)
    torch.testing.assert_close(f(x, x)[0], 2 * x)
    with pytest.raises(AssertionError, match="duplicate"):
        f(x, torch.randn(3))


def test_debug_assert_requires_grad_mismatch():
    class M(torch.nn.Module):
        def forward(self, a):
            return (a * 2,)

    f = aot_module_simplified(M(), [torch.randn(3, requires_grad=True)], nop)
    with config.patch(debug_assert=True):
        with pytest.raises(AssertionError, match="requires_grad"):
            f(torch.randn(3))


def test_export_module_joint_signature():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)
            self.register_buffer("steps", torch.zeros(()))

        def forward(self, x):
            self.steps.add_(1)
            return (self.lin(x).sum(), x * 2)

    gm, sig = aot_export_module(M(), (torch.randn(4, 3),), trace_joint=True, output_loss_index=0)
    assert sig.parameters == ["lin.weight", "lin.bias"]
    assert sig.buffers == ["steps"]
    assert len(sig.user_inputs) == 1 and len(sig.user_outputs) == 2
    assert list(sig.buffers_to_mutate.values()) == ["steps"]
    bw = sig.backward_signature
    assert sorted(bw.gradients_to_parameters.values()) == ["lin.bias", "lin.weight"]
    assert bw.loss_output == sig.user_outputs[0]
    outs = [getattr(o, "name", None) for o in gm.graph.output_node().args[0]]
    assert set(bw.gradients_to_parameters) <= set(outs)
    assert not any(getattr(n.target, "_schema", None) is not None and n.target._schema.is_mutable
                   for n in gm.graph.nodes if n.op == "call_function")


def test_export_joint_simple_runs():
    def f(x, w):
        return (x @ w).tanh(),

    x, w = torch.randn(2, 3), torch.randn(3, 4, requires_grad=True)
    gm = aot_export_joint_simple(f, [x, w], trace_joint=False)
    torch.testing.assert_close(gm(x, w)[0], f(x, w)[0])
    joint = aot_export_joint_simple(f, [x, w], trace_joint=True)
    tangent = torch.randn(2, 4)
    outs = joint(x, w, tangent)  # primals, then tangents
    w2 = w.detach().clone().requires_grad_()
    f(x, w2)[0].backward(tangent)
    torch.testing.assert_close(outs[-1], w2.grad)


def test_export_joint_simple_refuses_input_mutation():
    def f(x):
        x.add_(1)
        return (x * 2,)

    with pytest.raises(exc.FunctionalizationError, match="mutate"):
        aot_export_joint_simple(f, [torch.randn(3)], trace_joint=False)


def test_untraceable_backward_is_a_kiln_error():
    class Bad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return torch.from_numpy(g.numpy() * 2)

    f = aot_function(lambda x: Bad.apply(x), nop)
    with pytest.raises(exc.TracingError) as info:
        f(torch.randn(3, requires_grad=True))
    assert "backward" in str(info.value) and "test_aot_api.py" in str(info.value)


@pytest.mark.expect_fallback("runs eagerly: DynamicOutputShapeException: aten.nonzero.default")
def test_data_dependent_ops_fall_back_to_eager():
    def f(x):
        return x[x > 0].sum() * 2

    x = torch.randn(10)
    with pytest.warns(FallbackWarning, match="eagerly"):
        out = aot_function(f, nop)(x)
    torch.testing.assert_close(out, f(x))
    with config.patch(fallback_to_eager_on_data_dependence=False):
        with pytest.raises(Exception):
            aot_function(f, nop)(x)


def test_effectful_ops_print_once_per_call_in_order(capfd):
    def f(x):
        torch.ops.aten._print("first")
        y = x + 1
        torch.ops.aten._print("second")
        return y

    g = aot_function(f, nop)
    capfd.readouterr()
    g(torch.randn(2))
    g(torch.randn(2, requires_grad=True)).sum().backward()
    assert capfd.readouterr().out.split() == ["first", "second", "first", "second"]


def test_mutated_leaf_under_no_grad_keeps_no_grad_fn():
    p = torch.nn.Parameter(torch.randn(4))
    y = torch.randn(4)
    before = p.detach().clone()

    def f(param, y):
        with torch.no_grad():
            param.add_(y)
        return y

    aot_function(f, nop)(p, y)
    torch.testing.assert_close(p.detach(), before + y)
    assert p.grad_fn is None and p.is_leaf


def test_source_meta_flows_from_graph_module_to_fw_and_bw_nodes():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x):
            return (self.lin(x).relu(),)

    gm = torch.fx.symbolic_trace(M())
    for n in gm.graph.nodes:
        if n.op in ("call_module", "call_function", "call_method"):
            n.meta["source_fn_stack"] = [(n.name, n.target)]
    fw, bw = Recorder(), Recorder()
    f = aot_module_simplified(gm, [torch.randn(2, 3)], fw, bw)
    f(torch.randn(2, 3))[0].sum().backward()
    fw_srcs = {n.meta["source_fn_stack"][0][0] for n in fw.graphs[0].graph.nodes
               if "source_fn_stack" in n.meta}
    assert {"lin", "relu"} <= fw_srcs
    bw_nodes = [n for n in bw.graphs[0].graph.nodes if n.op == "call_function"]
    assert any("source_fn_stack" in n.meta for n in bw_nodes)


@pytest.mark.expect_fallback("shares memory with another input")
def test_mutated_input_sharing_memory_with_another_input_matches_eager():
    def f(x, y):
        x.add_(1)
        return y * 2

    base = torch.zeros(4)
    ref = f(base, base[:2])
    base = torch.zeros(4)
    with pytest.warns(FallbackWarning, match="shares memory"):
        out = aot_function(f, nop)(base, base[:2])
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(aot_function(f, nop)(torch.zeros(4), torch.zeros(2)), torch.zeros(2))

    class M(torch.nn.Module):
        def forward(self, x, y):
            x.add_(1)
            return (y * 2,)

    g = aot_module_simplified(M(), [torch.zeros(4), torch.zeros(2)], nop)
    base = torch.zeros(4)
    torch.testing.assert_close(g(base, base[:2])[0], ref)


@pytest.mark.expect_fallback("is not an argument")
def test_closed_over_tensor_requiring_grad_runs_eagerly_with_its_grad():
    w = torch.randn(3, requires_grad=True)

    def f(x):
        return (x * w).sum()

    x = torch.randn(3)
    with pytest.warns(FallbackWarning, match="not an argument"):
        out = aot_function(f, nop)(x)
    out.backward()
    torch.testing.assert_close(w.grad, x)


def test_aot_function_on_a_module_lifts_parameters():
    torch.manual_seed(0)
    mod = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    aot_function(mod, nop)(x).sum().backward()
    assert mod.weight.grad is not None
    torch.testing.assert_close(mod.bias.grad, torch.full((2,), 4.0))


def test_inference_mode_inputs_and_calls():
    def f(x):
        x.add_(1)
        return x.view(-1) * 2

    with torch.inference_mode():
        a = torch.randn(2, 3)
        b = a.clone()
        ref = f(a)
        out = aot_function(f, nop)(b)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(b, a)
    c = torch.randn(2, 3)
    d = c.clone()
    with torch.inference_mode():
        torch.testing.assert_close(aot_function(f, nop)(d), f(c))
    torch.testing.assert_close(c, d)


def test_aot_module_simplified_compiled_without_grad_then_needs_grad():
    # NOTE: compiled while grad mode was off, then called with grad on: the
    # training graphs are compiled then; outputs get a grad_fn and correct grads.
    class M(torch.nn.Module):
        def forward(self, a):
            return (a.sin(),)

    x = torch.randn(3, requires_grad=True)
    with torch.no_grad():
        f = aot_module_simplified(M(), [x], nop)
        assert f(x)[0].grad_fn is None
    out = f(x)[0]
    assert out.grad_fn is not None
    out.sum().backward()
    torch.testing.assert_close(x.grad, x.detach().cos())


def test_aot_module_simplified_leaves_callers_grad_mode():
    class M(torch.nn.Module):
        def forward(self, a):
            return (a * 2,)

    x = torch.randn(3, requires_grad=True)
    f = aot_module_simplified(M(), [x], nop)
    with torch.no_grad():
        out = f(x)[0]
        assert torch.is_grad_enabled() is False
    assert out.grad_fn is None


def test_aot_module_simplified_sees_reassigned_parameter():
    lin = torch.nn.Linear(3, 2)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, a):
            return (self.lin(a),)

    m, x = M(), torch.randn(4, 3)
    f = aot_module_simplified(m, [x], nop)
    lin.weight = torch.nn.Parameter(torch.randn(2, 3))
    torch.testing.assert_close(f(x)[0], m(x)[0])


def test_aot_function_output_structures():
    f = aot_function(lambda a, b: (a + b, [a * b], {"k": a - b}), nop)
    g = aot_function(lambda a: a + 1, nop)
    a, b = torch.randn(3), torch.randn(3)
    s, (p,), d = f(a, b)
    torch.testing.assert_close(s, a + b)
    torch.testing.assert_close(p, a * b)
    torch.testing.assert_close(d["k"], a - b)
    torch.testing.assert_close(g(a), a + 1)
    assert isinstance(g(a), torch.Tensor)


def test_training_graphs_for_symbolic_inputs_stay_symbolic():
    # compiled for symbolic fakes with grad off; the first call that needs
    # gradients compiles the training graphs, which must still take any size.
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from kiln.aot import aot_module_simplified, nop

    class M(torch.nn.Module):
        def forward(self, x):
            return (x.sin().reshape(x.shape[0] * x.shape[1]) * 2,)

    mode = FakeTensorMode(shape_env=ShapeEnv(), static_shapes=False)
    fake = mode.from_tensor(torch.randn(4, 3))
    with torch.no_grad():
        compiled = aot_module_simplified(M(), [fake], nop)
    for n in (5, 7):
        x = torch.randn(n, 3, requires_grad=True)
        (out,) = compiled(x)
        out.sum().backward()
        assert out.shape == (n * 3,)
        torch.testing.assert_close(x.grad, 2 * x.detach().cos())


def test_output_shape_disagreeing_with_captured_graph_is_an_error():
    """A captured graph whose recorded output shape differs from what the ATen trace gives
    (a buggy decomposition in some PyTorch release) fails the compile, never runs wrong."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kiln.aot import aot_module_simplified
    from kiln.exc import TracingError

    def f(x):
        return (x.sum(0),)

    gm = torch.fx.symbolic_trace(f)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with FakeTensorMode():
        out.args[0][0].meta["val"] = torch.empty(3, 1)  # the true shape is (3,)
    with pytest.raises(TracingError, match=r"output 0 traced with shape \[3\], but the captured graph says \[3, 1\]"):
        aot_module_simplified(gm, [torch.randn(4, 3)], fw_compiler=lambda g, _: g)
    out.args[0][0].meta["val"] = None
    assert aot_module_simplified(gm, [torch.randn(4, 3)], fw_compiler=lambda g, _: g)(torch.ones(4, 3))[0].shape == (3,)
