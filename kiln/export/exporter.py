"""kiln.export.export: a module's forward as one functional ATen graph with its signature.

In:  an ``nn.Module`` (a plain function is wrapped in one), example ``args`` (a tuple)
     and ``kwargs``, ``dynamic_shapes`` (see :mod:`.shapes`), ``strict``.
Out: an :class:`~kiln.export.program.ExportedProgram`.

Strict: the forward is first captured whole by kiln's capture (a graph break raises
:class:`kiln.exc.Unsupported` with what, why, where and a hint), and that graph is traced.
Non-strict: the forward itself is traced by kiln's make_fx over fake tensors.  Both then
go through kiln.aot's export tracing (functionalization, effect tokens made inside the
graph): parameters and buffers are lifted to inputs, tensor constants to
CONSTANT_TENSOR inputs, and placeholders are named as PyTorch names them
(``p_weight``, ``b_running_mean``, ``c_lifted_tensor_0``, ``x``, ``x_0``).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from kiln import exc
from kiln.export import shapes as D
from kiln.export.program import (ExportedProgram, ExportGraphSignature, InputKind, InputSpec, LeafMeta,
                                 OutputKind, OutputSpec)


class _FunctionModule(torch.nn.Module):
    def __init__(self, fn: Callable) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def _sanitize(s: str) -> str:
    s = re.sub(r"[^0-9a-zA-Z_]+", "_", s).strip("_")
    return s if s and not s[0].isdigit() else f"_{s}"


def _key_str(k: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _leaf_paths(fn: Callable, args: tuple, kwargs: dict) -> list:
    """``(argument name, pytree key path)`` of each flat user input, in flattening order."""
    pos, kw = D.input_names(fn, args, kwargs)
    return [(name, path) for name, v in zip(pos + kw, list(args) + [kwargs[k] for k in kw])
            for path, _ in pytree.tree_flatten_with_path(v)[0]]


def leaf_names(fn: Callable, args: tuple, kwargs: dict) -> list:
    """Placeholder names of the flat user inputs: ``x``, ``x_0``, ``x_key``."""
    return [_sanitize("_".join([name] + [_key_str(k) for k in path]))
            for name, path in _leaf_paths(fn, args, kwargs)]


def _as_module(mod: Any) -> torch.nn.Module:
    if isinstance(mod, torch.nn.Module):
        return mod
    if callable(mod):
        return _FunctionModule(mod)
    raise exc.ExportError(f"kiln.export.export takes an nn.Module, got {type(mod).__name__}",
                          where=exc.user_location(), hint="pass the model (an nn.Module)")


def _check_args(args: Any, kwargs: Any) -> tuple[tuple, dict]:
    if not isinstance(args, tuple):
        raise exc.ExportError(f"kiln.export.export: args is a {type(args).__name__}, not a tuple",
                              why="args holds the example positional inputs", where=exc.user_location(),
                              hint="pass (x,) for a single input")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise exc.ExportError(f"kiln.export.export: kwargs is a {type(kwargs).__name__}, not a dict",
                              where=exc.user_location())
    return args, dict(kwargs or {})


def _source_names(fn: Callable, args: tuple, kwargs: dict) -> list:
    """Capture's source text of each flat input leaf (``L['x']``, ``L['pair'][0]``)."""
    return [f"L[{name!r}]" + "".join(f"[{getattr(k, 'key', getattr(k, 'idx', k))!r}]" for k in path)
            for name, path in _leaf_paths(fn, args, kwargs)]


def _check_capture_guards(guards: list, specs: list, sources: list, names: list) -> None:
    """Strict capture specialises a size the program computes with in Python (a
    ``math.sqrt(x.shape[1])`` becomes a constant) and guards on it: a declared Dim with
    such a guard is an error, as a specialisation found while tracing is."""
    texts = [str(g) for g in guards if "SHAPE_ENV" in str(g)]
    why, fixes = [], []
    for spec, src, leaf in zip(specs, sources, names):
        for i, d in enumerate(spec or []):
            if not isinstance(d, (D.Dim, D.DerivedDim)):
                continue
            name = d.__name__ if isinstance(d, D.Dim) else d.root.__name__
            pat = re.escape(f"({src}.size()[{i}])") + r" (==|>=|<=) (\d+)"
            found = {m.group(1): int(m.group(2)) for t in texts for m in [re.search(pat, t)] if m}
            where = f"{leaf}.size({i}) (Dim {name!r})"
            if "==" in found:
                why.append(f"{where} was specialised to {found['==']} by the program")
                fixes.append(f"{name} = {found['==']}  # or Dim.STATIC for {leaf}.size({i})")
                continue
            lo, hi = found.get(">="), found.get("<=")
            if isinstance(d, D.Dim) and ((lo is not None and lo > max(d.min, 2))
                                         or (hi is not None and hi < d.max)):
                lo, hi = max(lo or 2, d.min, 2), min(hi if hi is not None else d.max, d.max)
                why.append(f"{where} only works in [{lo}, {hi if hi < D.INT_MAX else 'inf'}] in the program")
                fixes.append(f"{name} = Dim({name!r}, min={lo}" + (f", max={hi})" if hi < D.INT_MAX else ")"))
    if why:
        raise exc.ConstraintViolationError(
            "kiln.export: the program does not allow the dynamic shapes it was given",
            why="; ".join(why), where=exc.user_location(),
            hint="Suggested fixes:\n  " + "\n  ".join(fixes))


def _capture(mod: torch.nn.Module, args: tuple, kwargs: dict, dynamic: bool,
             specs: list, names: list) -> torch.nn.Module:
    from kiln.capture.explain_export import capture_whole

    # NOTE: capture runs the forward on the real inputs; what it writes to the module's
    # buffers (BatchNorm's statistics, counters) is put back, as export must not run it
    saved = [(b, b.detach().clone()) for b in mod.buffers()]
    try:
        gm, guards = capture_whole(mod, args, kwargs, dynamic=True if dynamic else None)
        if dynamic:
            _check_capture_guards(guards, specs, _source_names(mod.forward, args, kwargs), names)
    finally:
        with torch.no_grad():
            for b, c in saved:
                if b.shape == c.shape:
                    b.copy_(c)
    return gm


def _fakes_for(flat_user: list, specs: list, names: list, box: list) -> Callable:
    dynamic = any(s is not None and any(d is not None and d is not D.Dim.STATIC
                                        and not isinstance(d, int) for d in s) for s in specs)

    def make(all_inputs: list) -> tuple:
        from kiln.aot.api import _not_inference, fake_mode_for

        if not dynamic:
            box.append(None)
            return fake_mode_for(all_inputs)
        from kiln.capture.dynamic import new_fake_mode

        mode = new_fake_mode(shape_env=True)
        n_state = len(all_inputs) - len(flat_user)
        state = [mode.from_tensor(t, static_shapes=True) for t in all_inputs[:n_state]]
        user, syms = D.make_fakes(mode, all_inputs[n_state:], specs, names)
        box.append(syms)
        return mode, [_not_inference(mode, f) for f in state + user]

    make.dynamic = dynamic
    return make


def _export_decompositions() -> dict:
    """Ops decomposed while exporting.

    NOTE: ``native_batch_norm``'s schema does not say it writes the running statistics;
    its decomposition reaches ``_native_batch_norm_legit``, whose schema does, so the
    functional program returns them as BUFFER_MUTATION outputs (the Python dispatcher
    takes that path by itself when sizes are symbolic)."""
    from torch._decomp import decomposition_table

    ops = [torch.ops.aten.native_batch_norm.default]
    return {op: decomposition_table[op] for op in ops if op in decomposition_table}


def export(mod: Any, args: tuple, kwargs: Optional[dict] = None, *, dynamic_shapes: Any = None,
           strict: bool = True, pre_dispatch: bool = False) -> ExportedProgram:
    """Export ``mod(*args, **kwargs)`` (see the module docstring)."""
    from kiln.aot import config as aot_config
    from kiln.aot.export import aot_export_module

    mod = _as_module(mod)
    args, kwargs = _check_args(args, kwargs)
    if pre_dispatch:
        from kiln.fallbacks import record_fallback

        # NOTE: PyTorch's pre-dispatch graph keeps composite ops (aten.linear) and grad-mode
        # switches; kiln's tracer sits below autograd and sees them decomposed
        record_fallback("export", "pre_dispatch=True",
                        "kiln exports the post-dispatch ATen program (composite ops such as "
                        "aten.linear come decomposed); a pre-dispatch graph is not built yet")
    specs = D.leaf_specs(mod.forward, args, kwargs, dynamic_shapes)
    flat_user, in_spec = pytree.tree_flatten((args, kwargs))
    names = leaf_names(mod.forward, args, kwargs)
    box: list = []
    # NOTE: the graph takes the tensor inputs only (the others are specialised)
    is_t = [isinstance(v, torch.Tensor) for v in flat_user]
    fakes = _fakes_for([v for v, t in zip(flat_user, is_t) if t], [s for s, t in zip(specs, is_t) if t],
                       [n for n, t in zip(names, is_t) if t], box)
    target = _capture(mod, args, kwargs, fakes.dynamic, specs, names) if strict else mod
    with aot_config.patch(unlift_effect_tokens=True):
        gm, sig = _traced(lambda: aot_export_module(target, args, trace_joint=False, kwargs=kwargs,
                                                    pre_dispatch=pre_dispatch, fake_inputs=fakes,
                                                    decompositions=_export_decompositions(),
                                                    keep_grad_mode=True))
    rc, dim_names = D.range_constraints(box[0]) if box and box[0] is not None else ({}, {})
    return _program(mod, target, gm, sig, args, kwargs, in_spec, names, rc, dim_names)


def _state_kind(mod: torch.nn.Module, name: str, sig) -> tuple[InputKind, bool]:
    if name in sig.parameters:
        return InputKind.PARAMETER, True
    *path, leaf = name.split(".")
    owner = mod
    try:
        for p in path:
            owner = getattr(owner, p)
        persistent = leaf not in getattr(owner, "_non_persistent_buffers_set", set())
    except AttributeError:
        persistent = True
    return InputKind.BUFFER, persistent


def _rename(node: fx.Node, name: str) -> None:
    if node.name != name:
        node._rename(name)
        node.target = node.name if node.op == "placeholder" else node.target


def _lift_constants(gm: fx.GraphModule, before: Optional[fx.Node]) -> list:
    """Tensor attributes read by get_attr become placeholders (before ``before``);
    returns ``[(placeholder, attribute name, tensor)]``."""
    g = gm.graph
    out = []
    for n in list(g.nodes):
        if n.op != "get_attr":
            continue
        t = getattr(gm, n.target, None)
        if not isinstance(t, torch.Tensor):
            continue
        with g.inserting_before(before if before is not None else n):
            ph = g.placeholder(f"c_{_sanitize(str(n.target))}")
        ph.meta = dict(n.meta)
        n.replace_all_uses_with(ph)
        g.erase_node(n)
        delattr(gm, n.target)
        out.append((ph, str(n.target), t))
    return out


# NOTE: outputs that are not tensors stay in the program as constants (as PyTorch's
# ConstantArgument outputs); anything else cannot be given back by a runtime.
_CONSTANT_OUTPUTS = (type(None), bool, int, float, str)


def _check_outputs(sig) -> dict:
    bad = {i: v for i, v in sig.out_constants.items() if not isinstance(v, _CONSTANT_OUTPUTS)}
    if bad:
        i, v = next(iter(bad.items()))
        raise exc.ExportError(
            f"kiln.export: output {i} of the program (flattened) is a {type(v).__name__}, not a tensor",
            why="an exported program returns tensors and constants (None, bool, int, float, str): "
                "a runtime has no Python objects to give back",
            where=exc.user_location(), hint="return tensors; register the output type with "
                                            "torch.utils._pytree if it is a container of them")
    return dict(sig.out_constants)


_DATA_DEPENDENT = ("DataDependentOutputException", "DynamicOutputShapeException",
                   "GuardOnDataDependentSymNode", "DataDependentError")


def _user_line(e: BaseException) -> str:
    """file:line of the deepest frame of ``e``'s traceback outside kiln and torch."""
    import os
    import traceback

    skip = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            os.path.dirname(os.path.abspath(torch.__file__)))
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(skip)]
    if not frames:
        return exc.user_location()
    f = frames[-1]
    return f"{f.filename}:{f.lineno}" + (f"\n    {f.line}" if f.line else "")


def _traced(fn: Callable) -> Any:
    """``fn()``, with data-dependent tracing failures turned into ExportError."""
    try:
        return fn()
    except exc.KilnError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with what/why/where
        if type(e).__name__ not in _DATA_DEPENDENT:
            raise
        raise exc.ExportError(
            f"kiln.export: the program reads tensor values to decide what to do ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:120]})",
            why="an exported program is traced on example shapes only: control flow or output "
                "sizes that depend on tensor data cannot be part of one graph",
            where=_user_line(e),
            hint="use torch.where or torch.cond instead of Python branching on tensor values; "
                 "strict=True names the line too") from e


def _program(mod, target, gm, sig, args, kwargs, in_spec, names, rc, dim_names) -> ExportedProgram:
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    n_state = len(sig.parameters) + len(sig.buffers)
    state_phs, user_phs = phs[:n_state], phs[n_state:]
    out_constants = _check_outputs(sig)
    consts = _lift_constants(gm, user_phs[0] if user_phs else None)
    input_specs, state_dict = [], {}
    traced_names = [sig.inputs_to_parameters.get(p.name) or sig.inputs_to_buffers[p.name] for p in state_phs]
    all_state = dict(mod.named_parameters(remove_duplicate=False))
    all_state.update(mod.named_buffers(remove_duplicate=False))
    # NOTE: strict capture may hold module state under its own names (``_const_3`` for a
    # weight read through a path it does not follow): the module's name is found by identity
    by_id = {}
    for k, t in all_state.items():
        by_id.setdefault(id(t), k)
    target_state = dict(target.named_parameters(remove_duplicate=False))
    target_state.update(target.named_buffers(remove_duplicate=False))
    state_names = [n if n in all_state else by_id.get(id(target_state.get(n)), n) for n in traced_names]
    sig = _renamed_state(sig, dict(zip(traced_names, state_names)))
    user_old = [p.name for p in user_phs]
    constants: dict = {}

    def constant(ph: fx.Node, t: torch.Tensor) -> None:
        target = f"lifted_tensor_{len(constants)}"
        _rename(ph, f"c_{target}")
        input_specs.append(InputSpec(InputKind.CONSTANT_TENSOR, ph.name, target))
        constants[target] = t.detach()

    for ph, name, traced in zip(state_phs, state_names, traced_names):
        if name not in all_state:
            # NOTE: a tensor strict capture read from a plain attribute or a global
            constant(ph, target_state[traced])
            continue
        kind, persistent = _state_kind(mod, name, sig)
        _rename(ph, ("p_" if kind is InputKind.PARAMETER else "b_") + _sanitize(name))
        input_specs.append(InputSpec(kind, ph.name, name, None if kind is InputKind.PARAMETER else persistent))
        state_dict[name] = all_state[name]
    for ph, _attr, t in consts:
        constant(ph, t)
    flat_user = pytree.tree_leaves((tuple(args), kwargs))
    tensor_names = [n for n, v in zip(names, flat_user) if isinstance(v, torch.Tensor)]
    for ph, name in zip(user_phs, tensor_names):
        _rename(ph, name)
        input_specs.append(InputSpec(InputKind.USER_INPUT, ph.name))
    renamed = dict(zip(user_old, [p.name for p in user_phs]))
    output_specs = _output_specs(gm, sig, renamed)
    gm.recompile()
    vals = iter(p.meta.get("val") for p in user_phs)
    meta = []
    for name, leaf in zip(names, flat_user):
        if isinstance(leaf, torch.Tensor):
            v = next(vals)
            meta.append(LeafMeta(name, v.dtype, [_size(s) for s in v.shape]))
        else:
            meta.append(LeafMeta(name, value=leaf))
    return ExportedProgram(gm, ExportGraphSignature(input_specs, output_specs), state_dict, rc,
                           constants=constants, example_inputs=(args, kwargs), in_spec=in_spec,
                           out_spec=sig.out_spec, input_meta=meta, dim_names=dim_names,
                           out_constants=out_constants)


def _renamed_state(sig, new_names: dict):
    """``sig`` with its state names mapped through ``new_names``."""
    import dataclasses

    def m(d: dict) -> dict:
        return {k: new_names.get(v, v) for k, v in d.items()}

    return dataclasses.replace(sig, parameters=[new_names.get(n, n) for n in sig.parameters],
                               buffers=[new_names.get(n, n) for n in sig.buffers],
                               inputs_to_parameters=m(sig.inputs_to_parameters),
                               inputs_to_buffers=m(sig.inputs_to_buffers),
                               buffers_to_mutate=m(sig.buffers_to_mutate))


def _size(s: Any) -> Any:
    return int(s) if not isinstance(s, torch.SymInt) else str(s.node.expr)


def _output_specs(gm: fx.GraphModule, sig, renamed: dict) -> list:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    specs = []
    for o in out.args[0]:
        name = o.name if isinstance(o, fx.Node) else str(o)
        old = name
        if old in sig.buffers_to_mutate:
            specs.append(OutputSpec(OutputKind.BUFFER_MUTATION, name, sig.buffers_to_mutate[old]))
        elif old in sig.user_inputs_to_mutate:
            specs.append(OutputSpec(OutputKind.USER_INPUT_MUTATION, name,
                                    renamed.get(sig.user_inputs_to_mutate[old], sig.user_inputs_to_mutate[old])))
        else:
            specs.append(OutputSpec(OutputKind.USER_OUTPUT, name))
    return specs


def retrace(ep: ExportedProgram, decomp_table: dict) -> ExportedProgram:
    """``ep``'s graph traced again through ``decomp_table`` (same signature and state)."""
    from kiln.tracing import make_fx

    phs = [n for n in ep.graph.nodes if n.op == "placeholder"]
    vals = [p.meta["val"] for p in phs]
    mode = "symbolic" if ep.range_constraints else "fake"
    new = make_fx(fx.Interpreter(ep.graph_module).run, tracing_mode=mode,
                  decomposition_table=decomp_table)(*vals)
    for p, old in zip([n for n in new.graph.nodes if n.op == "placeholder"], phs):
        _rename(p, old.name)
    out = next(n for n in reversed(new.graph.nodes) if n.op == "output")
    outs = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    specs = [OutputSpec(s.kind, o.name if isinstance(o, fx.Node) else str(o), s.target)
             for s, o in zip(ep.graph_signature.output_specs, outs)]
    new.recompile()
    return ExportedProgram(new, ExportGraphSignature(list(ep.graph_signature.input_specs), specs),
                           ep.state_dict, ep.range_constraints, constants=ep.constants,
                           example_inputs=ep.example_inputs, in_spec=ep.in_spec, out_spec=ep.out_spec,
                           input_meta=ep.input_meta, dim_names=ep.dim_names,
                           out_constants=ep.out_constants)


__all__ = ["export", "retrace", "leaf_names"]
