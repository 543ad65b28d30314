"""Symbolic sizes: one compiled backward for every batch size.

In:  traced backward graphs (trace.py) of one autograd-graph *structure* (walk.py's
     ``structural`` key: ranks, dtypes, devices, no sizes), each with the sizes of its
     graph inputs.
Out: :func:`generalize`: from two such graphs traced at different sizes, a
     :class:`Template`: the graph with every int that differs between them computed from
     the inputs' sizes (``inputs[i].size(d)`` and ``*``, ``//``, ``+``), so that it takes
     its sizes as symbolic inputs (``compiler_fn`` may compile it with ``dynamic=True``);
     None when some difference has no such explanation.  :func:`matches`: whether a graph
     traced at new sizes is exactly the template evaluated at those sizes.

Why (and why it is never a wrong gradient): the nodes' backward formulas run for real, so
a trace holds its sizes as plain ints (PyTorch's C++ hook swaps a node's saved sizes for
SymInts; a Python walk cannot).  Sizes are therefore recovered by comparing traces, and a
template is only ever *used* for sizes at which a fresh trace was checked, op by op and
constant by constant, to be the template's instance (a new size costs a trace, never a
compile).  A wrong guess of an expression only means a failed match, i.e. a compile of
the concrete graph, as without this file.
"""
from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

Sizes = list  # per graph input: tuple of its sizes


@dataclass
class NormalForm:
    """A graph as (skeleton, leaves): the skeleton is hashable and holds ops, targets and
    argument structure (nodes by position); ``leaves`` are the literal arguments in order."""
    skeleton: tuple
    leaves: list
    constants: dict = field(default_factory=dict)


_LEAF = "_leaf"


def _walk_arg(a: Any, nodes: dict, on_leaf: Callable[[Any], Any], skel: list) -> Any:
    """Rebuild ``a`` with every literal replaced by ``on_leaf(literal)``; ``skel`` gets its shape."""
    if isinstance(a, fx.Node):
        skel.append(("n", nodes[a]))
        return a
    if isinstance(a, (tuple, list)):
        skel.append((type(a).__name__, len(a)))
        out = [_walk_arg(x, nodes, on_leaf, skel) for x in a]
        return tuple(out) if isinstance(a, tuple) else out
    if isinstance(a, dict):
        skel.append(("dict", tuple(a)))
        return {k: _walk_arg(v, nodes, on_leaf, skel) for k, v in a.items()}
    if isinstance(a, slice):
        skel.append(("slice",))
        return slice(*(_walk_arg(x, nodes, on_leaf, skel) for x in (a.start, a.stop, a.step)))
    skel.append(_LEAF)
    return on_leaf(a)


def normal_form(gm: fx.GraphModule) -> NormalForm:
    nodes: dict = {}
    skel: list = []
    leaves: list = []
    constants: dict = {}

    def leaf(v: Any) -> Any:
        leaves.append(v)
        return v

    for n in gm.graph.nodes:
        nodes[n] = len(nodes)
        target = n.target if n.op in ("call_function", "call_method") else str(n.target)
        skel.append((n.op, target))
        _walk_arg(n.args, nodes, leaf, skel)
        _walk_arg(n.kwargs, nodes, leaf, skel)
        if n.op == "get_attr":
            constants[n.target] = getattr(gm, n.target)
    return NormalForm(tuple(skel), leaves, constants)


def _same_leaf(a: Any, b: Any) -> bool:
    return type(a) is type(b) and (a is b or a == b)


def _same_constants(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k, x in a.items():
        y = b[k]
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.dtype != y.dtype or x.shape != y.shape or x.device != y.device or not torch.equal(x, y):
                return False
        elif x is not y:
            return False
    return True


# ---- expressions over input sizes ---------------------------------------------------------
# An expression is (kind, coeff, offset, symbols): symbols are (input index, dim) pairs;
#   "mul": coeff * prod(symbols) + offset;  "div": prod(symbols) // coeff.

def _symbols(a: Sizes, b: Sizes) -> dict:
    """{(size in a, size in b): (input, dim)} for the dims whose sizes differ."""
    syms: dict = {}
    for i, (sa, sb) in enumerate(zip(a, b)):
        if sa is None or sb is None or len(sa) != len(sb):
            continue
        for d, (x, y) in enumerate(zip(sa, sb)):
            if x != y:
                syms.setdefault((x, y), (i, d))
    return syms


def _explain(a: int, b: int, syms: dict) -> Optional[tuple]:
    """An expression over the differing sizes equal to ``a`` at the first sizes and ``b``
    at the second, preferring products (views, numels), then affine forms (slice ends)."""
    pairs = list(syms.items())
    combos = [c for r in (1, 2, 3) for c in itertools.combinations_with_replacement(range(len(pairs)), r)]
    for combo in combos:
        pa = pb = 1
        for k in combo:
            pa *= pairs[k][0][0]
            pb *= pairs[k][0][1]
        src = tuple(pairs[k][1] for k in combo)
        if pa and a % pa == 0 and b == (a // pa) * pb and a // pa != 0:
            return ("mul", a // pa, 0, src)
        if a and pa % a == 0 and pb % (pa // a) == 0 and pb // (pa // a) == b:
            return ("div", pa // a, 0, src)
    for combo in combos:
        pa = pb = 1
        for k in combo:
            pa *= pairs[k][0][0]
            pb *= pairs[k][0][1]
        if pa != pb and (a - b) % (pa - pb) == 0 and (a - b) // (pa - pb) != 0:
            coeff = (a - b) // (pa - pb)
            return ("mul", coeff, a - coeff * pa, tuple(pairs[k][1] for k in combo))
    return None


def evaluate(expr: tuple, sizes: Sizes) -> int:
    kind, coeff, offset, src = expr
    p = 1
    for i, d in src:
        p *= sizes[i][d]
    return coeff * p + offset if kind == "mul" else p // coeff


@dataclass
class Template:
    """A graph whose size-dependent ints are expressions over its inputs' sizes."""
    nf: NormalForm                   # of the concrete graph it was built from
    exprs: dict                      # leaf position -> expression
    gm: fx.GraphModule               # the graph with those ints computed in it
    outputs: list


def generalize(a: NormalForm, sizes_a: Sizes, b: NormalForm, sizes_b: Sizes,
               gm_b: fx.GraphModule, outputs: list) -> Optional[Template]:
    """A template that both traces are instances of (see the module docstring), built on
    ``gm_b`` (rewritten in place), or None."""
    if a.skeleton != b.skeleton or len(a.leaves) != len(b.leaves) \
            or not _same_constants(a.constants, b.constants):
        return None
    syms = _symbols(sizes_a, sizes_b)
    exprs: dict = {}
    for k, (x, y) in enumerate(zip(a.leaves, b.leaves)):
        if _same_leaf(x, y):
            continue
        if type(x) is not int or type(y) is not int:
            return None
        e = _explain(x, y, syms)
        if e is None:
            return None
        exprs[k] = e
    _rewrite(gm_b, exprs)
    return Template(b, exprs, gm_b, outputs)


def matches(t: Template, nf: NormalForm, sizes: Sizes) -> bool:
    """Whether ``nf`` (traced at ``sizes``) is exactly ``t`` evaluated at ``sizes``."""
    if nf.skeleton != t.nf.skeleton or len(nf.leaves) != len(t.nf.leaves) \
            or not _same_constants(nf.constants, t.nf.constants):
        return False
    exprs = t.exprs
    for k, (x, y) in enumerate(zip(t.nf.leaves, nf.leaves)):
        e = exprs.get(k)
        if e is None:
            if not _same_leaf(x, y):
                return False
        elif type(y) is not int or evaluate(e, sizes) != y:
            return False
    return True


def _rewrite(gm: fx.GraphModule, exprs: dict) -> None:
    """Replace the literal at each position in ``exprs`` by nodes computing it from the
    sizes of the inputs (placed before the first op, in order)."""
    g = gm.graph
    nodes_in_order = list(g.nodes)
    inputs_ph = nodes_in_order[0]
    first = next(n for n in nodes_in_order if n.op != "placeholder")
    made: dict = {}

    def sym(i: int, d: int) -> fx.Node:
        key = ("size", i, d)
        if key not in made:
            inp = g.call_function(operator.getitem, (inputs_ph, i))
            made[key] = g.call_method("size", (inp, d))
        return made[key]

    def build(expr: tuple) -> fx.Node:
        if expr not in made:
            kind, coeff, offset, src = expr
            node = sym(*src[0])
            for i, d in src[1:]:
                node = g.call_function(operator.mul, (node, sym(i, d)))
            if kind == "div":
                node = g.call_function(operator.floordiv, (node, coeff))
            elif coeff != 1:
                node = g.call_function(operator.mul, (node, coeff))
            if kind == "mul" and offset:
                node = g.call_function(operator.add, (node, offset))
            made[expr] = node
        return made[expr]

    counter = [0]
    changed = [False]

    def on_leaf(v: Any) -> Any:
        e = exprs.get(counter[0])
        counter[0] += 1
        if e is None:
            return v
        changed[0] = True
        with g.inserting_before(first):
            return build(e)

    index: dict = {}
    for n in nodes_in_order:
        index[n] = len(index)
        changed[0] = False
        args = _walk_arg(n.args, index, on_leaf, [])
        kwargs = _walk_arg(n.kwargs, index, on_leaf, [])
        if changed[0]:
            n.args, n.kwargs = args, kwargs
    gm.recompile()


__all__ = ["NormalForm", "Template", "normal_form", "generalize", "matches", "evaluate"]
