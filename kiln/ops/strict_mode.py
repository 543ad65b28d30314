"""strict_mode(callable, operands): run the body; trace it as a subgraph.

Export marks regions that must be captured strictly with this op.  In eager it
simply calls ``callable(*operands)``.  Under tracing the body is traced into
its own GraphModule (with the same fake mode as the outer trace), stored on the
root as ``strict_graph_N``, and the outer graph gets one node
``strict_mode(strict_graph_N, operands)``; tensors of the outer trace the body reads
(a module's buffers, say) become extra operands of the node and placeholders of the
body.  Under functionalization the body is functionalized on its own (its in-place ops
become functional ones inside ``strict_graph_N``).  Traced, the operands must be a
flat tuple of tensors.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from kiln import exc
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


def _check_flat(operands: Any) -> None:
    for i, o in enumerate(operands):
        if not isinstance(o, torch.Tensor):
            raise exc.ExportError(
                f"strict_mode HOO doesn't work unless it is called with a flat tuple of tensors: "
                f"operand {i} is a {type(o).__name__}",
                why="a region marked strict is traced as a subgraph whose inputs are tensors",
                where=exc.user_location(),
                hint="pass tensors (not containers) to the module marked strict, or unmark it")


@strict_mode.py_impl("functionalize")
def _functionalize(mode: Any, callable_: Callable, operands: Any) -> Any:
    from kiln.aot.collect import run_functionalized

    _check_flat(operands)
    values = tuple(mode.value_of(o) for o in operands)
    decompositions = mode.decompositions

    def functional_body(*xs):
        # NOTE: a fresh functionalization of the body alone: its in-place ops become
        # functional inside the subgraph (a body that writes to its operands or to outer
        # state is refused there: the write could not be replayed outside)
        single: list = []

        def call(*a):
            o = callable_(*a)
            single.append(not isinstance(o, (tuple, list)))
            return o

        inner, outs = run_functionalized(call, list(xs), decompositions, None)
        vals = [inner.value_of(o) for o in outs]
        return vals[0] if single[0] else tuple(vals)

    out = strict_mode(functional_body, values)
    return pytree.tree_map_only(torch.Tensor, mode.new_base, out)


@strict_mode.py_impl("trace")
def _trace(mode: Any, callable_: Callable, operands: Any) -> Any:
    from kiln.tracing import make_fx

    tracer = mode.tracer
    if isinstance(callable_, fx.GraphModule):
        body = callable_
    else:
        _check_flat(operands)
        from kiln.tracing.tracer import lifting_from

        sub_mode = "real" if tracer.fake_mode is None else "fake"
        with lifting_from(tracer) as lifted:
            body = make_fx(callable_, tracing_mode=sub_mode)(*operands)
        operands = tuple(operands) + tuple(lifted)
    out = strict_mode(body, operands)
    graph_node = tracer.add_subgraph(body, "strict_graph_")
    tracer.record(strict_mode, (graph_node, tuple(operands)), {}, out, name="strict_mode")
    return out
