"""The backend registry and kiln's backends, called directly on torch.fx graphs
(no capture stage needed), plus kiln backends used as torch.compile backends."""
from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

import kiln
import kiln.exc
from kiln.backends import aot_autograd, call_backend, list_backends, lookup_backend, register_backend
from kiln.backends.debugging import ExplainOutput, ExplainWithBackend
from kiln.testing import same



class Seq(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(10, 10), torch.nn.ReLU(), torch.nn.Linear(10, 10), torch.nn.Sigmoid()
        )

    def forward(self, x):
        return self.layers(x)


def _fn(a, b):
    x = torch.cos(a)
    x = x + b
    return torch.sin(x), x.sum()


def _graph_and_inputs():
    return torch.fx.symbolic_trace(_fn), [torch.randn(4), torch.randn(4)]


# --------------------------------------------------------------------------- registry


def test_list_backends_matches_seed():
    assert "inductor" in list_backends()
    assert "inductor" in list_backends(exclude_tags=None)
    assert "eager" not in list_backends()
    assert "eager" not in list_backends(exclude_tags=["debug"])
    assert "eager" in list_backends(exclude_tags=[])
    assert list_backends() == sorted(list_backends())
    everything = list_backends(exclude_tags=None)
    for name in ["eager", "eager_noexcept", "ts", "aot_eager", "aot_eager_decomp_partition", "aot_ts", "cudagraphs", "tvm"]:
        assert name in everything


def test_public_names_on_kiln():
    assert kiln.list_backends is list_backends
    assert kiln.lookup_backend is lookup_backend
    assert kiln.register_backend is register_backend


def test_unknown_backend_lists_known_ones():
    with pytest.raises(kiln.exc.InvalidBackend) as info:
        lookup_backend("no_such_backend")
    msg = str(info.value)
    assert "no_such_backend" in msg and "aot_eager" in msg and "eager" in msg


def test_lookup_passes_callables_through():
    def mine(gm, example_inputs):
        return gm.forward

    assert lookup_backend(mine) is mine


def test_register_backend_both_ways():
    @register_backend
    def kiln_test_backend_plain(gm, example_inputs):
        return gm.forward

    @register_backend(name="kiln_test_backend_named", tags=("debug",))
    def whatever(gm, example_inputs):
        return gm.forward

    assert lookup_backend("kiln_test_backend_plain") is kiln_test_backend_plain
    assert lookup_backend("kiln_test_backend_named") is whatever
    assert "kiln_test_backend_plain" in list_backends()
    assert "kiln_test_backend_named" not in list_backends()
    assert "kiln_test_backend_named" in list_backends(exclude_tags=())
    assert whatever._tags == ("debug",)
    register_backend(kiln_test_backend_plain)  # the same function again: allowed
    with pytest.raises(kiln.exc.InvalidBackend, match="already registered"):
        register_backend(lambda gm, ex: gm.forward, name="kiln_test_backend_plain")


def test_register_non_callable_refused():
    with pytest.raises(kiln.exc.InvalidBackend):
        register_backend(42, name="kiln_test_not_callable")


def test_unavailable_backend_not_listed_and_explained():
    register_backend(lambda gm, ex: gm.forward, name="kiln_test_unavailable", available=lambda: "needs a unicorn")
    assert "kiln_test_unavailable" not in list_backends(exclude_tags=None)
    with pytest.raises(kiln.exc.InvalidBackend, match="needs a unicorn"):
        lookup_backend("kiln_test_unavailable")


def test_onnxrt_listed_only_when_available():
    from kiln.backends.onnxrt import has_onnxruntime

    assert ("onnxrt" in list_backends()) == has_onnxruntime()


def test_tvm_missing_is_a_clear_error():
    from kiln.backends.tvm import has_tvm

    if has_tvm():
        pytest.skip("checks the error for a missing tvm engine; the optional tvm engine is installed here")
    gm, inputs = _graph_and_inputs()
    with pytest.raises(kiln.exc.InvalidBackend, match="pip install apache-tvm"):
        lookup_backend("tvm")(gm, inputs)


def test_backend_returning_non_callable_is_named():
    def broken_backend(gm, example_inputs):
        return 3

    gm, inputs = _graph_and_inputs()
    with pytest.raises(kiln.exc.InvalidBackend, match="broken_backend"):
        call_backend(broken_backend, gm, inputs)


def test_backend_that_raises_is_wrapped_with_its_name():
    def exploding_backend(gm, example_inputs):
        raise ValueError("boom")

    gm, inputs = _graph_and_inputs()
    with pytest.raises(kiln.exc.BackendCompilerFailed, match="exploding_backend.*boom") as info:
        call_backend(exploding_backend, gm, inputs)
    assert isinstance(info.value.__cause__, ValueError)


# --------------------------------------------------------------------------- backends on fx graphs


@pytest.mark.parametrize("name", ["eager", "eager_noexcept"])
def test_eager_backends_on_fx_graph(name):
    gm, inputs = _graph_and_inputs()
    compiled = call_backend(name, gm, inputs)
    assert same(compiled(*inputs), _fn(*inputs))


def test_eager_noexcept_reraises_clearly():
    def bad(x):
        return x.view(7, 7)

    gm = torch.fx.symbolic_trace(bad)
    compiled = lookup_backend("eager_noexcept")(gm, [torch.randn(3)])
    with pytest.raises(kiln.exc.KilnError, match="Unexpected exception when running generated GraphModule") as info:
        compiled(torch.randn(3))
    assert isinstance(info.value.__cause__, RuntimeError)


def test_ts_backend_scripts_graph():
    gm, inputs = _graph_and_inputs()
    compiled = lookup_backend("ts")(gm, inputs)
    assert isinstance(compiled, torch.jit.ScriptModule)
    assert same(compiled(*inputs), _fn(*inputs))


@pytest.mark.expect_fallback("TorchScript could not script the graph")
def test_ts_backend_falls_back_when_unscriptable():
    def fn(x):
        return torch.sin(x) + 1

    gm = torch.fx.symbolic_trace(fn)
    # NOTE: a call_function to a Python lambda cannot be scripted.
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.sin:
            node.target = lambda t: torch.sin(t)
    gm.recompile()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = lookup_backend("ts")(gm, [torch.randn(3)])
    x = torch.randn(3)
    assert same(compiled(x), fn(x))
    assert any("running it eagerly" in str(w.message) for w in caught)


@pytest.mark.expect_fallback("the inputs are not CUDA tensors")
def test_cudagraphs_on_cpu_runs_eagerly_and_says_so():
    gm, inputs = _graph_and_inputs()
    import kiln.backends.cudagraphs as cg

    cg._warned_not_cuda = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = lookup_backend("cudagraphs")(gm, inputs)
    assert same(compiled(*inputs), _fn(*inputs))
    assert any("not CUDA" in str(w.message) for w in caught)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cudagraphs_on_cuda_replays():
    def fn(x, y):
        y.add_(1)
        return (x * 2).relu(), x.sum()

    gm = torch.fx.symbolic_trace(fn)
    x, y = torch.randn(8, device="cuda"), torch.zeros(8, device="cuda")
    compiled = lookup_backend("cudagraphs")(gm, [x, y])
    first = compiled(x, y)
    x2 = torch.randn(8, device="cuda")
    second = compiled(x2, y)
    assert same(first, fn(x, torch.zeros(8, device="cuda")))
    assert same(second[0], (x2 * 2).relu())
    assert torch.equal(y, torch.full((8,), 2.0, device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cudagraphs_on_cuda_with_autograd():
    torch._dynamo.reset()
    model = Seq().cuda()
    ref_model = Seq().cuda()
    ref_model.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend=lookup_backend("cudagraphs"))
    for _ in range(3):
        x = torch.randn(2, 10, device="cuda", requires_grad=True)
        rx = x.detach().clone().requires_grad_()
        out, ref = compiled(x), ref_model(rx)
        out.sum().backward()
        ref.sum().backward()
        assert same(ref, out, tol=1e-3) and same(rx.grad, x.grad, tol=1e-3)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert same(q.grad, p.grad, tol=1e-3)


# --------------------------------------------------------------------------- explain


def test_explain_with_backend_records_graphs_and_breaks():
    from kiln.backends.debugging import BreakReason

    eb = ExplainWithBackend("eager")
    gm1, inputs = _graph_and_inputs()
    gm2 = torch.fx.symbolic_trace(lambda x: torch.sigmoid(x))
    gm1.compile_subgraph_reason = BreakReason("graph_break() called", [])
    eb(gm1, inputs)
    eb(gm2, [torch.randn(2)])
    eb.record_break("another reason")
    out = eb.output()
    assert isinstance(out, ExplainOutput)
    assert out.graph_count == 2 and out.graph_break_count == 1
    assert out.op_count == 4  # cos, add, sin, sigmoid (x.sum() is call_method: not an op here)
    text = str(out)
    for field in ("Graph Count", "Graph Break Count", "Op Count", "Break Reasons", "graph_break() called"):
        assert field in text
    assert len(out.break_reasons) == 2


# --------------------------------------------------------------------------- as torch.compile backends


def test_kiln_backend_works_in_torch_compile():
    def f(x):
        return torch.relu(x) + 1

    compiled = torch.compile(f, backend=lookup_backend("eager"))
    x = torch.randn(3, 3)
    assert same(compiled(x), f(x))


def test_torch_compile_with_explain_backend():
    def f(x):
        return torch.sigmoid(torch.cos(x))

    eb = ExplainWithBackend("eager")
    x = torch.randn(4)
    assert same(torch.compile(f, backend=eb)(x), f(x))
    assert eb.output().graph_count == 1 and eb.output().op_count == 2


@pytest.mark.parametrize("name", ["eager", "eager_noexcept", "ts"])
def test_check_backend_works_through_torch_compile(name):
    torch._dynamo.reset()
    model = Seq().eval()
    x = torch.randn(2, 10)
    r1 = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r2 = torch.compile(model, backend=lookup_backend(name))(x)
    assert same(r1, r2.float(), tol=0.01)


# --------------------------------------------------------------------------- aot-based (need kiln.aot)


@pytest.mark.parametrize("name", ["aot_eager", "aot_eager_decomp_partition", "aot_eager_default_partitioner", "aot_ts"])
def test_aot_backends_on_fx_graph(name):
    gm, inputs = _graph_and_inputs()
    inputs = [t.requires_grad_() for t in inputs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = call_backend(name, gm, inputs)
    out = compiled(*inputs)
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    ref = _fn(*ref_inputs)
    assert same(out, ref)
    (out[0].sum() + out[1]).backward()
    (ref[0].sum() + ref[1]).backward()
    assert same([t.grad for t in inputs], [t.grad for t in ref_inputs])


def test_aot_autograd_api_runs_compiler():
    from kiln.aot import make_boxed_func

    seen = []

    def my_compiler(gm, example_inputs):
        seen.append(gm)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=my_compiler)
    gm = torch.fx.symbolic_trace(lambda x: torch.relu(x))
    x = torch.randn(3, 3)
    compiled = backend(gm, [x])
    assert same(compiled(x), torch.relu(x))
    assert seen


@pytest.mark.parametrize("name", [
    "aot_eager", "aot_eager_decomp_partition", "aot_ts",
    "inductor",
    pytest.param("cudagraphs", marks=pytest.mark.expect_fallback("the inputs are not CUDA tensors")),
])
def test_aot_backends_through_torch_compile_with_grads(name):
    torch._dynamo.reset()
    model = Seq()
    x = torch.randn(2, 10, requires_grad=True)
    ref_model = Seq()
    ref_model.load_state_dict(model.state_dict())
    ref_x = x.detach().clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = torch.compile(model, backend=lookup_backend(name))(x)
    ref = ref_model(ref_x)
    assert same(ref, out, tol=1e-3)
    out.sum().backward()
    ref.sum().backward()
    assert same(ref_x.grad, x.grad, tol=1e-3)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert same(q.grad, p.grad, tol=1e-3)


def test_aot_autograd_without_fw_compiler_is_an_error():
    gm, inputs = _graph_and_inputs()
    with pytest.raises(kiln.exc.InvalidBackend, match="fw_compiler"):
        aot_autograd()(gm, inputs)


# --------------------------------------------------------------------------- optional packages


def _has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


@pytest.mark.expect_fallback("an ONNX session has no backward")
@pytest.mark.skipif(not (_has("onnxruntime") and _has("onnx")), reason="needs the optional onnxruntime engine (pip install onnxruntime onnx)")
def test_onnxrt_runs_graph_and_falls_back_for_autograd():
    gm, inputs = _graph_and_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = call_backend("onnxrt", gm, inputs)
    for args in (inputs, [torch.randn(4), torch.randn(4)]):
        assert same(compiled(*args), _fn(*args))
    a = torch.randn(4, requires_grad=True)
    out = compiled(a, torch.randn(4))
    assert out[0].requires_grad  # NOTE: ran eagerly: an ONNX session has no backward


@pytest.mark.skipif(not (_has("onnxruntime") and _has("onnx")), reason="needs the optional onnxruntime engine (pip install onnxruntime onnx)")
def test_onnxrt_through_torch_compile():
    torch._dynamo.reset()
    model = Seq().eval()
    x = torch.randn(2, 10)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r2 = torch.compile(model, backend=lookup_backend("onnxrt"))(x)
    assert same(model(x), r2, tol=0.01)


@pytest.mark.skipif(not _has("tvm"), reason="needs the optional tvm engine (pip install -e '.[tvm]')")
@pytest.mark.parametrize("options", [None, {"scheduler": None}, {"opt_level": 0}])
def test_tvm_backend(options):
    gm, inputs = _graph_and_inputs()
    compiled = lookup_backend("tvm")(gm, inputs, options=options)
    args = [torch.randn(4), torch.randn(4)]
    assert same(compiled(*args), _fn(*args))


def test_aot_autograd_flattens_nested_inputs():
    from kiln.aot import nop

    def f(xs, y):
        return (xs[0] * xs[1] + y,)

    gm = torch.fx.symbolic_trace(f)
    a, b, y = torch.randn(3, requires_grad=True), torch.randn(3), torch.randn(3)
    compiled = aot_autograd(fw_compiler=nop)(gm, [[a, b], y])
    out = compiled([a, b], y)
    assert same(list(out), list(f([a, b], y)))
    out[0].sum().backward()
    assert same(a.grad, b)


@pytest.mark.parametrize(
    "fn",
    [lambda x: torch.relu(x), lambda x: (x.sin(), x.cos()), lambda x: {"a": x.sin(), "b": (x.cos(), x + 1)}],
    ids=["single", "tuple", "nested"],
)
def test_aot_autograd_keeps_output_structure(fn):
    from kiln.aot import nop

    gm = torch.fx.symbolic_trace(fn)
    x = torch.randn(4)
    out = aot_autograd(fw_compiler=nop)(gm, [x])(x)
    ref = fn(x)
    if isinstance(ref, tuple):
        out, ref = list(out), list(ref)  # NOTE: AOT returns a flat tuple as a list, as PyTorch's
    assert same(ref, out)
