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


def _inner_deep(a, b):
    return torch.cat((a, a)) + b


def _inner(x, y, z):
    r = _inner_deep(x, y)
    r2 = _inner_deep(y, z)
    return r, r2


def _outer(x, y, z):
    r, r2 = _inner(x, y, z)
    return r * r, r2 * r2


def test_inlined_calls_push_the_callers_frame_on_the_tracing_context():
    from torch._guards import TracingContext

    seen, backend_saw = [], []
    real = TracingContext.current_frame

    def recording(frame_summary):
        if frame_summary is not None:
            seen.append((frame_summary.name, frame_summary.line, len(TracingContext.extract_stack())))
        return real(frame_summary)

    def backend(gm, example_inputs):
        backend_saw.append(TracingContext.try_get())
        return gm

    x, y, z = torch.ones(2), torch.ones(4), torch.ones(8)
    TracingContext.current_frame = staticmethod(recording)
    try:
        out = kiln.compile(_outer, backend=backend)(x, y, z)
    finally:
        TracingContext.current_frame = real
    # NOTE: the stack's depth before each frame is pushed: the root frame is not on it.
    assert seen == [("_outer", "r, r2 = _inner(x, y, z)", 0),
                    ("_inner", "r = _inner_deep(x, y)", 1),
                    ("_inner", "r2 = _inner_deep(y, z)", 1)]
    assert backend_saw == [None]
    assert torch.equal(out[1], torch.full((8,), 4.0))
