"""kiln.codegen.triton.printer: scheduled kernels -> Triton source.

In:  :class:`kiln.codegen.schedule.Kernel` groups, the graph's buffers, size hints, and
     whether the kernels run under the interpreter (CPU tensors).
Out: one Python module source (the :mod:`compat` prelude, then one ``@triton.jit``
     function per kernel) and, per kernel, a :class:`KernelInfo` (arguments, numel
     expressions over the size symbols, kind, persistent or looped).

Shapes: a pointwise kernel (no reduction, no inner loops) is 1-D: program ``pid`` owns
``XBLOCK`` elements of the flattened outer range.  Any other kernel is 2-D: a program owns
``XBLOCK`` outer rows (axis 0) and walks each node's inner range (its reduction range, or
the rest of a pointwise node's ranges) along axis 1 in ``RBLOCK`` chunks: once, with every
node's values kept in registers, when every inner range fits one block (persistent), else
in a loop per node (looped; a node that reads a buffer stored earlier in the same kernel
waits on ``tl.debug_barrier()``).  Every load and store is masked; index math is int32
unless a size is symbolic or an extent reaches 2**31 (then program ids and aranges are
int64).  Only Triton builtins are used, never its ``@jit`` standard library
(``tl.zeros``, ``tl.sum``): those are decorated when Triton is imported, so they would not
run under an interpreter switched on later.  float16/bfloat16 are loaded, converted to float32, and cast back when stored.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import sympy
import torch

from kiln import exc
from kiln.codegen import ir
from kiln.codegen.ir import Const, FloorDiv, IndexValue, Load, ModIndex, Op
from kiln.codegen.triton import compat, ops
from kiln.codegen.triton.ops import tl_type
from kiln.codegen.triton import heuristics
from kiln.codegen.triton.heuristics import next_pow2

@dataclasses.dataclass
class KernelInfo:
    """What the runtime needs to launch one printed kernel."""

    name: str
    args: list                 # ("tensor", buffer name) | ("size", sympy symbol)
    kind: str                  # "pointwise" | "reduction"
    xnumel: sympy.Expr         # outer elements
    rnumels: list              # one per node with an inner range (in order)
    persistent: bool
    rblock: int                # fixed RBLOCK of a persistent kernel (else 0)
    index64: bool
    origins: list


def _index_str(e, names: dict) -> str:
    """Integer sympy expression -> Triton (names: symbol -> printed name)."""
    e = sympy.sympify(e)
    if e.is_Integer:
        return str(int(e))
    if e.is_Symbol:
        return names.get(e, e.name)
    if isinstance(e, FloorDiv):
        return f"({_index_str(e.args[0], names)} // {_index_str(e.args[1], names)})"
    if isinstance(e, ModIndex):
        return f"({_index_str(e.args[0], names)} % {_index_str(e.args[1], names)})"
    if e.is_Add:
        terms = sorted(e.args, key=lambda t: (t.is_Integer, str(t)))
        return "(" + " + ".join(_index_str(t, names) for t in terms) + ")"
    if e.is_Mul:
        if any(a.is_Rational and not a.is_Integer for a in e.args):
            num, den = sympy.fraction(e)
            return f"({_index_str(num, names)} // {_index_str(den, names)})"
        return "(" + " * ".join(_index_str(a, names) for a in e.args) + ")"
    if e.is_Pow and e.args[1].is_Integer and int(e.args[1]) > 0:
        return "(" + " * ".join([_index_str(e.args[0], names)] * int(e.args[1])) + ")"
    if isinstance(e, (sympy.Max, sympy.Min)):
        fn = "tl.maximum" if isinstance(e, sympy.Max) else "tl.minimum"
        s = _index_str(e.args[0], names)
        for a in e.args[1:]:
            s = f"{fn}({s}, {_index_str(a, names)})"
        return s
    if isinstance(e, sympy.floor) and e.args[0].is_Mul:
        num, den = sympy.fraction(e.args[0])
        return f"({_index_str(num, names)} // {_index_str(den, names)})"
    raise exc.CodegenError(f"cannot print index {e} for Triton")


def _const(value, dt: torch.dtype) -> str:
    if dt == torch.bool:
        return "True" if value else "False"
    if dt.is_floating_point:
        v = float(value)
        if math.isnan(v):
            return 'float("nan")'
        if math.isinf(v):
            return 'float("inf")' if v > 0 else 'float("-inf")'
        return repr(v)
    return str(int(value))


class Scope:
    """Lines of one block of a kernel with a CSE table, the masks in force and the
    dims ({"x", "r"}) of each printed value."""

    def __init__(self, p: "KernelPrinter", parent: Optional["Scope"] = None,
                 masks: Optional[list] = None, share_lines: bool = False):
        self.p = p
        self.lines: list[str] = parent.lines if (share_lines and parent is not None) else []
        self.cse: dict = dict(parent.cse) if parent is not None else {}
        self.masks: list = list(masks if masks is not None else (parent.masks if parent else []))
        self.regs: dict = dict(parent.regs) if parent is not None else {}   # buffer -> value name

    def emit(self, s: str, dims: frozenset, hint: str = "t") -> str:
        name = self.p.tmp(hint)
        self.lines.append(f"{name} = {s}")
        self.p.dims[name] = dims
        return name

    def mask_for(self, dims: frozenset) -> tuple[Optional[str], frozenset]:
        """(mask, dims the pointer must broadcast to) for an access over ``dims``."""
        parts, need = [], set(dims)
        for m, mdims, base in self.masks:
            if base and not mdims <= dims:
                continue   # NOTE: that range does not move the address: always in bounds
            parts.append(m)
            need |= mdims
        if not parts:
            return None, frozenset(need)
        return (" & ".join(parts) if len(parts) > 1 else parts[0]), frozenset(need)

    def expr(self, e: ir.Expr) -> str:
        hit = self.cse.get(e)
        if hit is not None:
            return hit
        p = self.p
        if isinstance(e, Const):
            s = f"tl.full({p.shape1}, {_const(e.value, e.dtype)}, {tl_type(e.dtype)})"
            name = self.emit(s, frozenset(), "c")
        elif isinstance(e, IndexValue):
            txt = p.index(e.expr)
            dims = p.index_dims(e.expr, self)
            if dims:
                name = self.emit(f"({txt}).to({tl_type(e.dtype)})", dims)
            else:
                name = self.emit(f"(tl.full({p.shape1}, 0, {tl_type(e.dtype)}) + {txt})", dims)
        elif isinstance(e, Load):
            name = p.load(self, e)
        elif isinstance(e, Op) and e.name == "masked":
            m = self.expr(e.args[0])
            o = self.expr(e.args[2])
            # NOTE: the value's loads may be out of bounds where the mask is false: they
            # run under the mask, in a scope of their own (no CSE with unmasked loads).
            child = Scope(p, self, masks=self.masks + [(m, p.dims[m], False)], share_lines=True)
            v = child.expr(e.args[1])
            name = self.emit(f"tl.where({m}, {v}, {o})", p.dims[m] | p.dims[v] | p.dims[o])
        elif isinstance(e, Op):
            a = [self.expr(x) for x in e.args]
            dims = frozenset().union(*(p.dims[x] for x in a)) if a else frozenset()
            name = self.emit(p.op(e.name, a, e.args, e.dtype), dims)
        else:
            raise exc.CodegenError(f"unknown expression {e!r}")
        self.cse[e] = name
        return name


class KernelPrinter:
    def __init__(self, kernel, buffers: dict, interpret: bool, hint):
        self.k = kernel
        self.buffers = buffers
        self.interpret = interpret
        self.hint = hint
        self._tmp = 0
        self.dims: dict[str, frozenset] = {}
        self.ptrs: list[str] = []
        self.sizes: set = set()
        self.names: dict = {}
        self.pointwise = not kernel.has_reduction and all(not i for i in kernel.inner)
        self.shape1 = "[1]" if self.pointwise else "[1, 1]"

    # ------------------------------------------------------------------ helpers
    def tmp(self, hint: str = "t") -> str:
        self._tmp += 1
        return f"{hint}{self._tmp - 1}"

    def note(self, e) -> None:
        for s in sympy.sympify(e).free_symbols:
            if not s.name.startswith(("x", "r", "y", "ind")):
                self.sizes.add(s)

    def index(self, e) -> str:
        self.note(e)
        return _index_str(e, self.names)

    def index_dims(self, e, scope: Scope) -> frozenset:
        out = set()
        for s in sympy.sympify(e).free_symbols:
            d = self.dims.get(self.names.get(s, s.name))
            if d:
                out |= d
        return frozenset(out)

    def ptr(self, name: str) -> str:
        if name not in self.ptrs:
            self.ptrs.append(name)
        return f"{name}_ptr"

    def _broadcast(self, ptr_dims: frozenset, need: frozenset) -> str:
        extra = ""
        if "x" in need and "x" not in ptr_dims:
            extra += " + xzero"
        if "r" in need and "r" not in ptr_dims:
            extra += " + rzero"
        return extra

    def load(self, scope: Scope, e: Load) -> str:
        if e.buf in scope.regs:
            return scope.regs[e.buf]
        for sym, val, bound in e.indirect:
            key = ("ind", sym)
            if key in scope.cse:
                continue
            v = scope.expr(val)
            n = sym.name
            b = self.index(bound)
            scope.lines.append(f"{n} = {v}.to(tl.int64)")
            scope.lines.append(f"{n} = tl.where({n} < 0, {n} + {b}, {n})")
            self.dims[n] = self.dims[v]
            scope.cse[key] = n
        dims = self.index_dims(e.index, scope)
        mask, need = scope.mask_for(dims)
        if mask is not None and not need:
            need = frozenset("x")   # NOTE: a mask is a block: the pointer must be one too
        addr = f"{self.ptr(e.buf)} + {self.index(e.index)}{self._broadcast(dims, need)}"
        dt = self.buffers[e.buf].dtype
        s = f"tl.load({addr}" + (f", mask={mask}, other=0)" if mask else ")")
        if dt in (torch.float16, torch.bfloat16):
            s += ".to(tl.float32)"
        return scope.emit(s, need, "v")

    def store(self, scope: Scope, name: str, index, value: str, node_dims: frozenset) -> None:
        dt = self.buffers[name].dtype
        dims = self.index_dims(index, scope)
        mask, need = scope.mask_for(node_dims)
        need = need | node_dims
        addr = f"{self.ptr(name)} + {self.index(index)}{self._broadcast(dims, need)}"
        scope.lines.append(f"tl.store({addr}, {value}.to({tl_type(dt)})"
                           + (f", mask={mask})" if mask else ")"))

    def op(self, name: str, a: list, args: tuple, dt: torch.dtype) -> str:
        return ops.op_str(name, a, args, dt, self.interpret)

    # ------------------------------------------------------------------ kernels
    def _decompose(self, scope: Scope, flat: str, vars_: list, ranges: list, dims: frozenset) -> None:
        n = len(ranges)
        for j, (v, r) in enumerate(zip(vars_, ranges)):
            stride = ir.product(ranges[j + 1:])
            s = flat if stride == 1 else f"({flat} // {self.index(stride)})"
            if j > 0:
                s = f"({s} % {self.index(r)})"
            scope.lines.append(f"{v.name} = {s}")
            self.dims[v.name] = dims
        if n == 0:
            return

    def print_scatter(self) -> tuple[str, KernelInfo]:
        """An indirect-store kernel: ``{name}_base`` copies the base, then
        ``{name}_scatter`` adds the values at their targets atomically (two launches: the
        adds must see the whole copy)."""
        k = self.k
        n = k.nodes[0]
        sc = n.buf.body
        name = n.buf.name
        idx = "tl.int64" if self._needs_int64([ir.product(sc.src_ranges)]) else "tl.int32"
        pid = "tl.program_id(0).to(tl.int64)" if idx == "tl.int64" else "tl.program_id(0)"
        bodies = []
        for part, ranges, prefix in (("base", sc.ranges, "x"), ("scatter", sc.src_ranges, "y")):
            for r in ranges:
                self.note(r)
            top = Scope(self)
            top.lines += [f"xindex = {pid} * XBLOCK + tl.arange(0, XBLOCK)", "xmask = xindex < xnumel",
                          f"xzero = tl.full([XBLOCK], 0, {idx})"]
            self.dims["xindex"] = frozenset("x")
            top.masks = [("xmask", frozenset("x"), True)]
            self._decompose(top, "xindex", ir.make_vars(prefix, len(ranges)), ranges, frozenset("x"))
            if part == "base":
                v = top.expr(sc.base)
                self.store(top, name, n.store, v, frozenset("x"))
            else:
                v = top.expr(sc.value)
                for sym, iv, bound in sc.indirect:
                    e = top.expr(iv)
                    b = self.index(bound)
                    top.lines.append(f"{sym.name} = {e}.to(tl.int64)")
                    top.lines.append(f"{sym.name} = tl.where({sym.name} < 0, {sym.name} + {b}, {sym.name})")
                    self.dims[sym.name] = self.dims[e]
                dt = self.buffers[name].dtype
                addr = f"{self.ptr(name)} + {self.index(sc.target)} + xzero"
                top.lines.append(f"tl.atomic_add({addr}, {v}.to({tl_type(dt)}), mask=xmask)")
            bodies.append((part, top.lines))
        params = [f"{b}_ptr" for b in self.ptrs]
        sizes = sorted(self.sizes, key=lambda s: s.name)
        params += [s.name for s in sizes] + ["xnumel", "XBLOCK: tl.constexpr"]
        src = []
        for part, lines in bodies:
            src.append("\n".join([f"@triton.jit", f"def {k.name}_{part}({', '.join(params)}):",
                                   f"    # ATen nodes: {', '.join(n.buf.origins)}"]
                                  + ["    " + ln for ln in lines]) + "\n")
        args = [("tensor", b) for b in self.ptrs] + [("size", s) for s in sizes]
        info = KernelInfo(k.name, args, "scatter", sympy.expand(ir.product(sc.ranges)),
                          [sympy.expand(ir.product(sc.src_ranges))], False, 0, idx == "tl.int64",
                          list(n.buf.origins))
        return "\n\n".join(src), info

    def print(self) -> tuple[str, KernelInfo]:
        k = self.k
        if getattr(k, "is_scatter", False):
            return self.print_scatter()
        kk = len(k.outer)
        for r in k.outer:
            self.note(r)
        inner_sizes = []
        for n, inner in zip(k.nodes, k.inner):
            rr = n.rranges if n.is_reduction else inner
            for r in rr:
                self.note(r)
            # NOTE: a reduction over size-1 dims only still reduces (over one element)
            inner_sizes.append(ir.product(rr) if (rr or n.is_reduction) else None)
        self.index64 = self._needs_int64(inner_sizes)
        idx = "tl.int64" if self.index64 else "tl.int32"
        top = Scope(self)
        L = top.lines
        pid = "tl.program_id(0).to(tl.int64)" if self.index64 else "tl.program_id(0)"
        xs = ir.make_vars("x", kk)
        rnumels: list = []
        persistent, rblock = False, 0
        if self.pointwise:
            L.append(f"xindex = {pid} * XBLOCK + tl.arange(0, XBLOCK)")
            L.append("xmask = xindex < xnumel")
            L.append(f"xzero = tl.full([XBLOCK], 0, {idx})")
            self.dims["xindex"] = frozenset("x")
            top.masks = [("xmask", frozenset("x"), True)]
            self._decompose(top, "xindex", xs, k.outer, frozenset("x"))
            for n in k.nodes:
                top.lines.append(f"# {n.buf.name}: {', '.join(n.buf.origins)}")
                v = top.expr(n.expr)
                top.regs[n.buf.name] = v
                if n.buf.name not in k.locals:
                    self.store(top, n.buf.name, n.store, v, frozenset("x"))
        else:
            ints = [s for s in inner_sizes if s is not None]
            persistent = all(sympy.sympify(s).is_Integer for s in ints) and \
                max(int(s) for s in ints) <= heuristics.PERSISTENT_MAX
            rblock = next_pow2(max(int(s) for s in ints)) if persistent else 0
            L.append(f"xindex = {pid} * XBLOCK + tl.arange(0, XBLOCK)[:, None]")
            L.append("xmask = xindex < xnumel")
            L.append(f"xzero = tl.full([XBLOCK, 1], 0, {idx})")
            L.append(f"rzero = tl.full([1, RBLOCK], 0, {idx})")
            L.append(f"rbase = tl.arange(0, RBLOCK)[None, :]" + (".to(tl.int64)" if self.index64 else ""))
            self.dims["xindex"] = frozenset("x")
            top.masks = [("xmask", frozenset("x"), True)]
            self._decompose(top, "xindex", xs, k.outer, frozenset("x"))
            group_scope, group_key, grp = None, None, None
            stored_here: set = set()
            for i, (n, inner) in enumerate(zip(k.nodes, k.inner)):
                top.lines.append(f"# {n.buf.name}: {', '.join(n.buf.origins)}")
                if inner_sizes[i] is None:      # outer-only pointwise node
                    self._close(top, grp, stored_here)
                    grp = None
                    v = top.expr(n.expr)
                    top.regs[n.buf.name] = v
                    if n.buf.name not in k.locals:
                        self.store(top, n.buf.name, n.store, v, frozenset("x"))
                        stored_here.add(n.buf.name)
                    continue
                rn = f"rnumel{len(rnumels)}"
                rnumels.append(inner_sizes[i])
                rr = n.rranges if n.is_reduction else inner
                rvars = ir.make_vars("r", len(rr)) if n.is_reduction else \
                    [ir.var("x", kk + j) for j in range(len(inner))]
                if persistent:
                    expr, store = n.expr, n.store
                    if not n.is_reduction:
                        # NOTE: a pointwise node's inner vars become the r vars of the same
                        # ranges, so its loads share registers with the group's reductions.
                        rv = ir.make_vars("r", len(rr))
                        m = dict(zip(rvars, rv))
                        expr, store = ir.substitute(expr, m), sympy.sympify(store).xreplace(m)
                        rvars = rv
                    if group_scope is None or not ir_same(rr, group_key):
                        group_scope = Scope(self, top, share_lines=True)
                        group_key = list(rr)
                        group_scope.lines.append("rindex = rbase")
                        self.dims["rindex"] = frozenset("r")
                        group_scope.masks = top.masks + [(f"(rindex < {rn})", frozenset("r"), True)]
                        self._decompose(group_scope, "rindex", rvars, rr, frozenset("r"))
                    # NOTE: later nodes of the group see the kernel's register values
                    group_scope.regs.update(top.regs)
                    self._inner_node(top, group_scope, n, rr, rvars, rn, looped=False,
                                     expr=expr, store=store)
                    continue
                if not n.is_reduction:
                    rv = ir.make_vars("r", len(rr))
                    m = dict(zip(rvars, rv))
                    expr, store = ir.substitute(n.expr, m), sympy.sympify(n.store).xreplace(m)
                    rvars = rv
                else:
                    expr, store = n.expr, n.store
                # NOTE: nodes over the same inner range share one loop unless a node needs
                # a reduction finished in that loop.
                if grp is None or not ir_same(rr, grp["rr"]) or n.reads & grp["reductions"]:
                    self._close(top, grp, stored_here)
                    loop = Scope(self, top)
                    loop.masks = top.masks + [("rmask", frozenset("r"), True)]
                    loop.lines.append("rindex = roffset + rbase")
                    loop.lines.append(f"rmask = rindex < {rn}")
                    self.dims["rindex"] = self.dims["rmask"] = frozenset("r")
                    self._decompose(loop, "rindex", rvars, rr, frozenset("r"))
                    grp = {"rr": list(rr), "rn": rn, "scope": loop, "pre": [], "post": [],
                           "reductions": set(), "stored": set(), "barrier": False}
                if stored_here & n.reads:
                    # NOTE: this loop reads what an earlier loop of this program stored.
                    grp["barrier"] = True
                self._pre = grp["pre"]
                mark = len(top.lines)
                self._inner_node(top, grp["scope"], n, rr, rvars, rn, looped=True,
                                 expr=expr, store=store)
                grp["post"] += top.lines[mark:]
                del top.lines[mark:]
                (grp["reductions"] if n.is_reduction else grp["stored"]).add(n.buf.name)
            self._close(top, grp, stored_here)
        params = [f"{b}_ptr" for b in self.ptrs]
        sizes = sorted(self.sizes, key=lambda s: s.name)
        params += [s.name for s in sizes]
        params += ["xnumel"] + [f"rnumel{i}" for i in range(len(rnumels))]
        params += ["XBLOCK: tl.constexpr"] + ([] if self.pointwise else ["RBLOCK: tl.constexpr"])
        origins: list = []
        for n in k.nodes:
            origins += [o for o in n.buf.origins if o not in origins]
        head = [f"@triton.jit", f"def {k.name}({', '.join(params)}):",
                f"    # ATen nodes: {', '.join(origins)}"]
        src = "\n".join(head + ["    " + ln for ln in L]) + "\n"
        args = [("tensor", b) for b in self.ptrs] + [("size", s) for s in sizes]
        info = KernelInfo(k.name, args, "pointwise" if self.pointwise else "reduction",
                          sympy.expand(ir.product(k.outer)), rnumels, persistent, rblock,
                          self.index64, origins)
        return src, info

    def _inner_node(self, top: Scope, sc: Scope, n, rr, rvars, rn: str, looped: bool,
                    expr=None, store=None) -> None:
        """A node over an inner range: a pointwise tile, or a reduction to one value per row."""
        name = n.buf.name
        xr = frozenset("xr")
        if not n.is_reduction:
            v = sc.expr(n.expr if expr is None else expr)
            if name not in self.k.locals:   # NOTE: a row held in registers needs no store
                self.store(sc, name, n.store if store is None else store, v, xr)
            sc.regs[name] = v
            if not looped:
                top.regs[name] = v
            return
        body = n.buf.body
        rtype = body.reduction_type
        acc_t = body.acc_dtype
        v = sc.expr(n.expr)
        mask, _ = sc.mask_for(xr)
        vdt = n.expr.dtype
        if rtype in ("argmax", "argmin"):
            vt = torch.int8 if vdt == torch.bool else vdt
            lo = rtype == "argmax"
            if vt.is_floating_point:
                init = 'float("-inf")' if lo else 'float("inf")'
            else:
                info = torch.iinfo(vt)
                init = str(info.min if lo else info.max)
            vv = f"tl.where({mask}, {v}.to({tl_type(vt)}), {init})"
            ii = f"tl.where({mask}, rindex.to(tl.int64), {2 ** 62})"
            res = self.tmp("red")
            if looped:
                av, ai = self.tmp("acc"), self.tmp("acc")
                self._pre.append(f"{av} = tl.full([XBLOCK, RBLOCK], {init}, {tl_type(vt)})")
                self._pre.append(f"{ai} = tl.full([XBLOCK, RBLOCK], {2 ** 62}, tl.int64)")
                sc.lines.append(f"{av}, {ai} = kiln_{rtype}({av}, {ai}, {vv}, {ii})")
            else:
                av, ai = self.tmp("t"), self.tmp("t")
                sc.lines.append(f"{av} = {vv} + tl.full([XBLOCK, RBLOCK], 0, {tl_type(vt)})")
                sc.lines.append(f"{ai} = {ii} + tl.full([XBLOCK, RBLOCK], 0, tl.int64)")
            top.lines.append(f"_, {res} = tl.reduce(({av}, {ai}), 1, kiln_{rtype})")
            top.lines.append(f"{res} = {res}[:, None]")
        else:
            at = torch.int8 if acc_t == torch.bool else acc_t
            t = tl_type(at)
            if rtype == "sum":
                init, comb, upd = "0", "kiln_sum", "{a} + {v}"
            elif rtype == "prod":
                init, comb, upd = "1", "kiln_mul", "{a} * {v}"
            elif rtype == "any":
                at, t = torch.int8, "tl.int8"
                init, comb, upd = "0", "kiln_or", "{a} | {v}"
            elif rtype in ("max", "min"):
                lo = rtype == "max"
                if at.is_floating_point:
                    init = 'float("-inf")' if lo else 'float("inf")'
                else:
                    info = torch.iinfo(at)
                    init = str(info.min if lo else info.max)
                comb = f"kiln_{rtype}"
                upd = f"kiln_{rtype}({{a}}, {{v}})"
            else:
                raise exc.CodegenError(f"no Triton reduction {rtype}")
            vv = f"tl.where({mask}, {v}.to({t}), {init})"
            res = self.tmp("red")
            if looped:
                acc = self.tmp("acc")
                self._pre.append(f"{acc} = tl.full([XBLOCK, RBLOCK], {init}, {t})")
                sc.lines.append(f"{acc} = " + upd.format(a=acc, v=vv))
            else:
                acc = self.tmp("t")
                sc.lines.append(f"{acc} = {vv} + tl.full([XBLOCK, RBLOCK], 0, {t})")
            top.lines.append(f"{res} = tl.reduce({acc}, 1, {comb})[:, None]")
            if acc_t == torch.bool:
                top.lines.append(f"{res} = {res} != 0")
        self.dims[res] = frozenset("x")
        top.regs[name] = res
        if not looped:
            sc.regs[name] = res
        if name not in self.k.locals:
            self.store(top, name, n.store, res, frozenset("x"))

    def _close(self, top: Scope, grp: Optional[dict], stored_here: set) -> None:
        """Emit a loop group: accumulators, the loop over the inner range, results."""
        if grp is None or grp.get("closed"):
            return
        grp["closed"] = True
        if grp["barrier"]:
            top.lines.append("tl.debug_barrier()")
        top.lines += grp["pre"] + self._loop(grp["rn"], grp["scope"].lines) + grp["post"]
        stored_here |= grp["stored"]

    def _loop(self, rn: str, lines: list) -> list:
        if self.interpret:
            # NOTE: Triton's interpreter before 3.7 turns a scalar argument into a 1-element
            # array and range() calls int() on it, which NumPy 2.4 refuses; a while loop only
            # compares.  Compiled kernels keep the for loop (Triton pipelines it).
            return (["roffset = 0", f"while roffset < {rn}:"] + ["    " + ln for ln in lines]
                    + ["    roffset += RBLOCK"])
        return [f"for roffset in range(0, {rn}, RBLOCK):"] + ["    " + ln for ln in lines]

    def _needs_int64(self, inner_sizes) -> bool:
        exprs = [ir.product(self.k.outer)] + [s for s in inner_sizes if s is not None]
        for n in self.k.nodes:
            b = n.buf
            exprs.append(sum(((s - 1) * st for s, st in zip(b.sizes, b.strides)), sympy.Integer(1)))
            for ld in ir.loads(n.expr):
                lb = self.buffers[ld.buf]
                exprs.append(sum(((s - 1) * st for s, st in zip(lb.sizes, lb.strides)), sympy.Integer(1)))
        total = ir.product(self.k.outer) * (max((int(s) for s in inner_sizes if s is not None and
                                                 sympy.sympify(s).is_Integer), default=1))
        exprs.append(total)
        for e in exprs:
            e = sympy.sympify(e)
            if not e.is_Integer:
                # NOTE: a symbolic size may grow past 2**31 at a later call (no recompile).
                return True
            if abs(int(e)) >= 2 ** 31 - 1:
                return True
        return False


def ir_same(a, b) -> bool:
    return len(a) == len(b) and all(sympy.expand(x - y) == 0 for x, y in zip(a, b))


def print_kernels(kernels: list, buffers: dict, *, interpret: bool = False,
                  hint=None) -> tuple[str, dict]:
    """One module for ``kernels``; returns (source, {kernel name: KernelInfo})."""
    parts = [compat.prelude(interpret)]
    infos = {}
    for k in kernels:
        p = KernelPrinter(k, buffers, interpret, hint)
        src, info = p.print()
        parts.append(src)
        infos[k.name] = info
    return "\n\n".join(parts), infos


__all__ = ["print_kernels", "KernelInfo", "tl_type"]
