"""Opcode handlers claim only the CPython versions they were tested on; any other
interpreter gets one clear warning and runs compiled functions eagerly."""
from __future__ import annotations

import warnings

import pytest
import torch

import kiln
from kiln import fallbacks
from kiln.capture import bytecode as bc
from kiln.capture import convert
from kiln.capture.interpreter import Translator
from kiln.exc import FallbackWarning, Unsupported
from kiln.testing import CompileCounter


def test_default_versions_are_the_tested_ones():
    class H:
        @bc.handles("A")
        def a(self, inst):
            pass

    assert bc.build_dispatch(H, bc.NEWEST_TESTED) == {"A": "a"}
    assert bc.build_dispatch(H, bc.OLDEST_TESTED) == {"A": "a"}
    assert bc.build_dispatch(H, (3, 13)) == {}
    assert bc.build_dispatch(H, (3, 10)) == {}


def test_no_translator_handler_claims_an_untested_version():
    claims = [(name, lo, hi) for klass in Translator.__mro__ for name, fn in vars(klass).items()
              for _, lo, hi in getattr(fn, "_kiln_opcodes", ())]
    assert len(claims) > 50
    assert all(bc.OLDEST_TESTED <= lo and hi <= bc.NEWEST_TESTED for _, lo, hi in claims), claims
    assert bc.build_dispatch(Translator, (3, 13)) == {}
    assert "CALL" in bc.build_dispatch(Translator, bc.PY)


def test_version_reasons():
    assert bc.unsupported_version_reason((3, 11)) is None
    assert bc.unsupported_version_reason((3, 12)) is None
    newer = bc.unsupported_version_reason((3, 13))
    assert newer.startswith("Python 3.13 is newer than the versions kiln's bytecode handlers were tested on "
                            "(3.11 to 3.12)") and "run eagerly" in newer
    assert "Python 3.10 is older" in bc.unsupported_version_reason((3, 10))


@pytest.fixture
def python_313(monkeypatch):
    monkeypatch.setattr(bc, "PY", (3, 13))
    monkeypatch.setattr(convert, "_VERSION_WARNED", False)


@pytest.mark.expect_fallback("Python 3.13 is newer")
def test_unknown_version_warns_once_and_runs_eagerly(python_313):
    def f(x):
        return torch.sin(x) + 1

    def g(x):
        return x * 2

    cc = CompileCounter()
    cf, cg = kiln.compile(f, backend=cc), kiln.compile(g, backend=cc)
    x = torch.randn(4)
    start = fallbacks.mark()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [cf(x), cf(x), cg(x), cg(x)]
    torch.testing.assert_close(outs[0], f(x))
    torch.testing.assert_close(outs[2], g(x))
    assert cc.frame_count == 0  # nothing was traced with handlers that do not know 3.13
    ours = [w for w in caught if issubclass(w.category, FallbackWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "Python 3.13 is newer than the versions" in str(ours[0].message)
    recs = fallbacks.recorded(since=start)
    assert len(recs) == 1 and recs[0].stage == "capture"


@pytest.mark.expect_fallback("Python 3.13 is newer")
def test_unknown_version_under_fullgraph_raises(python_313):
    f = kiln.compile(lambda x: x + 1, backend="eager", fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        with pytest.raises(Unsupported, match="tested on"):
            f(torch.randn(2))
