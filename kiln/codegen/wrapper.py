"""kiln.codegen.wrapper: a scheduled plan -> generated Python that runs it.

In:  the lowered graph and its :class:`kiln.codegen.schedule.Plan`.
Out: a boxed callable ``call(args) -> tuple`` (``_boxed_call = True``) whose source is
readable Python (kept as ``call.source``; ``KILN_LOGS=output_code`` prints it and the
kernel source).  The generated code reads symbolic sizes from its inputs, allocates
buffers with ``empty_strided`` (reusing dead buffers of the same layout), calls kernels
through ctypes with ``data_ptr()`` arguments, calls externs as ATen ops, and returns
outputs (views as ``as_strided`` of their base).
"""
from __future__ import annotations

import ctypes
import sys
from typing import Any, Callable

import sympy
import torch

from kiln import exc
from kiln.codegen import ir, metrics
from kiln.codegen.ir import BufRef, Extern, InputBuffer
from kiln.codegen.schedule import Kernel, Plan, _collect_refs
from kiln.passes import should_log


def pyexpr(e: Any) -> str:
    """A sympy integer expression as Python source over the wrapper's symbol names."""
    e = sympy.sympify(e)
    if e.is_Integer:
        return str(int(e))
    if e.is_Symbol:
        return e.name
    if isinstance(e, ir.FloorDiv) or (type(e).__name__ == "FloorDiv" and type(e).__module__.startswith("torch.")):
        # NOTE: also the ShapeEnv's FloorDiv (sizes computed from an int input)
        return f"({pyexpr(e.args[0])} // {pyexpr(e.args[1])})"
    if isinstance(e, ir.ModIndex):
        return f"({pyexpr(e.args[0])} % {pyexpr(e.args[1])})"
    if e.is_Add:
        return "(" + " + ".join(pyexpr(a) for a in e.args) + ")"
    if e.is_Mul:
        return "(" + " * ".join(pyexpr(a) for a in e.args) + ")"
    if e.is_Pow and e.args[1].is_Integer:
        return f"({pyexpr(e.args[0])} ** {int(e.args[1])})"
    if isinstance(e, sympy.Max):
        return "max(" + ", ".join(pyexpr(a) for a in e.args) + ")"
    if isinstance(e, sympy.Min):
        return "min(" + ", ".join(pyexpr(a) for a in e.args) + ")"
    if isinstance(e, sympy.floor):
        num, den = sympy.fraction(e.args[0])
        return f"({pyexpr(num)} // {pyexpr(den)})"
    raise exc.CodegenError(f"cannot print size expression {e}")


def _tuple(xs) -> str:
    items = [pyexpr(x) for x in xs]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def _may_alias(op) -> bool:
    if not isinstance(op, torch._ops.OpOverload):
        return True
    return any(r.alias_info is not None for r in op._schema.returns)


def _restride(t: torch.Tensor, strides: tuple) -> torch.Tensor:
    """``t``'s values in the layout ``strides`` (stride-0 dims: broadcast of index 0)."""
    if 0 in strides:
        idx = tuple(slice(0, 1) if st == 0 else slice(None) for st in strides)
        small = t[idx]
        base = torch.empty_strided(small.shape, tuple(st if st else 1 for st in strides),
                                   dtype=t.dtype, device=t.device)
        base.copy_(small)
        return torch.as_strided(base, t.shape, strides)
    out = torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out


class WrapperWriter:
    def __init__(self, lowered, plan: Plan):
        self.lw = lowered
        self.plan = plan
        self.lines: list[str] = []
        self.ns = self.base_namespace()
        self.consts: list = self.ns["_c"]

    @staticmethod
    def base_namespace() -> dict[str, Any]:
        """The names every wrapper reads besides its kernels, externs and constants."""
        return {"torch": torch, "empty_strided": torch.empty_strided, "as_strided": torch.as_strided,
                "_restride": _restride, "_nt": torch.get_num_threads, "_c": []}

    def const(self, v: Any) -> str:
        if v is None or isinstance(v, (bool, int, str)):
            return repr(v)
        if isinstance(v, float):
            return repr(v) if v == v and abs(v) != float("inf") else f"float('{v}')"
        self.consts.append(v)
        return f"_c[{len(self.consts) - 1}]"

    def tensor(self, ref: BufRef) -> str:
        buf = self.lw.buffers[ref.buf]
        whole = (list(ref.sizes) == list(buf.sizes) and list(ref.strides) == list(buf.strides)
                 and sympy.sympify(ref.offset) == 0)
        if whole:
            return ref.buf
        off = pyexpr(ref.offset)
        if not buf.is_kernel():
            off = f"{ref.buf}.storage_offset() + {off}"
        return f"as_strided({ref.buf}, {_tuple(ref.sizes)}, {_tuple(ref.strides)}, {off})"

    def arg(self, a: Any) -> str:
        if isinstance(a, BufRef):
            return self.tensor(a)
        if isinstance(a, sympy.Basic):
            return pyexpr(a)
        if isinstance(a, (list, tuple)):
            inner = [self.arg(x) for x in a]
            if isinstance(a, tuple):
                return "(" + ", ".join(inner) + ("," if len(inner) == 1 else "") + ")"
            return "[" + ", ".join(inner) + "]"
        return self.const(a)

    def write(self, kernel_fns: dict, kernel_args: dict, kernel_targets: dict | None = None) -> str:
        lw, plan = self.lw, self.plan
        L = self.lines
        L.append("def call(args):")
        names = [n for n, _ in lw.inputs]
        if names:
            L.append(f"    {', '.join(names)}{',' if len(names) == 1 else ''} = args")
        L.append("    args.clear()")
        defined = self._symbols()
        # NOTE: kernels and as_strided views assume the layout the fake values had; a
        # tensor that arrives (or an extern that returns one) with other strides is
        # copied into that layout first.
        kernel_reads = set()
        for s in plan.steps:
            if isinstance(s, Kernel):
                kernel_reads |= set(s.reads)
        refs: list = []
        for s in plan.steps:
            if not isinstance(s, Kernel):
                _collect_refs(s.body.args, refs)
                _collect_refs(tuple(s.body.kwargs.values()), refs)
        _collect_refs(tuple(lw.outputs), refs)
        for r in refs:
            b = lw.buffers[r.buf]
            if not (list(r.sizes) == list(b.sizes) and list(r.strides) == list(b.strides)
                    and sympy.sympify(r.offset) == 0):
                kernel_reads.add(r.buf)
        for name, b in lw.inputs:
            if isinstance(b, ir.Buffer) and name in kernel_reads:
                L.append(f"    if {name}.stride() != {_tuple(b.strides)}: "
                         f"{name} = _restride({name}, {_tuple(b.strides)})")
        last_use = self._last_uses()
        pool: dict = {}
        allocated: set = set()
        outputs = {o.buf for o in lw.outputs if isinstance(o, BufRef)}
        # NOTE: an extern whose result may alias its inputs (views, opaque callables)
        # keeps those buffers alive: they are never handed out for reuse.
        for s in plan.steps:
            if not isinstance(s, Kernel) and _may_alias(s.body.op):
                refs2: list = []
                _collect_refs(s.body.args, refs2)
                _collect_refs(tuple(s.body.kwargs.values()), refs2)
                outputs |= {r.buf for r in refs2}
        for i, s in enumerate(plan.steps):
            if isinstance(s, Kernel):
                for n in s.nodes:
                    name = n.buf.name
                    if name in s.stores and name not in allocated:
                        allocated.add(name)
                        b = n.buf
                        key = (_tuple(b.sizes), _tuple(b.strides), b.dtype)
                        if pool.get(key):
                            L.append(f"    {name} = {pool[key].pop()}  # reuse")
                        else:
                            dev = "" if b.device.type == "cpu" else f", device={self.const(b.device)}"
                            L.append(f"    {name} = empty_strided({_tuple(b.sizes)}, {_tuple(b.strides)}, "
                                     f"dtype={self.const(b.dtype)}{dev})")
                call = []
                if (kernel_targets or {}).get(s.name) == "triton":
                    # NOTE: Triton launchers take the tensors themselves and int sizes.
                    call = [v if kind == "tensor" else pyexpr(v) for kind, v in kernel_args[s.name]]
                else:
                    for kind, v in kernel_args[s.name]:
                        call.append(f"{v}.data_ptr()" if kind == "ptr" else pyexpr(v))
                    call.append("_nt()")
                L.append(f"    {s.name}({', '.join(call)})")
            else:
                ext: Extern = s.body
                self.ns[f"op_{s.name}"] = ext.op
                args = [self.arg(a) for a in ext.args]
                args += [f"{k}={self.arg(v)}" for k, v in ext.kwargs.items()]
                L.append(f"    {s.name} = op_{s.name}({', '.join(args)})  # {ext.op}")
                for b in lw.buffers.values():
                    if isinstance(b.body, InputBuffer) and b.body.producer == s.name and b.name in plan.live:
                        L.append(f"    {b.name} = {b.body.source}")
                        if b.name in kernel_reads:
                            L.append(f"    if {b.name}.stride() != {_tuple(b.strides)}: "
                                     f"{b.name} = _restride({b.name}, {_tuple(b.strides)})")
            for name, last in last_use.items():
                if last == i and name in allocated and name not in outputs:
                    b = lw.buffers[name]
                    pool.setdefault((_tuple(b.sizes), _tuple(b.strides), b.dtype), []).append(name)
        outs = []
        for o in lw.outputs:
            outs.append(self.arg(o) if isinstance(o, (BufRef, sympy.Basic)) else self.const(o))
        L.append(f"    return ({', '.join(outs)}{',' if len(outs) == 1 else ''})")
        self.ns.update(lw.constants)
        for k, fn in kernel_fns.items():
            self.ns[k] = fn
        return "\n".join(L) + "\n"

    def _symbols(self) -> set:
        L = self.lines
        defined: dict = {}
        for name, b in self.lw.inputs:
            if isinstance(b, sympy.Symbol):
                defined.setdefault(b, name)
        for name, b in self.lw.inputs:
            if isinstance(b, ir.Buffer):
                for d, s in enumerate(b.sizes):
                    if s.is_Symbol and s not in defined:
                        defined[s] = f"{name}.size({d})"
                for d, s in enumerate(b.strides):
                    if s.is_Symbol and s not in defined:
                        defined[s] = f"{name}.stride({d})"
        for s, src in defined.items():
            if src != s.name:
                L.append(f"    {s.name} = {src}")
        self.defined = set(defined)
        return self.defined

    def _last_uses(self) -> dict:
        last: dict = {}
        for i, s in enumerate(self.plan.steps):
            if isinstance(s, Kernel):
                for r in s.reads:
                    last[r] = i
                for n in s.nodes:
                    last.setdefault(n.buf.name, i)
            else:
                refs: list = []
                _collect_refs(s.body.args, refs)
                _collect_refs(tuple(s.body.kwargs.values()), refs)
                for r in refs:
                    last[r.buf] = i
        return last


def kernel_target(k: Kernel) -> str:
    """The printer for kernel ``k``: "triton" for CUDA tensors; for CPU tensors
    ``config.cpu_backend`` ("cpp" or "triton")."""
    return device_target(k.nodes[0].buf.device)


def device_target(dev: torch.device) -> str:
    """The printer for kernels over ``dev`` tensors (see :func:`kernel_target`)."""
    from kiln.codegen import config

    if dev.type == "cuda":
        return "triton"
    if dev.type == "cpu":
        if config.cpu_backend not in ("cpp", "triton"):
            raise exc.CodegenError(f"config.cpu_backend={config.cpu_backend!r}: expected 'cpp' or 'triton'")
        return config.cpu_backend
    raise exc.CodegenError(f"no codegen target for {dev.type} tensors")


def build(lowered, plan: Plan) -> Callable:
    """Print, compile and load the plan's kernels and exec its wrapper."""
    from kiln.codegen.cpp import load_library, print_kernels

    all_kernels = [s for s in plan.steps if isinstance(s, Kernel)]
    targets = {k.name: kernel_target(k) for k in all_kernels}
    kernels = [k for k in all_kernels if targets[k.name] == "cpp"]
    fns: dict = {}
    kargs: dict = {}
    source = ""
    triton_source = _build_triton([k for k in all_kernels if targets[k.name] == "triton"],
                                  lowered, fns, kargs)
    if kernels:
        source, cargs = print_kernels(kernels, lowered.buffers)
        kargs.update(cargs)
        lib = load_library(source, name="kiln_graph")
        for k in kernels:
            fn = getattr(lib, k.name)
            fn.argtypes = [ctypes.c_void_p if kind == "ptr" else ctypes.c_int64
                           for kind, _ in kargs[k.name]] + [ctypes.c_int]
            fn.restype = None
            fns[k.name] = fn
    source = "\n".join(x for x in (source, triton_source) if x)
    kernels = all_kernels
    w = WrapperWriter(lowered, plan)
    py = w.write(fns, kargs, targets)
    missing = _undefined_symbols(kargs, w.defined, plan, lowered)
    if missing:
        raise exc.CodegenError(f"sizes {sorted(map(str, missing))} cannot be read from the inputs")
    call = finish(py, w.ns, source, len(kernels), uses_triton=bool(triton_source))
    if not triton_source:
        from kiln.codegen import graph_cache

        call.cache_record = graph_cache.record_of(
            py=py, cpp_source=source, cpp_kinds={k: [kind for kind, _ in kargs[k]] for k in fns},
            consts=w.consts, ops={k: v for k, v in w.ns.items() if k.startswith("op_")},
            constant_targets=dict(lowered.constant_targets), kernel_count=len(kernels))
    return call


def finish(py: str, ns: dict, source: str, kernel_count: int, *, uses_triton: bool) -> Callable:
    """Exec the wrapper source ``py`` in ``ns``; the boxed ``call`` with its sources attached
    (a fresh build, or one rebuilt from :mod:`kiln.codegen.graph_cache`)."""
    if should_log("output_code"):
        print("===== [kiln output_code] wrapper =====", file=sys.stderr)
        print(py, file=sys.stderr)
        if source:
            print("===== [kiln output_code] kernels =====", file=sys.stderr)
            print(source, file=sys.stderr)
    code = compile(py, "<kiln wrapper>", "exec")
    exec(code, ns)
    call = ns["call"]
    call._boxed_call = True
    call._returns_sequence = True
    call.source = py
    call.kernel_source = source
    call.kernel_count = kernel_count
    call.uses_triton = uses_triton
    metrics.generated_kernel_count += kernel_count
    return call


def _build_triton(kernels: list, lowered, fns: dict, kargs: dict) -> str:
    """Print and load the Triton kernels (CPU ones under the interpreter); their source."""
    if not kernels:
        return ""
    from kiln.codegen import triton as ktriton

    sources = []
    for interpret in (True, False):
        group = [k for k in kernels if (k.nodes[0].buf.device.type == "cpu") == interpret]
        if not group:
            continue
        why = ktriton.unavailable_reason("cpu" if interpret else group[0].nodes[0].buf.device.type)
        if why is not None:
            raise exc.CodegenError(f"Triton kernels cannot run here: {why}")
        src, infos = ktriton.print_kernels(group, lowered.buffers, interpret=interpret)
        launchers = ktriton.load_kernels(src, infos, interpret)
        if not interpret:
            from kiln.codegen.triton import pool

            # NOTE: the kernels compile in worker processes while the wrapper is written;
            # each launcher waits for its own jobs at its first call
            pool.precompile(launchers.values(), pool.launch_hints(lowered))
        for k in group:
            fns[k.name] = launchers[k.name]
            kargs[k.name] = infos[k.name].args
        sources.append(src)
    return "\n".join(sources)


def _undefined_symbols(kargs, defined, plan, lowered) -> set:
    used: set = set()
    for args in kargs.values():
        used |= {v for kind, v in args if kind == "size"}
    for s in plan.steps:
        if isinstance(s, Kernel):
            for n in s.nodes:
                for e in list(n.buf.sizes) + list(n.buf.strides):
                    used |= sympy.sympify(e).free_symbols
    return {s for s in used if s not in defined}
