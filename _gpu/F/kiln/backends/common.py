"""Pieces shared by backends: the aot_autograd backend builder, calling a backend
safely, and turning fake example inputs into real ones for backends that run code
at compile time.

In:  a torch-level ``fx.GraphModule`` and its example inputs (real or fake tensors,
     SymInts, Python scalars; possibly nested lists from compiled autograd).
Out: a callable taking the graph's inputs positionally.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Any, Callable, Optional, Sequence

import torch
import torch.utils._pytree as pytree

from kiln.exc import BackendCompilerFailed, InvalidBackend, KilnError, user_location
from kiln.tracing.symbolic import size_hint

from .registry import CompiledFn, CompilerFn, backend_name, lookup_backend


def call_backend(
    backend: Any, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, name: Optional[str] = None
) -> CompiledFn:
    """Compile ``gm`` with ``backend`` (a name or a callable) and check the result.

    Returns the backend's callable.  A backend that raises gets
    :class:`kiln.exc.BackendCompilerFailed` (kiln's own errors pass through unchanged);
    one that returns a non-callable gets :class:`kiln.exc.InvalidBackend` naming it.
    """
    compiler_fn = lookup_backend(backend)
    label = name or backend_name(backend)
    try:
        compiled = compiler_fn(gm, list(example_inputs))
    except KilnError:
        raise
    except Exception as e:  # NOTE: any backend failure is reported with the backend's name
        raise BackendCompilerFailed(label, e, where=user_location()) from e
    check_compiled(compiled, label)
    return compiled


def check_compiled(compiled: Any, label: str) -> None:
    """Raise :class:`kiln.exc.InvalidBackend` unless ``compiled`` is callable."""
    if not callable(compiled):
        raise InvalidBackend(
            f"backend {label!r} returned a non-callable {type(compiled).__name__}",
            why="a backend must return a callable that runs the graph on its inputs",
            where=user_location(),
            hint="return gm.forward, or a function taking the graph's inputs",
        )


# --------------------------------------------------------------------------- aot_autograd


def _flat_input_graph(gm: torch.fx.GraphModule, inputs: Sequence[Any]) -> torch.fx.GraphModule:
    """A copy of ``gm`` taking the leaves of ``inputs`` as separate placeholders."""
    flat, spec = pytree.tree_flatten(list(inputs))
    graph = torch.fx.Graph()
    leaves = [graph.placeholder(f"arg{i}") for i in range(len(flat))]
    old = [n for n in gm.graph.nodes if n.op == "placeholder"]
    # NOTE: a placeholder that took a list now maps to a list of nodes; `xs[0]` in the
    # copied graph then indexes that list.
    val_map = dict(zip(old, pytree.tree_unflatten(leaves, spec)))
    graph.output(graph.graph_copy(gm.graph, val_map))
    return torch.fx.GraphModule(gm, graph)


def _flatten_graph_inputs(gm: torch.fx.GraphModule, inputs: Sequence[Any], compile_gm: CompilerFn) -> CompiledFn:
    # NOTE: graphs from compiled autograd take lists of tensors; AOT wants flat tensors.
    compiled = compile_gm(_flat_input_graph(gm, inputs), pytree.tree_leaves(list(inputs)))

    def run(*args: Any) -> Any:
        return compiled(*pytree.tree_leaves(list(args)))

    return run


def _aot_config_patch(**patches: Any) -> contextlib.AbstractContextManager:
    """kiln.aot.config.patch(**patches) for the keys kiln.aot knows; a no-op otherwise."""
    try:
        from kiln.aot import config  # noqa: PLC0415 (aot is written beside us)
    except ImportError:
        return contextlib.nullcontext()
    known = {k: v for k, v in patches.items() if hasattr(config, k)}
    if not known or not hasattr(config, "patch"):
        return contextlib.nullcontext()
    return config.patch(**known)


def _accepted_kwargs(fn: Callable, kwargs: dict[str, Any]) -> dict[str, Any]:
    # NOTE: kiln.aot may not take every torch-era keyword (keep_inference_input_mutations);
    # pass only what its signature accepts so both evolve independently.
    present = {k: v for k, v in kwargs.items() if v is not None}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return present
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return present
    return {k: v for k, v in present.items() if k in params}


def _flat_outputs(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, Optional[pytree.TreeSpec]]:
    """``gm`` itself when it returns a flat tuple/list (capture's graphs do); otherwise a
    copy returning the flat tuple of its outputs, and the structure to rebuild them.

    NOTE: AOT autograd returns a flat list of outputs, as PyTorch's does; graphs from
    other sources (``fx.symbolic_trace``) may return one tensor or a dict.
    """
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    leaves, spec = pytree.tree_flatten(out_node.args[0])
    if isinstance(out_node.args[0], (tuple, list)) and all(
        not isinstance(a, (tuple, list, dict)) for a in out_node.args[0]
    ):
        return gm, None
    graph = copy.deepcopy(gm.graph)
    new_out = next(n for n in reversed(graph.nodes) if n.op == "output")
    new_out.args = (tuple(pytree.tree_leaves(new_out.args[0])),)
    return torch.fx.GraphModule(gm, graph), spec


def _restructure(compiled: CompiledFn, spec: pytree.TreeSpec) -> CompiledFn:
    def run(*args: Any) -> Any:
        return pytree.tree_unflatten(list(compiled(*args)), spec)

    return run


class AotAutograd:
    """A backend that runs AOT autograd with the given compilers.

    Build it with :func:`aot_autograd`.  Called as ``backend(gm, example_inputs)``
    it returns ``kiln.aot.aot_module_simplified(gm, example_inputs, **kwargs)``.
    """

    def __init__(self, config_patches: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        self.__name__ = "compiler_fn"
        self.kwargs = kwargs
        self.config_patches = dict(config_patches or {})

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **extra: Any) -> CompiledFn:
        if any(isinstance(x, (list, tuple, dict)) for x in example_inputs):
            return _flatten_graph_inputs(gm, example_inputs, self)
        from kiln.aot import aot_module_simplified, nop  # lazy: aot/ is a sibling stage

        kwargs = self._resolved_kwargs()
        patches = dict(self.config_patches)
        if kwargs["fw_compiler"] is nop:
            patches.setdefault("debug_assert", True)  # NOTE: as torch: nop means "debugging"
        flat_gm, out_spec = _flat_outputs(gm)
        with _aot_config_patch(**patches):
            compiled = aot_module_simplified(
                flat_gm, list(example_inputs), **_accepted_kwargs(aot_module_simplified, kwargs)
            )
        return compiled if out_spec is None else _restructure(compiled, out_spec)

    def _resolved_kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.kwargs)
        if kwargs.get("fw_compiler") is None:
            raise InvalidBackend(
                "aot_autograd backend has no fw_compiler",
                why="aot_autograd(fw_compiler=...) must name the forward compiler",
                where=user_location(),
                hint="e.g. aot_autograd(fw_compiler=kiln.aot.nop)",
            )
        decomps = kwargs.get("decompositions")
        if callable(decomps):
            kwargs["decompositions"] = decomps()  # NOTE: built lazily, tables are large
        kwargs["bw_compiler"] = kwargs.get("bw_compiler") or kwargs["fw_compiler"]
        kwargs["inference_compiler"] = kwargs.get("inference_compiler") or kwargs["fw_compiler"]
        return kwargs


def aot_autograd(
    fw_compiler: Optional[CompilerFn] = None,
    bw_compiler: Optional[CompilerFn] = None,
    partition_fn: Optional[Callable] = None,
    decompositions: Any = None,
    inference_compiler: Optional[CompilerFn] = None,
    keep_inference_input_mutations: Optional[bool] = None,
    **kwargs: Any,
) -> AotAutograd:
    """Build a backend from AOT compilers, like PyTorch's ``aot_autograd`` backend helper.

    ``fw_compiler``/``bw_compiler``/``inference_compiler`` are ``(gm, example_inputs) -> callable``
    applied to the functional ATen forward/backward/inference graphs; ``bw_compiler`` and
    ``inference_compiler`` default to ``fw_compiler``.  ``decompositions`` is a table or a
    zero-argument callable returning one.  Returns a backend ``(gm, example_inputs) -> callable``.
    """
    return AotAutograd(
        fw_compiler=fw_compiler,
        bw_compiler=bw_compiler,
        partition_fn=partition_fn,
        decompositions=decompositions,
        inference_compiler=inference_compiler,
        keep_inference_input_mutations=keep_inference_input_mutations,
        **kwargs,
    )


# --------------------------------------------------------------------------- inputs


def _defake(x: Any) -> Any:
    from torch._subclasses.fake_tensor import is_fake

    if isinstance(x, torch.SymInt):
        return size_hint(x)
    if not isinstance(x, torch.Tensor) or not is_fake(x):
        return x
    size = [size_hint(s) for s in x.size()]
    stride = [size_hint(s) for s in x.stride()]
    out = torch.empty_strided(size, stride, dtype=x.dtype, device=x.device)
    if x.dtype.is_floating_point or x.dtype.is_complex:
        out.normal_()
    else:
        out.zero_()
    return out.requires_grad_(x.requires_grad)


def real_inputs(example_inputs: Sequence[Any]) -> list[Any]:
    """Example inputs with fake tensors replaced by real ones of the same metadata.

    For backends that must run the graph while compiling (TorchScript, ONNX, CUDA graphs).
    """
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        return [_defake(x) for x in example_inputs]


def device_from_inputs(example_inputs: Sequence[Any]) -> torch.device:
    """The device of the first tensor input (cpu when there is none)."""
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


__all__ = ["AotAutograd", "aot_autograd", "call_backend", "check_compiled", "real_inputs", "device_from_inputs"]
