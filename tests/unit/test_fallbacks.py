"""The one recording point for fallbacks (kiln.fallbacks), what tests and explain see of
it, and the suite's check that fails undeclared fallbacks (tests/conftest.py)."""
from __future__ import annotations

import warnings

import pytest
import torch

import kiln
from kiln import fallbacks
from kiln.backends import call_backend
from kiln.exc import BackendCompilerFailed, FallbackWarning
from kiln.testing import fallback_mismatch

X = torch.randn(3)


def _exploding_backend(gm, example_inputs):
    raise ValueError("no kernels today")


def _f(x):
    return torch.sin(x) + 1


def test_record_warns_with_the_category_and_the_users_location():
    start = fallbacks.mark()
    with fallbacks.taken() as got, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallbacks.record_fallback("codegen", "kernel k0", "the C++ compiler is missing")
    assert len(got) == 1 and fallbacks.mark() == start  # taken: out of the process record
    assert str(got[0]).startswith("kiln.codegen: kernel k0: the C++ compiler is missing")
    assert got[0].where.startswith(__file__ + ":")
    [w] = caught
    assert w.category is FallbackWarning and w.filename == __file__


@pytest.mark.expect_fallback("failed (ValueError: no kernels today); running the graph eagerly")
def test_a_failing_backend_runs_eagerly_and_explain_shows_it():
    assert torch.equal(kiln.compile(_f, backend=_exploding_backend)(X), _f(X))
    ex = kiln.explain(kiln.compile(_f, backend=_exploding_backend))(X)
    assert ex.eager_frames == []
    ex2 = kiln.backends.debugging.ExplainWithBackend(_exploding_backend)
    kiln.compile(_f, backend=ex2)(X)
    out = ex2.output()
    assert [f.stage for f in out.fallbacks] == ["backend"]
    assert "Fallbacks:" in str(out) and "no kernels today" in str(out)


def test_fullgraph_backend_failure_raises():
    with pytest.raises(BackendCompilerFailed, match="no kernels today"):
        kiln.compile(_f, backend=_exploding_backend, fullgraph=True)(X)


def test_call_backend_raises_or_falls_back():
    gm = torch.fx.symbolic_trace(_f)
    with pytest.raises(BackendCompilerFailed):
        call_backend(_exploding_backend, gm, [X])
    with fallbacks.taken() as got, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn = call_backend(_exploding_backend, gm, [X], fallback_to_eager=True)
    assert torch.equal(fn(X), _f(X)) and len(got) == 1 and got[0].stage == "backend"


@pytest.mark.expect_fallback("generator or coroutine function")
def test_explain_lists_capture_fallbacks():
    def gen(x):
        yield x + 1

    ex = kiln.explain(gen)(X)
    assert any(fb.stage == "capture" and "gen" in fb.what for fb in ex.fallbacks), ex.fallbacks
    assert "Fallbacks:" in str(ex)


def test_check_fails_undeclared_and_missing_fallbacks():
    fb = fallbacks.Fallback("aot", "the graph", "runs eagerly: data-dependent")
    assert fallback_mismatch("t", [fb], [("data-dependent", True)]) is None
    assert fallback_mismatch("t", [], [("optional thing", False)]) is None
    assert "did not declare" in fallback_mismatch("t", [fb], [])
    assert "did not declare" in fallback_mismatch("t", [fb], [("something else", True)])
    assert "did not happen" in fallback_mismatch("t", [], [("data-dependent", True)])


def test_forced_reads_the_switch(monkeypatch):
    monkeypatch.delenv("KILN_TEST_FORCE_FALLBACK", raising=False)
    assert not fallbacks.forced("aot")
    monkeypatch.setenv("KILN_TEST_FORCE_FALLBACK", "aot")
    assert fallbacks.forced("aot") and not fallbacks.forced("capture")
    monkeypatch.setenv("KILN_TEST_FORCE_FALLBACK", "nonsense")
    with pytest.raises(ValueError, match="unknown stage"):
        fallbacks.forced("aot")


@pytest.mark.expect_fallback("forced by KILN_TEST_FORCE_FALLBACK")
def test_forced_aot_runs_eagerly_through_the_fallback_path(monkeypatch):
    monkeypatch.setenv("KILN_TEST_FORCE_FALLBACK", "aot")
    out = kiln.compile(_f, backend="aot_eager")(X)
    assert torch.equal(out, _f(X))
    assert any(fb.stage == "aot" for fb in fallbacks.recorded())


@pytest.mark.expect_fallback("forced by KILN_TEST_FORCE_FALLBACK")
def test_forced_capture_runs_eagerly_through_the_fallback_path(monkeypatch):
    monkeypatch.setenv("KILN_TEST_FORCE_FALLBACK", "capture")
    from kiln.testing import CompileCounter

    cc = CompileCounter()
    assert torch.equal(kiln.compile(_f, backend=cc)(X), _f(X))
    assert cc.frame_count == 0


@pytest.mark.expect_fallback("the module has forward hooks")
def test_hooked_submodule_after_a_break_is_recorded_once():
    """A submodule with a forward hook whose forward cannot be captured (here it breaks), called
    by generated code after a graph break, runs eagerly (its hooks too): that is recorded as a
    fallback, once per module. (A hooked module that can be captured has its hooks inlined.)"""
    class Breaking(torch.nn.Linear):
        def forward(self, x):
            kiln.graph_break()
            return super().forward(x)

    torch.manual_seed(0)
    lin = Breaking(3, 3)
    seen = []
    lin.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))

    def f(x):
        y = x * 2
        kiln.graph_break()
        return lin(y)

    mark = fallbacks.mark()
    cf = kiln.compile(f, backend="eager")
    x = torch.randn(2, 3)
    for _ in range(2):
        torch.testing.assert_close(cf(x), lin(x * 2))
    recs = [r for r in fallbacks.recorded(mark) if "forward hooks" in r.why]
    assert len(recs) == 1 and recs[0].what == "Breaking.forward"
    assert len(seen) == 4  # two compiled calls, two eager reference calls: the hook ran each time
