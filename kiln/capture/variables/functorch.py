"""torch.func transforms inside compiled code: ``vmap``, ``grad``, ``grad_and_value``,
``vjp``, ``jvp``, ``jacrev``, ``jacfwd``, ``hessian``, ``linearize`` and ``functional_call``.

In: a call of one of those entry points (``torch.func.*``, ``torch.vmap``, ``functorch.*``;
``PUBLIC`` maps their public names to handlers, registered in hops.py's table).  Out:

* ``torch.func.vmap(f, ...)`` / ``grad(f, ...)`` / ``jacrev(f, ...)`` ...: a
  ``FuncTransformVT`` (the transformed function, not yet called; it can be returned or
  passed on, rebuilt in generated code as the same ``torch.func`` call);
* calling it (and ``jvp(f, primals, tangents)`` / ``vjp(f, *primals)``, called at once):
  ``f`` is captured as a subgraph by a nested trace (subgraph.py: the frame's guards,
  closures lifted to inputs, side-effect and in-place rules), and ONE ``call_function``
  node goes into the enclosing graph, ``func_<kind>(body_gm, *flat)``, whose target
  (kiln/ops/func_transforms.py) applies PyTorch's own eager transform to the body.  Its
  outputs (getitem nodes) are rebuilt into the result's pytree.

Design (why this works): functorch's transforms are dispatcher-level (batching rules,
grad/jvp levels), so when AOT / make_fx traces the outer graph through that node, the
dispatcher hands kiln's tracer plain ATen ops, for fake tensors, under functionalization
and inside AOT's joint forward/backward trace (a ``grad`` inside the forward is a
higher-order derivative of the outer one, as in eager).  Nothing of torch._functorch's
internals is traced by capture, and its interpreter stack is never live during capture.
The body is traced on the values ``f`` sees: per-example slices for ``vmap`` (each input
with its ``in_dims`` dimension removed), the primals' own shapes for the others.  The node's
output metadata and the result's tree come from running the same runtime function on the
fake inputs at capture time, so a transform the arguments do not fit (a non-scalar for
``grad``, random ops under ``randomness='error'``, mismatched batch sizes) is found then.

``vjp`` returns its primal output and a ``VjpFnVT``: calling that emits a second node that
re-applies ``vjp`` with the cotangents (the forward is computed again in that node).
``linearize`` is the same with ``jvp``.  ``functional_call(module, params, args)`` is
inlined, as PyTorch inlines it: the module's call is traced with every read of one of its
own parameters / buffers giving the tensor passed in instead (by identity, so tied weights
follow), so the body sees the given tensors' shapes, dtypes and requires_grad.

Graph breaks: a body that cannot be captured as one graph (a graph break, ``print``,
Python side effects, in-place writes to its inputs), options that are not constants,
arguments the transform rejects: the whole transform call is one graph break with the
reason, and it runs eagerly (functorch then runs the body in eager).
"""
from __future__ import annotations

import inspect
import types
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from kiln.exc import Unsupported
from kiln.ops import func_transforms as rt

from ..sources import Source
from .base import VT, ConstantVT, unsupported
from .containers import ListVT, TupleVT
from .dicts import DictVT
from .subgraph import attach, speculate, tree_leaves, tree_map
from .symbolic import SymNodeVT
from .tensor import TensorVT


# --------------------------------------------------------------------------- templates
def template(v: Any) -> Any:
    """A VT tree as a Python pytree with ``rt.LEAF`` at its tensor / SymInt leaves (and at
    the leaf indices of a body's output tree)."""
    if isinstance(v, (TensorVT, SymNodeVT)) or (isinstance(v, int) and not isinstance(v, bool)):
        return rt.LEAF
    if isinstance(v, TupleVT):
        from .namedtuples import const_value

        items = [template(i) for i in v.items]
        return tuple(items) if v.pytype is tuple else const_value(v.pytype, items)
    if isinstance(v, ListVT):
        return [template(i) for i in v.items]
    if isinstance(v, DictVT):
        keys = v.keys()
        if not all(k.is_const() for k in keys):
            unsupported("torch.func: a dict argument with keys that are not constants")
        return v.pytype((k.const(), template(i)) for k, i in zip(keys, v.items.values()))
    if isinstance(v, ConstantVT) or v.is_const():
        return v.const()
    unsupported(f"torch.func: cannot pass {v} through a transform",
                why="arguments of a transformed function inside a compiled region must be tensors, "
                    "constants, or tuples / lists / dicts of them")


def const_of(v: VT, what: str) -> Any:
    """The Python constant a transform option holds (a SymInt is specialised)."""
    if isinstance(v, SymNodeVT):
        return v.const()
    if isinstance(v, (TupleVT, ListVT)):
        items = [const_of(i, what) for i in v.items]
        return tuple(items) if isinstance(v, TupleVT) else items
    if isinstance(v, DictVT) and all(k.is_const() for k in v.keys()):
        return v.pytype((k.const(), const_of(i, what)) for k, i in zip(v.keys(), v.items.values()))
    if isinstance(v, ConstantVT) or v.is_const():
        return v.const()
    unsupported(f"torch.func: {what} must be a constant, got {v}",
                why="a transform's options are fixed when the graph is captured")


def _bind(fn: Any, args: list, kwargs: dict, what: str) -> dict:
    """The call's arguments by parameter name (defaults as plain values)."""
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as e:
        unsupported(f"{what}: {e}", why="the call does not match the function's signature (it fails in "
                                        "eager too)")
    bound.apply_defaults()
    return dict(bound.arguments)


def _opt(value: Any, what: str) -> Any:
    return const_of(value, what) if isinstance(value, VT) else value


# --------------------------------------------------------------------------- the call
def _slice_for_vmap(tx, args: list, in_dims: Any) -> list:
    """The argument VTs as the vmapped body sees them: each tensor without its batch dim."""
    tmpl = tuple(template(a) for a in args)
    leaves, spec = pytree.tree_flatten(tmpl)
    if isinstance(in_dims, tuple) and len(in_dims) != len(args):
        unsupported(f"torch.func.vmap: in_dims has {len(in_dims)} entries for {len(args)} arguments",
                    why="vmap rejects it in eager too")
    flat = ([in_dims] * len(leaves) if isinstance(in_dims, int)
            else pytree._broadcast_to_and_flatten(in_dims, spec))
    if flat is None:
        unsupported(f"torch.func.vmap: in_dims={in_dims!r} does not match the arguments' structure",
                    why="vmap rejects it in eager too")
    traced_dims = []
    for d, leaf in zip(flat, leaves):
        if leaf is rt.LEAF:
            traced_dims.append(d)
        elif d is not None:
            unsupported(f"torch.func.vmap: in_dim={d} for a non-tensor input {leaf!r}",
                        why="vmap can only map over tensors (it raises in eager)")
    it = iter(traced_dims)

    def per_example(v: VT) -> VT:
        d = next(it)
        if d is None:
            return v
        if not isinstance(v, TensorVT):
            unsupported(f"torch.func.vmap: in_dim={d} for a SymInt input", why="vmap maps over tensors only")
        nd = v.fake.dim()
        if not isinstance(d, int) or not -nd <= d < max(nd, 1) or nd == 0:
            unsupported(f"torch.func.vmap: in_dim={d} is out of range for a tensor of {nd} dims",
                        why="vmap rejects it in eager too")
        d %= nd
        # NOTE: the sizes and strides without the batch dim (not ``select(d, 0)``: a batch of
        # size 0 is valid for vmap, and generic associative scans make such batches).
        shape = [s for i, s in enumerate(v.fake.shape) if i != d]
        stride = [s for i, s in enumerate(v.fake.stride()) if i != d]
        with tx.output.fake_mode:
            fake = torch.empty_strided(shape, stride, dtype=v.fake.dtype, device=v.fake.device)
            if v.fake.requires_grad:
                fake.requires_grad_(True)
        return TensorVT(v.node, fake, None, v.pytype)

    return [tree_map(a, per_example) for a in args]


def _fake(a: Any) -> Any:
    return a.meta.get("example_value") if isinstance(a, fx.Node) else a


def _body_node(tx, gm: fx.GraphModule, prefix: str, cache: Optional[dict] = None) -> fx.Node:
    graph = tx.output.graph
    if cache is not None and graph in cache:
        return cache[graph]
    node = attach(tx.output, graph, gm, prefix)
    if cache is not None:
        cache[graph] = node
    return node


class _Captured:
    """A body captured for one transform call: its module and inputs."""

    def __init__(self, sub, call_tmpl: Any, out_tmpl: Any, explicit_fakes: list):
        self.gm = sub.gm
        self.args = list(sub.args)           # outer fx values per body placeholder
        self.n_explicit = sub.n_explicit
        self.call = rt.Template.of(call_tmpl)
        self.out = rt.Template.of(out_tmpl)
        self.fakes = list(explicit_fakes) + [_fake(a) for a in self.args[sub.n_explicit:]]
        self.nodes: dict = {}                # graph -> get_attr node of the body


def capture_body(tx, kind: str, fn: VT, args: list, kwargs: dict, body_args: Optional[list] = None,
                 has_aux: bool = False) -> _Captured:
    """Trace ``fn`` as the body of a ``kind`` transform (``body_args``: what it sees)."""
    body_args = args if body_args is None else body_args
    sub = speculate(tx, fn, body_args, kwargs, f"torch.func.{kind}",
                    name_outputs=_output_namer(_OUTPUT_NAMES.get(kind), has_aux))
    call_tmpl = (tuple(template(a) for a in args), {k: template(v) for k, v in kwargs.items()})
    leaves = tree_leaves(TupleVT(list(args) + list(kwargs.values())))
    fakes = [v.fake if isinstance(v, TensorVT) else v.sym for v in leaves]
    return _Captured(sub, call_tmpl, template(sub.out_tree), fakes)


# NOTE: the local that functorch's Python stores the body's result to (``output = func(*args)``
# in grad, ``primals_out`` in vjp / jacrev, ``result_duals`` in jvp / jacfwd, ``batched_outputs``
# in vmap; with has_aux, ``output, aux = output``): PyTorch's capture inlines that code, so a
# body result not yet stored to a local of the user's is named after it.
_OUTPUT_NAMES = {
    "vmap": "batched_outputs",
    "grad": "output",
    "grad_and_value": "output",
    "vjp": "primals_out",
    "jacrev": "primals_out",
    "hessian": "primals_out",  # jacfwd(jacrev(f)): f runs inside jacrev
    "jvp": "result_duals",
    "jacfwd": "result_duals",
}


def _output_namer(name: Optional[str], has_aux: bool) -> Optional[Callable]:
    """Names the body's result nodes as functorch's locals (``_OUTPUT_NAMES``)."""
    if name is None:
        return None

    def namer(tree: Any, outputs: list) -> None:
        from ..handlers_basic import name_hint

        named = [(tree, name)]
        if has_aux:
            items = tree.items if isinstance(tree, TupleVT) and len(tree.items) == 2 else None
            named = [(items[0], name), (items[1], "aux")] if items is not None else []
        for leaf, n in named:
            if type(leaf) is int and outputs[leaf] is not None:
                name_hint(outputs[leaf], n)

    return namer


def emit(tx, kind: str, body: _Captured, opts: dict, extra: Optional[VT] = None) -> VT:
    """One node applying the ``kind`` transform to ``body``; its result as a VT tree."""
    extra_vt = extra if extra is not None else TupleVT([])
    extra_leaves = tree_leaves(extra_vt)
    spec = rt.CallSpec(kind, tuple(sorted(opts.items())), body.call, body.out,
                       len(body.args) - body.n_explicit, rt.Template.of(template(extra_vt)))
    fakes = body.fakes + [v.fake if isinstance(v, TensorVT) else v.sym for v in extra_leaves]
    out = tx.output
    try:
        res = out._fake_call("call_function", rt.apply, [spec, body.gm, *fakes], {})
    except Unsupported:
        raise
    except Exception as e:  # noqa: BLE001 - the transform rejects these inputs: eager shows the error
        first = str(e).splitlines()[0] if str(e) else ""
        unsupported(f"torch.func.{_public(kind)}: {type(e).__name__}: {first}",
                    why="the transform fails on these inputs (it fails in eager too), or cannot run on "
                        "fake tensors; the call runs eagerly",
                    hint="check the transform's arguments and options")
    if any(isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)) for x in pytree.tree_leaves(res)):
        unsupported(f"torch.func.{_public(kind)}: the transform returns a symbolic number",
                    why="its result must be tensors and constants")
    leaves = rt.result_leaves(res)
    gm_node = _body_node(tx, body.gm, f"{_public(kind)}_body", body.nodes)
    args = (gm_node, *body.args, *[v.node for v in extra_leaves])
    node = out.graph.create_node("call_function", rt.make_call(spec), args, {})
    vt = out._wrap_result(leaves, node)
    items = list(vt.items) if isinstance(vt, TupleVT) else []
    return _rebuild(res, iter(items))


def _public(kind: str) -> str:
    return {"vjp_out": "vjp", "vjp_apply": "vjp", "linearize_apply": "linearize", "call": "linearize"}.get(kind, kind)


def _rebuild(res: Any, items) -> VT:
    """The result pytree ``res`` (fakes) as VTs: tensors in order from ``items``."""
    if isinstance(res, torch.Tensor):
        return next(items)
    if isinstance(res, tuple):
        return TupleVT([_rebuild(r, items) for r in res], pytype=type(res) if type(res) is not tuple else None)
    if isinstance(res, list):
        return ListVT([_rebuild(r, items) for r in res])
    if isinstance(res, dict):
        d = DictVT({}, pytype=type(res))
        for k, v in res.items():
            d.put(ConstantVT(k), _rebuild(v, items))
        return d
    return ConstantVT(res)


# --------------------------------------------------------------------------- transformed functions
_OPTIONS = {  # kind -> (the torch.func function, options read from its call)
    "vmap": (torch.func.vmap, ("in_dims", "out_dims", "randomness", "chunk_size")),
    "grad": (torch.func.grad, ("argnums", "has_aux")),
    "grad_and_value": (torch.func.grad_and_value, ("argnums", "has_aux")),
    "jacrev": (torch.func.jacrev, ("argnums", "has_aux", "chunk_size", "_preallocate_and_copy")),
    "jacfwd": (torch.func.jacfwd, ("argnums", "has_aux", "randomness")),
    "hessian": (torch.func.hessian, ("argnums",)),
}


class _FunctionVT(VT):
    """What the transforms return: a Python function, true, called with resolved arguments."""

    def python_type(self) -> type:
        return types.FunctionType

    def truthy(self, tx) -> bool:
        return True

    @staticmethod
    def resolved(tx, args: list, kwargs: dict) -> tuple[list, dict]:
        return [tx.resolve(a) for a in args], {k: tx.resolve(v) for k, v in kwargs.items()}


class FuncTransformVT(_FunctionVT):
    """``torch.func.<kind>(f, **opts)``: a transformed function, captured when called."""

    def __init__(self, kind: str, fn: VT, opts: dict, source: Optional[Source] = None):
        self.kind = kind
        self.fn = fn
        self.opts = opts
        self.source = source

    def call(self, tx, args: list, kwargs: dict) -> VT:
        args, kwargs = self.resolved(tx, args, kwargs)
        body_args = _slice_for_vmap(tx, args, self.opts["in_dims"]) if self.kind == "vmap" else args
        body = capture_body(tx, self.kind, self.fn, args, kwargs, body_args, bool(self.opts.get("has_aux")))
        return emit(tx, self.kind, body, self.opts)

    def getattr(self, tx, name: str) -> VT:
        if name in ("__name__", "__qualname__"):
            return ConstantVT(getattr(_OPTIONS[self.kind][0], name))
        return super().getattr(tx, name)

    def reconstruct(self, cg) -> str:
        if self.source is not None:
            return self.source.code()
        fn = _OPTIONS[self.kind][0]
        kw = ", ".join(f"{k}={cg.const_expr(v) if not isinstance(v, tuple) else _tuple_expr(cg, v)}"
                       for k, v in self.opts.items())
        return f"{cg.obj(fn)}({rebuild_fn(cg, self.fn)}, {kw})"

    def __repr__(self) -> str:
        return f"FuncTransformVT(torch.func.{self.kind})"


def _tuple_expr(cg, v: Any) -> str:
    if isinstance(v, tuple):
        inner = ", ".join(_tuple_expr(cg, i) for i in v)
        return f"({inner},)" if len(v) == 1 else f"({inner})"
    return cg.const_expr(v)


def rebuild_fn(cg, fn: VT) -> str:
    """Generated code for the transformed function; a function made in the region (a
    lambda, a nested def) is rebuilt from its code object when its closure cells are the
    caller's own."""
    from .callables import NestedFunctionVT, RealCellVT

    if not isinstance(fn, NestedFunctionVT) or fn.attrs:
        return cg.expr(fn)
    if fn.kwdefaults is not None or not all(isinstance(c, RealCellVT) for c in fn.closure):
        return cg.expr(fn)  # NOTE: raises Unsupported with the reason
    defaults = cg.expr(fn.defaults) if fn.defaults is not None else "None"
    closure = "(" + "".join(f"{cg.obj(c.cell)}, " for c in fn.closure) + ")" if fn.closure else "None"
    return (f"{cg.obj(types.FunctionType)}({cg.obj(fn.code)}, {cg.obj(fn.fn_globals)}, "
            f"{fn.code.co_name!r}, {defaults}, {closure})")


def _transform_handler(kind: str) -> Callable:
    entry, names = _OPTIONS[kind]

    def handler(tx, fn: Any, args: list, kwargs: dict) -> VT:
        bound = _bind(entry, args, kwargs, f"torch.func.{kind}")
        # NOTE: only options this torch's signature has (jacrev's _preallocate_and_copy is new).
        opts = {n: _opt(bound[n], f"{kind}'s {n}") for n in names if n in bound}
        return FuncTransformVT(kind, bound["func"], opts)

    handler.__name__ = f"_{kind}"
    return handler


# --------------------------------------------------------------------------- vjp / jvp / linearize
class DeferredFnVT(_FunctionVT):
    """The ``vjp_fn`` of ``vjp`` (or ``jvp_fn`` of ``linearize``): calling it emits a node
    applying the transform again with the given cotangents / tangents."""

    def __init__(self, kind: str, body: _Captured, primals: list, opts: dict):
        self.kind = kind
        self.body = body
        self.primals = primals
        self.opts = opts

    def call(self, tx, args: list, kwargs: dict) -> VT:
        args, kwargs = self.resolved(tx, args, kwargs)
        if self.kind == "vjp_apply":
            extra = TupleVT([TupleVT(args), DictVT({ConstantVT(k).value: v for k, v in kwargs.items()})])
        else:
            if kwargs:
                unsupported("linearize's jvp_fn takes tangents positionally")
            extra = TupleVT(args)
        return emit(tx, self.kind, self.body, self.opts, extra)

    def __repr__(self) -> str:
        return f"DeferredFnVT({_public(self.kind)}_fn)"


def _vjp(tx, fn: Any, args: list, kwargs: dict) -> VT:
    bound = _bind(torch.func.vjp, args, kwargs, "torch.func.vjp")
    has_aux = bool(_opt(bound["has_aux"], "vjp's has_aux"))
    primals = list(bound["primals"])
    body = capture_body(tx, "vjp", bound["func"], primals, {}, has_aux=has_aux)
    out = emit(tx, "vjp_out", body, {"has_aux": has_aux})
    vjp_fn = DeferredFnVT("vjp_apply", body, primals, {"has_aux": has_aux})
    if has_aux:
        return TupleVT([out.items[0], vjp_fn, out.items[1]])
    return TupleVT([out, vjp_fn])


def _jvp(tx, fn: Any, args: list, kwargs: dict) -> VT:
    bound = _bind(torch.func.jvp, args, kwargs, "torch.func.jvp")
    primals, tangents = bound["primals"], bound["tangents"]
    if not isinstance(primals, TupleVT) or not isinstance(tangents, TupleVT):
        unsupported("torch.func.jvp: primals and tangents must be tuples", why="jvp raises in eager")
    opts = {"strict": bool(_opt(bound["strict"], "jvp's strict")), "has_aux": bool(_opt(bound["has_aux"],
                                                                                        "jvp's has_aux"))}
    body = capture_body(tx, "jvp", bound["func"], list(primals.items), {}, has_aux=opts["has_aux"])
    return emit(tx, "jvp", body, opts, tangents)


def _linearize(tx, fn: Any, args: list, kwargs: dict) -> VT:
    bound = _bind(torch.func.linearize, args, kwargs, "torch.func.linearize")
    primals = list(bound["primals"])
    body = capture_body(tx, "linearize", bound["func"], primals, {})
    out = emit(tx, "call", body, {})
    return TupleVT([out, DeferredFnVT("linearize_apply", body, primals, {"detach": True})])


# --------------------------------------------------------------------------- functional_call
def _functional_call(tx, fn: Any, args: list, kwargs: dict) -> VT:
    from .objects import NNModuleVT

    b = _bind(torch.func.functional_call, args, kwargs, "torch.func.functional_call")
    module, dicts = b["module"], b["parameter_and_buffer_dicts"]
    tie, strict = bool(_opt(b["tie_weights"], "tie_weights")), bool(_opt(b["strict"], "strict"))
    if not isinstance(module, NNModuleVT):
        unsupported(f"torch.func.functional_call of {module}", why="the module must be an nn.Module of the caller")
    if tie:
        _read_given_module_tensors(tx, module, dicts)
    given = _given_tensors(dicts)
    repl = _replacements(module.mod, given, tie, strict)
    out = tx.output
    out.read_inputs_first(list(given.values()))
    # NOTE: while the module's call is inlined, reading one of its parameters / buffers gives
    # the tensor the caller passed (OutputGraph.add_tensor_input consults ``tensor_overrides``),
    # as functional_call swaps them on the module in eager.
    saved = out.__dict__.get("tensor_overrides")
    out.tensor_overrides = {**(saved or {}), **repl}
    try:
        return module.call(tx, _as_args(b["args"]), _as_kwargs(b["kwargs"]))
    finally:
        out.tensor_overrides = saved


def _read_given_module_tensors(tx, module: VT, dicts: VT) -> None:
    """Read, through the module's tables, each of its parameters and buffers that the one given
    dict holds itself (``params = dict(model.named_parameters())``), before the dicts' values.

    NOTE: eager functional_call reads the module's tensors first (``_untie_named_tensors_map``),
    so in PyTorch's capture they name the graph inputs (``L['model']._parameters['weight']``);
    it prunes the inputs nothing used, so a module tensor the dicts replace by another one is
    no input there and is not read here."""
    from .lazy_dict import LazyValues

    # NOTE: a sequence of dicts is merged into one first (``{k: v for d in dicts ...}``): its
    # values are read before the module's tensors.
    if not isinstance(dicts, DictVT) or not isinstance(dicts.items, LazyValues) or module.source is None:
        return
    given = dicts.items
    mod = module.mod
    for table, named in (("_parameters", mod.named_parameters), ("_buffers", mod.named_buffers)):
        for name, t in named(remove_duplicate=False):
            if given.peek(name) is not t:
                continue
            *path, leaf = name.split(".")
            src = module.source
            for p in path:
                src = src.module_entry("_modules", p)
            tx.wrap(t, src.module_entry(table, leaf))


def _given_tensors(dicts: VT) -> dict:
    """{name: TensorVT} of ``parameter_and_buffer_dicts`` (one dict or a sequence of them)."""
    parts = list(dicts.items) if isinstance(dicts, (TupleVT, ListVT)) else [dicts]
    given: dict = {}
    for d in parts:
        if not isinstance(d, DictVT):
            unsupported(f"torch.func.functional_call: parameters given as {d}", why="expected a dict of tensors")
        for k, v in zip(d.keys(), d.items.values()):
            if not k.is_const() or not isinstance(v, TensorVT):
                unsupported("torch.func.functional_call: a parameter dict that is not {name: tensor}")
            if k.const() in given:
                unsupported(f"torch.func.functional_call: {k.const()!r} appears in more than one dict",
                            why="functional_call raises in eager")
            given[k.const()] = v
    return given


def _as_args(v: Any) -> list:
    if v is None or (isinstance(v, ConstantVT) and v.value is None):
        return []
    return list(v.items) if isinstance(v, TupleVT) else [v]


def _as_kwargs(v: Any) -> dict:
    if v is None or (isinstance(v, ConstantVT) and v.value is None):
        return {}
    if not isinstance(v, DictVT) or not all(k.is_const() for k in v.keys()):
        unsupported("torch.func.functional_call: kwargs must be a dict with string keys")
    return {k.const(): i for k, i in zip(v.keys(), v.items.values())}


def _replacements(mod: torch.nn.Module, given: dict, tie: bool, strict: bool) -> dict:
    """{id(the module's tensor): the TensorVT that replaces it}."""
    own = dict(mod.named_parameters(remove_duplicate=False))
    own.update(mod.named_buffers(remove_duplicate=False))
    unknown = [n for n in given if n not in own]
    if unknown:
        unsupported(f"torch.func.functional_call: the module has no parameter or buffer {unknown[0]!r}",
                    why="kiln replaces the module's own tensors only")
    if strict and set(given) != set(own):
        unsupported("torch.func.functional_call(strict=True) without every parameter and buffer",
                    why="functional_call raises in eager")
    repl: dict = {}
    for name, vt in given.items():
        t = own[name]
        tied = [n for n, o in own.items() if o is t and n != name]
        if tied and not tie and any(n not in given for n in tied):
            unsupported("torch.func.functional_call(tie_weights=False) of one of several tied names",
                        why="kiln swaps the shared tensor for every name that holds it")
        if id(t) in repl and repl[id(t)] is not vt:
            unsupported(f"torch.func.functional_call: tied names given different tensors ({name!r})",
                        why="functional_call raises in eager")
        repl[id(t)] = vt
    return repl


# --------------------------------------------------------------------------- table
PUBLIC: dict = {
    **{f"torch.func.{k}": _transform_handler(k) for k in _OPTIONS},
    **{f"functorch.{k}": _transform_handler(k) for k in _OPTIONS},
    "torch.func.vjp": _vjp,
    "functorch.vjp": _vjp,
    "torch.func.jvp": _jvp,
    "functorch.jvp": _jvp,
    "torch.func.linearize": _linearize,
    "torch.func.functional_call": _functional_call,
}

__all__ = ["PUBLIC", "FuncTransformVT", "DeferredFnVT", "capture_body", "emit", "template", "rebuild_fn"]
