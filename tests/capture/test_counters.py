"""kiln.capture.counters: graph-break, frame and graph statistics under PyTorch's keys."""
from __future__ import annotations

import pytest
import torch

import kiln
from kiln.capture import counters
from kiln.testing import CompileCounter, count_ops


@pytest.fixture(autouse=True)
def _reset():
    kiln.reset()
    yield
    kiln.reset()


def _two_breaks(x):
    x = x.sin()
    print("")  # noqa: T201 - a graph break
    x = x.cos()
    print("")  # noqa: T201 - the same reason again
    return x + 1


def test_graph_break_one_key_per_reason_counted_per_occurrence(capsys):
    cnt = CompileCounter()
    g = kiln.compile(_two_breaks, backend=cnt)
    x = torch.randn(3)
    torch.testing.assert_close(g(x), _two_breaks(x))
    assert len(counters["graph_break"]) == 1
    (reason, n), = counters["graph_break"].items()
    assert "print" in reason and n == 2
    assert cnt.frame_count == 3


def test_frames_and_graph_stats_match_the_compiled_graphs():
    cnt = CompileCounter()
    g = kiln.compile(_two_breaks, backend=cnt)
    x = torch.randn(3)
    g(x)
    # NOTE: the root frame and its two resume functions each compiled once.
    assert dict(counters["frames"]) == {"total": 3, "ok": 3}
    assert counters["stats"]["unique_graphs"] == cnt.frame_count == 3
    assert counters["stats"]["calls_captured"] == cnt.op_count
    g(x)  # cache hits: nothing new
    assert dict(counters["frames"]) == {"total": 3, "ok": 3}
    assert counters["stats"]["unique_graphs"] == 3
    assert sum(counters["resumes"].values()) == 2


def test_calls_captured_counts_call_nodes_of_each_graph():
    graphs = []

    def backend(gm, example):
        graphs.append(gm)
        return gm.forward

    def f(x, y):
        return torch.relu(x @ y).sum(1) * 2

    g = kiln.compile(f, backend=backend, fullgraph=True)
    g(torch.randn(2, 3), torch.randn(3, 4))
    assert counters["stats"]["calls_captured"] == count_ops(graphs[0]) == 4
    g(torch.randn(2, 3), torch.randn(3, 4))
    assert counters["stats"]["calls_captured"] == 4


def test_no_break_no_key_and_reading_does_not_create_keys():
    g = kiln.compile(lambda x: x * 2, backend="eager")
    g(torch.ones(2))
    assert len(counters["graph_break"]) == 0
    assert counters["frames"]["missing"] == 0 and "missing" not in counters["frames"]


def test_data_dependent_jump_is_not_a_graph_break():
    def f(x):
        y = x.sin()
        if y.sum() > 0:
            return y + 1
        return y - 1

    g = kiln.compile(f, backend="eager")
    for x in (torch.ones(3), -torch.ones(3)):
        torch.testing.assert_close(g(x), f(x))
    # NOTE: as in PyTorch: the jump is counted as unimplemented, not as a graph break.
    assert len(counters["graph_break"]) == 0
    assert sum(counters["unimplemented"].values()) == 1


def test_break_inside_an_inlined_call_is_one_graph_break():
    def inner(x):
        kiln.graph_break()
        return x + 1

    def f(x):
        return inner(x.sin()) * 2

    g = kiln.compile(f, backend="eager")
    x = torch.randn(3)
    torch.testing.assert_close(g(x), f(x))
    assert len(counters["graph_break"]) == 1


@pytest.mark.expect_fallback("generator or coroutine function")
def test_frame_that_runs_eagerly_counts_total_not_ok():
    def gen(x):
        yield x + 1

    g = kiln.compile(gen, backend="eager")
    x = torch.randn(2)
    torch.testing.assert_close(list(g(x)), list(gen(x)))
    assert dict(counters["frames"]) == {"total": 1}
    assert len(counters["unimplemented"]) == 1 and len(counters["graph_break"]) == 0


def test_fullgraph_error_is_unimplemented_not_graph_break():
    def f(x):
        print("")  # noqa: T201
        return x

    g = kiln.compile(f, backend="eager", fullgraph=True)
    with pytest.raises(kiln.exc.Unsupported):
        g(torch.ones(1))
    assert len(counters["graph_break"]) == 0
    assert sum(counters["unimplemented"].values()) == 1
    assert counters["frames"]["total"] == 1 and counters["frames"]["ok"] == 0


def test_reset_clears_counters():
    kiln.compile(_two_breaks, backend="eager")(torch.ones(2))
    assert counters["graph_break"]
    kiln.reset()
    assert dict(counters) == {}
