"""Never slower than eager: time what codegen made against eager, keep the faster.

``choose_graph`` (what ``compile_fx`` calls): the whole compiled callable (AOT runtime +
generated kernels) against the captured torch-level graph run eagerly, PyTorch's own
kernels; a training graph is timed forward and backward.  Module state the graph writes
(BatchNorm's running statistics) and the RNG state are restored afterwards; measured
decisions are cached on disk (``config.profitability_cache``), so a later process decides
without timing.  ``choose``: one ATen graph against itself run op by op (a library
function; the decomposed graph is a weak baseline, see ``choose_graph``).

Both time interleaved rounds (one untimed warm-up each, then rounds while
``config.profitability_budget_s`` lasts, at most ``_MAX_ROUNDS``); the best time of each
decides.  Each :class:`Decision` is appended to ``metrics.profitability_decisions``; a
graph kept eager is counted in ``metrics.graphs_kept_eager``; ``KILN_LOGS=codegen`` prints
every decision.  A compiled graph that raises where eager does not (a kiln bug) is
recorded with ``kiln.fallbacks.record_fallback`` and warns.
``config.profitability_check=False`` turns the check off.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from kiln.codegen import config, metrics

_MAX_ROUNDS = 10


@dataclasses.dataclass(frozen=True)
class Decision:
    graph: str                   # the graph's name (and its node count)
    eager_s: Optional[float]     # best time of the ATen graph run eagerly (None: not measured)
    compiled_s: Optional[float]  # best time of the compiled graph
    kept: str                    # "compiled" or "eager"
    why: str                     # in words

    def __str__(self) -> str:
        times = ""
        if self.eager_s is not None and self.compiled_s is not None:
            times = f" (compiled {self.compiled_s * 1e6:.1f} us, eager {self.eager_s * 1e6:.1f} us)"
        return f"kiln.codegen profitability: {self.graph}: kept {self.kept}{times}: {self.why}"


def _copy_layout(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` with the same sizes, strides and storage offset (expanded too)."""
    x = x.detach()
    n = x.untyped_storage().nbytes() // max(x.element_size(), 1)
    return x.as_strided((n,), (1,), 0).clone().as_strided(x.size(), x.stride(), x.storage_offset())


def _real_inputs(example_inputs: Sequence[Any]) -> list[Any]:
    from kiln.backends.common import real_inputs

    # NOTE: fake inputs become new random tensors; real ones are copied (layout kept),
    # so the timed runs never touch the caller's tensors.
    made = real_inputs(example_inputs)
    return [_copy_layout(m) if isinstance(m, torch.Tensor) and m is x else
            (m.detach() if isinstance(m, torch.Tensor) else m)
            for m, x in zip(made, example_inputs)]


def _call(fn: Callable, inputs: list) -> float:
    args = list(inputs)  # NOTE: a boxed callable may clear its argument list
    t0 = time.perf_counter()
    fn(args)
    return time.perf_counter() - t0


def _sync(inputs: list) -> None:
    if any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs):
        torch.cuda.synchronize()


def _timed(fn: Callable, inputs: list) -> float:
    _sync(inputs)
    t = _call(fn, inputs)
    _sync(inputs)
    return t


def graph_label(gm: fx.GraphModule) -> str:
    n = sum(1 for node in gm.graph.nodes if node.op == "call_function")
    return f"{getattr(gm, '_kiln_graph_name', type(gm).__name__)} ({n} ops)"


def measure(gm: fx.GraphModule, example_inputs: Sequence[Any], compiled: Callable,
            eager: Callable) -> tuple[Optional[float], Optional[float], str]:
    """Best times of ``eager`` and ``compiled`` on real inputs; (None, None, why) when a run
    of the eager graph raised (nothing to compare); (eager, None, why) when only the
    compiled one raised."""
    inputs = _real_inputs(example_inputs)
    budget = config.profitability_budget_s
    start = time.perf_counter()
    with torch.no_grad():
        try:
            best_e = _timed(eager, inputs)
        except Exception as e:  # noqa: BLE001 - random data may be invalid for this graph
            return None, None, f"the eager graph raised on random inputs ({type(e).__name__}: {e})"
        try:
            best_c = _timed(compiled, inputs)
        except Exception as e:  # noqa: BLE001 - a codegen bug; eager is right
            return best_e, None, f"the compiled graph raised where eager did not ({type(e).__name__}: {e})"
        rounds = 0
        while rounds < _MAX_ROUNDS and time.perf_counter() - start < budget:
            # NOTE: interleaved, so a slow spell of the machine hits both.
            best_e = min(best_e, _timed(eager, inputs))
            best_c = min(best_c, _timed(compiled, inputs))
            rounds += 1
    return best_e, best_c, f"best of {rounds + 1} runs each"


def _record(decision: Decision) -> bool:
    """Keep ``decision`` (metrics, KILN_LOGS=codegen); True when the compiled callable stays."""
    from kiln.passes import should_log

    metrics.profitability_decisions.append(decision)
    if should_log("codegen", "profitability"):
        print(str(decision), file=sys.stderr)
    if decision.kept == "compiled":
        return True
    metrics.graphs_kept_eager += 1
    return False


def choose(gm: fx.GraphModule, example_inputs: Sequence[Any], compiled: Callable) -> Callable:
    """The faster of ``compiled`` and the ATen graph run eagerly (see the module docstring)."""
    from kiln.aot import nop
    from kiln.fallbacks import record_fallback

    eager = nop(gm, list(example_inputs))
    eager_s, compiled_s, how = measure(gm, example_inputs, compiled, eager)
    label = graph_label(gm)
    if eager_s is None:
        decision = Decision(label, None, None, "compiled", f"not measured: {how}")
    elif compiled_s is None:
        decision = Decision(label, eager_s, None, "eager", how)
    elif compiled_s <= eager_s:
        decision = Decision(label, eager_s, compiled_s, "compiled", f"not slower than eager ({how})")
    else:
        decision = Decision(label, eager_s, compiled_s, "eager", f"slower than eager ({how})")
    if _record(decision):
        return compiled
    if compiled_s is None:
        # NOTE: a compiled graph that raised is a kiln bug, and users hear of it.  A slower
        # one is a normal decision, not a fallback: it is kept in
        # metrics.profitability_decisions (KILN_LOGS=codegen prints it), without a warning.
        record_fallback("codegen", f"graph {label}", f"the ATen graph runs eagerly: {decision.why}")
    return eager


# ----------------------------------------------------------------------------- whole graphs

# NOTE: in-place torch-level calls (method names ending in "_", copy_) write module state or
# inputs: timing such a graph would change what the user's program sees.
# Normalisations update their running statistics (buffers) inside the call, with no
# in-place op in the graph to show it.
_STAT_UPDATING = ("batch_norm", "instance_norm")


# NOTE: the operator module's in-place functions; its other names ending in "_" (and_,
# or_, not_, is_) are pure.
_OPERATOR_WRITES = frozenset({"setitem", "delitem", "iadd", "iand", "iconcat", "ifloordiv",
                              "ilshift", "imod", "imul", "imatmul", "ior", "ipow", "irshift",
                              "isub", "itruediv", "ixor"})


def _writes(n: fx.Node) -> bool:
    if n.op == "call_method":
        name = n.target
    elif n.op == "call_function":
        # NOTE: graph targets of kiln's own (NumPy calls, say) declare whether they write
        # their arguments; ATen operators say so in their schema.
        declared = getattr(n.target, "writes_inputs", None)
        if declared is not None:
            return bool(declared)
        if isinstance(n.target, torch._ops.OpOverload):
            return n.target._schema.is_mutable
        name = getattr(n.target, "__name__", "")
        if getattr(n.target, "__module__", None) in ("_operator", "operator"):
            return name in _OPERATOR_WRITES
    else:
        return False
    return ((name.endswith("_") and not name.startswith("__")) or "out" in n.kwargs
            or any(k in name for k in _STAT_UPDATING))


def _writes_state(gm: fx.GraphModule) -> bool:
    return any(_writes(n) for n in gm.graph.nodes)


# NOTE: calls that change a tensor's sizes or memory (``x.data = y`` is captured as set_):
# after one timing run the inputs no longer have the shapes the graph was compiled for.
_RESHAPING = frozenset({"set_", "resize_", "resize_as_", "as_strided_"})


def _reshapes_inputs(gm: fx.GraphModule) -> bool:
    return any(n.op in ("call_method", "call_function")
               and (n.target if n.op == "call_method" else getattr(n.target, "__name__", "")) in _RESHAPING
               for n in gm.graph.nodes)


def _timing_inputs(example_inputs: Sequence[Any], copy: bool) -> list[Any]:
    """Real inputs to time with: copies when the graph writes (so the caller's tensors,
    lifted parameters and buffers among them, never move), else the inputs themselves
    (fake ones become random tensors either way)."""
    if copy:
        inputs = _real_inputs(example_inputs)
    else:
        from kiln.backends.common import real_inputs

        inputs = [m.detach() if isinstance(m, torch.Tensor) else m for m in real_inputs(example_inputs)]
    return [m.requires_grad_(x.requires_grad) if isinstance(m, torch.Tensor) and isinstance(x, torch.Tensor)
            and x.requires_grad and m.is_leaf and (m.is_floating_point() or m.is_complex()) else m
            for m, x in zip(inputs, example_inputs)]


def _state_tensors(gm: fx.GraphModule) -> list[torch.Tensor]:
    """The tensors ``gm`` holds (parameters, buffers, tensor constants), each once."""
    seen: dict[int, torch.Tensor] = {}
    for t in [*gm.parameters(), *gm.buffers(), *(v for v in vars(gm).values() if isinstance(v, torch.Tensor))]:
        seen.setdefault(id(t), t)
    return list(seen.values())


class _Step:
    """One timed call of a torch-level callable: the forward, and when the outputs need
    grads, their backward too (``torch.autograd.grad`` into ``leaves``: no ``.grad`` is
    written), so a training graph is judged on what a training step runs."""

    def __init__(self, inputs: list, leaves: list[torch.Tensor]):
        self.inputs, self.leaves = inputs, leaves

    def __call__(self, fn: Callable) -> float:
        _sync(self.inputs)
        t0 = time.perf_counter()
        out = fn(*self.inputs)
        if self.leaves:
            outs = [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor) and o.requires_grad]
            if outs:
                torch.autograd.grad(outs, self.leaves, [torch.ones_like(o) for o in outs], allow_unused=True)
        _sync(self.inputs)
        return time.perf_counter() - t0


def _leaves(gm: fx.GraphModule, inputs: list) -> list[torch.Tensor]:
    if not torch.is_grad_enabled():
        return []
    ts = [x for x in inputs if isinstance(x, torch.Tensor)] + list(gm.parameters())
    return [t for t in ts if t.requires_grad and t.is_leaf]


@contextlib.contextmanager
def _state_kept(gm: fx.GraphModule, writes: bool):
    """Around timing runs: the RNG state, and (when the graph writes module state, e.g.
    BatchNorm's running statistics) every tensor ``gm`` holds, restored afterwards."""
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    state = _state_tensors(gm) if writes else []
    with torch.no_grad():
        saved = [t.detach().clone() for t in state]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, s in zip(state, saved):
                t.copy_(s)
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _state_bytes(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> int:
    ts = _state_tensors(gm) + [x for x in example_inputs if isinstance(x, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in ts)


def _measure_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], compiled: Callable,
                   label: str) -> Decision:
    writes = _writes_state(gm)
    if _reshapes_inputs(gm):
        return Decision(label, None, None, "compiled", "not measured: the graph changes the sizes or "
                        "memory of a tensor it is given (set_, resize_), which repeated timing runs "
                        "would see changed")
    if writes and _state_bytes(gm, example_inputs) > config.profitability_snapshot_bytes:
        return Decision(label, None, None, "compiled", "not measured: the graph writes module state "
                        "or inputs larger than config.profitability_snapshot_bytes, which timing "
                        "would have to copy")
    inputs = _timing_inputs(example_inputs, copy=writes)
    step = _Step(inputs, _leaves(gm, inputs))
    what = "forward and backward" if step.leaves else "forward"
    with _state_kept(gm, writes):
        try:
            step(gm.forward)
        except Exception as e:  # noqa: BLE001 - random inputs may be invalid for this graph
            return Decision(label, None, None, "compiled", f"not measured: the captured graph raised on "
                            f"random inputs ({type(e).__name__}: {e})")
        try:
            # NOTE: one untimed call each first: the compiled callable's first call may still
            # compile (the backward graph, Triton's JIT and autotuning).
            step(compiled)
        except Exception as e:  # noqa: BLE001 - a codegen bug; eager is right
            return Decision(label, None, None, "eager", f"the compiled graph raised where eager did not "
                            f"({type(e).__name__}: {e})")
        budget, start = config.profitability_budget_s, time.perf_counter()
        best_e, best_c = step(gm.forward), step(compiled)
        rounds = 0
        while rounds < _MAX_ROUNDS and (rounds < 2 or time.perf_counter() - start < budget):
            # NOTE: interleaved, so a slow spell of the machine hits both.
            best_e = min(best_e, step(gm.forward))
            best_c = min(best_c, step(compiled))
            rounds += 1
    kept = "compiled" if best_c <= best_e else "eager"
    return Decision(label, best_e, best_c, kept,
                    f"{'not slower' if kept == 'compiled' else 'slower'} than the captured graph run "
                    f"eagerly ({what}, best of {rounds + 1} runs each)")


# ----------------------------------------------------------------------------- cached decisions

def decision_key(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Optional[str]:
    """The cache key of the decision for ``gm`` on inputs like ``example_inputs``, or None
    when the graph cannot be keyed (its code does not print)."""
    from kiln.codegen import cache
    from kiln.codegen.cache import kiln_fingerprint, value_meta
    from kiln.settings import options_of

    try:
        code = gm.code
    except Exception:  # noqa: BLE001 - an unprintable graph is decided every time
        return None
    return cache.record_key({
        "graph": code, "inputs": [value_meta(x) for x in example_inputs],
        "state": [value_meta(t) for t in _state_tensors(gm)], "grad": torch.is_grad_enabled(),
        "threads": torch.get_num_threads(), "kiln_sources": kiln_fingerprint(),
        "config": {k: getattr(config, k) for k in sorted(options_of(config.__name__))},
    })


def _cached(key: Optional[str], label: str) -> Optional[Decision]:
    from kiln.codegen import cache

    rec = cache.read_record("decisions", key) if key and config.profitability_cache else None
    if rec is None or rec.get("kept") not in ("compiled", "eager"):
        return None
    return Decision(label, rec.get("eager_s"), rec.get("compiled_s"), rec["kept"],
                    f"{rec.get('why', '')}; read from the cache (an earlier run on this machine measured it)")


def _store(key: Optional[str], d: Decision) -> None:
    from kiln.codegen import cache

    # NOTE: only measured decisions are kept; "not measured" ones are cheap to remake.
    if key and config.profitability_cache and d.eager_s is not None and d.compiled_s is not None:
        cache.write_record("decisions", key, {"kept": d.kept, "eager_s": d.eager_s,
                                              "compiled_s": d.compiled_s, "why": d.why})


def choose_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], compiled: Callable,
                 label: str) -> Callable:
    """The faster of ``compiled(*inputs)`` (the whole AOT + codegen callable) and the captured
    torch-level graph ``gm`` run eagerly: PyTorch's own kernels, the real eager baseline.

    NOTE: the ATen graphs codegen receives are decomposed (softmax into amax, sub, exp, sum,
    div): run op by op they are much slower than eager, so they are no baseline for "never
    slower than eager".  Timed in the grad mode of the compile; when outputs need grads, a
    timed run is the forward and its backward.  The random-number state is restored
    afterwards, and so is module state the graph writes (BatchNorm's running statistics).
    A compiled callable that raises where eager does not is a kiln bug: eager is kept and
    the fallback recorded.  A measured decision is cached on disk (keyed by the graph, its
    inputs' metadata, threads, config and kiln's sources), so a later process
    compiling the same graph decides without timing.
    """
    from kiln.fallbacks import record_fallback

    key = decision_key(gm, example_inputs) if config.profitability_cache else None
    decision = _cached(key, label)
    if decision is None:
        decision = _measure_graph(gm, example_inputs, compiled, label)
        _store(key, decision)
    if _record(decision):
        return compiled
    if decision.compiled_s is None:
        record_fallback("codegen", label, f"the captured graph runs eagerly: {decision.why}")
    return gm.forward


__all__ = ["Decision", "choose", "choose_graph", "measure", "graph_label", "decision_key"]
