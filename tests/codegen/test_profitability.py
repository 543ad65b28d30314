"""Never slower than eager: kiln.codegen.profitability keeps the faster of the compiled
callable and the captured graph run eagerly (``choose_graph``; ``choose`` does the same
for one ATen graph against itself), records the decision and caches it on disk."""
from __future__ import annotations

import importlib
import time

import pytest
import torch
import torch.fx as fx

import kiln
from kiln.aot import make_boxed_func
from kiln.codegen import config, metrics, profitability
from kiln.exc import FallbackWarning
from kiln.tracing import make_fx

# NOTE: the package's compile_fx attribute is the function; this is its module.
compile_fx_mod = importlib.import_module("kiln.codegen.compile_fx")


def _graph(fn, *inputs, mode="fake"):
    return make_fx(fn, tracing_mode=mode)(*inputs)


def _f(x, y):
    return (x.sin() + y * 2,)


def _slowed(gm, delay_s=0.002):
    """The graph's own eager run, made slower on purpose."""
    def run(args):
        time.sleep(delay_s)
        return gm.forward(*args)

    run._boxed_call = True
    return run


def test_a_slower_compiled_graph_is_replaced_and_recorded():
    x, y = torch.randn(4, 4), torch.randn(4, 4)
    gm = _graph(_f, x, y)
    example = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    slow = _slowed(gm)
    with config.patch(profitability_check=True):
        chosen = profitability.choose(gm, example, slow)
    assert chosen is not slow
    torch.testing.assert_close(chosen([x, y])[0], _f(x, y)[0])
    assert metrics.graphs_kept_eager == 1
    (d,) = metrics.profitability_decisions
    assert d.kept == "eager" and "slower than eager" in d.why and d.compiled_s > d.eager_s
    assert "kept eager" in str(d)


def _sleepy_add(x):
    time.sleep(0.002)
    return x + 1


def test_a_faster_compiled_graph_is_kept():
    g = fx.Graph()
    x = g.placeholder("x")
    g.output((g.call_function(_sleepy_add, (x,)),))
    gm = fx.GraphModule(torch.nn.Module(), g)
    fast = make_boxed_func(lambda t: (t + 1,))
    chosen = profitability.choose(gm, [torch.randn(3)], fast)
    assert chosen is fast
    (d,) = metrics.profitability_decisions
    assert d.kept == "compiled" and d.compiled_s < d.eager_s
    assert metrics.graphs_kept_eager == 0


def test_timing_stays_within_the_budget():
    gm = _graph(_f, torch.randn(3), torch.randn(3))
    example = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    t0 = time.perf_counter()
    with config.patch(profitability_budget_s=0.05):
        profitability.choose(gm, example, _slowed(gm, 0.02))
    assert time.perf_counter() - t0 < 0.5
    assert "best of" in metrics.profitability_decisions[0].why


def test_caller_inputs_are_not_touched():
    def mutating(args):
        args[0].add_(100)
        return (args[0].sin() + args[1] * 2,)

    mutating._boxed_call = True
    x = torch.randn(5, 3).t()  # non-contiguous real input
    y = torch.randn(1, 5).expand(3, 5)  # expanded: stride 0
    before = x.clone()
    gm = _graph(_f, x, y, mode="real")
    seen = []

    def spy(args):
        seen.append([(a.shape, a.stride()) for a in args])
        return mutating(args)

    spy._boxed_call = True
    profitability.choose(gm, [x, y], spy)
    assert torch.equal(x, before)
    assert seen[0] == [(x.shape, x.stride()), (y.shape, y.stride())]  # layouts kept


@pytest.mark.expect_fallback("the compiled graph raised")
def test_a_compiled_graph_that_raises_is_replaced_with_a_warning():
    gm = _graph(_f, torch.randn(3), torch.randn(3))

    def broken(args):
        raise RuntimeError("bad kernel")

    broken._boxed_call = True
    with pytest.warns(FallbackWarning, match="bad kernel"):
        chosen = profitability.choose(gm, [torch.randn(3), torch.randn(3)], broken)
    assert chosen is not broken and metrics.graphs_kept_eager == 1


def test_a_graph_that_raises_eagerly_on_random_inputs_keeps_the_compiled_one():
    def f(i, x):
        return (torch.ops.aten.index.Tensor(x, [i]),)

    g = _graph(f, torch.tensor([0]), torch.randn(3), mode="real")
    compiled = make_boxed_func(g.forward)
    chosen = profitability.choose(g, [torch.tensor([7]), torch.randn(3)], compiled)  # index out of range
    assert chosen is compiled
    assert "not measured" in metrics.profitability_decisions[0].why


def test_kiln_logs_codegen_prints_the_decision(monkeypatch, capsys):
    monkeypatch.setenv("KILN_LOGS", "codegen")
    gm = _graph(_f, torch.randn(3), torch.randn(3))
    profitability.choose(gm, [torch.randn(3), torch.randn(3)], _slowed(gm))
    assert "kiln.codegen profitability" in capsys.readouterr().err


def _compile_with_slowed_core(monkeypatch, **options):
    calls = []

    def slowed_core(gm, example_inputs):
        calls.append(gm)
        return _slowed(gm)

    monkeypatch.setattr(compile_fx_mod, "_compile_aten_graph", slowed_core)

    def f(x, y):
        return x.sin() + y * 2

    x, y = torch.randn(8), torch.randn(8)
    out = kiln.compile(f, **options)(x, y)
    torch.testing.assert_close(out, f(x, y))
    return calls


def test_end_to_end_slow_graph_runs_the_captured_graph(monkeypatch, tmp_cache):
    with config.patch(profitability_check=True):
        calls = _compile_with_slowed_core(monkeypatch)
    # NOTE: one decision: the whole compiled callable against the captured torch-level graph
    # run eagerly (the real eager baseline; the decomposed ATen graph is none).
    assert calls and metrics.graphs_compiled == 1 and metrics.graphs_kept_eager == 1
    (whole,) = metrics.profitability_decisions
    assert whole.kept == "eager" and "captured graph run eagerly" in whole.why
    assert whole.eager_s < whole.compiled_s and "(forward," in whole.why


def test_training_graph_is_timed_with_its_backward(monkeypatch, tmp_cache):
    calls = []

    def slowed_core(gm, example_inputs):
        calls.append(gm)
        return _slowed(gm)

    monkeypatch.setattr(compile_fx_mod, "_compile_aten_graph", slowed_core)
    x = torch.randn(8, requires_grad=True)
    with config.patch(profitability_check=True):
        out = kiln.compile(lambda t: (t.sin() * 2).sum())(x)
    out.backward()
    torch.testing.assert_close(x.grad, 2 * x.detach().cos())
    (whole,) = metrics.profitability_decisions
    assert "forward and backward" in whole.why and whole.kept == "eager"
    assert len(calls) == 2          # forward and backward graphs were both compiled (and timed)


def test_decision_is_cached_for_the_next_process(monkeypatch, tmp_cache):
    with config.patch(profitability_check=True):
        _compile_with_slowed_core(monkeypatch)
        kiln.reset()   # NOTE: as a new process: nothing compiled in memory
        monkeypatch.setattr(profitability, "_measure_graph",
                            lambda *a: pytest.fail("timed again instead of reading the cache"))
        _compile_with_slowed_core(monkeypatch)
    (again,) = metrics.profitability_decisions
    assert again.kept == "eager" and "read from the cache" in again.why
    assert list((tmp_cache / "decisions").rglob("*.json"))


@pytest.mark.expect_fallback("raised where eager did not")
def test_compiled_graph_that_raises_keeps_eager_and_says_so(monkeypatch, tmp_cache):
    def broken_core(gm, example_inputs):
        def run(args):
            raise RuntimeError("kernel bug")
        run._boxed_call = True
        return run

    monkeypatch.setattr(compile_fx_mod, "_compile_aten_graph", broken_core)
    x = torch.randn(8)
    with config.patch(profitability_check=True), pytest.warns(FallbackWarning, match="raised where eager did not"):
        out = kiln.compile(lambda t: t.sin() * 2)(x)
    torch.testing.assert_close(out, x.sin() * 2)


def test_whole_graph_check_leaves_module_state_alone(tmp_cache):
    """A graph that updates buffers (BatchNorm in training) is timed with its state copied
    and restored: timing must not move the running statistics."""
    bn = torch.nn.BatchNorm1d(4).train()
    ref = torch.nn.BatchNorm1d(4).train()
    x = torch.randn(8, 4)
    with config.patch(profitability_check=True):
        out = kiln.compile(bn)(x)
    torch.testing.assert_close(out, ref(x))
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert bn.num_batches_tracked.item() == 1
    whole = metrics.profitability_decisions[-1]
    assert whole.eager_s is not None and whole.compiled_s is not None


def test_large_module_state_is_not_copied_for_timing(tmp_cache):
    bn = torch.nn.BatchNorm1d(4).train()
    with config.patch(profitability_check=True, profitability_snapshot_bytes=8):
        kiln.compile(bn)(torch.randn(8, 4))
    whole = metrics.profitability_decisions[-1]
    assert whole.kept == "compiled" and "writes module state" in whole.why


def test_check_off_keeps_the_compiled_graph(monkeypatch):
    calls = _compile_with_slowed_core(monkeypatch, options={"profitability_check": False})
    assert calls and metrics.graphs_kept_eager == 0 and not metrics.profitability_decisions


def test_timing_never_writes_the_callers_tensors_through_numpy(tmp_cache):
    """A graph that writes its input through NumPy in place (``a = x.numpy(); a += 1``): the
    whole-graph timing runs on copies, so the caller's tensor is written once, by the call."""
    def f(x):
        a = x.numpy()
        a += 1
        return x

    x = torch.zeros(3)
    with config.patch(profitability_check=True):
        kiln.compile(f, backend="inductor")(x)
    assert torch.equal(x, torch.ones(3))
