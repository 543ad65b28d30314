"""Reading the autograd graph a backward call is about to run, from Python.

In:  the roots of one ``backward`` / ``autograd.grad`` call (tensors or gradient edges,
     their incoming gradients, the ``inputs`` of ``autograd.grad``).
Out: a :class:`Plan`: the nodes that run, in the eager engine's order, each with its
     kind, edges, saved values and hooks; the graph inputs (incoming gradients, saved
     tensors, existing ``.grad``\\ s, in a fixed order); the hooks; and ``key``, a hashable
     description of everything a traced graph depends on (structure, metadata of the
     inputs, saved non-tensor values), used as the cache key.

Invariants: reading is side-effect free for the user (the hook probes add and remove a
no-op hook); two calls with equal keys collect their inputs and hooks in the same order,
so one traced graph serves both.  What cannot be traced raises :class:`NotTraceable`.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Optional

import torch

from kiln.compiled_autograd import hooks as H

RELEASED_KEY = "_kiln_ca_released"   # node.metadata: saved state freed by a compiled backward
RELEASED_ERROR = (
    "Trying to backward through the graph a second time (or directly access saved tensors after "
    "they have already been freed). Saved intermediate values of the graph are freed when you call "
    ".backward() or autograd.grad(). Specify retain_graph=True if you need to backward through the "
    "graph a second time or if you need to access saved tensors after calling backward.")


class NotTraceable(Exception):
    """This backward cannot be compiled; ``why`` says why (it runs in the eager engine)."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


# ---- node kinds ----------------------------------------------------------------------
# NOTE: the kind decides how a node is read here and traced in trace.py (a table there).
ACCUMULATE = "accumulate_grad"
PYTHON = "python_function"
KILN_AOT = "kiln_aot"
CPP = "cpp"

# node names the eager engine must run, and why
# (by name prefix; other sparse gradients are caught when a traced value is sparse)
REFUSED: dict[str, str] = {
    "CppNode": "a C++ custom autograd Function has no Python backward to trace",
    "torch::autograd::CppNode": "a C++ custom autograd Function has no Python backward to trace",
    "SparseCooTensorWithDimsAndTensorsBackward": "sparse gradients are not traced",
    "ToSparseBackward": "sparse gradients are not traced",
    "ToDenseBackward": "sparse gradients are not traced",
}

_SPECIAL_NAMES = {"torch::autograd::AccumulateGrad": ACCUMULATE, "AccumulateGrad": ACCUMULATE}


_KINDS: dict[type, str] = {}   # node type -> kind (a node's kind depends on its type only)


def node_kind(node: Any) -> str:
    cls = type(node)
    kind = _KINDS.get(cls)
    if kind is None:
        kind = _KINDS[cls] = _kind_of(node)
    return kind


def _kind_of(node: Any) -> str:
    name = node.name()
    kind = _SPECIAL_NAMES.get(name)
    if kind is not None:
        return kind
    for prefix, why in REFUSED.items():
        if name.startswith(prefix):
            raise NotTraceable(f"node {name}: {why}")
    fwd = getattr(node, "_forward_cls", None)
    if fwd is not None:
        return KILN_AOT if getattr(fwd, "_kiln_artifact", None) is not None else PYTHON
    return CPP


_SAVED_ATTRS: dict[type, tuple] = {}


def saved_attr_names(node: Any) -> tuple:
    cls = type(node)
    names = _SAVED_ATTRS.get(cls)
    if names is None:
        names = tuple(a for a in dir(cls) if a.startswith("_saved_"))
        _SAVED_ATTRS[cls] = names
    return names


def storage_key(t: torch.Tensor) -> tuple:
    """Tensors with equal keys are the same values (same memory, view and dtype)."""
    try:
        ptr = t.data_ptr()
    except (RuntimeError, NotImplementedError):
        ptr = ("id", id(t))
    return (ptr, t.shape, t.stride(), t.dtype, t.device)


def tensor_meta(t: torch.Tensor) -> tuple:
    """A tensor's metadata as a key part (sizes as ``torch.Size``, see :func:`structural`)."""
    return ("T", t.shape, t.stride(), t.dtype, t.device, t.layout)


def structural(key: Any) -> Any:
    """``key`` without sizes: every ``torch.Size`` and node input metadata (``("M", sizes,
    dtype, device)``) keeps its rank, every tensor's strides their order, every saved int
    its type.  Plans with equal structural keys differ only
    in sizes (and in size-like ints), the case of dynamic.py."""
    if type(key) is torch.Size:
        return ("rank", len(key))
    if type(key) is tuple:
        if len(key) == 6 and key[0] == "T":
            _, shape, stride, dtype, dev, layout = key
            order = tuple(sorted(range(len(stride)), key=lambda d: -stride[d]))
            return ("T", len(shape), order, is_dense(_Meta(shape, stride)), dtype, dev, layout)
        if len(key) == 4 and key[0] == "M":
            return ("M", len(key[1]), key[2], key[3])
        if len(key) == 2 and key[0] == "int" and type(key[1]) is int:
            return ("int",)
        return tuple(structural(k) for k in key)
    return key


class _Meta:
    __slots__ = ("shape", "_stride")

    def __init__(self, shape: Any, stride: tuple):
        self.shape, self._stride = shape, stride

    def dim(self) -> int:
        return len(self.shape)

    def stride(self, d: int) -> int:
        return self._stride[d]


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the strides are a permutation of contiguous ones (as
    eager's AccumulateGrad checks before giving a new .grad the leaf's strides)."""
    expected = 1
    for d in sorted(range(t.dim()), key=lambda d: (t.stride(d), t.shape[d])):
        if t.shape[d] == 1:
            continue
        if t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return True


_CONST_TYPES = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout,
                torch.memory_format)


_EMPTY = MappingProxyType({})


class NodeRec:
    """One node of the plan.  NOTE: the hook fields default to shared empty values,
    replaced (never mutated) when a node has any: most nodes have none, and this is built
    per node per backward (a plain class with slots: cheaper than a dataclass)."""

    __slots__ = ("node", "kind", "edges", "num_inputs", "needed", "saved", "variable", "grad_input",
                 "var_input", "leaf", "tensor_pre_hooks", "retains", "pre_hooks", "post_hooks",
                 "post_acc_hooks", "captures")

    def __init__(self, node: Any, kind: str, edges: list, num_inputs: int, needed: bool = True):
        self.node = node
        self.kind = kind
        self.edges = edges                  # per output: (index into Plan.recs, input_nr) or None
        self.num_inputs = num_inputs
        self.needed = needed
        self.saved: Any = ()                # encoded saved values (inputs by index)
        self.variable: Optional[torch.Tensor] = None  # AccumulateGrad's leaf
        self.grad_input: Optional[int] = None         # input index of the leaf's old .grad
        self.var_input: Optional[int] = None          # input index of the leaf itself
        self.leaf: Optional[int] = None               # index into Plan.leaves
        self.tensor_pre_hooks: Any = _EMPTY           # slot -> [hook indices]
        self.retains: Any = _EMPTY                    # slot -> (retained index, old-grad input)
        self.pre_hooks: Any = ()
        self.post_hooks: Any = ()
        self.post_acc_hooks: Any = ()
        self.captures: Any = ()                       # (slot, result index)


@dataclass
class Plan:
    recs: list
    roots: list                     # (rec index, input_nr, input index of the gradient or None)
    inputs: list
    hooks: list
    leaves: list                    # AccumulateGrad variables, by NodeRec.leaf
    retained: list                  # non-leaf tensors with retain_grad(), by retains index
    num_results: int
    key: tuple
    by_storage: dict                # storage_key -> input index (saved tensors)
    released: list = field(default_factory=list)   # nodes whose saved state a run frees


class _Collector:
    def __init__(self) -> None:
        self.inputs: list = []
        self._by_id: dict[int, tuple] = {}
        self.by_storage: dict = {}
        self.hooks: list = []
        self.key: list = []
        self.n_saved = 0          # saved tensors read so far (a node that read one is released)

    def add_input(self, t: torch.Tensor, saved: bool = False) -> int:
        hit = self._by_id.get(id(t))
        i = hit[1] if hit is not None and hit[0] is t else None
        sk = None
        if i is None and saved:
            sk = storage_key(t)
            i = self.by_storage.get(sk)
        if i is None:
            if t.layout != torch.strided:
                raise NotTraceable(f"a {t.layout} tensor takes part in the backward")
            if t.is_nested:
                raise NotTraceable("a nested tensor takes part in the backward")
            i = len(self.inputs)
            self.inputs.append(t)
            self.key.append(("in", i, tensor_meta(t)))
        # NOTE: the tensor is kept alive with its id (an unpacked saved tensor is a new,
        # short-lived object: a freed one's id could be reused by the next).
        self._by_id[id(t)] = (t, i)
        if saved:
            self.n_saved += 1
            self.by_storage.setdefault(storage_key(t) if sk is None else sk, i)
        return i

    def add_hooks(self, hooks: list) -> list:
        out = []
        for h in hooks:
            out.append(len(self.hooks))
            self.hooks.append(h)
        return out

    def encode(self, v: Any) -> Any:
        """A saved value as a key part; tensors become graph inputs."""
        t = type(v)
        if t is int or t is bool or t is float or v is None:
            return (t.__name__, v)
        if isinstance(v, torch.Tensor):
            return ("saved", self.add_input(v, saved=True))
        if isinstance(v, (list, tuple)):
            return (type(v).__name__, tuple(self.encode(x) for x in v))
        if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            raise NotTraceable("a symbolic size is saved by a backward node")
        if isinstance(v, _CONST_TYPES):
            return (type(v).__name__, v)
        # NOTE: any other object is compared by identity: a new object is a new graph.
        return ("obj", type(v).__qualname__, id(v))


def _root_edges(t_outputs: Any) -> list:
    edges = []
    for t in t_outputs:
        if isinstance(t, torch.autograd.graph.GradientEdge):
            edges.append((t.node, t.output_nr))
            continue
        if not isinstance(t, torch.Tensor) or not t.requires_grad:
            raise NotTraceable("a root does not require grad (eager raises the error)")
        edge = torch.autograd.graph.get_gradient_edge(t)
        edges.append((edge.node, edge.output_nr))
    return edges


def collect(t_outputs: Any, grad_tensors: Any, inputs: Any, accumulate_grad: bool) -> Plan:
    """Read the autograd graph below ``t_outputs`` (see the module docstring)."""
    c = _Collector()
    root_edges = _root_edges(t_outputs)
    grads = list(grad_tensors) if grad_tensors is not None else [None] * len(root_edges)
    # discovery
    # NOTE: next_functions builds new tuples on every read: read once per node here.
    order: dict[Any, int] = {}
    nodes: list = []
    nfs: list = []
    stack = [n for n, _ in root_edges]
    while stack:
        n = stack.pop()
        if n is None or n in order:
            continue
        order[n] = len(nodes)
        nodes.append(n)
        nf = n.next_functions
        nfs.append(nf)
        for m, _ in nf:
            if m is not None:
                stack.append(m)
    succ = [[-1 if m is None else order[m] for m, _ in nf] for nf in nfs]
    # which nodes run (autograd.grad runs only what leads to its inputs)
    targets: dict = {}
    if inputs is not None:
        for k, t in enumerate(inputs):
            if isinstance(t, torch.autograd.graph.GradientEdge):
                n, nr = t.node, t.output_nr
            else:
                e = torch.autograd.graph.get_gradient_edge(t)
                n, nr = e.node, e.output_nr
            if n not in order:
                raise NotTraceable("an input of autograd.grad is not reached from the outputs")
            targets.setdefault(n, []).append((nr, k))
    needed = _needed(nodes, order, targets, accumulate_grad)
    # dependencies and the engine's order: ready nodes by descending sequence number
    deps = [0] * len(nodes)
    for n, _ in root_edges:
        deps[order[n]] += 1
    for i, ks in enumerate(succ):
        if needed[i]:
            for k in ks:
                if k >= 0:
                    deps[k] += 1
    heap: list = []
    counter = 0
    left = list(deps)
    runs = [needed[i] or nodes[i] in targets for i in range(len(nodes))] if targets else needed
    for n, _ in root_edges:
        j = order[n]
        left[j] -= 1
        if left[j] == 0 and runs[j]:
            heapq.heappush(heap, (-n._sequence_nr(), counter, j))
            counter += 1
    exec_order: list[int] = []
    while heap:
        _, _, j = heapq.heappop(heap)
        exec_order.append(j)
        if not needed[j]:
            continue
        for k in succ[j]:
            if k < 0:
                continue
            left[k] -= 1
            if left[k] == 0 and runs[k]:
                heapq.heappush(heap, (-nodes[k]._sequence_nr(), counter, k))
                counter += 1
    if len(exec_order) != sum(runs):
        raise NotTraceable("the autograd graph has nodes that never become ready")
    pos = [-1] * len(nodes)
    for p, j in enumerate(exec_order):
        pos[j] = p
    # root gradients are the first inputs (as eager's engine receives them)
    roots = []
    for (n, nr), g in zip(root_edges, grads):
        gi = c.add_input(g) if isinstance(g, torch.Tensor) else None
        roots.append((pos[order[n]], nr, gi))
        c.key.append(("root", pos[order[n]], nr, gi))
    recs: list[NodeRec] = []
    leaves: list = []
    retained_list: list = []
    released: list = []
    num_results = len(inputs) if inputs is not None else 0
    flags = (H.install_seq(), H.node_hooks_possible())
    for j in exec_order:
        n = nodes[j]
        rec = _read_node(c, n, needed[j], nfs[j], succ[j], pos, leaves, retained_list, released, flags)
        caps = targets.get(n) if targets else None
        if caps:
            rec.captures = list(caps)
            c.key.append(("captures", tuple(caps)))
        recs.append(rec)
    c.key.append(("grad_mode", torch.is_grad_enabled(), accumulate_grad, num_results))
    return Plan(recs, roots, c.inputs, c.hooks, leaves, retained_list, num_results,
                tuple(c.key), c.by_storage, released)


def _needed(nodes: list, order: dict, targets: dict, accumulate_grad: bool) -> list:
    if not targets:
        return [True] * len(nodes)
    # NOTE: nodes were discovered parents first; a child's answer is known before its
    # parent's when walked in reverse topological order, computed here by memoised DFS.
    memo: dict[int, bool] = {}

    def need(i: int) -> bool:
        if i in memo:
            return memo[i]
        memo[i] = False
        r = False
        for m, _ in nodes[i].next_functions:
            if m is not None and (m in targets or need(order[m])):
                r = True
        memo[i] = r
        return r

    import sys

    limit = sys.getrecursionlimit()
    if len(nodes) * 2 + 100 > limit:
        sys.setrecursionlimit(len(nodes) * 2 + 100)
    try:
        return [need(i) for i in range(len(nodes))]
    finally:
        sys.setrecursionlimit(limit)


def _read_node(c: _Collector, n: Any, needed: bool, nf: tuple, succ: list, pos: list, leaves: list,
               retained_list: list, released: list, flags: tuple) -> NodeRec:
    """``flags``: (autograd sequence number at hooks.install, whether nodes may hold hooks)."""
    kind = node_kind(n)
    md = n.metadata
    if md and md.get(RELEASED_KEY):
        raise RuntimeError(RELEASED_ERROR)
    if flags[0] and kind != ACCUMULATE and n._sequence_nr() < flags[0]:
        raise NotTraceable(f"node {n.name()} was created before kiln was imported: hooks registered on "
                           f"its tensors then cannot be seen (import kiln before building the graph)")
    edges = []
    for (_, nr), k in zip(nf, succ):
        p = -1 if k < 0 else pos[k]
        edges.append(None if p < 0 else (p, nr))
    metas = n._input_metadata
    rec = NodeRec(n, kind, edges, len(metas), needed)
    key: list = [type(n), tuple(edges), needed,
                 tuple([("M", tuple(m.shape), m.dtype, m.device) for m in metas])]
    # hooks, in the engine's order
    variable = n.variable if kind == ACCUMULATE else None
    hook_key = _NO_HOOKS
    if variable is not None:
        tph = H.leaf_pre_hooks(variable)
    else:
        tph = H.tensor_pre_hooks(md) if md else None
    if tph:
        rec.tensor_pre_hooks = {slot: c.add_hooks(hs) for slot, hs in tph.items()}
    ret = H.retained(md) if md else None
    if ret:
        retains = {}
        for slot, t in ret.items():
            gi = c.add_input(t.grad) if t.grad is not None else None
            retains[slot] = (len(retained_list), gi)
            retained_list.append(t)
        rec.retains = retains
    if flags[1]:
        pre, post = H.node_hooks(n)
        if pre:
            rec.pre_hooks = c.add_hooks(pre)
        if post:
            rec.post_hooks = c.add_hooks(post)
    if tph or ret or rec.pre_hooks or rec.post_hooks:
        hook_key = (tuple((s, len(h)) for s, h in rec.tensor_pre_hooks.items()),
                    tuple((s, gi is not None) for s, (_, gi) in rec.retains.items()),
                    len(rec.pre_hooks), len(rec.post_hooks))
    key.append(hook_key)
    if needed:
        _READERS[kind](c, n, rec, key, leaves, released)
    c.key.append(tuple(key))
    return rec


_NO_HOOKS = ((), (), 0, 0)


def _read_accumulate(c: _Collector, n: Any, rec: NodeRec, key: list, leaves: list,
                     released: list) -> None:
    var = n.variable
    rec.variable = var
    rec.leaf = len(leaves)
    leaves.append(var)
    if var.grad is not None:
        if var.grad.layout != torch.strided:
            raise NotTraceable("a leaf's existing .grad is sparse")
        rec.grad_input = c.add_input(var.grad)
    pah = H.post_acc_hooks(var)
    if pah:
        rec.post_acc_hooks = c.add_hooks(pah)
        rec.var_input = c.add_input(var)
    key += [tensor_meta(var), rec.grad_input is not None, len(rec.post_acc_hooks)]


def _read_cpp(c: _Collector, n: Any, rec: NodeRec, key: list, leaves: list, released: list) -> None:
    # NOTE: the attribute names are fixed by the node's type, which is in the key already.
    before = c.n_saved
    enc = c.encode
    saved = tuple([enc(getattr(n, a)) for a in saved_attr_names(n)])
    rec.saved = saved
    key.append(saved)
    if c.n_saved != before:
        released.append(n)


def _read_python(c: _Collector, n: Any, rec: NodeRec, key: list, leaves: list, released: list) -> None:
    saved = tuple(c.encode(t) for t in n.saved_tensors)
    attrs = tuple(sorted((k, c.encode(v)) for k, v in vars(n).items()))
    fwd = n._forward_cls
    key += [fwd.__qualname__, id(fwd), saved, attrs, tuple(n.needs_input_grad)]
    if saved:
        released.append(n)


def _read_kiln_aot(c: _Collector, n: Any, rec: NodeRec, key: list, leaves: list, released: list) -> None:
    from kiln.aot.runtime import _merge_saved

    art = n._forward_cls._kiln_artifact
    saved = tuple(c.encode(v) for v in _merge_saved(n))
    key += ["aot", id(art), saved, tuple(n.needs_input_grad)]
    rec.saved = list(saved)
    if saved:
        released.append(n)


_READERS = {ACCUMULATE: _read_accumulate, CPP: _read_cpp, PYTHON: _read_python, KILN_AOT: _read_kiln_aot}


__all__ = ["NotTraceable", "Plan", "NodeRec", "collect", "storage_key", "RELEASED_KEY", "RELEASED_ERROR"]
