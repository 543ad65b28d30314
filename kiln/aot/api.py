"""aot_function / aot_module / aot_module_simplified: compile a function's
forward and backward graphs ahead of time and wrap them to behave as eager."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from kiln import exc
from kiln.fallbacks import record_fallback
from kiln.aot import config
from kiln.aot.collect import AOTMeta, collect_metadata, fresh_leaf
from kiln.aot.compilers import call_compiled
from kiln.aot.meta import SourceMetaInterpreter
from kiln.aot.options import AOTOptions, make_options
from kiln.aot.partition import default_partition
from kiln.aot.pipeline import inference_pipeline, training_pipeline
from kiln.aot.runtime import CompiledArtifact
from kiln.aot.trace import trace_forward, trace_joint
from kiln.passes import run_pipeline
from kiln.tracing.autocast import autocast_key, no_autocast_cache, without_autocast


def fake_mode_for(args: list) -> tuple[FakeTensorMode, list]:
    """The fake mode of already-fake args, or a fresh one; and fake versions of args."""
    mode = next((a.fake_mode for a in args if isinstance(a, FakeTensor)), None)
    if mode is None:
        mode = FakeTensorMode(allow_non_fake_inputs=True, static_shapes=True)
        mode._allow_unsafe_data_ptr_access = config.fake_tensor_allow_unsafe_data_ptr_access
    fakes = [x if isinstance(x, FakeTensor) else mode.from_tensor(x, static_shapes=True)
             if isinstance(x, torch.Tensor) else x for x in args]
    return mode, [_not_inference(mode, f) for f in fakes]


def _not_inference(mode: FakeTensorMode, t):
    """A normal (non-inference) fake with t's metadata: tracing runs outside
    inference_mode, where inference tensors refuse in-place updates."""
    if not isinstance(t, torch.Tensor) or not t.is_inference():
        return t
    with torch.inference_mode(False), mode:
        out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return out.requires_grad_(t.requires_grad)


# NOTE: C++ kernels that read data directly (not through an op) fail on fake
# tensors with these messages.
_DATA_READ_MESSAGES = ("data is not allocated yet", "Cannot access data pointer",
                       "Cannot access storage")


def _needs_autograd(args: list) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def compile_flat(flat_fn: Callable, args: list, options: AOTOptions) -> CompiledArtifact:
    """Trace ``flat_fn(*args)`` (args: tensors, and SymInts for ints captured as symbols)
    and compile it as ``options`` say.

    Returns a CompiledArtifact: call it with a list of tensors like ``args``.
    """
    if not isinstance(options, AOTOptions):
        raise TypeError(f"compile_flat takes an AOTOptions, got {type(options).__name__}")
    if options.num_params_buffers > len(args):
        raise exc.KilnError(
            f"num_params_buffers={options.num_params_buffers} but the function takes "
            f"{len(args)} tensor inputs",
            why="num_params_buffers counts the leading tensor inputs that are parameters or buffers",
            where=exc.user_location(),
            hint="pass the number of parameters and buffers, first among the inputs",
        )
    # NOTE: with oneDNN on, CPU RNNs trace to mkldnn_rnn_layer, whose backward
    # takes a workspace tensor that is undefined in eager and cannot be passed
    # from Python; the portable RNN path traces to ordinary ATen ops.
    # NOTE: under inference_mode, autograd refuses the view bookkeeping tracing
    # does; trace outside it (with grad off, as inference_mode implies).
    inference = torch.is_inference_mode_enabled()
    ctx = contextlib.ExitStack()
    if inference:
        ctx.enter_context(torch.inference_mode(False))
        ctx.enter_context(torch.no_grad())
    # NOTE: casts served from the autocast cache would be no nodes of the graph (and the
    # cache would keep fake tensors): tracing runs without it.
    ctx.enter_context(no_autocast_cache())
    prev = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        with ctx:
            return _compile_flat(flat_fn, args, options)
    finally:
        torch._C._set_mkldnn_enabled(prev)


def _is_leaf(a: Any) -> bool:
    """``a.is_leaf``, also for a view out of a multi-output op (split, unbind) written in
    place under no_grad, whose ``is_leaf`` (its grad_fn) raises: such a view is a leaf
    exactly when it does not require grad."""
    try:
        return bool(getattr(a, "is_leaf", True))
    except RuntimeError:
        return not a.requires_grad


def _compile_flat(flat_fn: Callable, args: list, options: AOTOptions) -> CompiledArtifact:
    decompositions = options.decompositions
    fake_mode, fakes = fake_mode_for(args)
    is_leaf = [_is_leaf(a) for a in args]
    try:
        meta = collect_metadata(flat_fn, fakes, fake_mode, decompositions, is_leaf)
    except RuntimeError as e:
        if not any(m in str(e) for m in _DATA_READ_MESSAGES):
            raise
        raise exc.DataDependentError(
            "the function reads tensor data while being traced",
            why=str(e).splitlines()[0], where=exc.user_location(),
            hint="move data-dependent code (item(), .tolist(), data_ptr()) out of the compiled function",
        ) from e
    if any(isinstance(v, torch.Tensor) and v.layout != torch.strided for v in meta.fw_out_fakes):
        raise _NotTraceable()
    if meta.external_requires_grad and torch.is_grad_enabled():
        raise _ClosedOverGrad()
    if _needs_autograd(fakes) and any(meta.fw_out_requires_grad):
        joint, grad_map = trace_joint(flat_fn, meta, fakes, fake_mode, decompositions)
        # NOTE: the graphs are functional: mutations of inputs are applied by the
        # runtime wrapper after the call, never by ops inside the graph.
        # NOTE: the joint graph holds the casts autocast made; compiling it (and timing it)
        # must not apply autocast again.
        with without_autocast():
            graphs = run_pipeline("aot", joint, training_pipeline(options, meta), functional=True)
        return CompiledArtifact(meta, graphs.meta["compiled"], bw_gm=graphs.bw_graph,
                                bw_compiler=options.bw_compiler, grad_map=grad_map,
                                num_inputs=len(args))
    with torch.no_grad() if not _needs_autograd(fakes) else contextlib.nullcontext():
        gm = trace_forward(flat_fn, meta, fakes, fake_mode, decompositions)
    # NOTE: functional too, except the input writes keep_inference_input_mutations puts
    # in the graph (listed in gm.meta["kept_input_mutations"], which the verifier allows).
    with without_autocast():
        gm = run_pipeline("aot", gm, inference_pipeline(options, meta), functional=True)
    return CompiledArtifact(meta, gm.meta["compiled"], num_inputs=len(args))


# ---------------------------------------------------------------------------- keys
class _NotTraceable(Exception):
    """Inputs or outputs kiln does not trace (sparse / nested layouts)."""

    what = "inputs or outputs with a non-strided (sparse) layout are not traced"


class _ClosedOverGrad(_NotTraceable):
    """The function reads a global / closure tensor that requires grad: as a graph
    constant its gradient would be lost."""

    what = ("the function uses a tensor that requires grad but is not an argument "
            "(a global or closure tensor); pass it as an argument to compile it")


class _AliasedMutatedInputs(_NotTraceable):
    """Inputs that share memory, one of them mutated: eager semantics need the
    other to see the write mid-function, which separate graph inputs cannot."""

    what = "the function mutates an input that shares memory with another input"


def _arg_key(a: Any) -> Any:
    if isinstance(a, torch.Tensor) and a.layout != torch.strided:
        return ("S", tuple(a.shape), a.dtype, a.layout, a.requires_grad)
    if isinstance(a, torch.Tensor):
        return ("T", tuple(a.shape), tuple(a.stride()), a.storage_offset(), a.dtype, a.device.type,
                a.requires_grad, a.is_leaf, type(a))
    try:
        hash(a)
        return ("V", type(a), a)
    except TypeError:
        return ("O", id(a))


def _storage_id(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage()._cdata
    except Exception:  # noqa: BLE001 - tensors without storage: alias nothing
        return id(t)


def alias_pattern(tensors: list) -> tuple:
    """For each tensor, the index of the first *other* tensor sharing its storage (or -1)."""
    first: dict = {}
    pattern = []
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            pattern.append(-1)  # NOTE: an int input (dynamic ints) aliases nothing
            continue
        sid = _storage_id(t) if t.layout == torch.strided else id(t)
        j = first.setdefault(sid, i)
        pattern.append(j if j != i else -1)
    return tuple(pattern)


def _dedupe(flat: list) -> tuple[list, list]:
    """(tensor positions to pass, for each flat position the kept index or None)."""
    kept, where, seen = [], [], {}
    for i, a in enumerate(flat):
        if isinstance(a, (torch.SymInt, torch.SymFloat)):
            # NOTE: an int or float captured as a symbol (dynamic scalars) is a graph input of its own.
            where.append(len(kept))
            kept.append(i)
        elif isinstance(a, torch.Tensor):
            if id(a) in seen:
                where.append(seen[id(a)])
            else:
                seen[id(a)] = len(kept)
                where.append(len(kept))
                kept.append(i)
        else:
            where.append(None)
    return kept, where


def _fake_tensor_errors() -> tuple:
    from torch._subclasses import fake_tensor as ft

    names = ("DataDependentOutputException", "DynamicOutputShapeException",
             "UnsupportedOperatorException", "UnsupportedFakeTensorException")
    errs = tuple(getattr(ft, n) for n in names if hasattr(ft, n))
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    return errs + (GuardOnDataDependentSymNode,)


# NOTE: errors that mean "this function cannot be traced on metadata alone";
# with config.fallback_to_eager_on_data_dependence the function runs eagerly.
_DATA_DEPENDENT = (exc.DataDependentError, exc.UnsupportedOperatorError, _NotTraceable) \
    + _fake_tensor_errors()


class _Entry:
    def __init__(self, art: Optional[CompiledArtifact], out_spec: Any, reason: str = ""):
        self.art = art
        self.out_spec = out_spec
        self.reason = reason
        self.rebuild = _output_builder(out_spec) if art is not None else None


def _output_builder(spec: Any) -> Callable[[list], Any]:
    """Flat outputs -> the function's output structure; plain shapes (one leaf,
    a flat tuple or list of leaves) skip pytree."""
    n = spec.num_leaves
    if spec == pytree.tree_structure(0):
        return lambda outs: outs[0]
    if spec == pytree.tree_structure(tuple(range(n))):
        return tuple
    if spec == pytree.tree_structure(list(range(n))):
        return list
    return lambda outs: pytree.tree_unflatten(outs, spec)


_FLAT_SPECS: dict = {}
_LEAF_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _flatten_call(args: tuple, kw: dict) -> tuple[list, Any]:
    """pytree.tree_flatten((args, kw)); positional tensors only: the spec is cached."""
    # NOTE: exact types: a tensor subclass may be registered as a pytree node.
    if not kw and all(type(a) in _LEAF_TENSOR_TYPES for a in args):
        spec = _FLAT_SPECS.get(len(args))
        if spec is None:
            spec = _FLAT_SPECS[len(args)] = pytree.tree_flatten((args, kw))[1]
        return list(args), spec
    return pytree.tree_flatten((args, kw))


def _given(**kwargs: Any) -> dict:
    """The options a caller passed (None and the documented defaults left out)."""
    defaults = {"partition_fn": default_partition, "num_params_buffers": 0,
                "keep_inference_input_mutations": False}
    return {k: v for k, v in kwargs.items() if v is not None and not (k in defaults and v is defaults[k])}


def aot_function(fn: Callable, fw_compiler: Optional[Callable] = None,
                 bw_compiler: Optional[Callable] = None,
                 partition_fn: Callable = default_partition, decompositions: Optional[dict] = None,
                 num_params_buffers: int = 0, keep_inference_input_mutations: bool = False,
                 inference_compiler: Optional[Callable] = None, **options: Any) -> Callable:
    """Wrap ``fn`` so each call runs graphs compiled by ``fw_compiler`` / ``bw_compiler``.

    Inputs may be any pytree; tensors become graph inputs (a tensor passed twice
    is passed once), other values are baked in (a new value recompiles).
    Outputs, gradients, input mutations, aliasing and grad mode match eager.
    An nn.Module is compiled as by aot_module (its parameters are inputs).
    The arguments are those of PyTorch's aot_function (see kiln.aot.AOTOptions);
    ``options=AOTOptions(...)`` passes them as one record.  An unknown keyword is a
    TypeError listing the valid ones.
    """
    opts = make_options("aot_function", **_given(
        fw_compiler=fw_compiler, bw_compiler=bw_compiler, partition_fn=partition_fn,
        decompositions=decompositions, num_params_buffers=num_params_buffers,
        keep_inference_input_mutations=keep_inference_input_mutations,
        inference_compiler=inference_compiler), **options)
    from kiln.ops.foreign import kiln_graph

    fn = kiln_graph(fn)  # NOTE: PyTorch's higher-order operators read as kiln's (kiln.ops.foreign)
    if isinstance(fn, torch.nn.Module):
        return aot_module(fn, options=opts)
    return _aot_function(fn, opts)


def _aot_function(fn: Callable, opts: AOTOptions) -> Callable:
    cache: dict = {}

    def compiled(*args: Any, **kw: Any) -> Any:
        flat, in_spec = _flatten_call(args, kw)
        kept, where = _dedupe(flat)
        tensors = [flat[i] for i in kept]
        key = (in_spec, tuple(_arg_key(a) for a in flat), tuple(where), torch.is_grad_enabled(),
               alias_pattern(tensors), autocast_key())
        entry = cache.get(key)
        if entry is None:
            entry = cache[key] = _compile_entry(fn, flat, in_spec, kept, where, opts)
        if entry.art is None:
            return fn(*args, **kw)
        if config.debug_assert:
            _assert_inputs(entry.art, tensors)
        return entry.rebuild(entry.art(tensors))

    compiled.__wrapped__ = fn
    compiled._kiln_cache = cache
    return compiled


def _compile_entry(fn, flat, in_spec, kept, where, opts: AOTOptions) -> _Entry:
    out_spec_box: list = []

    def flat_fn(*tensors):
        full = [tensors[where[i]] if where[i] is not None else a for i, a in enumerate(flat)]
        args, kw = pytree.tree_unflatten(full, in_spec)
        out = fn(*args, **kw)
        out_flat, spec = pytree.tree_flatten(out)
        if not out_spec_box:
            out_spec_box.append(spec)
        return out_flat

    tensors = [flat[i] for i in kept]
    try:
        if any(t.layout != torch.strided for t in tensors):
            raise _NotTraceable()
        art = compile_flat(flat_fn, tensors, opts)
        if art.meta.any_mutated_inputs and any(p >= 0 for p in alias_pattern(tensors)):
            raise _AliasedMutatedInputs()
    except _DATA_DEPENDENT as e:
        if not config.fallback_to_eager_on_data_dependence:
            raise
        record_fallback("aot", f"function {getattr(fn, '__name__', fn)}", f"runs eagerly: {_reason(e)}")
        return _Entry(None, None, reason=_reason(e))
    return _Entry(art, out_spec_box[0])


def _reason(e: BaseException) -> str:
    return getattr(e, "what", None) or f"{type(e).__name__}: {e}"


def _assert_inputs(art: CompiledArtifact, tensors: list) -> None:
    for i, (t, rg) in enumerate(zip(tensors, art.meta.input_requires_grad)):
        if getattr(t, "requires_grad", False) != rg:
            raise AssertionError(
                f"input {i} requires_grad={t.requires_grad} but was traced with requires_grad={rg}")


# ---------------------------------------------------------------------------- modules
def _module_state(mod: torch.nn.Module) -> tuple[list, list, list]:
    params = dict(mod.named_parameters(remove_duplicate=False))
    buffers = dict(mod.named_buffers(remove_duplicate=False))
    names, values, seen = [], [], set()
    for name, t in list(params.items()) + list(buffers.items()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        names.append(name)
        values.append(t)
    return names, values, [n for n in names if n in params]


def functional_call(mod: torch.nn.Module, names: list, values: list, args: tuple, kwargs: dict):
    from torch.nn.utils.stateless import _reparametrize_module

    with _reparametrize_module(mod, dict(zip(names, values)), tie_weights=True):
        if isinstance(mod, fx.GraphModule) and not kwargs:
            # NOTE: run node by node so each ATen node inherits its source node's meta.
            return SourceMetaInterpreter(mod).run(*args)
        return mod(*args, **kwargs)


class AOTModule(torch.nn.Module):
    """What aot_module returns: calls the module's forward through aot_function."""

    def __init__(self, mod: torch.nn.Module, compiled: Callable):
        super().__init__()
        self.orig_module = mod
        self._compiled = compiled

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names, values, _ = _module_state(self.orig_module)
        return self._compiled(values, *args, **kwargs)


def aot_module(mod: torch.nn.Module, fw_compiler: Optional[Callable] = None,
               bw_compiler: Optional[Callable] = None,
               partition_fn: Callable = default_partition, decompositions: Optional[dict] = None,
               **options: Any) -> torch.nn.Module:
    """An nn.Module whose forward runs ``mod`` through aot_function (parameters
    and buffers are graph inputs, so updates to them are seen; they are the first
    ``num_params_buffers`` inputs, set here).  Options as aot_function's."""
    opts = make_options("aot_module", **_given(
        fw_compiler=fw_compiler, bw_compiler=bw_compiler, partition_fn=partition_fn,
        decompositions=decompositions), **options)
    from kiln.ops.foreign import kiln_graph

    mod = kiln_graph(mod)
    names = _module_state(mod)[0]
    _check_params_buffers("aot_module", opts, len(names))

    def fn(values, *args, **kw):
        return functional_call(mod, names, values, args, kw)

    compiled = _aot_function(fn, opts.replace(num_params_buffers=len(names)))
    return AOTModule(mod, compiled)


def _check_params_buffers(where: str, opts: AOTOptions, n_state: int) -> None:
    if opts.num_params_buffers not in (0, n_state):
        raise exc.KilnError(
            f"{where}(num_params_buffers={opts.num_params_buffers}) disagrees with the module, "
            f"which has {n_state} parameters and buffers",
            why=f"{where} passes the module's parameters and buffers as the first inputs itself",
            where=exc.user_location(),
            hint="leave num_params_buffers out",
        )


def check_output_shapes(mod: torch.nn.Module, meta: AOTMeta) -> None:
    """Outputs traced at the ATen level must have the shapes the captured graph recorded.

    NOTE: a Python decomposition with a bug in some PyTorch release (2.11's LSTM returns
    h_n with an extra dim for bidirectional stacks) would otherwise be a wrong answer;
    a mismatch fails the backend, and the graph then runs eagerly with a warning."""
    if not isinstance(mod, fx.GraphModule):
        return
    out = next((n for n in reversed(mod.graph.nodes) if n.op == "output"), None)
    vals = out.args[0] if out is not None else None
    if not isinstance(vals, (list, tuple)) or len(vals) != len(meta.out_shapes):
        return
    for i, (n, got) in enumerate(zip(vals, meta.out_shapes)):
        want = n.meta.get("val", n.meta.get("example_value")) if isinstance(n, fx.Node) else None
        if isinstance(want, torch.Tensor) and got is not None and _shape_text(want.shape) != _shape_text(got):
            raise exc.TracingError(
                f"output {i} traced with shape {list(got)}, but the captured graph says {list(want.shape)}",
                why="a decomposition used while tracing ATen ops disagrees with the operator "
                    f"'{n.target if n.op == 'call_function' else n.name}' as captured",
                where=exc.user_location(),
                hint="the graph runs eagerly; upgrading PyTorch may fix the decomposition",
            )


def _shape_text(shape) -> list:
    """Dims as text to compare two traces of one graph; a dim with unbacked symbols (sizes
    read from tensor data) is "?": each trace reads the data anew, under a new symbol."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    return ["?" if free_unbacked_symbols(d) else str(d) for d in shape]


def aot_module_simplified(mod: torch.nn.Module, args: list, fw_compiler: Optional[Callable] = None,
                          bw_compiler: Optional[Callable] = None,
                          partition_fn: Callable = default_partition,
                          decompositions: Optional[dict] = None,
                          keep_inference_input_mutations: bool = False,
                          inference_compiler: Optional[Callable] = None,
                          **options: Any) -> Callable:
    """Compile ``mod`` now for ``args`` (real or fake); returns ``forward(*runtime_args)``.

    ``mod`` (typically a captured GraphModule) takes and returns flat tensors;
    its parameters and buffers are lifted to graph inputs (read from the module
    at each call, so reassigned parameters are seen).  Compiled for the grad
    mode of this call; a call that needs gradients where this one did not
    compiles the training graphs then (once).  Options as aot_function's
    (``num_params_buffers`` is the module's count of parameters and buffers).
    """
    opts = make_options("aot_module_simplified", **_given(
        fw_compiler=fw_compiler, bw_compiler=bw_compiler, partition_fn=partition_fn,
        decompositions=decompositions, keep_inference_input_mutations=keep_inference_input_mutations,
        inference_compiler=inference_compiler), **options)
    from kiln.ops.foreign import kiln_graph

    mod = kiln_graph(mod)
    names, values, _ = _module_state(mod)
    _check_params_buffers("aot_module_simplified", opts, len(values))
    opts = opts.replace(num_params_buffers=len(values))
    state = _state_reader(mod, names)
    n_state = len(values)
    flat_args = list(args)
    kept, where = _dedupe(values + flat_args)
    all_flat = values + flat_args

    def flat_fn(*tensors):
        full = [tensors[where[i]] if where[i] is not None else a for i, a in enumerate(all_flat)]
        out = functional_call(mod, names, full[:n_state], tuple(full[n_state:]), {})
        return list(out) if isinstance(out, (list, tuple)) else [out]

    example = [all_flat[i] for i in kept]
    dupes = [i for i, w in enumerate(where) if w is not None and kept[w] != i]
    # NOTE: no duplicates and no non-tensor inputs: the graph takes [*state, *args] as is.
    identity = not dupes and kept == list(range(len(all_flat)))
    pattern = alias_pattern(example)

    def compile_for(tensors: list) -> Optional[CompiledArtifact]:
        try:
            art = compile_flat(flat_fn, tensors, opts)
            check_output_shapes(mod, art.meta)
            if art.meta.any_mutated_inputs and any(p >= 0 for p in pattern):
                raise _AliasedMutatedInputs()
        except _DATA_DEPENDENT as e:
            if not config.fallback_to_eager_on_data_dependence:
                raise
            record_fallback("aot", "the graph", f"runs eagerly: {_reason(e)}")
            return None
        return art

    compiled_for_grad = _needs_autograd(example)
    art = compile_for(example)
    arts = {compiled_for_grad: art}

    def forward(*runtime_args: Any) -> Any:
        if art is None:
            return mod(*runtime_args)
        if identity:
            tensors = [*state(), *runtime_args] if n_state else list(runtime_args)
        else:
            tensors = _gather(state() + list(runtime_args), kept, where, dupes, n_state)
        cur = art
        if not compiled_for_grad and _is_grad_enabled() and any(
                getattr(t, "requires_grad", False) for t in tensors):
            cur = _training_artifact(arts, compile_for, _training_inputs(example, tensors))
            if cur is None:
                return mod(*runtime_args)
        if config.debug_assert:
            _assert_inputs(cur, tensors)
        if cur.meta.any_mutated_inputs and alias_pattern(tensors) != pattern:
            # NOTE: inputs share memory now that did not when traced: the graph's
            # write-backs would be wrong, eager is right.
            return mod(*runtime_args)
        return cur(tensors)

    forward.zero_grad = mod.zero_grad
    forward.named_parameters = mod.named_parameters
    forward.named_buffers = mod.named_buffers
    return forward


_is_grad_enabled = torch._C.is_grad_enabled


def _training_artifact(arts: dict, compile_for: Callable, tensors: list) -> Optional[CompiledArtifact]:
    """The artifact for calls that need gradients, compiled at the first such call.

    NOTE: a graph compiled while grad mode was off (or for inputs that did not
    require grad) has no backward; running it would silently drop gradients."""
    if True not in arts:
        arts[True] = compile_for(tensors)
    return arts[True]


def _training_inputs(example: list, tensors: list) -> list:
    """What to trace the training graphs on: this call's tensors, or, when the
    graph was compiled for symbolic (fake) inputs, those fakes with this call's
    requires_grad: tracing the real tensors would give graphs specialised to
    this call's sizes, later run for every size the caller allows."""
    if not any(isinstance(e, FakeTensor) for e in example):
        return tensors
    return [fresh_leaf(e, bool(t.requires_grad)) if isinstance(e, FakeTensor)
            else e if isinstance(e, (torch.SymInt, torch.SymFloat)) else t
            for e, t in zip(example, tensors)]


def _gather(cur: list, kept: list, where: list, dupes: list, n_state: int) -> list:
    """The graph inputs from the flat (state + runtime) inputs: duplicates dropped."""
    tensors = [cur[i] for i in kept]
    # NOTE: always checked (cheap): running a graph traced for f(a, a) on
    # f(a, b) would silently compute the wrong thing.
    for i in dupes:
        if cur[i] is not tensors[where[i]]:
            raise AssertionError(
                f"aot_module_simplified: input {i - n_state} was traced as a duplicate of "
                f"input {kept[where[i]] - n_state} but is a different tensor now")
    return tensors


def _state_reader(mod: torch.nn.Module, names: list) -> Callable[[], list]:
    """A function returning the current values of ``mod``'s parameters/buffers
    ``names`` (dotted), read from their owners' dicts (a reassigned parameter is seen)."""
    slots = []
    for name in names:
        prefix, _, key = name.rpartition(".")
        owner = mod.get_submodule(prefix) if prefix else mod
        slots.append((owner._parameters if key in owner._parameters else owner._buffers, key))
    if not slots:
        return list
    return lambda: [d[k] for d, k in slots]


__all__ = ["aot_function", "aot_module", "aot_module_simplified", "compile_flat", "call_compiled",
           "alias_pattern", "fake_mode_for", "functional_call"]
