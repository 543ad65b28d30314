"""kiln.codegen.schedule: buffers -> an ordered plan of kernels and extern calls.

In:  a :class:`kiln.codegen.graph.GraphLowering` after ``run()`` (buffers in program
     order, graph outputs).
Out: a :class:`Plan`: steps in order (:class:`Kernel` groups and extern buffers), which
     buffers each step reads/writes, which kernel results stay local (never stored).

A kernel is a group of nodes sharing an outer iteration space ("outer" loops, run in
parallel); each node adds inner loops of its own: a pointwise node over the rest of its
ranges, a reduction over its reduction ranges.  So pointwise chains (already inlined by
lowering), a reduction with its consumers, sibling reductions and row kernels
(softmax / layer_norm: several reductions and pointwise over one row) are one kernel.
A node joins the current kernel only when every value it reads from the kernel was
written at the same point of the same loops (so one thread owns it).  Decisions are
logged under ``KILN_LOGS=schedule``.  Nothing here knows the target language.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Optional

import sympy
import torch

from kiln.codegen import ir
from kiln.codegen.ir import Buffer, Extern, Pointwise, Reduction, make_vars
from kiln.passes import should_log


@dataclasses.dataclass
class Node:
    """One buffer's body in canonical form: size-1 dims dropped, vars x0.. (outer ranges
    of the node) and r0.. (reduction ranges)."""

    buf: Buffer
    ranges: list
    rranges: list
    expr: ir.Expr
    store: sympy.Expr          # store index over x vars
    reads: set
    is_reduction: bool


@dataclasses.dataclass
class Kernel:
    name: str
    outer: list                        # outer ranges (vars x0..)
    nodes: list                        # Node, in order
    inner: list = dataclasses.field(default_factory=list)   # per node: its inner ranges
    locals: set = dataclasses.field(default_factory=set)    # buffers kept in registers
    stores: set = dataclasses.field(default_factory=set)    # buffers written to memory
    reads: list = dataclasses.field(default_factory=list)   # buffers read from memory
    # buffers read only inside this kernel, one row (the inner range) per outer iteration:
    # name -> (row base index over the outer vars, row size); a C++ kernel keeps each in
    # a scratch array (no allocation, no memory traffic beyond the cache)
    rows: dict = dataclasses.field(default_factory=dict)

    @property
    def is_scatter(self) -> bool:
        return isinstance(self.nodes[0].buf.body, ir.Scatter)

    @property
    def has_reduction(self) -> bool:
        return any(n.is_reduction for n in self.nodes)


@dataclasses.dataclass
class Plan:
    steps: list                 # Kernel | Buffer (extern)
    live: set                   # buffer names that must exist in memory
    log: list


def canonical(buf: Buffer) -> Node:
    body = buf.body
    if isinstance(body, ir.Scatter):
        reads = {ld.buf for e in (body.base, body.value) for ld in ir.loads(e)}
        for _, v, _ in body.indirect:
            reads |= {ld.buf for ld in ir.loads(v)}
        return Node(buf, list(body.ranges), [], body.base, buf.store_index(make_vars("x", len(body.ranges))),
                    reads, False)
    if isinstance(body, Pointwise):
        ranges, rranges = list(body.ranges), []
    else:
        ranges, rranges = list(body.ranges), list(body.reduction_ranges)
    xv, rv = make_vars("x", len(ranges)), make_vars("r", len(rranges))
    mapping, keep_x, keep_r = {}, [], []
    for v, s in zip(xv, ranges):
        if s == 1:
            mapping[v] = sympy.Integer(0)
        else:
            mapping[v] = ir.var("x", len(keep_x)); keep_x.append(s)
    for v, s in zip(rv, rranges):
        if s == 1:
            mapping[v] = sympy.Integer(0)
        else:
            mapping[v] = ir.var("r", len(keep_r)); keep_r.append(s)
    mapping = {k: v for k, v in mapping.items() if k != v}
    expr = ir.substitute(body.expr, mapping)
    store = sympy.expand(buf.store_index(xv).xreplace(mapping))
    if isinstance(body, Reduction):
        expr, keep_r = merge_reduction_dims(expr, keep_r)
    reads = {ld.buf for ld in ir.loads(expr)}
    return Node(buf, keep_x, keep_r, expr, store, reads, isinstance(body, Reduction))


# NOTE: a row scratch array lives on the stack of each thread: at most this many elements.
ROW_SCRATCH_MAX = 16384


def _row_of(k: Kernel, n: Node, kk: int, inner: list) -> Optional[tuple]:
    """(row base, row size) when ``n``'s buffer can live in a per-row scratch array of a
    C++ kernel: every read of it in ``k`` is at the stored row (its index minus the row
    base uses only the reading loop's own inner vars); else None."""
    from kiln.codegen import config

    if n.buf.device.type != "cpu" or config.cpu_backend != "cpp" or isinstance(n.buf.body, ir.Scatter):
        return None
    size = ir.product(inner)
    if not size.is_Integer or int(size) > ROW_SCRATCH_MAX:
        return None
    outer_vars = {ir.var("x", j) for j in range(kk)}
    inner_vars = {ir.var("x", kk + j) for j in range(len(inner))}
    store = sympy.expand(n.store)
    base = sympy.expand(store.xreplace({v: 0 for v in inner_vars}))
    local = sympy.expand(store - base)
    if local.free_symbols - inner_vars or local != sympy.expand(
            ir.strided_index([ir.var("x", kk + j) for j in range(len(inner))], ir.contiguous_strides(inner))):
        return None   # NOTE: only rows stored contiguously (local index = flat inner index)
    for m in k.nodes:
        own = ({ir.var("r", j) for j in range(len(m.rranges))} if m.is_reduction
               else {ir.var("x", kk + j) for j in range(len(m.ranges) - kk)})
        for ld in ir.loads(m.expr):
            if ld.buf != n.buf.name:
                continue
            rel = sympy.expand(ld.index - base)
            if ld.indirect or rel.free_symbols - own or rel.has(ir.FloorDiv, ir.ModIndex) and rel.free_symbols & outer_vars:
                return None
    return base, int(size)


def _expr_indices(e: ir.Expr) -> list:
    out = []
    for n in ir.walk(e):
        if isinstance(n, ir.Load):
            out.append(n.index)
        elif isinstance(n, ir.IndexValue):
            out.append(n.expr)
    return out


def _mergeable(indices: list, outer: sympy.Symbol, inner: sympy.Symbol, inner_size) -> bool:
    """Whether every index is linear in ``outer`` and ``inner`` with the coefficient of
    ``outer`` equal to ``inner_size`` times that of ``inner`` (so the two walk one range)."""
    for ix in indices:
        if not ({outer, inner} & ix.free_symbols):
            continue
        a, b = sympy.diff(ix, outer), sympy.diff(ix, inner)
        if {outer, inner} & (a.free_symbols | b.free_symbols) or a.has(sympy.Derivative) or b.has(sympy.Derivative):
            return False
        if sympy.expand(a - inner_size * b) != 0:
            return False
    return True


def merge_reduction_dims(expr: ir.Expr, rranges: list) -> tuple[ir.Expr, list]:
    """Adjacent reduction dims that every index walks as one range become one dim.

    NOTE: a reduction over (N, H, W) of an NCHW tensor reads ``W``-long rows: short inner
    loops (and collapsed loop nests) the compiler vectorizes badly; ``H*W`` is one
    contiguous run.  An index that is not linear in the two (floor division, modulo, an
    index used as a value) keeps them apart.
    """
    rranges = list(rranges)
    i = len(rranges) - 2
    while i >= 0:
        indices = _expr_indices(expr)
        outer, inner = ir.var("r", i), ir.var("r", i + 1)
        if _mergeable(indices, outer, inner, rranges[i + 1]):
            m = {outer: sympy.Integer(0), inner: outer}
            m.update({ir.var("r", j): ir.var("r", j - 1) for j in range(i + 2, len(rranges))})
            expr = ir.map_index(expr, lambda ix, m=m: sympy.expand(ix.xreplace(m)) if ix.free_symbols & m.keys() else ix)
            rranges[i:i + 2] = [rranges[i] * rranges[i + 1]]
        i -= 1
    return expr, rranges


def _rename_inner(e: sympy.Expr, k: int, prefix_from: str, n: int, to: list) -> sympy.Expr:
    m = {ir.var(prefix_from, k + j) if prefix_from == "x" else ir.var(prefix_from, j): to[j]
         for j in range(n)}
    return e.xreplace(m)


def _inner_of(node: Node, k: int) -> tuple[list, list]:
    """(inner ranges, inner vars) of ``node`` when its first ``k`` x dims are outer."""
    if node.is_reduction:
        return node.rranges, make_vars("r", len(node.rranges))
    return node.ranges[k:], [ir.var("x", k + j) for j in range(len(node.ranges) - k)]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(sympy.expand(x - y) == 0 for x, y in zip(a, b))


def _cumprod(sizes: list) -> list:
    out, acc = [], sympy.Integer(1)
    for s in sizes:
        acc = acc * s
        out.append(acc)
    return out


def common_refinement(a: list, b: list) -> Optional[list]:
    """The coarsest sizes ``F`` of which both ``a`` and ``b`` are regroupings (each of
    their dims a run of adjacent ``F`` dims multiplied together): ``[2, 17]`` and
    ``[34]`` give ``[2, 17]``; ``[2, 3]`` and ``[3, 2]`` give None (one walks the
    other's index with division and modulo), as do symbolic sizes."""
    if not a or not b or not all(getattr(sympy.sympify(s), "is_Integer", False) for s in [*a, *b]):
        return None
    ca, cb = _cumprod(a), _cumprod(b)
    if ca[-1] != cb[-1]:
        return None
    out, prev = [], sympy.Integer(1)
    for bound in sorted(set(ca) | set(cb)):
        if bound % prev:
            return None
        out.append(bound // prev)
        prev = bound
    return out


def _split_outer(node: Node, k: int, fine: list) -> Node:
    """``node`` with its first ``k`` x dims (whose sizes ``fine`` refines) replaced by
    ``fine``'s dims: each old var becomes the flat index of the new vars it covers
    (linear, no division), later x vars shift up.  A copy; ``node`` is unchanged."""
    bounds = _cumprod(fine)
    mapping, t = {}, 0
    for i, acc in enumerate(_cumprod(node.ranges[:k])):
        start = t
        while bounds[t] != acc:
            t += 1
        t += 1
        flat, stride = sympy.Integer(0), sympy.Integer(1)
        for j in reversed(range(start, t)):
            flat += ir.var("x", j) * stride
            stride *= fine[j]
        mapping[ir.var("x", i)] = flat
    for i in range(k, len(node.ranges)):
        mapping[ir.var("x", i)] = ir.var("x", i - k + len(fine))
    ranges = list(fine) + node.ranges[k:]
    sizes = {ir.var("x", i): s for i, s in enumerate(ranges)}
    sizes.update((ir.var("r", i), s) for i, s in enumerate(node.rranges))
    # NOTE: a view's index (``17 * (y // 17) + y % 17``) over the new vars becomes plain
    # again (``17 * x0 + x1``) once ``x1 < 17`` is used.

    def remap(ix: sympy.Expr) -> sympy.Expr:
        return ir.simplify_in_ranges(ix.xreplace(mapping), sizes) if ix.free_symbols & mapping.keys() else ix

    return dataclasses.replace(node, ranges=ranges, expr=ir.map_index(node.expr, remap),
                               store=remap(node.store))


def _prefix_len(ranges: list, total) -> Optional[int]:
    """The number of leading ``ranges`` whose product is ``total`` (None if none)."""
    for i, acc in enumerate(_cumprod(ranges)):
        if sympy.expand(acc - total) == 0:
            return i + 1
    return None


def regrouped(k: Kernel, n: Node) -> Optional[tuple[list, list, Node]]:
    """``(outer, nodes, node)``: kernel ``k``'s outer ranges and nodes, and ``n``, all
    over the common refinement of ``k.outer`` and ``n``'s leading dims; None when
    there is none or nothing changes.

    NOTE: a layer norm's statistics (a reduction over rows ``[2, 17]``) and the
    normalised output, flattened to ``[34, 64]`` for the matmul that reads it, walk the
    same rows: over ``[2, 17, 64]`` the output joins the statistics' kernel (one row
    kernel, as the unflattened norm at the end of a model already is)."""
    if n.is_reduction:
        j = len(n.ranges)
    else:
        j = _prefix_len(n.ranges, ir.product(k.outer))
    if j is None:
        return None
    fine = common_refinement(k.outer, n.ranges[:j])
    if fine is None or (_same(fine, k.outer) and _same(fine, n.ranges[:j])):
        return None
    nodes = [_split_outer(m, len(k.outer), fine) for m in k.nodes]
    return fine, nodes, _split_outer(n, j, fine)


class Scheduler:
    def __init__(self, lowered):
        self.lowered = lowered
        self.log: list[str] = []
        self._ext_out: dict = {}

    def why_not(self, k: Kernel, n: Node, writers: dict) -> Optional[str]:
        """None when ``n`` can join kernel ``k``; else the reason."""
        if k.nodes[0].buf.device != n.buf.device:
            return "different device"
        if isinstance(n.buf.body, ir.Scatter) or any(isinstance(m.buf.body, ir.Scatter) for m in k.nodes):
            return "indirect stores run in a kernel of their own"
        outer = k.outer
        if n.is_reduction:
            if not k.has_reduction and len(outer) >= len(n.ranges):
                if not all(len(m.ranges) >= len(n.ranges) and _same(m.ranges[:len(n.ranges)], n.ranges)
                           for m in k.nodes):
                    return f"outer ranges {n.ranges} vs {outer}"
                new_outer = n.ranges
            elif _same(n.ranges, outer):
                new_outer = outer
            else:
                return f"reduction ranges {n.ranges} vs outer {outer}"
        else:
            if len(n.ranges) < len(outer) or not _same(n.ranges[:len(outer)], outer):
                return f"ranges {n.ranges} vs outer {outer}"
            if not k.has_reduction and not _same(n.ranges, outer):
                return f"ranges {n.ranges} vs {outer}"
            new_outer = outer
        kk = len(new_outer)
        n_inner, n_vars = _inner_of(n, kk)
        for ld in ir.loads(n.expr):
            w = writers.get(ld.buf)
            if w is None or w not in k.nodes:
                continue
            if ld.indirect:
                return f"indirect read of {ld.buf} written in this kernel"
            w_inner, w_vars = _inner_of(w, kk)
            if w.is_reduction:
                w_inner, w_vars = [], []
            if w_inner:
                if not _same(w_inner, n_inner):
                    return f"reads {ld.buf} over other inner loops"
                expect = w.store.xreplace(dict(zip(w_vars, n_vars)))
            else:
                expect = w.store
            if sympy.expand(ld.index - expect) != 0:
                return f"reads {ld.buf} at another element ({ld.index} vs {expect})"
        return None

    def run(self) -> Plan:
        lw = self.lowered
        needed = self._live_buffers()
        steps: list = []
        writers: dict[str, Node] = {}
        for buf in lw.order:
            if buf.name not in needed:
                self.log.append(f"{buf.name}: dropped (unused)")
                continue
            if isinstance(buf.body, Extern):
                steps.append(buf)
                continue
            node = canonical(buf)
            target, reasons = None, []
            # NOTE: a node may join an earlier kernel when no step after that kernel
            # produces something it reads (moving it earlier keeps the order valid).
            for step in reversed(steps):
                if isinstance(step, Kernel):
                    reason = self.why_not(step, node, writers)
                    if reason is not None and (alt := self._try_regrouped(step, node, writers)) is not None:
                        node, reason = alt, None
                    if reason is None:
                        target = step
                        break
                    reasons.append(f"{step.name}: {reason}")
                    if any(m.buf.name in node.reads for m in step.nodes):
                        break
                elif self._extern_outputs(step) & node.reads:
                    break
                if len(reasons) >= 4:
                    break
            if target is not None:
                if node.is_reduction and not target.has_reduction:
                    target.outer = node.ranges
                target.nodes.append(node)
                writers[buf.name] = node
                self.log.append(f"{buf.name}: fused into {target.name} "
                                f"(with {', '.join(m.buf.name for m in target.nodes[:-1])})")
                continue
            current = Kernel(f"kernel{sum(isinstance(s, Kernel) for s in steps)}",
                             list(node.ranges), [node])
            self.log.append(f"{buf.name}: new kernel {current.name}"
                            + (f"; not fused: {'; '.join(reasons)}" if reasons else ""))
            writers[buf.name] = node
            steps.append(current)
        self._finish(steps, needed)
        if should_log("schedule"):
            print("===== [kiln schedule] =====", file=sys.stderr)
            print("\n".join(self.log), file=sys.stderr)
        return Plan(steps, needed, self.log)

    def _try_regrouped(self, k: Kernel, n: Node, writers: dict) -> Optional[Node]:
        """When ``n`` joins ``k`` over the common refinement of their ranges (see
        :func:`regrouped`): rewrites ``k`` (and ``writers``) to it and returns ``n``
        rewritten; else None, ``k`` unchanged."""
        alt = regrouped(k, n)
        if alt is None:
            return None
        outer, nodes, node = alt
        trial = Kernel(k.name, outer, nodes)
        trial_writers = dict(writers)
        trial_writers.update((m.buf.name, m) for m in nodes)
        if self.why_not(trial, node, trial_writers) is not None:
            return None
        k.outer, k.nodes = outer, nodes
        writers.update((m.buf.name, m) for m in nodes)
        self.log.append(f"{k.name}: outer ranges regrouped to {list(outer)} for {n.buf.name}")
        return node

    def _extern_outputs(self, ext: Buffer) -> set:
        out = self._ext_out.get(ext.name)
        if out is None:
            out = self._ext_out[ext.name] = {
                b.name for b in self.lowered.buffers.values()
                if isinstance(b.body, ir.InputBuffer) and b.body.producer == ext.name}
        return out

    def _live_buffers(self) -> set:
        """Buffers reachable from the outputs (dead code dropped)."""
        lw = self.lowered
        live: set = set()
        stack = [o.buf for o in lw.outputs if isinstance(o, ir.BufRef)]
        # NOTE: externs that return nothing run for their effect (``aten._assert_async``: an
        # ``assert`` on tensor data): live, whatever uses them.
        stack += [b.name for b in lw.order if isinstance(b.body, Extern)
                  and isinstance(b.body.op, torch._ops.OpOverload) and not b.body.op._schema.returns]
        deps = {}
        for b in lw.order:
            if isinstance(b.body, Extern):
                refs = []
                _collect_refs(b.body.args, refs)
                _collect_refs(tuple(b.body.kwargs.values()), refs)
                deps[b.name] = {r.buf for r in refs}
            elif isinstance(b.body, ir.Scatter):
                deps[b.name] = canonical(b).reads
            else:
                deps[b.name] = {ld.buf for ld in ir.loads(b.body.expr)}
        for b in lw.buffers.values():
            if isinstance(b.body, ir.InputBuffer) and b.body.producer:
                deps[b.name] = {b.body.producer}
        while stack:
            n = stack.pop()
            if n in live:
                continue
            live.add(n)
            stack.extend(deps.get(n, ()))
        return live

    def _finish(self, steps: list, needed: set) -> None:
        """Decide locals / stores / memory reads of each kernel; merge loops."""
        for s in steps:
            if isinstance(s, Kernel) and not s.is_scatter:
                merge_loops(s)
        outside: dict[str, int] = {}
        lw = self.lowered
        for o in lw.outputs:
            if isinstance(o, ir.BufRef):
                outside[o.buf] = outside.get(o.buf, 0) + 1
        owner: dict[str, Kernel] = {}
        for s in steps:
            if isinstance(s, Kernel):
                for n in s.nodes:
                    owner[n.buf.name] = s
        for s in steps:
            if isinstance(s, Kernel):
                for n in s.nodes:
                    for r in n.reads:
                        if owner.get(r) is not s:
                            outside[r] = outside.get(r, 0) + 1
            else:
                refs = []
                _collect_refs(s.body.args, refs)
                _collect_refs(tuple(s.body.kwargs.values()), refs)
                for r in refs:
                    outside[r.buf] = outside.get(r.buf, 0) + 1
        for s in steps:
            if not isinstance(s, Kernel):
                continue
            kk = len(s.outer)
            mine = {n.buf.name for n in s.nodes}
            in_registers = _one_register_row(s)
            for n in s.nodes:
                inner, _ = _inner_of(n, kk)
                s.inner.append([] if n.is_reduction else inner)
                name = n.buf.name
                outer_only = n.is_reduction or not inner or in_registers
                if outer_only and name not in outside and not isinstance(n.buf.body, ir.Scatter):
                    s.locals.add(name)
                elif name not in outside and (row := _row_of(s, n, kk, inner)) is not None:
                    s.rows[name] = row
                else:
                    s.stores.add(name)
            reads = []
            for n in s.nodes:
                for r in sorted(n.reads):
                    if (r not in mine or r in s.stores) and r not in reads and r not in s.locals:
                        reads.append(r)
            s.reads = [r for r in reads if r not in mine]


def _one_register_row(k: Kernel) -> bool:
    """Whether a Triton kernel holds each row of every node in registers: a reduction
    kernel whose nodes all walk the same inner ranges, of a static size a persistent
    reduction takes (the printer's rule).  Values only this kernel reads need no store.

    NOTE: softmax followed by layer norm stored the softmax output (the norm's input) to
    memory although the norm read it from registers: one more write of the whole tensor."""
    from kiln.codegen import wrapper
    from kiln.codegen.triton import heuristics

    if not k.has_reduction or k.is_scatter or wrapper.device_target(k.nodes[0].buf.device) != "triton":
        return False
    kk = len(k.outer)
    inner = [n.rranges if n.is_reduction else n.ranges[kk:] for n in k.nodes]
    first = next((r for r in inner if r), None)
    if first is None or not all(not r or _same(r, first) for r in inner):
        return False
    size = ir.product(first)
    return bool(size.is_Integer) and int(size) <= heuristics.PERSISTENT_MAX


def _index_exprs(k: Kernel) -> list:
    out = []
    for n in k.nodes:
        out.append(n.store)
        for e in ir.walk(n.expr):
            if isinstance(e, ir.Load):
                out.append(e.index)
            elif isinstance(e, ir.IndexValue):
                out.append(e.expr)
    return out


def merge_loops(k: Kernel) -> None:
    """Merge adjacent outer loops of a kernel where every index is affine in both
    with ``stride(i) == stride(i+1) * size(i+1)`` (so a contiguous tensor of any rank is
    one flat, vectorizable loop; a row kernel walks its rows with no division).
    Rewrites the nodes' expressions in place; a pointwise node's inner loops (those of
    a kernel with a reduction) keep their order, renumbered."""
    i = len(k.outer) - 2
    while i >= 0:
        xi, xj = ir.var("x", i), ir.var("x", i + 1)
        sj = k.outer[i + 1]
        ok = True
        for e in _index_exprs(k):
            e = sympy.expand(e)
            if any(({xi, xj} & f.free_symbols) for f in e.atoms(ir.FloorDiv, ir.ModIndex)):
                ok = False
                break
            ci, cj = e.coeff(xi), e.coeff(xj)
            if ci.free_symbols & {xi, xj} or cj.free_symbols & {xi, xj} or sympy.expand(ci - cj * sj) != 0:
                ok = False
                break
        if ok:
            mapping = {xi: sympy.Integer(0)}
            n_old = max(len(n.ranges) for n in k.nodes)
            # x_{i+1} becomes the merged var x_i; later vars (inner ones too) shift down by one
            mapping[xj] = xi
            for j in range(i + 2, n_old):
                mapping[ir.var("x", j)] = ir.var("x", j - 1)
            for n in k.nodes:
                n.expr = ir.substitute(n.expr, mapping)
                n.store = sympy.expand(n.store.xreplace(mapping))
                n.ranges = n.ranges[:i] + [n.ranges[i] * n.ranges[i + 1]] + n.ranges[i + 2:]
            k.outer = k.outer[:i] + [k.outer[i] * sj] + k.outer[i + 2:]
        i -= 1


def _collect_refs(a, out: list) -> None:
    if isinstance(a, ir.BufRef):
        out.append(a)
    elif isinstance(a, (list, tuple)):
        for x in a:
            _collect_refs(x, out)


def schedule(lowered) -> Plan:
    """Group the lowered buffers into kernels (see module docstring)."""
    return Scheduler(lowered).run()


__all__ = ["schedule", "Plan", "Kernel", "Node", "canonical"]
