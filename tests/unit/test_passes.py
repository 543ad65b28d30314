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
    def mutates_input(x):
        x.add_(1)
        return x * 2

    def mutates_own_buffer(x):
        y = x.clone()
        y.add_(1)
        return y

    verify_graph(make_fx(mutates_own_buffer, tracing_mode="fake")(torch.randn(2)), functional=True)
    gm = make_fx(mutates_input, tracing_mode="fake")(torch.randn(2))
    verify_graph(gm)
    with pytest.raises(exc.GraphInvariantError, match="mutates graph input x_1"):
        verify_graph(gm, functional=True)


def test_aot_graphs_are_logged_and_verified(monkeypatch, capsys):
    from kiln.aot import aot_function, nop

    monkeypatch.setenv("KILN_LOGS", "aot")
    monkeypatch.setenv("KILN_CHECK", "1")

    def f(x):
        x.mul_(2)
        return x.sin()

    x = torch.randn(3, requires_grad=True)
    out = aot_function(f, nop)(x.clone())
    out.sum().backward()
    err = capsys.readouterr().err
    assert "[kiln aot] after joint" in err and "[kiln aot] after partition" in err
    assert "class fw_graph" in err and "class bw_graph" in err
    assert "[kiln aot] after compile" in err


def test_kiln_logs_functionalize_prints_the_functional_graph(monkeypatch, capsys):
    from kiln.aot import aot_function, nop

    monkeypatch.setenv("KILN_LOGS", "functionalize")

    def f(x):
        x.mul_(2)
        return x.sin()

    aot_function(f, nop)(torch.randn(3))
    err = capsys.readouterr().err
    assert "[kiln functionalize] after input" in err and "[kiln functionalize] after dce" in err
    # the traced graph is functional: mul_ became mul, the mutated value is returned
    assert "aten.mul.Tensor" in err and "aten.mul_" not in err
    assert "[kiln aot]" not in err


def test_kiln_logs_aot_partition_prints_forward_and_backward_only(monkeypatch, capsys):
    from kiln.aot import aot_function, nop

    monkeypatch.setenv("KILN_LOGS", "aot.partition")
    x = torch.randn(3, requires_grad=True)
    aot_function(lambda x: x.sin() * 2, nop)(x).sum().backward()
    err = capsys.readouterr().err
    assert err.count("=====") == 2 and "[kiln aot] after partition" in err
    fw, bw = err.split("class fw_graph")[1].split("class bw_graph")
    assert "aten.sin" in fw and "aten.cos" not in fw
    assert "aten.cos" in bw and "tangents_1" in bw


def test_capture_graph_is_logged(monkeypatch, capsys):
    import kiln

    monkeypatch.setenv("KILN_LOGS", "capture")
    monkeypatch.setenv("KILN_CHECK", "1")
    kiln.reset()
    out = kiln.compile(lambda x: x.cos() + 1, backend="eager")(torch.ones(2))
    torch.testing.assert_close(out, torch.ones(2).cos() + 1)
    assert "[kiln capture] after output_graph" in capsys.readouterr().err
