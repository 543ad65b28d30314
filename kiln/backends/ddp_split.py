"""backends/ddp_split.py: a captured graph split at DistributedDataParallel's gradient buckets.

In:  a torch-level ``fx.GraphModule`` captured inside ``DDP.forward`` (parameters are
     placeholders), the real values of its inputs, the active DDP module and a backend.
Out: a callable that runs the graph as consecutive parts, each compiled by the
     backend on its own (its own autograd function), so that the backward of the
     last part finishes its parameters' gradients, and DDP's reducer starts that
     bucket's all-reduce, while the backward of the earlier parts still runs.

How the parts are chosen (the ``ddp.split`` pass, :func:`split_at_buckets`): DDP fills its
buckets with parameters in reverse order of use, the first one up to
``first_bucket_bytes_cap`` (1 MiB by default) and the others up to ``bucket_bytes_cap``
(``bucket_cap_mb``, 25 MiB by default).  The pass walks the graph backwards, adding the
bytes of each parameter when it meets its last use, and closes a part once the bytes
reach the cap of that bucket.  Each part gets the values it needs as inputs and returns
every value a later part or the graph output reads.

Invariants: the split graph computes exactly what the graph computed (same nodes, same
order); no communication is issued here (DDP's own reducer does all of it); a graph this
pass cannot split safely runs as one graph and the reason is recorded (kiln.fallbacks).
``KILN_LOGS=ddp`` prints the plan and every part; ``kiln.explain`` lists the splits.
"""
from __future__ import annotations

import dataclasses
import operator
import sys
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from kiln.fallbacks import record_fallback
from kiln.passes import checking, graph_pass, log_graph, should_log, verify_graph


@dataclasses.dataclass(frozen=True)
class Bucket:
    """One part of a split graph: the parameters whose gradients it finishes, and their bytes."""

    index: int                 # part number in forward order (0 runs first)
    params: tuple[str, ...]    # placeholder names of the parameters it finishes
    nbytes: int
    cap: int                   # the DDP bucket cap it was filled against
    nodes: int                 # how many compute nodes it holds


@dataclasses.dataclass(frozen=True)
class SplitRecord:
    """What ``kiln.explain`` and ``KILN_LOGS=ddp`` report about one captured graph."""

    graph: str                 # the captured graph (its first ops)
    buckets: tuple[Bucket, ...]
    reason: str                # why it was split this way (or why not)

    def __str__(self) -> str:
        parts = "; ".join(f"part {b.index}: {len(b.params)} params, {b.nbytes} bytes (cap {b.cap})"
                          for b in self.buckets)
        return f"{self.graph}: {len(self.buckets)} parts ({self.reason}){': ' + parts if parts else ''}"


_records: list[SplitRecord] = []


def recorded_splits(since: int = 0) -> list[SplitRecord]:
    """The split decisions made in this process (from index ``since`` on)."""
    return list(_records[since:])


def mark() -> int:
    """An index to pass to ``recorded_splits(since=...)`` later."""
    return len(_records)


# NOTE: calls that change global state for the nodes after them: a part boundary between
# them would leave the next part running under another mode than its nodes were traced in.
_GLOBAL_STATE_TARGETS = (torch._C._set_grad_enabled,)


def bucket_caps(ddp: Any) -> list[int]:
    """DDP's bucket byte caps in the order it fills buckets (the last one repeats)."""
    per = list(getattr(ddp, "bucket_bytes_cap_list", None) or [])
    if per:
        return per
    cap = int(ddp.bucket_bytes_cap)
    cfg = getattr(ddp, "_bucket_config", None)
    if cfg is not None:
        return [int(cfg.first_bucket_bytes_cap), cap]
    # NOTE: older torch (2.11): the first bucket is small only with the default cap.
    import torch.distributed as dist

    return [dist._DEFAULT_FIRST_BUCKET_BYTES, cap] if getattr(ddp, "bucket_bytes_cap_default", False) else [cap]


def plan_buckets(gm: fx.GraphModule, params: dict[str, torch.Tensor], caps: Sequence[int]
                 ) -> tuple[dict[fx.Node, int], list[Bucket]]:
    """Which part each compute node goes to (forward order), and the parts.

    ``params``: placeholder name -> the parameter it holds (those DDP reduces).
    """
    compute = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    seen: set[str] = set()
    rev_part: dict[fx.Node, int] = {}
    filled: list[tuple[list[str], int, int]] = [([], 0, caps[0])]  # (params, bytes, cap), reverse order
    for node in reversed(compute):
        names, nbytes, cap = filled[-1]
        if nbytes >= cap and names:
            filled.append(([], 0, caps[min(len(filled), len(caps) - 1)]))
            names, nbytes, cap = filled[-1]
        rev_part[node] = len(filled) - 1
        for inp in node.all_input_nodes:
            if inp.op == "placeholder" and inp.name in params and inp.name not in seen:
                seen.add(inp.name)
                p = params[inp.name]
                names.append(inp.name)
                nbytes += p.numel() * p.element_size()
        filled[-1] = (names, nbytes, cap)
    last = len(filled) - 1
    part = {n: last - r for n, r in rev_part.items()}
    counts = [0] * len(filled)
    for p in part.values():
        counts[p] += 1
    buckets = [Bucket(last - r, tuple(names), nbytes, cap, counts[last - r])
               for r, (names, nbytes, cap) in enumerate(filled)]
    return part, sorted(buckets, key=lambda b: b.index)


@graph_pass("ddp.split")
def split_at_buckets(gm: fx.GraphModule, part: dict[fx.Node, int]) -> fx.GraphModule:
    """``gm`` as a graph of ``submod_<i>`` calls, one per part (``part``: node -> part index).

    Each submodule returns a tuple (the values later parts or the output read); the outer
    graph's placeholders and output are ``gm``'s own.
    """
    nodes = list(gm.graph.nodes)
    nparts = max(part.values(), default=-1) + 1
    members: list[list[fx.Node]] = [[] for _ in range(nparts)]
    for n in nodes:
        if n in part:
            members[part[n]].append(n)
    # NOTE: a value crosses a boundary when a node of a later part, or the output, reads it.
    needed_later: dict[fx.Node, int] = {}
    for n in nodes:
        for inp in n.all_input_nodes:
            if inp in part and (n.op == "output" or part.get(n, -1) != part[inp]):
                needed_later[inp] = 1
    outer = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        if n.op == "placeholder":
            env[n] = outer.node_copy(n)
    root = torch.nn.Module()
    for i, mem in enumerate(members):
        sub = fx.Graph()
        local: dict[fx.Node, fx.Node] = {}
        inputs: list[fx.Node] = []
        for n in mem:
            for inp in n.all_input_nodes:
                if inp not in local and part.get(inp) != i and inp not in inputs:
                    inputs.append(inp)
        for inp in inputs:
            ph = sub.placeholder(inp.name)
            ph.meta = dict(inp.meta)
            local[inp] = ph
        for n in mem:
            local[n] = sub.node_copy(n, lambda a: local[a])
        outs = [n for n in mem if n in needed_later]
        sub.output(tuple(local[o] for o in outs))
        sub_gm = fx.GraphModule(gm, sub)
        sub_gm.meta["kiln_ddp_part"] = (i, nparts)
        setattr(root, f"submod_{i}", sub_gm)
        call = outer.call_module(f"submod_{i}", tuple(env[a] for a in inputs))
        for k, o in enumerate(outs):
            g = outer.call_function(operator.getitem, (call, k))
            g.meta = dict(o.meta)
            env[o] = g
    out = next(n for n in nodes if n.op == "output")
    outer.node_copy(out, lambda a: env[a])
    split = fx.GraphModule(root, outer)
    split.meta.update(gm.meta)
    log_graph("ddp", "split", split)
    if checking():
        verify_graph(split, after="ddp.split")
    return split


class _LazyPart(torch.nn.Module):
    """A part compiled by the backend at its first call, on the real values it gets."""

    def __init__(self, gm: fx.GraphModule, compile_fn: Callable[[fx.GraphModule, list], Callable]):
        super().__init__()
        self.gm = gm
        self.__dict__["_compile"] = compile_fn
        self.__dict__["_fn"] = None

    def forward(self, *args: Any) -> Any:
        fn = self._fn
        if fn is None:
            # NOTE: lazily, on real inputs: the values between parts exist only at run time,
            # and a static graph's backend gets real example inputs as without the split.
            fn = self.__dict__["_fn"] = self._compile(self.gm, list(args))
        return fn(*args)


def _describe(gm: fx.GraphModule) -> str:
    ops = [str(getattr(n.target, "__name__", n.target)) for n in gm.graph.nodes
           if n.op in ("call_function", "call_method", "call_module")]
    return f"graph of {len(ops)} ops [{', '.join(ops[:3])}{', ...' if len(ops) > 3 else ''}]"


def _log(text: str) -> None:
    if should_log("ddp"):
        print(f"[kiln ddp] {text}", file=sys.stderr)


def _one_graph(gm: fx.GraphModule, why: str, compile_fn, example: list, *, fallback: bool) -> Callable:
    rec = SplitRecord(_describe(gm), (), why)
    _records.append(rec)
    _log(str(rec))
    if fallback:
        record_fallback("ddp", _describe(gm), f"not split at DDP's gradient buckets: {why}; it runs as one "
                        "graph (correct, without overlapping the all-reduce with the backward)")
    return compile_fn(gm, example)


# NOTE: why a DDP module is not split, checked in order: (test(ddp), reason).
_NO_SPLIT: list[tuple[Callable[[Any], bool], str]] = [
    (lambda ddp: bool(getattr(ddp, "find_unused_parameters", False)),
     "find_unused_parameters=True: the parameters used may change between steps"),
    (lambda ddp: bool(getattr(ddp, "static_graph", False)),
     "static_graph=True: DDP reorders its buckets from the first step's gradient order"),
]


def compile_for_ddp(gm: fx.GraphModule, example: list, real_inputs: Sequence[Any], ddp: Any,
                    compile_fn: Callable[[fx.GraphModule, list], Callable]) -> Callable:
    """Compile ``gm`` (captured inside ``ddp``'s forward) as parts at DDP's bucket boundaries.

    ``real_inputs``: the real value of each placeholder (to find DDP's parameters);
    ``compile_fn(gm, example_inputs) -> callable``: the backend, as capture calls it.
    Returns one callable taking the graph's inputs, as ``compile_fn(gm, example)`` would.
    """
    for test, why in _NO_SPLIT:
        if test(ddp):
            return _one_graph(gm, why, compile_fn, example, fallback=True)
    if any(isinstance(v, torch.Tensor) and isinstance(v, torch._subclasses.FakeTensor) for v in example):
        return _one_graph(gm, "dynamic shapes (the parts would be compiled for one size)", compile_fn,
                          example, fallback=True)
    if any(n.op == "call_function" and n.target in _GLOBAL_STATE_TARGETS for n in gm.graph.nodes):
        return _one_graph(gm, "the graph switches grad mode inside", compile_fn, example, fallback=True)
    owned = {id(p) for p in ddp.parameters() if p.requires_grad}
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    params = {n.name: v for n, v in zip(phs, real_inputs) if isinstance(v, torch.Tensor) and id(v) in owned}
    caps = bucket_caps(ddp)
    part, buckets = plan_buckets(gm, params, caps)
    if len(buckets) <= 1:
        total = sum(b.nbytes for b in buckets)
        why = (f"its parameters ({total} bytes) fit in DDP's first bucket (cap {caps[0]} bytes)" if params
               else "it reads none of DDP's parameters")
        return _one_graph(gm, why, compile_fn, example, fallback=False)
    split = split_at_buckets(gm, part)
    for i in range(len(buckets)):
        name = f"submod_{i}"
        setattr(split, name, _LazyPart(getattr(split, name), compile_fn))
    rec = SplitRecord(_describe(gm), tuple(buckets),
                      f"DDP bucket caps {caps} bytes, parameters bucketed in reverse order of use")
    _records.append(rec)
    _log(str(rec))
    return split.forward


def active_ddp_module() -> Optional[Any]:
    """The DDP module whose forward is running now (None outside one)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel._get_active_ddp_module()
