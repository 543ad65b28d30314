"""Capturing a callable as a subgraph of the graph under construction (a nested trace).

In: the translator, a callable VT and its argument VTs (tensors and SymInts anywhere in
tuples / lists / dicts; other values are constants of the body).  Out: a ``Subgraph``:
the torch-level fx.GraphModule of the body, the outer fx arguments of its placeholders
(in order), the body's output VT tree and its tensor outputs.

The body runs in the same OutputGraph with ``output.graph`` swapped for a fresh graph, so
its guards, fake tensors and inputs are the frame's own.  Afterwards:

* tensors the body read from the caller (globals, closures, module state: new graph
  inputs) get their placeholder in the enclosing graph; the body keeps its own, fed by it;
* values of the enclosing graph the body used (closures over intermediates) become
  extra placeholders ("lifted" free variables);
* a body that mutates Python state, changes grad mode, or writes to a tensor it did not
  create is refused (``Unsupported``, so the whole call is a graph break with the reason);
  so is any graph break inside it.

Subgraph modules are attached to the graph that reads them with ``attach``; the
OutputGraph hands them to the root module when it compiles (``attached``).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from kiln.exc import Unsupported
from kiln.ops.subgraph import align_placeholders

from .base import VT, ConstantVT, unsupported
from .containers import ListVT, TupleVT
from .dicts import DictVT
from .symbolic import SymNodeVT
from .tensor import TensorVT


@dataclass
class Subgraph:
    gm: fx.GraphModule
    graph: fx.Graph
    args: list            # outer fx argument per placeholder, in order
    n_explicit: int       # placeholders standing for the call's own arguments
    out_tree: Any         # output VT tree (tensor leaves are indices into ``outputs``)
    outputs: list = field(default_factory=list)  # TensorVT / SymNodeVT leaves of the body

    def fakes(self) -> list:
        return [o.fake if isinstance(o, TensorVT) else o.sym for o in self.outputs]


# --------------------------------------------------------------------------- VT trees
def is_traced(v: VT) -> bool:
    return isinstance(v, (TensorVT, SymNodeVT))


def tree_leaves(v: VT) -> list:
    """The tensor / SymInt leaves of a VT tree."""
    if is_traced(v):
        return [v]
    if isinstance(v, (TupleVT, ListVT)):
        return [x for i in v.items for x in tree_leaves(i)]
    if isinstance(v, DictVT):
        return [x for i in v.items.values() for x in tree_leaves(i)]
    return []


def _map_leaves(v: Any, is_leaf: Callable[[Any], bool], fn: Callable[[Any], Any]) -> Any:
    """``v`` with tuple/list/dict VTs rebuilt and each leaf (``is_leaf``) replaced by ``fn(leaf)``."""
    if is_leaf(v):
        return fn(v)
    if isinstance(v, TupleVT):
        return TupleVT([_map_leaves(i, is_leaf, fn) for i in v.items], pytype=v.pytype)
    if isinstance(v, ListVT):
        return ListVT([_map_leaves(i, is_leaf, fn) for i in v.items])
    if isinstance(v, DictVT):
        return DictVT({k: _map_leaves(i, is_leaf, fn) for k, i in v.items.items()}, pytype=v.pytype,
                      key_vts=v.key_vts)
    return v


def tree_map(v: VT, fn: Callable[[VT], Any]) -> Any:
    """The VT tree with each tensor / SymInt leaf replaced by ``fn(leaf)``."""
    return _map_leaves(v, is_traced, fn)


def check_leaf_types(v: VT, what: str) -> None:
    """Refuse values the body could not receive as constants (objects that may change)."""
    if is_traced(v) or v.is_const() or isinstance(v, (TupleVT, ListVT, DictVT)):
        for i in (v.items.values() if isinstance(v, DictVT) else getattr(v, "items", [])):
            check_leaf_types(i, what)
        return


# --------------------------------------------------------------------------- attach
def _registry(output) -> dict:
    return output.__dict__.setdefault("kiln_subgraphs", {})


def attach(output, graph: fx.Graph, gm: fx.GraphModule, prefix: str) -> fx.Node:
    """A get_attr node in ``graph`` naming ``gm`` (stored for that graph's module).

    Names are numbered over the whole frame, not per graph (as PyTorch names them): a body
    nested in another gets the lower number (``wrap_body_1.wrap_body_0``), so every
    module path of the root names one subgraph only once."""
    registry = _registry(output)
    mods = registry.setdefault(graph, {})
    used = {n for m in registry.values() for n in m}
    i = 0
    while f"{prefix}_{i}" in used:
        i += 1
    name = f"{prefix}_{i}"
    mods[name] = gm
    node = graph.get_attr(name)
    node.meta["example_value"] = gm
    return node


def attached(output, graph: fx.Graph) -> dict:
    """{attribute name: subgraph module} read by ``graph``'s get_attr nodes."""
    return dict(_registry(output).get(graph, {}))


def _module_for(output, graph: fx.Graph) -> fx.GraphModule:
    root = torch.nn.Module()
    for name, m in attached(output, graph).items():
        root.add_module(name, m)
    return fx.GraphModule(root, graph)


# --------------------------------------------------------------------------- speculate
def _placeholder(sub: fx.Graph, name: str, example: Any) -> fx.Node:
    phs = [n for n in sub.nodes if n.op == "placeholder"]
    if phs:
        with sub.inserting_after(phs[-1]):
            node = sub.placeholder(name)
    elif len(sub.nodes):
        with sub.inserting_before(next(iter(sub.nodes))):
            node = sub.placeholder(name)
    else:
        node = sub.placeholder(name)
    # NOTE: the same outer value may feed two placeholders (``f(x, x)``): fx numbers the
    # second's name (``l_x__1``), and its target, the argument's name, must follow.
    node.target = node.name
    node.meta["example_value"] = example
    return node


_INPLACE_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _written_tensor(node: fx.Node) -> Optional[fx.Node]:
    """The tensor node ``node`` writes in place, if any."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_") \
            and not node.target.startswith("_") and node.target != "requires_grad_":
        return node.args[0]
    if node.op == "call_function" and node.target in _INPLACE_FUNCTIONS:
        return node.args[0]
    if node.op == "call_function" and "out" in node.kwargs:
        return node.kwargs["out"] if isinstance(node.kwargs["out"], fx.Node) else None
    return None


def speculate(tx, fn: VT, args: list, kwargs: dict, what: str, *, prune: bool = False,
              prefix_names: str = "", name_outputs: Optional[Callable] = None) -> Subgraph:
    """Trace ``fn(*args, **kwargs)`` as a subgraph (see module docstring); ``name_outputs(out_tree,
    outputs)`` may rename the body's result nodes (None: a value from outside the body) before
    the graph's output node takes its name."""
    out = tx.output
    parent = out.graph
    sub = fx.Graph()
    outer: dict = {}  # sub placeholder -> outer fx argument
    counter = [0]

    def leaf(v: VT) -> VT:
        # NOTE: a body's placeholder takes the name of the outer value feeding it
        # (``l_x_``, ``item``), as PyTorch names subgraph inputs; fx numbers repeats.
        name = f"{prefix_names}{_outer_name(v.node, counter[0])}"
        counter[0] += 1
        if isinstance(v, TensorVT):
            ph = _placeholder(sub, name, v.fake)
            outer[ph] = v.node
            return TensorVT(ph, v.fake, None, v.pytype)
        ph = _placeholder(sub, name, v.sym)
        outer[ph] = v.node
        return SymNodeVT(ph, v.sym)

    new_args = [tree_map(a, leaf) for a in args]
    new_kwargs = {k: tree_map(v, leaf) for k, v in kwargs.items()}
    n_explicit = counter[0]
    se_before = out.side_effects.size()
    snap = _snapshot(tx)
    n_inputs = len(out.inputs)
    grad_before = out.grad_enabled
    from .autocast import depth as autocast_depth

    autocast_before = autocast_depth(out)
    out.graph = sub
    try:
        ret = fn.call(tx, new_args, new_kwargs)
    except Unsupported as e:
        out.graph = parent
        raise Unsupported(f"{what}: the body cannot be captured as one graph: {e.what}",
                          why=e.why or "a graph break inside a higher-order op's body makes the whole "
                                       "call run eagerly",
                          hint="move the unsupported code out of the body") from e
    finally:
        out.graph = parent
    if out.side_effects.size() != se_before or _changed(snap):
        unsupported("HigherOrderOperator: Mutating a variable not in the current scope (SideEffects)",
                    why=f"the body of {what} changes Python state outside it; a subgraph cannot replay that",
                    hint="return the values from the body instead of storing them")
    if out.grad_enabled != grad_before:
        unsupported(f"{what}: the body leaves grad mode changed",
                    why="a subgraph must restore the grad mode it started with")
    if autocast_depth(out) != autocast_before:
        unsupported(f"{what}: the body leaves the autocast state changed",
                    why="a subgraph must leave every autocast region it enters")
    # new graph inputs read inside the body: a placeholder in the enclosing graph feeds the body's
    for src, value, vt, *_ in out.inputs[n_inputs:]:
        inner = vt.node
        node = out._make_placeholder(src.name())
        node.meta.update(inner.meta)
        vt.node = node
        if isinstance(vt, SymNodeVT):
            out.size_nodes[vt.sym.node.expr] = node
        outer[inner] = node
    for node in list(sub.nodes):
        w = _written_tensor(node)
        if w is not None and (w.op == "placeholder" or w.graph is not sub):
            unsupported(f"{what}: the body writes in place to a tensor it did not create",
                        why="a higher-order op's body must be functional in its inputs",
                        hint="clone the tensor inside the body first")
    lifted: dict = {}

    def lift(a: fx.Node) -> fx.Node:
        ph = lifted.get(a)
        if ph is None:
            ph = _placeholder(sub, f"{prefix_names}{_outer_name(a, len(lifted))}", a.meta.get("example_value"))
            lifted[a] = ph
            outer[ph] = a
        return ph

    for node in list(sub.nodes):
        if node.op == "placeholder":
            continue
        for a in list(node.all_input_nodes):
            if a.graph is not sub:
                node.replace_input_with(a, lift(a))
    outputs: list = []

    def out_leaf(v: VT) -> Any:
        outputs.append(v)
        return len(outputs) - 1

    out_tree = tree_map(ret, out_leaf) if ret is not None else ConstantVT(None)
    _check_outputs(ret, what)
    if name_outputs is not None:
        name_outputs(out_tree, [o if o.node.graph is sub else None for o in outputs])
    nodes = [o.node if o.node.graph is sub else lift(o.node) for o in outputs]
    sub.output(tuple(nodes))
    if prune:
        _merge_same_inputs(sub, outer)
        for ph in [n for n in sub.nodes if n.op == "placeholder"]:
            if not ph.users:
                outer.pop(ph, None)
                sub.erase_node(ph)
        _order_by_first_use(sub)
    phs = [n for n in sub.nodes if n.op == "placeholder"]
    gm = _module_for(out, sub)
    return Subgraph(gm, sub, [outer[p] for p in phs], n_explicit, out_tree, outputs)


def _outer_name(node: Any, i: int) -> str:
    name = getattr(node, "name", None)
    return name if isinstance(name, str) and name else f"arg{i}"


def _merge_same_inputs(sub: fx.Graph, outer: dict) -> None:
    """One placeholder per outer value: later placeholders fed by the same outer node
    (``wrap(fn, x=x, z=(x, y))``) are replaced by the first.

    NOTE: PyTorch lifts a body's inputs by the value they are ("automatic" inputs), so a
    tensor reached through two arguments is one input of the subgraph."""
    first: dict = {}
    for ph in [n for n in sub.nodes if n.op == "placeholder"]:
        src = outer.get(ph)
        if not isinstance(src, fx.Node):
            continue
        keep = first.setdefault(src, ph)
        if keep is not ph:
            ph.replace_all_uses_with(keep)


def _order_by_first_use(sub: fx.Graph) -> None:
    """Placeholders in the order the body first reads them.

    NOTE: PyTorch lifts the inputs of a body it captures whole (``wrap``, checkpoint:
    "automatic" inputs) when the body first uses each, so its subgraph takes them in that
    order, arguments and closures alike; kiln's op takes the reordered outer arguments."""
    phs = [n for n in sub.nodes if n.op == "placeholder"]
    order = {n: i for i, n in enumerate(sub.nodes)}

    def first_use(ph: fx.Node) -> tuple:
        user = min(ph.users, key=order.__getitem__)
        return order[user], user.all_input_nodes.index(ph)

    ranked = sorted(phs, key=first_use)
    if ranked == phs:
        return
    anchor = next(n for n in sub.nodes if n.op != "placeholder")  # NOTE: the output node at least
    for ph in ranked:
        anchor.prepend(ph)


def _snapshot(tx) -> list:
    """The contents of every container, closure cell and object built in the region that
    the enclosing frames can reach (a body that changes one mutates state outside its
    scope): ``(vt, read, before)`` with ``read(vt)`` the current contents."""
    from .callables import CellVT, NestedFunctionVT
    from .new_objects import NewObjectVT

    seen: set = set()
    out: list = []

    def walk(v: Any) -> None:
        if not isinstance(v, VT) or id(v) in seen:
            return
        seen.add(id(v))
        if isinstance(v, (TupleVT, ListVT)):
            out.append((v, _items_of, list(v.items)))
            for i in v.items:
                walk(i)
        elif isinstance(v, DictVT):
            out.append((v, _items_of, dict(v.items)))
            for i in v.items.values():
                walk(i)
        elif isinstance(v, CellVT):
            out.append((v, _value_of, v.value))
            walk(v.value)
        elif isinstance(v, NestedFunctionVT):
            for c in v.closure:
                walk(c)
        elif isinstance(v, NewObjectVT):
            # NOTE: an object built earlier in the region (``obj = Obj()`` then a body that
            # sets or deletes ``obj.val``): its attributes live on the VT, not in side effects.
            out.append((v, _attrs_of, dict(v.attrs)))
            for i in v.attrs.values():
                walk(i)

    t = tx
    while t is not None:
        for v in list(t.locals.values()) + list(t.stack) + list(t.cells.values()):
            walk(v)
        t = t.parent
    return out


def _items_of(vt: VT) -> Any:
    return vt.items


def _value_of(vt: VT) -> Any:
    return vt.value


def _attrs_of(vt: VT) -> Any:
    return vt.attrs


def _changed(snap: list) -> bool:
    for vt, read, before in snap:
        now = read(vt)
        if isinstance(before, list):
            if len(now) != len(before) or any(a is not b for a, b in zip(now, before)):
                return True
        elif isinstance(before, dict):
            if now.keys() != before.keys() or any(now[k] is not before[k] for k in before):
                return True
        elif now is not before:
            return True
    return False


def _check_outputs(ret: Optional[VT], what: str) -> None:
    def walk(v: VT) -> None:
        if is_traced(v) or isinstance(v, ConstantVT):
            return
        if isinstance(v, (TupleVT, ListVT)):
            for i in v.items:
                walk(i)
            return
        if isinstance(v, DictVT):
            for i in v.items.values():
                walk(i)
            return
        unsupported(f"{what}: the body returns {v}",
                    why="a higher-order op's body may return tensors, constants and containers of them")

    if ret is not None:
        walk(ret)


def rebuild(tree: Any, values: list) -> VT:
    """The output VT tree with leaf indices replaced by ``values``."""
    return _map_leaves(tree, lambda t: isinstance(t, int) and not isinstance(t, bool),
                       lambda i: values[i])


def align(subs: list, n_explicit: int) -> list:
    """Give every subgraph the same inputs: the explicit ones, then the union of what each
    lifted (by outer node), each adding unused placeholders for the others'; returns the
    common outer arguments."""
    union: list = []
    for s in subs:
        for a in s.args[n_explicit:]:
            if all(a is not u for u in union):
                union.append(a)
    def fresh(a: Any, ph: fx.Node) -> None:
        ph.meta["example_value"] = a.meta.get("example_value") if isinstance(a, fx.Node) else a

    for s in subs:
        align_placeholders(s.graph, n_explicit, list(s.args[n_explicit:]), union, "free", fresh)
        s.args = list(s.args[:n_explicit]) + list(union)
        s.gm.recompile()
    return list(subs[0].args) if subs else []


def fake_meta(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return (tuple(v.shape), v.dtype, v.device)
    return type(v)
