"""ExportedProgram: one functional ATen graph, its signature, its state and its shapes.

The graph takes ``[*parameters, *buffers, *constants, *user inputs]`` (placeholders
``p_<name>``, ``b_<name>``, ``c_<name>`` and the forward's argument names) and returns
``[*buffer mutations, *user input mutations, *user outputs]`` (a joint program then the
gradients).  :meth:`ExportedProgram.module` is an ``nn.Module`` that checks its inputs
against the program's structure, dtypes, static sizes and Dim ranges, runs the graph
and writes the mutations back.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional

import sympy
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from kiln import exc


class InputKind(enum.Enum):
    USER_INPUT = "USER_INPUT"
    PARAMETER = "PARAMETER"
    BUFFER = "BUFFER"
    CONSTANT_TENSOR = "CONSTANT_TENSOR"
    TOKEN = "TOKEN"


class OutputKind(enum.Enum):
    USER_OUTPUT = "USER_OUTPUT"
    BUFFER_MUTATION = "BUFFER_MUTATION"
    USER_INPUT_MUTATION = "USER_INPUT_MUTATION"
    LOSS_OUTPUT = "LOSS_OUTPUT"
    GRADIENT_TO_PARAMETER = "GRADIENT_TO_PARAMETER"
    GRADIENT_TO_USER_INPUT = "GRADIENT_TO_USER_INPUT"
    TOKEN = "TOKEN"


@dataclass
class InputSpec:
    """One graph input: its placeholder ``name``; ``target`` the state name it binds."""

    kind: InputKind
    name: str
    target: Optional[str] = None
    persistent: Optional[bool] = None


@dataclass
class OutputSpec:
    """One graph output: the output node's ``name``; ``target`` what it writes or is the gradient of."""

    kind: OutputKind
    name: str
    target: Optional[str] = None


@dataclass
class ExportGraphSignature:
    """What each placeholder and output of the graph stands for."""

    input_specs: list = field(default_factory=list)
    output_specs: list = field(default_factory=list)

    def _ins(self, kind: InputKind) -> list:
        return [s for s in self.input_specs if s.kind is kind]

    def _outs(self, kind: OutputKind) -> list:
        return [s for s in self.output_specs if s.kind is kind]

    @property
    def user_inputs(self) -> list:
        return [s.name for s in self._ins(InputKind.USER_INPUT)]

    @property
    def parameters(self) -> list:
        return [s.target for s in self._ins(InputKind.PARAMETER)]

    @property
    def buffers(self) -> list:
        return [s.target for s in self._ins(InputKind.BUFFER)]

    @property
    def lifted_tensor_constants(self) -> list:
        return [s.target for s in self._ins(InputKind.CONSTANT_TENSOR)]

    @property
    def inputs_to_parameters(self) -> dict:
        return {s.name: s.target for s in self._ins(InputKind.PARAMETER)}

    @property
    def inputs_to_buffers(self) -> dict:
        return {s.name: s.target for s in self._ins(InputKind.BUFFER)}

    @property
    def inputs_to_lifted_tensor_constants(self) -> dict:
        return {s.name: s.target for s in self._ins(InputKind.CONSTANT_TENSOR)}

    @property
    def user_outputs(self) -> list:
        return [s.name for s in self.output_specs
                if s.kind in (OutputKind.USER_OUTPUT, OutputKind.LOSS_OUTPUT)]

    @property
    def buffers_to_mutate(self) -> dict:
        return {s.name: s.target for s in self._outs(OutputKind.BUFFER_MUTATION)}

    @property
    def user_inputs_to_mutate(self) -> dict:
        return {s.name: s.target for s in self._outs(OutputKind.USER_INPUT_MUTATION)}

    @property
    def gradients_to_parameters(self) -> dict:
        return {s.name: s.target for s in self._outs(OutputKind.GRADIENT_TO_PARAMETER)}

    @property
    def gradients_to_user_inputs(self) -> dict:
        return {s.name: s.target for s in self._outs(OutputKind.GRADIENT_TO_USER_INPUT)}

    @property
    def loss_output(self) -> Optional[str]:
        return next((s.name for s in self._outs(OutputKind.LOSS_OUTPUT)), None)

    def __str__(self) -> str:
        lines = ["# inputs"] + [f"{s.name}: {s.kind.name}" + (f" target={s.target!r}" if s.target else "")
                                for s in self.input_specs]
        lines += ["# outputs"] + [f"{s.name}: {s.kind.name}" + (f" target={s.target!r}" if s.target else "")
                                  for s in self.output_specs]
        return "\n".join(lines)


@dataclass
class LeafMeta:
    """What a flat user input must be: a tensor's dtype and sizes (ints, or a symbol's
    expression as text), or a constant's value (non-tensor inputs are specialised)."""

    path: str
    dtype: Optional[torch.dtype] = None
    sizes: Optional[list] = None
    value: Any = None


class ExportedProgram:
    """A whole program exported by :func:`kiln.export.export` (see the module docstring)."""

    def __init__(self, graph_module: fx.GraphModule, graph_signature: ExportGraphSignature,
                 state_dict: dict, range_constraints: dict, *, constants: Optional[dict] = None,
                 example_inputs: Any = None, in_spec: Any = None, out_spec: Any = None,
                 input_meta: Optional[list] = None, dim_names: Optional[dict] = None,
                 out_constants: Optional[dict] = None) -> None:
        self.graph_module = graph_module
        self.graph_signature = graph_signature
        self.state_dict = state_dict
        self.constants = constants or {}
        self.range_constraints = range_constraints
        self.example_inputs = example_inputs
        self.in_spec = in_spec
        self.out_spec = out_spec
        self.input_meta = input_meta or []
        self.dim_names = dim_names or {}
        # flat output index -> constant value (outputs that are not tensors)
        self.out_constants = out_constants or {}
        self._module: Optional[torch.nn.Module] = None

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    def module(self) -> torch.nn.Module:
        """An ``nn.Module`` running the program (state shared with ``state_dict``)."""
        return ExportedModule(self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``ep(*args)`` is ``ep.module()(*args)`` (one module per program)."""
        if self._module is None:
            self._module = self.module()
        return self._module(*args, **kwargs)

    def run_decompositions(self, decomp_table: Optional[dict] = None) -> "ExportedProgram":
        """The program re-traced with ``decomp_table`` (default: PyTorch's core ATen
        decompositions); same signature, state and ranges."""
        from kiln.export.exporter import retrace

        if decomp_table is None:
            from torch._decomp import core_aten_decompositions

            decomp_table = dict(core_aten_decompositions())
        return retrace(self, decomp_table)

    def __str__(self) -> str:
        code = self.graph_module.print_readable(print_output=False)
        body = "\n".join("    " + ln for ln in code.strip("\n").splitlines())
        rc = {k: v for k, v in self.range_constraints.items()}
        return (f"ExportedProgram:\n{body}\n\nGraph signature:\n"
                + "\n".join("    " + ln for ln in str(self.graph_signature).splitlines())
                + f"\nRange constraints: {rc}\n")

    __repr__ = __str__


def _set_state(root: torch.nn.Module, name: str, t: torch.Tensor, kind: InputKind, persistent: bool) -> None:
    *path, leaf = name.split(".")
    mod = root
    for p in path:
        if not hasattr(mod, p):
            mod.add_module(p, torch.nn.Module())
        mod = getattr(mod, p)
    if kind is InputKind.PARAMETER:
        p = t if isinstance(t, torch.nn.Parameter) else torch.nn.Parameter(t, requires_grad=t.requires_grad)
        mod.register_parameter(leaf, p)
    else:
        mod.register_buffer(leaf, t, persistent=persistent)


def _get_state(root: torch.nn.Module, name: str) -> torch.Tensor:
    mod = root
    for p in name.split("."):
        mod = getattr(mod, p)
    return mod


def _tensor_inputs(ep: ExportedProgram, flat: list) -> list:
    """The flat user inputs that are graph inputs (others were specialised at export)."""
    if not ep.input_meta:
        return flat
    return [v for v, m in zip(flat, ep.input_meta) if m.dtype is not None]


class _SizeExpr:
    """A symbolic size of the program's inputs (``"2*s3"``), parsed once.

    NOTE: parsed by the archive's checked expression grammar, never ``sympify``: a loaded
    program's text must not be evaluated as Python.  Checking an input evaluates it over
    ints (the per-call path of ``module()``); sympy is used only for a size that is not
    linear in its one unknown symbol."""

    def __init__(self, ep: ExportedProgram, text: str) -> None:
        from kiln.export.archive import _BadExpr, _parse_expr

        self.text = text
        try:
            self.tree = _parse_expr(text, ep.range_constraints)
        except _BadExpr as e:
            raise exc.ExportError(f"kiln.export: the program's input size {text!r} is not an "
                                  f"expression of its symbols ({e})") from None
        import ast

        self.symbols = sorted({n.id for n in ast.walk(self.tree) if isinstance(n, ast.Name)})

    def value(self, env: dict) -> int:
        from kiln.export.archive import _eval_tree

        return int(_eval_tree(self.tree, env))

    def solve(self, sym: str, got: int) -> Optional[int]:
        """The value of ``sym`` (the only symbol) giving ``got``, or None."""
        b = self.value({sym: 0})
        a = self.value({sym: 1}) - b
        if a and (got - b) % a == 0 and self.value({sym: (got - b) // a}) == got:
            return (got - b) // a
        from kiln.export.archive import _eval_tree

        s = sympy.Symbol(sym, integer=True, positive=True)
        sol = sympy.solve(sympy.Eq(sympy.sympify(_eval_tree(self.tree, {sym: s})), got), s)
        return next((int(v) for v in sol if v.is_integer), None)


def _size_expr(ep: ExportedProgram, text: str) -> _SizeExpr:
    cache = ep.__dict__.setdefault("_size_exprs", {})
    if text not in cache:
        cache[text] = _SizeExpr(ep, text)
    return cache[text]


def _fail(what: str, why: str = "", hint: str = "") -> exc.ExportInputError:
    return exc.ExportInputError(what, why=why, where=exc.user_location(), hint=hint)


class ExportedModule(torch.nn.Module):
    """The ``nn.Module`` of an :class:`ExportedProgram` (its ``module()``)."""

    def __init__(self, ep: ExportedProgram) -> None:
        super().__init__()
        self._ep = ep
        self.graph_module = ep.graph_module
        for s in ep.graph_signature.input_specs:
            if s.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                _set_state(self, s.target, ep.state_dict[s.target], s.kind, s.persistent is not False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        ep = self._ep
        flat, spec = pytree.tree_flatten((args, kwargs))
        if ep.in_spec is not None and spec != ep.in_spec:
            raise _fail("kiln.export: the inputs do not have the exported program's structure",
                        why=f"expected {ep.in_spec}, got {spec}",
                        hint="pass the inputs as at export (same nesting, same keyword names)")
        self._check(flat)
        ins = self._graph_inputs(flat)
        outs = self._run_graph(ins)
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        user_names = ep.graph_signature.user_inputs
        result = []
        for s, o in zip(ep.graph_signature.output_specs, outs):
            if s.kind is OutputKind.BUFFER_MUTATION:
                with torch.no_grad():
                    _get_state(self, s.target).copy_(o)
            elif s.kind is OutputKind.USER_INPUT_MUTATION:
                with torch.no_grad():
                    _tensor_inputs(ep, flat)[user_names.index(s.target)].copy_(o)
            elif s.kind in (OutputKind.USER_OUTPUT, OutputKind.LOSS_OUTPUT,
                            OutputKind.GRADIENT_TO_PARAMETER, OutputKind.GRADIENT_TO_USER_INPUT):
                result.append(o)
        if ep.out_spec is None:
            return tuple(result)
        for i in sorted(ep.out_constants):
            result.insert(i, ep.out_constants[i])
        return pytree.tree_unflatten(result, ep.out_spec)

    def _graph_inputs(self, flat: list) -> list:
        """The graph's inputs for the flat user inputs ``flat`` (state, constants, inputs)."""
        ep = self._ep
        ins, user = [], iter(_tensor_inputs(ep, flat))
        for s in ep.graph_signature.input_specs:
            if s.kind is InputKind.USER_INPUT:
                ins.append(next(user))
            elif s.kind is InputKind.CONSTANT_TENSOR:
                ins.append(ep.constants[s.target])
            elif s.kind is InputKind.TOKEN:
                ins.append(torch.empty(0))
            else:
                ins.append(_get_state(self, s.target))
        return ins

    def _run_graph(self, ins: list) -> Any:
        return self.graph_module(*ins)

    def _check(self, flat: list) -> None:
        ep = self._ep
        bound: dict = {}
        for m, v in zip(ep.input_meta, flat):
            if m.dtype is None:
                if not (v == m.value if not isinstance(v, torch.Tensor) else False):
                    raise _fail(f"kiln.export: input {m.path} is {v!r}, but the program was exported "
                                f"with {m.value!r}", why="inputs that are not tensors are specialised",
                                hint="export again with this value")
                continue
            if not isinstance(v, torch.Tensor):
                raise _fail(f"kiln.export: input {m.path} is a {type(v).__name__}, not a tensor")
            if v.dtype != m.dtype:
                raise _fail(f"kiln.export: input {m.path} has dtype {v.dtype}, the program takes {m.dtype}")
            if v.dim() != len(m.sizes):
                raise _fail(f"kiln.export: input {m.path} has {v.dim()} dims, the program takes "
                            f"{len(m.sizes)} ({list(m.sizes)})")
            for i, (got, want) in enumerate(zip(v.shape, m.sizes)):
                self._check_dim(m.path, i, int(got), want, bound)

    def _check_dim(self, path: str, i: int, got: int, want: Any, bound: dict) -> None:
        ep = self._ep
        where = f"{path}.size({i})"
        if isinstance(want, int):
            if got != want:
                raise _fail(f"kiln.export: input {where} is {got}, but the program was exported with "
                            f"a static {want} there", hint="declare the dim dynamic with a Dim in "
                            "dynamic_shapes to take other sizes")
            return
        expr = _size_expr(ep, want)
        unknown = [n for n in expr.symbols if n not in bound]
        if len(unknown) == 1 and len(expr.symbols) == 1:
            sym = unknown[0]
            val = expr.solve(sym, got)
            if val is None:
                raise _fail(f"kiln.export: input {where} is {got}, which {want} cannot be")
            bound[sym] = (val, where)
            rng = ep.range_constraints.get(sym)
            if rng is not None and val not in rng:
                dim = next((k for k, s in ep.dim_names.items() if s == sym), sym)
                raise _fail(f"kiln.export: input {where} is {got}, outside the range of Dim {dim!r}: "
                            f"{rng}", hint="pass an input inside the range, or export with a wider Dim")
            return
        value = expr.value({n: bound[n][0] for n in expr.symbols}) if not unknown else None
        if value != got:
            firsts = ", ".join(f"{w} = {v}" for _, (v, w) in bound.items())
            raise _fail(f"kiln.export: input {where} is {got}, but the program needs {want} = {value} "
                        f"there ({firsts})", why="sizes that share a Dim must agree")


__all__ = ["ExportedProgram", "ExportGraphSignature", "InputSpec", "OutputSpec", "InputKind",
           "OutputKind", "LeafMeta", "ExportedModule"]
