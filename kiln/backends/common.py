"""Pieces shared by backends: the aot_autograd backend builder, calling a backend
safely, and turning fake example inputs into real ones for backends that run code
at compile time.

In:  a torch-level ``fx.GraphModule`` and its example inputs (real or fake tensors,
     SymInts, Python scalars; possibly nested lists from compiled autograd).
Out: a callable taking the graph's inputs positionally.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Sequence

import torch
import torch.utils._pytree as pytree

from kiln import aot
from kiln.aot.options import check_option_names
from kiln.exc import BackendCompilerFailed, BannedInCompile, InvalidBackend, user_location
from kiln.fallbacks import record_fallback
from kiln.tracing.symbolic import size_hint

from .registry import CompiledFn, CompilerFn, backend_name, lookup_backend


def call_backend(
    backend: Any, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, name: Optional[str] = None,
    fallback_to_eager: bool = False,
) -> CompiledFn:
    """Compile ``gm`` with ``backend`` (a name or a callable) and check the result.

    The one place where kiln calls a backend (capture's graphs go through it too).
    Returns the backend's callable.  A backend that raises gets
    :class:`kiln.exc.BackendCompilerFailed` naming it (as PyTorch: also for kiln's own
    errors from AOT or codegen; :class:`kiln.exc.InvalidBackend` passes through unchanged);
    with ``fallback_to_eager`` (capture without fullgraph) the failure is recorded
    through :func:`kiln.fallbacks.record_fallback` instead and ``gm.forward`` returned.
    A backend that returns a non-callable gets :class:`kiln.exc.InvalidBackend` naming it.
    """
    compiler_fn = lookup_backend(backend)
    label = name or backend_name(backend)
    try:
        compiled = compiler_fn(gm, list(example_inputs))
    except Exception as e:  # NOTE: any backend failure is reported with the backend's name
        # NOTE: a program that compilation refuses by design is told so, not run eagerly.
        if fallback_to_eager and not isinstance(e, BannedInCompile):
            first = str(e).splitlines()[0] if str(e) else ""
            record_fallback("backend", f"a graph of {len(gm.graph.nodes)} nodes",
                            f"backend {label!r} failed ({type(e).__name__}: {first}); running the graph eagerly")
            return gm.forward
        if isinstance(e, (InvalidBackend, BackendCompilerFailed)):
            raise  # NOTE: already says which backend and why (e.g. a package to install)
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
    it returns ``kiln.aot.aot_module_simplified(gm, example_inputs, options=...)``
    with the AOTOptions made from ``kwargs``.  Unknown option names are a TypeError
    here, when the backend is built; ``config_patches`` are kiln.aot.config options.
    """

    def __init__(self, config_patches: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        self.__name__ = "compiler_fn"
        check_option_names(kwargs, "aot_autograd")
        self.kwargs = kwargs
        self.config_patches = dict(config_patches or {})

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **extra: Any) -> CompiledFn:
        if any(isinstance(x, (list, tuple, dict)) for x in example_inputs):
            return _flatten_graph_inputs(gm, example_inputs, self)
        options = self.options()
        patches = dict(self.config_patches)
        if options.fw_compiler is aot.nop:
            patches.setdefault("debug_assert", True)  # NOTE: as torch: nop means "debugging"
        flat_gm, out_spec = _flat_outputs(gm)
        with aot.config.patch(**patches):
            compiled = aot.aot_module_simplified(flat_gm, list(example_inputs), options=options)
        return compiled if out_spec is None else _restructure(compiled, out_spec)

    def options(self) -> aot.AOTOptions:
        """The AOTOptions this backend compiles with (decompositions built now)."""
        kwargs = {k: v for k, v in self.kwargs.items() if v is not None}
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
        return aot.AOTOptions(**kwargs)


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
    zero-argument callable returning one.  Other keywords are kiln.aot.AOTOptions fields
    (``num_params_buffers`` is not one: the backend counts them).  Returns a backend
    ``(gm, example_inputs) -> callable``.
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
