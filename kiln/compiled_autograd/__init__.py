"""compiled_autograd/: the backward pass the autograd engine is about to run, as one graph.

In:  inside ``with kiln.compiled_autograd.enable(compiler_fn):``, every
     ``tensor.backward()``, ``torch.autograd.backward`` and ``torch.autograd.grad``.
Out: the same effects as eager's engine (``.grad`` values, hook calls and their side
     effects, ``autograd.grad``'s results), computed by ``compiler_fn(gm)``, where ``gm``
     is an fx GraphModule ``forward(self, inputs: list, hooks: list) -> tuple``:

     - ``inputs``: the incoming gradients, then, in the engine's order, the saved tensors
       the backward reads and the existing ``.grad``\\ s it accumulates into;
     - ``hooks``: the Python hooks it calls (tensor hooks, node pre/post hooks, module
       full backward hooks, post-accumulate-grad hooks), each as one opaque
       ``call_hook(hooks[k], ...)`` node, so that a hook runs (with its side effects) on
       every backward, and so that ``kiln.compile(gm)`` inlines it;
     - nodes: the ATen ops of every node's backward (C++ formulas, custom
       ``autograd.Function`` backwards, the backward graphs of kiln-compiled regions),
       shape/dtype fixes between nodes as eager's engine makes them, gradient sums,
       ``torch.clone`` into a fresh ``.grad`` and in-place ``add_`` into an existing one;
     - outputs: the new ``.grad``\\ s (and ``autograd.grad``'s results), which the runtime
       assigns.

Design (why a Python walk).  PyTorch captures the backward with a hook inside its C++
engine, which swaps each node's saved variables for graph inputs.  kiln instead walks the
autograd graph from Python (``grad_fn.next_functions``, ``_saved_*``, ``_input_metadata``,
``AccumulateGrad.variable``), orders it as the engine would (ready nodes by descending
sequence number), and runs each node for real under kiln's own dispatch-level tracer
(kiln.tracing), which records the ATen ops it dispatches: no dependency on the C++
hook's interface (which differs between torch versions and calls back into
PyTorch's own bytecode compiler), and every node kind is a row of a table (walk.py reads, trace.py runs).
The price: saved tensors are found by identity or storage rather than swapped, hooks on
non-leaf tensors must be noted when registered (hooks.py, installed by ``import kiln``),
and a trace holds a node's saved sizes as plain ints, so symbolic sizes are recovered by
comparing traces (dynamic.py).  Kiln-compiled regions contribute their AOT backward
*graph*, never their compiled kernels (invisible to a dispatch tracer).

Cache: a traced graph is keyed by (``compiler_fn``, the autograd graph's structure,
its inputs' metadata, its nodes' saved non-tensor values, hook counts); an identical
second backward reuses the compiled graph without tracing (``counters["cache_hits"]``).
Sizes become symbolic as in capture's automatic dynamic: the first backward of a
structure compiles its graph as traced; a backward of the same structure at other sizes
(walk.structural: ranks, dtypes, devices, no sizes) is generalized with the first into a
graph that reads its sizes from its inputs (``inputs[i].size(d)``; ``compiler_fn`` may
compile it with ``dynamic=True``), compiled once; every later size is traced and, when
the trace is exactly that graph's instance, runs it without compiling
(``counters["dynamic_graphs"]``, ``counters["dynamic_hits"]``).

Fallbacks (recorded with ``kiln.fallbacks``; the eager engine runs the whole backward):
``create_graph=True``, ``backward(inputs=...)``, sparse gradients, C++ custom Functions,
a backward that reads a value into Python or a tensor that is not one of its inputs, or
that mutates its inputs, and a graph with nodes created before ``import kiln`` (hooks
on their tensors could not be seen).  Errors raised by ``compiler_fn`` or by the compiled graph
(``kiln.exc.Unsupported`` from a ``fullgraph=True`` compile of a hook that prints)
propagate to the ``backward`` call.

Limits: saved tensors of a compiled backward without ``retain_graph`` are not freed early
(a second backward raises eager's error; memory goes when the graph is dropped);
``set_materialize_grads(False)`` is not seen (a Function gets zeros for missing grads);
hooks registered from C++ (``add_post_hook`` of a C++ extension) are not seen.

Per-step cost: the walk reads each node once (``next_functions`` once, kinds and saved
attribute names by node type, no hook probes unless a node hook was ever registered); a
cached backward costs the walk, the key's hash and the compiled call.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Any, Callable, Iterator

from kiln.compiled_autograd import hooks as _hooks
from kiln.compiled_autograd.hooks import call_hook, call_post_acc_hook, call_posthook, call_prehook

# NOTE: normally installed already by ``import kiln``; here too for a direct import.
_hooks.install()

# NOTE: the rest is imported on first use, so that ``import kiln`` (which installs the
# hook wrappers from hooks.py) stays cheap.
_LAZY = {"reset": "engine", "counters": "engine", "NotTraceable": "walk"}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'kiln.compiled_autograd' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"kiln.compiled_autograd.{mod}"), name)
    globals()[name] = value
    return value


@contextlib.contextmanager
def enable(compiler_fn: Callable) -> Iterator[None]:
    """Compile every backward run inside the block.

    In: ``compiler_fn(gm: torch.fx.GraphModule) -> callable``; the callable is called as
    ``compiled(inputs: list[Tensor], hooks: list[Callable]) -> tuple[Tensor, ...]`` (``gm``
    itself is such a callable; ``lambda gm: kiln.compile(gm, backend=...)`` compiles it).
    Out: a context manager; nested blocks use the innermost ``compiler_fn``.
    """
    from kiln.compiled_autograd.engine import enabled

    with enabled(compiler_fn):
        yield


__all__ = ["enable", "reset", "counters", "NotTraceable", "call_hook", "call_prehook",
           "call_posthook", "call_post_acc_hook"]
