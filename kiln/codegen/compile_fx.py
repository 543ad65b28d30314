"""compile_fx: the entry of the code generator (what the ``inductor`` backend calls).

In:  a torch-level ``fx.GraphModule`` (from capture/, or any fx graph) and its example
     inputs; ``mode`` and ``options`` as ``torch.compile`` takes them.
Out: a callable running the graph on inputs like those, positionally.

The graph goes through kiln.aot (functional ATen forward/backward/inference graphs,
decomposed with codegen's table, split by the min-cut partitioner told which ops
codegen fuses for free), after ``TORCH_LEVEL_PASSES`` (attention masks that are the
causal pattern become ``is_causal``), and each ATen graph through the core's
``compile_aten_graph``, then the profitability check (never slower than eager).

Never a crash on what codegen cannot do: a graph codegen cannot handle
(:class:`kiln.exc.CodegenError`, :class:`~kiln.exc.KernelCompileError`,
:class:`~kiln.exc.CompilerNotFound`) runs its ATen graph eagerly (``kiln.aot.nop``), and
inputs on a device codegen does not target (meta, MPS, sparse, quantized) run the whole
graph through ``aot_eager``; both are recorded with ``kiln.fallbacks.record_fallback``.
"""
from __future__ import annotations

import functools
import itertools
import os
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from kiln.codegen import config, metrics, profitability
from kiln.codegen.causal_mask import causal_masks_to_is_causal
from kiln.exc import CodegenError, CompilerNotFound, InvalidOption, user_location
from kiln.fallbacks import record_fallback
from kiln.passes import run_pipeline
from kiln.settings import options_of

# NOTE: passes over the torch-level graph, before AOT (KILN_LOGS=codegen.<name> prints each)
TORCH_LEVEL_PASSES = [
    causal_masks_to_is_causal,
]


# --------------------------------------------------------------------------- the core
# NOTE: the one place the codegen core (graph.py, decompose.py) is imported; lazily, as
# the core imports cpp/build.py, which imports this package.


def _compile_aten_graph(gm: fx.GraphModule, example_inputs: list) -> Callable:
    from kiln.codegen.graph import compile_aten_graph

    return compile_aten_graph(gm, example_inputs)


def _decomposition_table() -> dict:
    from kiln.codegen.decompose import decomposition_table

    return decomposition_table()


# --------------------------------------------------------------------------- options

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_MODE_PATCHES: dict[Optional[str], dict[str, Any]] = {
    "max-autotune": {"max_autotune": True},
    "max-autotune-no-cudagraphs": {"max_autotune": True},
}


def resolve_options(mode: Optional[str] = None, options: Optional[dict] = None) -> dict[str, Any]:
    """The ``kiln.codegen.config`` settings that ``mode`` and ``options`` ask for.

    Raises :class:`kiln.exc.InvalidOption` for an unknown mode, an unknown option name
    (the known ones are listed) or a value of the wrong type.
    """
    if mode not in MODES:
        raise InvalidOption(
            f"unknown mode {mode!r}",
            why="kiln's inductor backend knows the modes of torch.compile",
            where=user_location(),
            hint=f"use one of {[m for m in MODES if m]}, or leave mode=None",
        )
    if options is not None and not isinstance(options, dict):
        raise InvalidOption(f"options must be a dict, got {type(options).__name__}",
                            where=user_location(), hint="e.g. options={'profitability_check': False}")
    known = options_of(config.__name__)
    patches = dict(_MODE_PATCHES.get(mode, {}))
    for k, v in (options or {}).items():
        if k not in known:
            raise InvalidOption(
                f"unknown option {k!r} for the inductor backend",
                why="options are the settings of kiln.codegen.config",
                where=user_location(),
                hint=f"known options: {sorted(known)}",
            )
        default = known[k]
        ok = (default is None or isinstance(v, type(default))
              or (isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool))
              or (default is not None and v is None and k == "cpp_compiler"))
        if not ok:
            raise InvalidOption(f"option {k!r} takes a {type(default).__name__}, got {v!r}",
                                where=user_location(), hint=f"e.g. options={{{k!r}: {default!r}}}")
        patches[k] = v
    return patches


def check_options(mode: Optional[str] = None, options: Optional[dict] = None, **kwargs: Any) -> None:
    """Validate the arguments ``compile_fx`` will get (called by ``kiln.compile`` at once)."""
    if kwargs:
        _unknown_kwargs(kwargs)
    resolve_options(mode, options)


def _unknown_kwargs(kwargs: dict) -> None:
    raise InvalidOption(
        f"compile_fx got unknown keyword argument(s) {sorted(kwargs)}",
        why="the inductor backend takes mode= and options= only",
        where=user_location(),
        hint="pass codegen settings as options={...} (names of kiln.codegen.config)",
    )


# --------------------------------------------------------------------------- devices


def _tensors(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[torch.Tensor]:
    return [x for x in example_inputs if isinstance(x, torch.Tensor)] + list(gm.parameters()) + list(gm.buffers())


def untargeted_reason(tensors: Sequence[torch.Tensor]) -> Optional[str]:
    """Why codegen cannot compile a graph over ``tensors`` (None when it can try)."""
    for t in tensors:
        if t.layout != torch.strided:
            return f"sparse or non-strided inputs ({t.layout}) are not compiled by codegen"
        if t.is_quantized:
            return f"quantized inputs ({t.dtype}) are not compiled by codegen"
        if t.device.type not in ("cpu", "cuda"):
            return f"codegen does not target {t.device.type} tensors"
    return None


def unbacked_reason(gm: fx.GraphModule) -> Optional[str]:
    """Why codegen does not compile a graph holding values read from tensor data
    (``Tensor.item()`` / ``tolist()``: unbacked symbols), or None."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    found: set = set()
    for n in gm.graph.nodes:
        v = n.meta.get("val", n.meta.get("example_value"))
        try:
            found |= free_unbacked_symbols(v)
        except Exception:  # noqa: BLE001 - values without symbols (modules, opaque objects)
            continue
    if not found:
        return None
    names = ", ".join(sorted(str(s) for s in found)[:4])
    return (f"the graph has unbacked symbols ({names}: values read from tensor data, or sizes marked "
            "unbacked); codegen compiles sizes known from the inputs' sizes only")


# --------------------------------------------------------------------------- the partition policy


def _shrinks(n: fx.Node, factor: int = 4) -> bool:
    """Whether ``n``'s output is ``factor`` times smaller than its tensor inputs (a reduction)."""
    out = n.meta.get("val")
    if not isinstance(out, torch.Tensor):
        return False
    from kiln.tracing.symbolic import size_hint

    ins = [a.meta.get("val") for a in n.all_input_nodes]
    biggest = max((size_hint(v.numel(), fallback=1) for v in ins if isinstance(v, torch.Tensor)), default=0)
    return biggest > factor * max(size_hint(out.numel(), fallback=1), 1)


def fusible_recomputable(n: fx.Node) -> bool:
    """Ops backward may recompute when codegen compiles it: what the default policy
    allows (pointwise, views, cheap creation; never random or expensive ops), except
    reductions that shrink their input more than 4x.

    NOTE: a pointwise op recomputed in backward fuses into the kernel that reads it and
    costs no memory traffic; a reduction recomputed would reread its whole input.
    """
    from kiln.aot.partition import recomputable

    return recomputable(n) and not _shrinks(n)


def partition_fn() -> Callable:
    """kiln's min-cut partitioner with codegen's recompute policy."""
    from kiln.aot import min_cut_rematerialization_partition

    return functools.partial(min_cut_rematerialization_partition, recomputable=fusible_recomputable)


# --------------------------------------------------------------------------- compiling ATen graphs

_graph_ids = itertools.count()


def _strict() -> bool:
    # NOTE: KILN_STRICT=1 (the test suite) turns kiln's own bugs into errors.
    return os.environ.get("KILN_STRICT", "") not in ("", "0")


def _ops_of(gm: fx.GraphModule, limit: int = 12) -> str:
    ops = list(dict.fromkeys(str(n.target) for n in gm.graph.nodes if n.op == "call_function"))
    more = f", ... ({len(ops) - limit} more)" if len(ops) > limit else ""
    return ", ".join(ops[:limit]) + more


def _cudagraphs_around(compiled: Callable, gm: fx.GraphModule, example_inputs: list, name: str) -> Callable:
    from kiln.aot.compilers import call_compiled, make_boxed_func
    from kiln.backends.cudagraphs import cudagraphify, mutated_inputs

    # NOTE: example inputs stay as they are (fake ones keep their symbolic sizes, which
    # cudagraphify refuses with a recorded reason); recording happens at the first call.
    return make_boxed_func(cudagraphify(lambda *a: call_compiled(compiled, list(a)), example_inputs,
                                        gm.meta.get("static_input_indices", ()),
                                        label=f"{name}: mode='reduce-overhead'",
                                        mutated_input_indices=mutated_inputs(gm)))


def compile_graph(gm: fx.GraphModule, example_inputs: list, *, name: str = "graph",
                  mode: Optional[str] = None) -> Callable:
    """One functional ATen graph -> a callable in kiln.aot's boxed convention.

    Codegen's failure on the graph records a fallback and returns ``kiln.aot.nop(gm)``.
    """
    from kiln.aot import nop

    gm._kiln_graph_name = name  # type: ignore[attr-defined]  # NOTE: for decisions and logs
    try:
        compiled = _compile_aten_graph(gm, example_inputs)
    except CodegenError as e:
        record_fallback("codegen", f"{name} ({_ops_of(gm)})", f"the ATen graph runs eagerly: {e}")
        return nop(gm, example_inputs)
    except Exception as e:  # noqa: BLE001 - a kiln bug: eager is right for users
        if _strict():
            raise
        record_fallback("codegen", f"{name} ({_ops_of(gm)})",
                        f"internal error in codegen, the ATen graph runs eagerly: {type(e).__name__}: {e}")
        return nop(gm, example_inputs)
    metrics.graphs_compiled += 1
    # NOTE: no per-ATen-graph timing here: compile_fx times the whole compiled callable
    # against the captured graph (profitability.choose_graph), the real eager baseline.
    if mode == "reduce-overhead" and any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs):
        compiled = _cudagraphs_around(compiled, gm, example_inputs, name)
    return compiled


def _graph_compiler(kind: str, graph_id: int, patches: dict, mode: Optional[str]) -> Callable:
    def compiler(gm: fx.GraphModule, example_inputs: list) -> Callable:
        # NOTE: the backward graph compiles at the first backward, after compile_fx
        # returned: the options are applied again here.
        with config.patch(patches):
            return compile_graph(gm, example_inputs, name=f"graph {graph_id} {kind}", mode=mode)

    compiler.__name__ = f"codegen_{kind}_compiler"
    return compiler


def compile_fx(gm: fx.GraphModule, example_inputs: Sequence[Any], *, mode: Optional[str] = None,
               options: Optional[dict] = None, **kwargs: Any) -> Callable:
    """Compile ``gm`` with kiln's code generator; returns ``f(*inputs)``.

    ``mode``: None/"default", "reduce-overhead" (CUDA graphs around the compiled graphs;
    on CPU tensors recorded as not applying), "max-autotune".  ``options``: settings of
    :mod:`kiln.codegen.config` for this compile.  Unknown ones raise
    :class:`kiln.exc.InvalidOption`.
    """
    if kwargs:
        _unknown_kwargs(kwargs)
    patches = resolve_options(mode, options)
    from kiln.backends.common import aot_autograd
    from kiln.backends.debugging import aot_eager
    from kiln.ops.foreign import kiln_graph

    gm = kiln_graph(gm)  # NOTE: PyTorch's higher-order operators read as kiln's (kiln.ops.foreign)
    graph_id = next(_graph_ids)
    tensors = _tensors(gm, example_inputs)
    with config.patch(patches):
        why = untargeted_reason(tensors) or unbacked_reason(gm)
        if why is None and not any(t.is_cuda for t in tensors) and config.cpu_backend == "cpp":
            from kiln.codegen.cpp.build import compiler

            try:
                compiler()
            except CompilerNotFound as e:
                why = str(e)
        if why is not None:
            record_fallback("codegen", f"graph {graph_id}", f"runs through aot_eager: {why}")
            return aot_eager(gm, list(example_inputs))
        if mode == "reduce-overhead" and not any(t.is_cuda for t in tensors):
            record_fallback("codegen", f"graph {graph_id}: mode='reduce-overhead'",
                            "CUDA graphs need CUDA tensors; the graph runs without them")
        backend = aot_autograd(
            fw_compiler=_graph_compiler("forward", graph_id, patches, mode),
            bw_compiler=_graph_compiler("backward", graph_id, patches, mode),
            inference_compiler=_graph_compiler("inference", graph_id, patches, mode),
            decompositions=_decomposition_table,
            partition_fn=partition_fn(),
            # NOTE: codegen takes functional graphs: an input an inference graph mutates
            # is returned and copied back by kiln.aot's runtime, as for training graphs
            # (kept in the graph, the copy_ made the whole graph run eagerly).
            keep_inference_input_mutations=False,
        )
        gm = run_pipeline("codegen", gm, TORCH_LEVEL_PASSES)
        compiled = backend(gm, list(example_inputs))
        if config.profitability_check:
            compiled = profitability.choose_graph(gm, list(example_inputs), compiled, f"graph {graph_id}")
        return compiled


__all__ = ["compile_fx", "compile_graph", "resolve_options", "check_options", "MODES",
           "fusible_recomputable", "partition_fn", "untargeted_reason", "unbacked_reason"]
