"""Never slower than eager: time a compiled graph against its ATen graph run eagerly.

In:  an ATen graph, its example inputs (fake or real), and the callable codegen made for
     it (kiln.aot's boxed convention).
Out: the faster of the two callables (the compiled one, or ``kiln.aot.nop(gm)``), and a
     :class:`Decision` appended to ``kiln.codegen.metrics.profitability_decisions``.

Both run on the same real inputs (fake inputs become random tensors of their metadata,
real ones are cloned, so nothing the caller holds is touched), under ``no_grad``, in
interleaved rounds (one warm-up each, then rounds while ``config.profitability_budget_s``
lasts, at most ``_MAX_ROUNDS``); the best time of each decides.  A graph kept eager is
counted in ``metrics.graphs_kept_eager``; ``KILN_LOGS=codegen`` prints every decision.
A compiled graph that raises where eager does not (a kiln bug) is recorded with
``kiln.fallbacks.record_fallback`` and warns.  ``config.profitability_check=False``
turns the check off.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

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


def _writes_state(gm: fx.GraphModule) -> bool:
    for n in gm.graph.nodes:
        if n.op not in ("call_method", "call_function"):
            continue
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        if (name.endswith("_") and not name.startswith("__")) or any(k in name for k in _STAT_UPDATING):
            return True
    return False


def _timing_inputs(example_inputs: Sequence[Any]) -> list[Any]:
    inputs = _real_inputs(example_inputs)
    return [m.requires_grad_(x.requires_grad) if isinstance(m, torch.Tensor) and isinstance(x, torch.Tensor)
            and x.requires_grad and m.is_leaf and (m.is_floating_point() or m.is_complex()) else m
            for m, x in zip(inputs, example_inputs)]


def _unboxed_timed(fn: Callable, inputs: list) -> float:
    _sync(inputs)
    t0 = time.perf_counter()
    fn(*inputs)
    _sync(inputs)
    return time.perf_counter() - t0


def choose_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], compiled: Callable,
                 label: str) -> Callable:
    """The faster of ``compiled(*inputs)`` (the whole AOT + codegen callable) and the captured
    torch-level graph ``gm`` run eagerly: PyTorch's own kernels, the real eager baseline.

    NOTE: the ATen graphs codegen receives are decomposed (softmax into amax, sub, exp, sum,
    div): run op by op they are much slower than eager, so they are no baseline for "never
    slower than eager".  Timed in the grad mode of the compile (the forward only), with the
    random-number state restored afterwards; graphs that write module state or inputs are not
    timed (the compiled callable is kept, and the decision says why).
    """
    if _writes_state(gm):
        decision = Decision(label, None, None, "compiled", "not measured: the graph writes module state or inputs")
    else:
        inputs = _timing_inputs(example_inputs)
        cpu_rng = torch.random.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        try:
            # NOTE: one untimed call each first: the compiled callable's first call may still
            # compile (the backward graph, Triton's JIT and autotuning).
            _unboxed_timed(gm.forward, inputs)
            _unboxed_timed(compiled, inputs)
            budget, start = config.profitability_budget_s, time.perf_counter()
            best_e = _unboxed_timed(gm.forward, inputs)
            best_c = _unboxed_timed(compiled, inputs)
            rounds = 0
            while rounds < _MAX_ROUNDS and (rounds < 2 or time.perf_counter() - start < budget):
                best_e = min(best_e, _unboxed_timed(gm.forward, inputs))
                best_c = min(best_c, _unboxed_timed(compiled, inputs))
                rounds += 1
            kept = "compiled" if best_c <= best_e else "eager"
            decision = Decision(label, best_e, best_c, kept,
                                f"{'not slower' if kept == 'compiled' else 'slower'} than the captured graph "
                                f"run eagerly (best of {rounds + 1} runs each)")
        except Exception as e:  # noqa: BLE001 - random inputs may be invalid for this graph
            decision = Decision(label, None, None, "compiled", f"not measured: {type(e).__name__}: {e}")
        finally:
            torch.random.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
    return compiled if _record(decision) else gm.forward


__all__ = ["Decision", "choose", "choose_graph", "measure", "graph_label"]
