"""Pipelines, KILN_LOGS dumps and the KILN_CHECK verifier."""
import pytest
import torch
import torch.fx as fx

from kiln import exc
from kiln.passes import graph_pass, run_pipeline, verify_graph
from kiln.tracing import make_fx


@graph_pass("dce")
def _dce(gm):
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


@graph_pass("break_order")
def _break_order(gm):
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    nodes[0].prepend(nodes[-1])  # use before def
    return gm


def _gm():
    return make_fx(lambda x: (x.sin() + 1).cos(), tracing_mode="fake")(torch.randn(3))


def test_logs_each_pass(monkeypatch, capsys):
    monkeypatch.setenv("KILN_LOGS", "demo")
    run_pipeline("demo", _gm(), [_dce])
    err = capsys.readouterr().err
    assert "[kiln demo] after input" in err and "[kiln demo] after dce" in err
    assert "torch.ops.aten.sin.default" in err


def test_no_logs_by_default(monkeypatch, capsys):
    monkeypatch.delenv("KILN_LOGS", raising=False)
    run_pipeline("demo", _gm(), [_dce])
    assert capsys.readouterr().err == ""


def test_verifier_catches_use_before_def(monkeypatch):
    monkeypatch.setenv("KILN_CHECK", "1")
    with pytest.raises(exc.GraphInvariantError) as info:
        run_pipeline("demo", _gm(), [_break_order])
    msg = str(info.value)
    assert "before it is defined" in msg and ">>" in msg and "demo.break_order" in msg


def test_verifier_functional_flag():
    def f(x):
        y = x.clone()
        y.add_(1)
        return y

    gm = make_fx(f, tracing_mode="fake")(torch.randn(2))
    verify_graph(gm)
    with pytest.raises(exc.GraphInvariantError, match="mutating op"):
        verify_graph(gm, functional=True)
