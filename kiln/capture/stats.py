"""Capture statistics under PyTorch's keys: ``kiln.capture.counters``.

In:  events of the capture stage (a frame compiled or not, a graph break, a graph
     handed to its backend, a reason capture gave up on).
Out: ``counters``, a ``defaultdict(collections.Counter)`` filled as PyTorch's
     bytecode compiler fills its ``utils.counters``, so that tests written against
     PyTorch's statistics read kiln's unchanged:

- ``counters["frames"]["total"]``: frames capture tried to compile (each miss that
  traces, resume functions included); ``["ok"]``: those that produced an entry.
- ``counters["graph_break"][reason]``: one key per distinct graph-break reason (the
  short "what" of the :class:`kiln.exc.Unsupported` that split the graph), counted
  per occurrence.  A data-dependent branch on a tensor is not a graph break here,
  as in PyTorch (its jump is recorded under ``"unimplemented"``).
- ``counters["unimplemented"][reason]``: what capture could not do and did not
  resume around (data-dependent jumps, frames that run eagerly, fullgraph errors).
- ``counters["stats"]["calls_captured"]``: call nodes (``call_function`` /
  ``call_method`` / ``call_module``) of every graph given to a backend;
  ``["unique_graphs"]``: how many graphs were given to a backend.
- ``counters["resumes"][name]``: resume functions created, by name.

Invariants: only capture writes here; ``kiln.reset()`` clears it; reading a missing
key never creates it (``Counter`` semantics), so ``dict(counters["frames"])`` is ``{}``
when nothing was compiled.

NOTE: no torch import: the capture package's root must stay importable without it.
"""
from __future__ import annotations

import collections
from typing import Any

counters: "collections.defaultdict[str, collections.Counter]" = collections.defaultdict(collections.Counter)


def count_calls(graph: Any) -> int:
    """Nodes of an fx graph whose op is a call (PyTorch's ``count_calls``)."""
    return sum(1 for n in graph.nodes if "call" in n.op)


def frame_started() -> None:
    counters["frames"]["total"] += 1


def frame_ok() -> None:
    counters["frames"]["ok"] += 1


def graph_compiled(graph: Any) -> None:
    """A graph was handed to its backend."""
    counters["stats"]["calls_captured"] += count_calls(graph)
    counters["stats"]["unique_graphs"] += 1


def graph_break(reason: str, data_dependent_jump: bool = False) -> None:
    """A graph break with ``reason`` (a jump on a tensor counts as unimplemented, as in PyTorch)."""
    counters["unimplemented" if data_dependent_jump else "graph_break"][reason] += 1


def unimplemented(reason: str) -> None:
    counters["unimplemented"][reason] += 1


def resume_created(name: str) -> None:
    counters["resumes"][name] += 1


def clear() -> None:
    """Drop every statistic (``kiln.reset()`` calls it)."""
    counters.clear()
