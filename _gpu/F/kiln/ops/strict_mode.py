"""strict_mode(callable, operands): run the body; trace it as a subgraph.

Export marks regions that must be captured strictly with this op.  In eager it
simply calls ``callable(*operands)``.  Under tracing the body is traced into
its own GraphModule (with the same fake mode as the outer trace), stored on the
root as ``strict_graph_N``, and the outer graph gets one node
``strict_mode(strict_graph_N, operands)``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch.fx as fx

from kiln.ops.base import HigherOrderOperator


class StrictMode(HigherOrderOperator):
    def __init__(self) -> None:
        super().__init__("strict_mode")

    def check_args(self, callable_: Callable = None, operands: Any = None) -> None:
        if not callable(callable_):
            raise TypeError(f"strict_mode needs a callable, got {callable_!r}")
        if not isinstance(operands, (tuple, list)):
            raise TypeError(
                f"strict_mode takes its operands as a tuple or list, got {type(operands).__name__}"
            )


strict_mode = StrictMode()


@strict_mode.py_impl("eager")
def _eager(callable_: Callable, operands: Any) -> Any:
    return callable_(*operands)


@strict_mode.py_impl("trace")
def _trace(mode: Any, callable_: Callable, operands: Any) -> Any:
    from kiln.tracing import make_fx

    tracer = mode.tracer
    if isinstance(callable_, fx.GraphModule):
        body = callable_
    else:
        sub_mode = "real" if tracer.fake_mode is None else "fake"
        body = make_fx(callable_, tracing_mode=sub_mode)(*operands)
    out = strict_mode(body, operands)
    graph_node = tracer.add_subgraph(body, "strict_graph_")
    tracer.record(strict_mode, (graph_node, tuple(operands)), {}, out, name="strict_mode")
    return out
