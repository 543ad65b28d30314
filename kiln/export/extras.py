"""What builds on an exported program: strict regions, joint export, TorchScript
conversion, ahead-of-time compilation.

* :func:`mark_strict` (a class decorator): calls of the module run through the
  ``strict_mode`` op, so a non-strict export traces them as ``strict_graph_N``
  subgraphs; kiln's capture (strict export, ``kiln.compile``) sees the forward itself.
* :func:`export_forward_backward`: the program with its backward, the scalar output
  as LOSS_OUTPUT and the gradients of parameters (and of user inputs that require
  grad) as GRADIENT_TO_* outputs.
* :func:`from_torchscript`: a ``torch.jit.trace``-d module to an exported program (its
  placeholders named as direct export names them).
* :func:`compile`: an exported program (possibly loaded from disk) through kiln's code
  generator, for inference (no autograd), once (symbolic sizes as kernel arguments);
  a module with the program's input checks.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from kiln import exc
from kiln.export.program import (ExportedModule, ExportedProgram, ExportGraphSignature, InputKind,
                                 OutputKind, OutputSpec)


def mark_strict(cls: type) -> type:
    """Class decorator: instances' calls go through ``strict_mode`` (see module docstring)."""
    from kiln.ops import strict_mode

    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise exc.ExportError(f"mark_strict decorates nn.Module classes, not {cls!r}",
                              where=exc.user_location())
    forward = cls.forward

    def call(self, *args: Any) -> Any:
        if torch.compiler.is_compiling():
            return forward(self, *args)   # NOTE: capture traces the forward itself
        return strict_mode(functools.partial(forward, self), args)

    cls.__call__ = call
    return cls


def export_forward_backward(ep: ExportedProgram) -> ExportedProgram:
    """The joint forward+backward program of ``ep``, whose one user output is a scalar loss."""
    from kiln.export.exporter import _rename
    from kiln.tracing import make_fx

    sig = ep.graph_signature
    user_outs = [s for s in sig.output_specs if s.kind is OutputKind.USER_OUTPUT]
    if len(user_outs) != 1:
        raise exc.ExportError(f"export_forward_backward needs one scalar output; the program has "
                              f"{len(user_outs)}", where=exc.user_location(),
                              hint="return the loss only")
    phs = [n for n in ep.graph.nodes if n.op == "placeholder"]
    # NOTE: gradients of the parameters, and of the user inputs whose example input
    # required grad (as PyTorch's joint export)
    example = pytree.tree_leaves(ep.example_inputs) if ep.example_inputs is not None else []
    wants_grad = iter([isinstance(v, torch.Tensor) and v.requires_grad for v in example
                       if isinstance(v, torch.Tensor)])
    wrt = [i for i, s in enumerate(sig.input_specs)
           if s.kind is InputKind.PARAMETER or (s.kind is InputKind.USER_INPUT and next(wants_grad, False))]
    loss_at = sig.output_specs.index(user_outs[0])

    def joint(*xs):
        with torch.enable_grad():
            xs = [x.detach().requires_grad_(True) if i in wrt else x for i, x in enumerate(xs)]
            outs = fx.Interpreter(ep.graph_module).run(*xs)
            outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
            loss = outs[loss_at]
            if loss.dim() != 0:
                raise exc.ExportError(f"export_forward_backward: the output has shape "
                                      f"{tuple(loss.shape)}, not a scalar", where=exc.user_location())
            grads = torch.autograd.grad(loss, [xs[i] for i in wrt], allow_unused=True)
        return (*[o.detach() for o in outs],
                *[g if g is not None else torch.zeros_like(xs[i]) for i, g in zip(wrt, grads)])

    vals = [p.meta["val"] for p in phs]
    gm = make_fx(joint, tracing_mode="symbolic" if ep.range_constraints else "fake")(*vals)
    for p, old in zip([n for n in gm.graph.nodes if n.op == "placeholder"], phs):
        _rename(p, old.name)
    gm.recompile()
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    names = [o.name for o in out.args[0]]
    specs = []
    for s, name in zip(sig.output_specs, names):
        kind = OutputKind.LOSS_OUTPUT if s is user_outs[0] else s.kind
        specs.append(OutputSpec(kind, name, s.target))
    for i, name in zip(wrt, names[len(sig.output_specs):]):
        s = sig.input_specs[i]
        if s.kind is InputKind.PARAMETER:
            specs.append(OutputSpec(OutputKind.GRADIENT_TO_PARAMETER, name, s.target))
        else:
            specs.append(OutputSpec(OutputKind.GRADIENT_TO_USER_INPUT, name, s.name))
    return ExportedProgram(gm, ExportGraphSignature(list(sig.input_specs), specs), ep.state_dict,
                           ep.range_constraints, constants=ep.constants, example_inputs=ep.example_inputs,
                           in_spec=ep.in_spec, out_spec=None, input_meta=ep.input_meta,
                           dim_names=ep.dim_names)


class _TorchScriptCall(torch.nn.Module):
    """Calls a TorchScript module; its ``forward`` has the traced module's argument names."""

    def __init__(self, ts: torch.nn.Module, names: list) -> None:
        super().__init__()
        self.ts = ts

        def forward(*args: Any) -> Any:
            return self.ts(*args)

        forward.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
        self.forward = forward


def _ts_arg_names(ts: torch.nn.Module) -> list:
    try:
        args = list(ts.graph.inputs())[1:]   # NOTE: the first is self
        return [a.debugName().split(".")[0] for a in args]
    except (AttributeError, RuntimeError):
        return []


def from_torchscript(traced: torch.nn.Module, args: Any) -> ExportedProgram:
    """A TorchScript-traced module (``torch.jit.trace``) as an exported program.

    The TorchScript module runs op by op under kiln's tracer (its ops are ATen ops), with
    the argument names of the module it was traced from, so the placeholders are those
    of ``kiln.export.export`` of that module."""
    from kiln.export.exporter import export

    if not isinstance(traced, torch.jit.ScriptModule):
        raise exc.ExportError(f"from_torchscript takes a torch.jit.trace-d module, got "
                              f"{type(traced).__name__}", where=exc.user_location(),
                              hint="use kiln.export.export for an nn.Module")
    args = args if isinstance(args, tuple) else (args,)
    names = _ts_arg_names(traced) or [f"arg{i}" for i in range(len(args))]
    names = (names + [f"arg{i}" for i in range(len(names), len(args))])[:len(args)]
    return export(_TorchScriptCall(traced, names), args, strict=False)


class CompiledProgram(ExportedModule):
    """An exported program whose graph runs as kiln's generated code."""

    def __init__(self, ep: ExportedProgram, options: Any = None) -> None:
        super().__init__(ep)
        self._options = options
        self._compiled: dict = {}

    def compiled_for(self, ins: list) -> Any:
        """The generated code for graph inputs like ``ins`` (compiled at the first use).

        A program with Dims compiles once, on its placeholders' symbolic fake values: the
        kernels take the sizes as arguments.  A static program compiles on its inputs."""
        from kiln.codegen.compile_fx import compile_fx

        dynamic = bool(self._ep.range_constraints)
        key = "symbolic" if dynamic else tuple(
            (tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor) else t for t in ins)
        fn = self._compiled.get(key)
        if fn is None:
            example = ([n.meta["val"] for n in self.graph_module.graph.nodes if n.op == "placeholder"]
                       if dynamic else list(ins))
            with torch.no_grad():
                fn = compile_fx(self.graph_module, example, options=self._options)
            self._compiled[key] = fn
        return fn

    def _run_graph(self, ins: list) -> Any:
        # NOTE: a compiled program serves inference, as ahead-of-time compiled programs
        # do: it runs without autograd (export_forward_backward gives a training program)
        with torch.no_grad():
            return self.compiled_for(ins)(*ins)


def compile(ep: ExportedProgram, options: Any = None) -> torch.nn.Module:
    """``ep`` through kiln's code generator: an ``nn.Module`` like ``ep.module()``.
    The program compiles here: on its symbolic sizes when it has Dims, else on its
    example inputs (a loaded static program: at its first call).  Nothing runs."""
    m = CompiledProgram(ep, options)
    if ep.range_constraints:
        m.compiled_for([])
    elif ep.example_inputs is not None:
        m.compiled_for(m._graph_inputs(pytree.tree_leaves(ep.example_inputs)))
    return m


__all__ = ["mark_strict", "export_forward_backward", "from_torchscript", "compile", "CompiledProgram"]
