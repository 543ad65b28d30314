"""make_fx: trace a function or nn.Module into an ATen-level fx.GraphModule."""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Callable, Iterator, Optional

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from kiln import exc
from kiln.passes import run_pipeline
from kiln.tracing.dce import eliminate_dead_code
from kiln.tracing.tracer import Tracer

TRACING_MODES = ("real", "fake", "symbolic")

_LEAF_TYPES = (torch.Tensor, int, float, bool, str, complex, type(None), torch.dtype,
               torch.device, torch.memory_format, torch.layout, torch.SymInt,
               torch.SymFloat, torch.SymBool)


# NOTE: passes run on a graph handed to make_fx before it is traced, registered by the
# stages that own them (kiln.ops registers the one reading PyTorch's higher-order
# operators as kiln's), so tracing imports no later stage.
_ENTRY_PASSES: list[Callable[[Any], Any]] = []


def register_entry_pass(fn: Callable[[Any], Any]) -> None:
    """Run ``fn`` (callable -> callable, returning its argument when it has nothing to
    do) on every function or graph handed to ``make_fx``."""
    if fn not in _ENTRY_PASSES:
        _ENTRY_PASSES.append(fn)


def make_fx(fn: Callable, tracing_mode: str = "real",
            decomposition_table: Optional[dict] = None) -> Callable[..., fx.GraphModule]:
    """Return a function that traces `fn` on given inputs into an fx.GraphModule.

    In: `fn` (function or nn.Module), `tracing_mode` ("real" runs ops on the
    inputs, "fake" on FakeTensors, "symbolic" on FakeTensors with SymInt sizes),
    an optional `decomposition_table` {OpOverload: fn} applied while tracing.
    Out: `wrapped(*args)` -> GraphModule whose nodes call ATen OpOverloads;
    every node has meta["val"] and (tensors) meta["tensor_meta"].

    NOTE: tensors from outside the function (closures, globals) are accepted
    in every mode: they become ``_tensor_constant`` attributes of the graph.
    """
    if tracing_mode not in TRACING_MODES:
        raise exc.TracingError(
            f"unknown tracing_mode {tracing_mode!r}",
            why=f"make_fx supports {', '.join(TRACING_MODES)}",
            where=exc.user_location(),
        )

    target = fn
    for entry_pass in _ENTRY_PASSES:  # NOTE: e.g. PyTorch's HOPs -> kiln's (kiln.ops.foreign)
        target = entry_pass(target)

    @functools.wraps(fn)
    def wrapped(*args: Any) -> fx.GraphModule:
        return _trace(target, args, tracing_mode, decomposition_table)

    return wrapped


def _find_fake_mode(flat_args: list) -> Optional[FakeTensorMode]:
    for a in flat_args:
        if isinstance(a, FakeTensor):
            return a.fake_mode
    return None


def has_shape_env(fake_mode: Optional[FakeTensorMode]) -> bool:
    """Whether tracing under ``fake_mode`` may meet symbolic sizes."""
    return fake_mode is not None and fake_mode.shape_env is not None


def _make_fake_mode(tracing_mode: str, flat_args: list) -> Optional[FakeTensorMode]:
    existing = _find_fake_mode(flat_args)
    if existing is not None:
        return existing
    if tracing_mode == "real":
        return None
    if tracing_mode == "symbolic":
        mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv(),
                              static_shapes=False)
    else:
        mode = FakeTensorMode(allow_non_fake_inputs=True, static_shapes=True)
    # NOTE: reading data of a fake tensor must fail loudly ("Cannot access data
    # pointer"), not warn and return garbage.
    mode._allow_unsafe_data_ptr_access = False
    return mode


def _placeholder_names(fn: Callable, n_args: int) -> list[str]:
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return [f"arg{i}" for i in range(n_args)]
    names: list[str] = []
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
        elif p.kind == p.VAR_POSITIONAL:
            break
    while len(names) < n_args:
        names.append(f"arg{len(names)}")
    return names[:n_args]


def _to_traced_input(x: Any, fake_mode: Optional[FakeTensorMode]) -> Any:
    if isinstance(x, torch.Tensor) and fake_mode is not None and not isinstance(x, FakeTensor):
        return fake_mode.from_tensor(x)
    return x


@contextlib.contextmanager
def _module_state(mod: torch.nn.Module, tracer: Tracer) -> Iterator[None]:
    """Bind parameters and buffers to get_attr nodes (fake copies in fake modes)."""
    state = dict(mod.named_parameters(remove_duplicate=False))
    state.update(mod.named_buffers(remove_duplicate=False))
    first_name: dict[int, str] = {}
    for name, t in state.items():
        first_name.setdefault(id(t), name)
    if tracer.fake_mode is None:
        for name, t in state.items():
            if tracer.node_of_tensor(t) is None:
                tracer.bind(t, tracer.graph.get_attr(first_name[id(t)]))
        yield
        return
    fakes: dict[int, torch.Tensor] = {}
    replacement: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if id(t) not in fakes:
            fake = tracer.fake_mode.from_tensor(t, static_shapes=True)
            if isinstance(t, torch.nn.Parameter):
                fake = torch.nn.Parameter(fake, requires_grad=t.requires_grad)
            fakes[id(t)] = fake
            tracer.bind(fake, tracer.graph.get_attr(first_name[id(t)]))
        replacement[name] = fakes[id(t)]
    from torch.nn.utils.stateless import _reparametrize_module

    with _reparametrize_module(mod, replacement, tie_weights=True):
        yield


def _trace(fn: Callable, args: tuple, tracing_mode: str,
           decomposition_table: Optional[dict]) -> fx.GraphModule:
    flat_args, spec = pytree.tree_flatten(args)
    fake_mode = _make_fake_mode(tracing_mode, flat_args)
    tracer = Tracer(fake_mode, decomposition_table)
    names = _placeholder_names(fn, len(args))
    traced_flat = _make_placeholders(tracer, args, names, fake_mode)
    traced_args = pytree.tree_unflatten(traced_flat, spec)

    is_module = isinstance(fn, torch.nn.Module)
    mode_ctx = fake_mode if fake_mode is not None else contextlib.nullcontext()
    state_ctx = _module_state(fn, tracer) if is_module else contextlib.nullcontext()
    # NOTE: with symbolic sizes, C++ composite kernels (aten::lstm) call numel() or sizes()
    # and fail or specialise; the Python dispatcher routes them to the Python decompositions
    # registered for CompositeImplicitAutograd instead (as PyTorch does whenever a ShapeEnv
    # exists). Fake inputs made elsewhere (AOT's) count by their ShapeEnv.
    dispatcher_ctx = enable_python_dispatcher() if has_shape_env(fake_mode) \
        else contextlib.nullcontext()
    with tracer, dispatcher_ctx, mode_ctx, state_ctx, tracer.mode:
        out = fn(*traced_args)
    _check_outputs(fn, out)
    tracer.graph.output(tracer.proxy_tree(out))
    _use_pytree_codegen(tracer.graph, names, args, spec)
    gm = _build_module(fn, tracer)
    return run_pipeline("tracing", gm, [eliminate_dead_code])


def _use_pytree_codegen(graph: fx.Graph, names: list[str], args: tuple,
                        spec: pytree.TreeSpec) -> None:
    """Let the GraphModule take the same nested inputs as the traced function."""
    if all(not isinstance(a, (list, tuple, dict)) for a in args):
        return
    from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

    graph._codegen = _PyTreeCodeGen(_PyTreeInfo(names, spec, None))


def _make_placeholders(tracer: Tracer, args: tuple, names: list[str],
                       fake_mode: Optional[FakeTensorMode]) -> list:
    traced_flat: list = []
    for i, a in enumerate(args):
        leaves = pytree.tree_leaves(a)
        for leaf in leaves:
            node = tracer.graph.placeholder(f"{names[i]}_1")
            node.target = node.name  # NOTE: primals_1, primals_2, ... as in PyTorch
            value = _to_traced_input(leaf, fake_mode)
            tracer.bind(value, node)
            if isinstance(value, FakeTensor) and fake_mode is not None \
                    and fake_mode.shape_env is not None:
                tracer.syms.register_input(node, value)
            elif isinstance(value, (torch.SymInt, torch.SymFloat)):
                tracer.syms.register_symint_input(node, value)
            traced_flat.append(value)
    return traced_flat


def _check_outputs(fn: Callable, out: Any) -> None:
    for leaf in pytree.tree_leaves(out):
        if not isinstance(leaf, _LEAF_TYPES):
            name = getattr(fn, "__qualname__", type(fn).__name__)
            raise exc.TracingError(
                f"{name} returned a {type(leaf).__name__}, which make_fx cannot put in a graph",
                why="a traced function must return tensors, Python scalars, or "
                    "lists/tuples/dicts of them",
                where=_fn_location(fn),
                hint="return the tensors inside the object instead (e.g. a tuple)",
            )


def _fn_location(fn: Callable) -> str:
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    code = getattr(target, "__code__", None)
    if code is None:
        return exc.user_location()
    return exc.format_location(code.co_filename, code.co_firstlineno)


def _build_module(fn: Callable, tracer: Tracer) -> fx.GraphModule:
    if isinstance(fn, torch.nn.Module):
        root: torch.nn.Module = fn
        class_name = type(fn).__name__
    else:
        root = torch.nn.Module()
        class_name = getattr(fn, "__name__", "traced")
        if not class_name.isidentifier():
            class_name = "traced"
    for name, value in tracer.constants.items():
        if isinstance(value, torch.nn.Module):
            root.add_module(name, value) if not hasattr(root, name) else None
        else:
            setattr(root, name, value)
    gm = fx.GraphModule(root, tracer.graph, class_name=class_name)
    if isinstance(fn, torch.nn.Module):
        # NOTE: constants were set on the user's module only to let GraphModule
        # copy them; take them off again so tracing leaves the module as it was.
        for name in tracer.constants:
            if name in fn.__dict__:
                del fn.__dict__[name]
            elif name in fn._modules:
                del fn._modules[name]
    gm.meta["fake_mode"] = tracer.fake_mode
    return gm
