"""What every test shares: strict mode, and no fallback to eager that the test did not declare.

Strict mode: ``KILN_STRICT=1`` is set (unless the environment already sets it) before kiln
is imported, so an internal exception in kiln's capture interpreter raises instead of
becoming an "internal limitation" graph break that still gives the right answer.

Fallbacks: every place where kiln gives up on compiling and runs eagerly records it
through ``kiln.fallbacks.record_fallback``.  A test in which a fallback is recorded fails,
unless it declares that fallback::

    @pytest.mark.expect_fallback("substring of the reason")
    def test_...():

A declared fallback must happen (at least one record contains the substring), unless
the marker says ``required=False`` (a fallback that depends on the machine, e.g. an
optional package).  Code that checks its own fallbacks (the OpInfo sweep) takes them out
of the record with ``kiln.fallbacks.taken()``.

Code generation: the profitability check (a compiled graph slower than its ATen graph
run eagerly is replaced by that) is off in tests, so that a test of compiled code tests
the generated kernels, not which of two callables timed faster on a noisy machine; the
tests of the check itself turn it on.

Checking the suite itself: ``KILN_TEST_FORCE_FALLBACK=aot`` (or ``capture``) makes AOT
autograd (or capture) give up on every graph, so everything compiled runs eagerly through
the normal fallback path.  The suite must then fail loudly (differential, model and seed
tests included): it shows that the tests see fallbacks and check that the compiler ran.
It is a switch for that check only, never for real work.
"""
from __future__ import annotations

import os

os.environ.setdefault("KILN_STRICT", "1")

import pytest  # noqa: E402

from kiln import fallbacks  # noqa: E402
from kiln.testing import fallback_mismatch  # noqa: E402

_START = pytest.StashKey[int]()


@pytest.fixture(autouse=True)
def _no_profitability_check():
    from kiln.codegen import config

    # NOTE: the graph cache is off too: a test that changes how codegen prints a graph
    # (a broken printer, a patched lowering) must not be answered by an earlier test's
    # record of the same graph.  tests/codegen/test_graph_cache.py turns it on.
    with config.patch(profitability_check=False, graph_cache=False):
        yield


def _declared(item: pytest.Item) -> list[tuple[str, bool]]:
    out = []
    for m in item.iter_markers("expect_fallback"):
        if len(m.args) != 1 or not isinstance(m.args[0], str) or not m.args[0]:
            raise pytest.UsageError(f"{item.nodeid}: expect_fallback takes one non-empty reason string, "
                                    f"got {m.args!r}")
        out.append((m.args[0], bool(m.kwargs.get("required", True))))
    return out


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # NOTE: from setup on, so that fallbacks in the test's fixtures count too.
    item.stash[_START] = fallbacks.mark()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    result = yield  # NOTE: a failing test raises here; its own failure is the one reported
    why = fallback_mismatch(item.nodeid, fallbacks.recorded(item.stash.get(_START, 0)), _declared(item))
    if why is not None:
        pytest.fail(why, pytrace=False)
    return result
