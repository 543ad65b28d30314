"""A compiled function seen by other tracers and by torch's tracing state: FX's
symbolic_trace of a caller, and the user frames capture reports to TracingContext."""
from __future__ import annotations

import operator

import pytest
import torch

import kiln
from kiln.capture import config


def _adds(x):
    return x + x


def test_fx_symbolic_trace_of_a_compiled_function_raises():
    opt = kiln.compile(_adds, backend="eager")
    x = torch.rand(2, 3)
    assert torch.equal(opt(x), x + x)
    with pytest.raises(RuntimeError, match="Detected that you are using FX to symbolically trace"):
        torch.fx.symbolic_trace(opt)


def test_fx_symbolic_trace_runs_the_original_when_allowed():
    opt = kiln.compile(_adds, backend="eager")
    with config.patch(error_on_nested_fx_trace=False):
        gm = torch.fx.symbolic_trace(opt)
    x = torch.rand(2, 3)
    assert torch.equal(gm(x), x + x)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [operator.add]
