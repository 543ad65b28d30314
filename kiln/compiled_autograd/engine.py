"""Running a backward through a compiled graph: the cache, the fallbacks, the engine switch.

In:  the arguments of the eager engine's ``run_backward`` (what ``Tensor.backward``,
     ``torch.autograd.backward`` and ``torch.autograd.grad`` pass it) while
     :func:`kiln.compiled_autograd.enable` is active.
Out: the same effects and results as eager's engine: ``.grad``\\ s written, hooks called,
     ``autograd.grad``'s tuple returned.  A backward that cannot be traced runs in the
     eager engine, recorded as a fallback (``kiln.fallbacks``) with the reason.

Cache: one entry per (compiler_fn, Plan.key): the traced graph's compiled callable and
what its outputs are for.  An identical second backward reuses it without tracing.
Sizes: per (compiler_fn, structural key) (walk.structural: the key without sizes), the
first graph traced and, once a second size was traced, a template whose sizes are read
from its inputs (dynamic.py).  A backward at a new size is traced, and, if the trace is
the template's instance, runs the template's compiled callable: sizes 4, 8, 16 make two
compiles (the first graph, then the template), not three (``counters["dynamic_hits"]``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref
from typing import Any, Callable, Iterator, Optional

import torch

from kiln import fallbacks
from kiln.compiled_autograd import dynamic as D
from kiln.compiled_autograd.walk import RELEASED_KEY, NotTraceable, Plan, collect, structural

counters: dict[str, int] = {"captures": 0, "cache_hits": 0, "fallbacks": 0, "compiles": 0,
                            "dynamic_graphs": 0, "dynamic_hits": 0}


@dataclasses.dataclass
class Entry:
    compiled: Callable
    outputs: list
    gm: torch.fx.GraphModule


@dataclasses.dataclass
class Family:
    """The graphs of one structure (sizes aside) under one compiler_fn."""
    first: D.NormalForm
    first_sizes: list
    first_outputs: list
    template: Optional[D.Template] = None
    template_entry: Optional[Entry] = None


_cache: dict = {}
_families: dict = {}
_stack: list = []          # active compiler_fns, innermost last
_running = [False]         # inside a compiled backward (a nested backward runs eagerly)
_orig_run: list = []


def reset() -> None:
    """Drop every compiled backward (``kiln.reset()`` calls this too)."""
    _cache.clear()
    _families.clear()
    for k in counters:
        counters[k] = 0


def _call_signature(t_outputs: Any, grad_tensors: Any = None, keep_graph: Any = None,
                    create_graph: bool = False, inputs: Any = None, allow_unreachable: bool = False,
                    accumulate_grad: bool = True) -> tuple:
    return t_outputs, grad_tensors, keep_graph, create_graph, inputs, allow_unreachable, accumulate_grad


def _run_backward(t_outputs: Any, *args: Any, **kwargs: Any) -> Any:
    orig = _orig_run[0]
    if _running[0] or not _stack or _inside_tracing(t_outputs):
        return orig(t_outputs, *args, **kwargs)
    outs, grads, keep_graph, create_graph, inputs, allow_unreachable, accumulate_grad = \
        _call_signature(t_outputs, *args, **kwargs)
    why = _refuse(create_graph, inputs, accumulate_grad)
    plan: Optional[Plan] = None
    if why is None:
        try:
            plan = collect(outs, grads, inputs if not accumulate_grad else None, accumulate_grad)
        except NotTraceable as e:
            why = e.why
    compiler_fn = _stack[-1]
    entry = None
    if plan is not None:
        entry = _cache.get((id(compiler_fn), plan.key))
        if entry is not None:
            counters["cache_hits"] += 1
        else:
            try:
                entry = _compile(plan, compiler_fn)
            except NotTraceable as e:
                why = e.why
    if entry is None:
        counters["fallbacks"] += 1
        fallbacks.record_fallback("compiled_autograd", "backward", f"{why}; it runs in the eager engine")
        return orig(t_outputs, *args, **kwargs)
    return _run(entry, plan, keep_graph, allow_unreachable)


def _inside_tracing(t_outputs: Any) -> bool:
    """A backward that a compiler runs while tracing (AOT's joint graph, on fake tensors,
    under a dispatch mode) is part of that compiler's work, not a user's backward."""
    from torch._subclasses.fake_tensor import FakeTensor

    if torch._C._len_torch_dispatch_stack() > 0:
        return True
    return any(isinstance(t, FakeTensor) for t in t_outputs if isinstance(t, torch.Tensor))


def _refuse(create_graph: bool, inputs: Any, accumulate_grad: bool) -> Optional[str]:
    if create_graph:
        return "double backward (create_graph=True) is not traced"
    if accumulate_grad and inputs:
        return "backward(inputs=...) is not traced"
    return None


def _compile(plan: Plan, compiler_fn: Callable) -> Entry:
    from kiln.compiled_autograd.trace import trace

    try:
        gm, outputs = trace(plan)
    except NotTraceable:
        raise
    except Exception as e:  # noqa: BLE001 - a failure of kiln's own tracing
        if fallbacks.strict():
            raise
        raise NotTraceable(f"tracing the backward failed ({type(e).__name__}: {e})") from e
    counters["captures"] += 1
    entry = _sized_entry(plan, gm, outputs, compiler_fn)
    key = (id(compiler_fn), plan.key)
    _cache[key] = entry
    _forget_with(compiler_fn, _cache, key)
    return entry


def _sized_entry(plan: Plan, gm: torch.fx.GraphModule, outputs: list, compiler_fn: Callable) -> Entry:
    """The entry for a graph just traced: the template's, when the graph is its instance at
    these sizes; else a new template made from this graph and the family's first one; else
    this graph compiled as it is (see the module docstring)."""
    sizes = [tuple(t.shape) for t in plan.inputs]
    nf = D.normal_form(gm)
    fkey = (id(compiler_fn), structural(plan.key))
    fam = _families.get(fkey)
    if fam is None:
        _families[fkey] = Family(nf, sizes, list(outputs))
        _forget_with(compiler_fn, _families, fkey)
        return _compile_gm(gm, outputs, compiler_fn)
    if fam.template is not None:
        if fam.template.outputs == outputs and D.matches(fam.template, nf, sizes):
            counters["dynamic_hits"] += 1
            return fam.template_entry
        return _compile_gm(gm, outputs, compiler_fn)
    if fam.first_outputs == outputs:
        t = D.generalize(fam.first, fam.first_sizes, nf, sizes, gm, list(outputs))
        if t is not None:
            t.gm.meta["kiln_compiled_autograd_dynamic"] = True
            entry = _compile_gm(t.gm, outputs, compiler_fn)
            fam.template, fam.template_entry = t, entry
            counters["dynamic_graphs"] += 1
            return entry
    return _compile_gm(gm, outputs, compiler_fn)


def _compile_gm(gm: torch.fx.GraphModule, outputs: list, compiler_fn: Callable) -> Entry:
    gm.meta["kiln_compiled_autograd_outputs"] = list(outputs)
    prior = _running[0]
    _running[0] = True  # NOTE: backwards the compiler itself runs go to the eager engine
    try:
        compiled = compiler_fn(gm)
    finally:
        _running[0] = prior
    counters["compiles"] += 1
    return Entry(compiled, outputs, gm)


def _forget_with(compiler_fn: Callable, table: dict, key: Any) -> None:
    # NOTE: an entry must not outlive its compiler (ids can be reused).
    try:
        weakref.finalize(compiler_fn, table.pop, key, None)
    except TypeError:
        pass


def _run(entry: Entry, plan: Plan, keep_graph: bool, allow_unreachable: bool) -> Any:
    _running[0] = True
    try:
        with torch.no_grad():
            outs = entry.compiled(list(plan.inputs), list(plan.hooks))
    finally:
        _running[0] = False
    plan.inputs.clear()  # NOTE: as eager frees the incoming gradients
    results: list = [None] * plan.num_results
    for (kind, i), value in zip(entry.outputs, outs):
        if kind == "grad":
            var = plan.leaves[i]
            if var.grad is not value:
                var.grad = value
        elif kind == "retain":
            plan.retained[i].grad = value
        else:
            results[i] = value
    if not keep_graph:
        for n in plan.released:
            n.metadata[RELEASED_KEY] = True
    if plan.num_results:
        if not allow_unreachable and any(r is None for r in results):
            raise RuntimeError("One of the differentiated Tensors appears to not have been used in the "
                               "graph. Set allow_unused=True if this is the desired behavior.")
        return tuple(results)
    return ()


@contextlib.contextmanager
def enabled(compiler_fn: Callable) -> Iterator[None]:
    from kiln.compiled_autograd import hooks

    hooks.install()
    if not _stack:
        _install()
    _stack.append(compiler_fn)
    try:
        yield
    finally:
        _stack.pop()
        if not _stack:
            _uninstall()


def _install() -> None:
    import torch.autograd as autograd
    import torch.autograd.graph as graph

    if not _orig_run:
        _orig_run.append(graph._engine_run_backward)
    autograd._engine_run_backward = _run_backward
    graph._engine_run_backward = _run_backward


def _uninstall() -> None:
    import torch.autograd as autograd
    import torch.autograd.graph as graph

    autograd._engine_run_backward = _orig_run[0]
    graph._engine_run_backward = _orig_run[0]


__all__ = ["enabled", "reset", "counters"]
