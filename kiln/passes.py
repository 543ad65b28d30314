"""Named graph passes, pipelines, logging (KILN_LOGS) and the verifier (KILN_CHECK).

A pass is a function ``fx.GraphModule -> fx.GraphModule`` with a name.  A
pipeline is a flat list of passes run top to bottom by ``run_pipeline``:

    KILN_LOGS=aot,functionalize   print the graph after every pass of those stages
    KILN_LOGS=all                 ... of every stage
    KILN_LOGS=aot.partition       ... after one named pass
    KILN_CHECK=1                  run the verifier after every pass

The verifier checks invariants every fx graph of kiln keeps: placeholders
first, one output last, every argument defined before use, call targets
callable, and (for functional graphs) no op writes to a graph input
(mutations of inputs are the runtime's job, after the call), except the inputs
a graph lists in ``gm.meta["kept_input_mutations"]`` (AOT's
keep_inference_input_mutations: the graph writes those itself).  On failure it
raises ``kiln.exc.GraphInvariantError`` showing the nodes around the bad one.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Iterable, Optional

import torch
import torch.fx as fx

from kiln import exc

GraphPass = Callable[[fx.GraphModule], fx.GraphModule]


def graph_pass(name: str) -> Callable[[GraphPass], GraphPass]:
    """Decorator: give a graph -> graph function its pass name."""

    def deco(fn: GraphPass) -> GraphPass:
        fn.pass_name = name  # type: ignore[attr-defined]
        return fn

    return deco


def pass_name(fn: GraphPass) -> str:
    return getattr(fn, "pass_name", getattr(fn, "__name__", repr(fn)))


def _log_targets() -> set[str]:
    raw = os.environ.get("KILN_LOGS", "")
    return {t.strip() for t in raw.split(",") if t.strip()}


def should_log(stage: str, name: str = "") -> bool:
    targets = _log_targets()
    return bool(targets) and ("all" in targets or stage in targets or f"{stage}.{name}" in targets)


def log_graph(stage: str, name: str, gm: fx.GraphModule, stream=None) -> None:
    """Print `gm` as readable Python if KILN_LOGS asks for this stage/pass."""
    if not should_log(stage, name):
        return
    stream = stream or sys.stderr
    print(f"===== [kiln {stage}] after {name} =====", file=stream)
    print(gm.print_readable(print_output=False), file=stream)


def checking() -> bool:
    return os.environ.get("KILN_CHECK", "") not in ("", "0")


def run_pipeline(stage: str, gm: fx.GraphModule, passes: Iterable[GraphPass],
                 *, functional: bool = False) -> fx.GraphModule:
    """Run `passes` in order, logging and verifying after each as asked."""
    log_graph(stage, "input", gm)
    for p in passes:
        gm = p(gm)
        name = pass_name(p)
        log_graph(stage, name, gm)
        if checking():
            verify_graph(gm, after=f"{stage}.{name}", functional=functional)
    return gm


# ---- the verifier ------------------------------------------------------------

def _context(nodes: list[fx.Node], i: int, radius: int = 3) -> str:
    lines = []
    for j in range(max(0, i - radius), min(len(nodes), i + radius + 1)):
        mark = ">>" if j == i else "  "
        n = nodes[j]
        lines.append(f"{mark} {n.format_node() or n.name}")
    return "\n".join(lines)


def _fail(nodes: list[fx.Node], i: int, what: str, after: str) -> None:
    raise exc.GraphInvariantError(
        f"graph invariant broken after {after}: {what}",
        why="a kiln pass produced a malformed graph",
        where="\n" + _context(nodes, i),
        hint="rerun with KILN_LOGS=all to see the graph after each pass",
    )


def _mutated_inputs(node: fx.Node) -> list[fx.Node]:
    """Graph inputs (placeholders) that `node`'s op writes to, per its schema."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.is_mutable:
        return []
    out = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, fx.Node) and v.op == "placeholder":
                out.append(v)
    return out


def verify_graph(gm: fx.GraphModule, *, after: str = "?", functional: bool = False) -> None:
    """Check the invariants described in this module's docstring."""
    nodes = list(gm.graph.nodes)
    defined: set[fx.Node] = set()
    seen_compute = False
    allowed = set(gm.meta.get("kept_input_mutations", ()))
    outputs = [i for i, n in enumerate(nodes) if n.op == "output"]
    if len(outputs) != 1 or outputs[0] != len(nodes) - 1:
        _fail(nodes, outputs[0] if outputs else len(nodes) - 1, "one output node, last", after)
    for i, n in enumerate(nodes):
        if n.op == "placeholder" and seen_compute:
            _fail(nodes, i, f"placeholder {n.name} after compute nodes", after)
        if n.op != "placeholder":
            seen_compute = True
        for a in n.all_input_nodes:
            if a not in defined:
                _fail(nodes, i, f"{n.name} uses {a.name} before it is defined", after)
        if n.op == "call_function" and not callable(n.target):
            _fail(nodes, i, f"{n.name} calls a non-callable {n.target!r}", after)
        written = [p for p in _mutated_inputs(n) if p.name not in allowed] \
            if functional and n.op == "call_function" else []
        if written:
            names = ", ".join(p.name for p in written)
            _fail(nodes, i, f"{n.name} ({n.target}) mutates graph input {names} in a functional graph",
                  after)
        defined.add(n)


__all__ = ["graph_pass", "pass_name", "run_pipeline", "log_graph", "should_log",
           "verify_graph", "checking"]

del torch, Optional
