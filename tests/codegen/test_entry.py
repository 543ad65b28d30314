"""kiln.codegen.compile_fx and the inductor backend: the default backend, options,
fallbacks when codegen cannot compile a graph, devices it does not target, the
recompute policy given to the partitioner, kiln.reset."""
from __future__ import annotations

import functools
import importlib
import inspect
import warnings

import pytest
import torch

import kiln
from kiln import fallbacks
from kiln.codegen import compile_fx, config, metrics
from kiln.exc import CodegenError, FallbackWarning, InvalidOption, KernelCompileError
from kiln.tracing import make_fx

compile_fx_mod = importlib.import_module("kiln.codegen.compile_fx")


def _f(x, y):
    return (x.sin() * y).relu().sum()


def _spy(monkeypatch, behaviour=None):
    """Replace the core's compile_aten_graph; returns the list of (graph, settings) it saw."""
    seen = []
    real = compile_fx_mod._compile_aten_graph

    def core(gm, example_inputs):
        seen.append((gm, dict(max_autotune=config.max_autotune, budget=config.profitability_budget_s)))
        if behaviour is not None:
            behaviour(gm)
        return real(gm, example_inputs)

    monkeypatch.setattr(compile_fx_mod, "_compile_aten_graph", core)
    return seen


def _inputs():
    return torch.randn(5, requires_grad=True), torch.randn(5)


def _check_against_eager(fn, x, y):
    out = fn(x, y)
    out.backward()
    xr = x.detach().clone().requires_grad_()
    ref = _f(xr, y)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, xr.grad)


def test_default_backend_is_inductor(monkeypatch):
    assert inspect.signature(kiln.compile).parameters["backend"].default == "inductor"
    assert inspect.signature(kiln.optimize).parameters["backend"].default == "inductor"
    assert kiln.lookup_backend("inductor") is kiln.backends.inductor.inductor
    seen = _spy(monkeypatch)
    _check_against_eager(kiln.compile(_f), *_inputs())
    names = [gm._kiln_graph_name for gm, _ in seen]
    assert any(n.endswith("forward") for n in names) and any(n.endswith("backward") for n in names)
    assert metrics.graphs_compiled == 2


def test_inference_graph_under_no_grad(monkeypatch):
    seen = _spy(monkeypatch)
    x, y = _inputs()
    with torch.no_grad():
        out = kiln.compile(_f)(x, y)
    torch.testing.assert_close(out, _f(x, y))
    assert [gm._kiln_graph_name.split()[-1] for gm, _ in seen] == ["inference"]


def test_kiln_reset_resets_metrics():
    metrics.generated_kernel_count = 3
    metrics.graphs_compiled = 2
    metrics.cpp_compile_count = 1
    metrics.profitability_decisions.append("a decision")
    kiln.reset()
    assert metrics.generated_kernel_count == 0 and metrics.graphs_compiled == 0
    assert metrics.cpp_compile_count == 0 and metrics.profitability_decisions == []


def test_unknown_option_is_an_error_at_compile_time():
    with pytest.raises(InvalidOption) as info:
        kiln.compile(_f, options={"profitabilty_check": False})  # misspelled
    msg = str(info.value)
    assert "'profitabilty_check'" in msg and "profitability_check" in msg.split("known options")[1]
    assert __file__ in msg  # where in the user's code


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "fastest"}, "unknown mode 'fastest'"),
    ({"options": {"profitability_check": "no"}}, "takes a bool"),
    ({"options": ["max_autotune"]}, "options must be a dict"),
])
def test_bad_mode_or_option_values(kwargs, match):
    with pytest.raises(InvalidOption, match=match):
        kiln.compile(_f, **kwargs)


def test_compile_fx_rejects_unknown_keyword():
    gm = make_fx(_f)(*_inputs())
    with pytest.raises(InvalidOption, match="unknown keyword argument"):
        compile_fx(gm, list(_inputs()), fullgraph=True)


def test_options_and_mode_apply_to_every_graph_even_the_late_backward(monkeypatch):
    seen = _spy(monkeypatch)
    fn = kiln.compile(_f, mode="max-autotune", options={"profitability_budget_s": 0.25})
    assert config.max_autotune is False
    _check_against_eager(fn, *_inputs())
    assert len(seen) == 2  # forward now, backward at .backward()
    assert all(s == {"max_autotune": True, "budget": 0.25} for _, s in seen)
    assert config.max_autotune is False and config.profitability_budget_s == 0.5


@pytest.mark.expect_fallback("no codegen for this dtype")
def test_codegen_error_runs_the_aten_graph_with_one_warning(monkeypatch):
    def refuse(gm):
        raise CodegenError("no codegen for this dtype")

    _spy(monkeypatch, refuse)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _check_against_eager(kiln.compile(_f), *_inputs())
    msgs = [str(w.message) for w in caught if issubclass(w.category, FallbackWarning)]
    assert len(msgs) == 2  # forward and backward graph, one each
    assert all("no codegen for this dtype" in m and "aten.sin.default" in m for m in msgs)
    assert metrics.graphs_compiled == 0


@pytest.mark.expect_fallback("did not compile")
def test_kernel_compile_error_names_the_file_and_aten_nodes(monkeypatch):
    def broken(gm):
        raise KernelCompileError("generated C++ kernel source did not compile: /cache/cpp/ab/abc.cpp",
                                 why="g++ exited with 1:\nabc.cpp:3: error: expected ';'")

    _spy(monkeypatch, broken)
    with pytest.warns(FallbackWarning) as record:
        _check_against_eager(kiln.compile(_f), *_inputs())
    msg = str(record[0].message)
    assert "/cache/cpp/ab/abc.cpp" in msg and "error: expected ';'" in msg
    assert "aten.sin.default" in msg and "aten.relu.default" in msg


@pytest.mark.expect_fallback("internal error in codegen")
def test_internal_error_falls_back_unless_strict(monkeypatch):
    def bug(gm):
        raise KeyError("a kiln bug")

    _spy(monkeypatch, bug)
    monkeypatch.setenv("KILN_STRICT", "0")
    with pytest.warns(FallbackWarning, match="KeyError"):
        _check_against_eager(kiln.compile(_f), *_inputs())
    monkeypatch.setenv("KILN_STRICT", "1")
    kiln.reset()
    with pytest.raises(Exception, match="a kiln bug"):
        kiln.compile(_f, fullgraph=True)(*_inputs())


@pytest.mark.expect_fallback("codegen does not target meta tensors")
def test_untargeted_device_runs_aot_eager(monkeypatch):
    seen = _spy(monkeypatch)
    gm = torch.fx.symbolic_trace(lambda x: x.sin() + 1)
    x = torch.empty(3, 4, device="meta")
    since = fallbacks.mark()
    with pytest.warns(FallbackWarning, match="meta"):
        out = compile_fx(gm, [x])(x)
    assert out.device.type == "meta" and out.shape == (3, 4)
    assert not seen
    (rec,) = [r for r in fallbacks.recorded(since) if r.stage == "codegen"]
    assert "aot_eager" in rec.why


def test_untargeted_reasons():
    reason = compile_fx_mod.untargeted_reason
    assert reason([torch.randn(2)]) is None
    assert "sparse" in reason([torch.randn(2, 2).to_sparse()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NOTE: torch deprecates quantized tensors
        q = torch.quantize_per_tensor(torch.randn(2), 0.1, 0, torch.qint8)
    assert "quantized" in reason([q])
    assert "meta" in reason([torch.empty(2, device="meta")])


@pytest.mark.expect_fallback("CUDA graphs need CUDA tensors")
def test_reduce_overhead_on_cpu_is_recorded_and_runs(monkeypatch):
    seen = _spy(monkeypatch)
    with pytest.warns(FallbackWarning, match="CUDA graphs need CUDA tensors"):
        _check_against_eager(kiln.compile(_f, mode="reduce-overhead"), *_inputs())
    assert len(seen) == 2


def test_partitioner_gets_codegens_recompute_policy(monkeypatch):
    from kiln.aot import min_cut_rematerialization_partition

    p = compile_fx_mod.partition_fn()
    assert isinstance(p, functools.partial) and p.func is min_cut_rematerialization_partition
    assert p.keywords["recomputable"] is compile_fx_mod.fusible_recomputable

    def f(x):
        return (x.exp() * x.exp().sum(-1, keepdim=True)).sin()

    seen = _spy(monkeypatch)
    x = torch.randn(64, 256, requires_grad=True)
    kiln.compile(f)(x).sum().backward()
    fw = next(gm for gm, _ in seen if gm._kiln_graph_name.endswith("forward"))
    saved = [n.meta["val"].shape for n in fw.graph.output_node().args[0][1:]]
    # NOTE: the 256x-smaller row sums are saved rather than recomputed from x in backward
    assert torch.Size([64, 1]) in saved


def test_fusible_recomputable_policy():
    def f(x, w):
        return (x.sin() @ w).sum()

    gm = make_fx(f, tracing_mode="fake")(torch.randn(64, 32), torch.randn(32, 16))
    by_op = {n.target.overloadpacket.__name__: n for n in gm.graph.nodes if n.op == "call_function"}
    assert compile_fx_mod.fusible_recomputable(by_op["sin"])
    assert not compile_fx_mod.fusible_recomputable(by_op["mm"])
    assert not compile_fx_mod.fusible_recomputable(by_op["sum"])  # 1024 -> 1


def test_kiln_backend_plugs_into_torch_compile(monkeypatch):
    seen = _spy(monkeypatch)
    torch._dynamo.reset()
    fn = torch.compile(_f, backend=kiln.lookup_backend("inductor"))
    _check_against_eager(fn, *_inputs())
    torch._dynamo.reset()
    assert len(seen) == 2


def test_inference_graph_mutating_an_input_is_compiled():
    """The mutation comes back from the graph and kiln.aot's runtime copies it into the
    input: the graph itself is functional and compiles (no fallback)."""
    from kiln.codegen import metrics

    def f(x, y):
        y.add_(1)
        return x * 2

    c = kiln.compile(f)
    x, y = torch.randn(8), torch.zeros(8)
    with torch.no_grad():
        for i in range(2):
            torch.testing.assert_close(c(x, y), x * 2)
            torch.testing.assert_close(y, torch.full((8,), float(i + 1)))
    assert metrics.generated_kernel_count > 0

