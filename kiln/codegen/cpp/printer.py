"""kiln.codegen.cpp.printer: scheduled kernels -> C++/OpenMP source.

In:  :class:`kiln.codegen.schedule.Kernel` groups and the graph's buffers.
Out: one translation unit (``extern "C"`` functions taking pointers, int64 sizes and a
thread count) and, per kernel, its argument list.

The outer loops run under ``#pragma omp parallel for`` when the work is large enough
(:data:`PARALLEL_MIN_WORK` elements; otherwise serially: thread start-up costs more);
innermost loops are ``#pragma omp simd`` (with ``reduction(+:acc)`` clauses for sums).
float16/bfloat16 are stored as 16-bit integers and computed in float (bit-level
conversion helpers below).  Expressions are printed once per loop body (CSE).  float32
exp/log/tanh/erf/sigmoid/... call the inline, vectorizable functions of
:mod:`kiln.codegen.cpp.mathlib` (a libm call would keep the loop scalar).
"""
from __future__ import annotations

import dataclasses

import math
from typing import Callable, Optional

import sympy
import torch

from kiln.codegen import ir
from kiln.codegen.cpp.mathlib import FLOAT32_FUNCS, MATH_PRELUDE
from kiln.codegen.ir import Const, FloorDiv, IndexValue, Load, ModIndex, Op

# NOTE: below this many elements of work a kernel runs on one thread: waking OpenMP
# threads costs a few microseconds, more than the loop itself.
PARALLEL_MIN_WORK = 32768

CTYPES = {
    torch.float32: "float", torch.float64: "double", torch.float16: "uint16_t",
    torch.bfloat16: "uint16_t", torch.int64: "int64_t", torch.int32: "int32_t",
    torch.int16: "int16_t", torch.int8: "int8_t", torch.uint8: "uint8_t", torch.bool: "bool",
}

PRELUDE = r"""
#include <cstdint>
#include <cmath>
#include <algorithm>
#include <limits>
#include <omp.h>
#include <cstring>

static inline float kiln_h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) { bits = sign; }
        else { int e = -1; do { e++; man <<= 1; } while ((man & 0x400) == 0);
               bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13); }
    } else if (exp == 0x1f) { bits = sign | 0x7f800000u | (man << 13); }
    else { bits = sign | ((exp + 112) << 23) | (man << 13); }
    float f; std::memcpy(&f, &bits, 4); return f;
}
static inline uint16_t kiln_f2h(float f) {
    uint32_t x; std::memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000; int32_t exp = ((x >> 23) & 0xff); uint32_t man = x & 0x7fffff;
    if (exp == 0xff) return (uint16_t)(sign | 0x7c00 | (man ? 0x200 : 0));
    int32_t e = exp - 127 + 15;
    if (e >= 0x1f) return (uint16_t)(sign | 0x7c00);
    if (e <= 0) {
        if (e < -10) return (uint16_t)sign;
        man |= 0x800000; uint32_t shift = (uint32_t)(14 - e);
        uint32_t half = man >> shift, rem = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = sign | ((uint32_t)e << 10) | (man >> 13), rem = man & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (half & 1))) half++;
    return (uint16_t)half;
}
static inline float kiln_bf2f(uint16_t h) { uint32_t b = (uint32_t)h << 16; float f; std::memcpy(&f, &b, 4); return f; }
static inline uint16_t kiln_f2bf(float f) {
    uint32_t x; std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffff) > 0x7f800000) return (uint16_t)((x >> 16) | 0x40);
    x += 0x7fff + ((x >> 16) & 1); return (uint16_t)(x >> 16);
}
template <typename T> static inline T kiln_max(T a, T b) { return (a != a) ? a : ((b != b) ? b : (a > b ? a : b)); }
template <typename T> static inline T kiln_min(T a, T b) { return (a != a) ? a : ((b != b) ? b : (a < b ? a : b)); }
template <typename T> static inline T kiln_floordiv_int(T a, T b) {
    if (b == 0) return 0;
    T q = a / b; if ((a % b != 0) && ((a < 0) != (b < 0))) q -= 1; return q;
}
template <typename T> static inline T kiln_mod_int(T a, T b) {
    if (b == 0) return 0;
    T r = a % b; if (r != 0 && ((r < 0) != (b < 0))) r += b; return r;
}
template <typename T> static inline T kiln_truncdiv_int(T a, T b) { return b == 0 ? 0 : a / b; }
template <typename T> static inline T kiln_mod_float(T a, T b) {
    T r = std::fmod(a, b); if (r != 0 && ((r < 0) != (b < 0))) r += b; return r;
}
template <typename T> static inline T kiln_floordiv_float(T a, T b) {
    if (b == 0) return a / b;
    T m = std::fmod(a, b); T d = (a - m) / b;
    if (m != 0 && ((b < 0) != (m < 0))) d -= 1;
    if (d == 0) return std::copysign(T(0), a / b);
    T f = std::floor(d); if (d - f > T(0.5)) f += 1; return f;
}
template <typename T> static inline T kiln_pow_int(T a, T b) {
    if (b < 0) return (a == 1) ? 1 : ((a == -1) ? ((b & 1) ? -1 : 1) : 0);
    T r = 1; while (b) { if (b & 1) r *= a; a *= a; b >>= 1; } return r;
}
static inline int64_t kiln_wrap(int64_t i, int64_t n) { return i < 0 ? i + n : i; }
""" + MATH_PRELUDE


def cpp_type(dt: torch.dtype) -> str:
    return CTYPES[dt]


def index_str(e) -> str:
    """An integer sympy expression as C++ (int64 arithmetic)."""
    e = sympy.sympify(e)
    if e.is_Integer:
        v = int(e)
        return f"INT64_C({v})" if abs(v) > 2 ** 31 - 1 else str(v)
    if e.is_Symbol:
        return e.name
    if isinstance(e, FloorDiv):
        return f"({index_str(e.args[0])} / {index_str(e.args[1])})"
    if isinstance(e, ModIndex):
        return f"({index_str(e.args[0])} % {index_str(e.args[1])})"
    if e.is_Add:
        terms = sorted(e.args, key=lambda t: (t.is_Integer, str(t)))
        return "(" + " + ".join(index_str(t) for t in terms) + ")"
    if e.is_Mul:
        num = [a for a in e.args if not (a.is_Rational and not a.is_Integer)]
        if len(num) != len(e.args):
            raise ValueError(f"non-integer index {e}")
        return "(" + " * ".join(index_str(a) for a in num) + ")"
    if e.is_Pow and e.args[1].is_Integer and int(e.args[1]) > 0:
        return "(" + " * ".join([index_str(e.args[0])] * int(e.args[1])) + ")"
    if isinstance(e, sympy.Max):
        return _fold("std::max<int64_t>", e.args)
    if isinstance(e, sympy.Min):
        return _fold("std::min<int64_t>", e.args)
    if isinstance(e, sympy.floor) and e.args[0].is_Mul:
        num, den = sympy.fraction(e.args[0])
        return f"({index_str(num)} / {index_str(den)})"
    if type(e).__name__ == "FloorDiv" and type(e).__module__.startswith("torch."):
        # NOTE: the ShapeEnv's FloorDiv (``x.view(n, -1)`` with an int input n) is Python's
        # floor division: C++ ``/`` truncates, so negative quotients are corrected.
        a, b = (index_str(x) for x in e.args)
        return f"(({a}) / ({b}) - ((({a}) % ({b}) != 0) && ((({a}) < 0) != (({b}) < 0))))"
    raise ValueError(f"cannot print index {e}")


def _fold(fn, args):
    s = index_str(args[0])
    for a in args[1:]:
        s = f"{fn}({s}, {index_str(a)})"
    return s


def const_str(value, dt: torch.dtype) -> str:
    t = cpp_type(dt)
    if dt == torch.bool:
        return "true" if value else "false"
    if dt.is_floating_point:
        v = float(value)
        if math.isnan(v):
            return f"std::numeric_limits<{t}>::quiet_NaN()"
        if math.isinf(v):
            return f"{'-' if v < 0 else ''}std::numeric_limits<{t}>::infinity()"
        s = repr(v)
        return f"{s}f" if dt == torch.float32 else s
    v = int(value)
    if dt == torch.int64:
        if v == -2 ** 63:
            return "std::numeric_limits<int64_t>::min()"
        return f"INT64_C({v})"
    return f"static_cast<{t}>({v})"


def _is_float(dt):
    return dt.is_floating_point


@dataclasses.dataclass(frozen=True)
class _Operands:
    """What an op's C++ template sees: printed operands ``a``, the result's C++ type ``t``
    and dtype ``dt``, the first operand's dtype ``ad`` and whether it is floating (``f``)."""

    a: list
    t: str
    dt: torch.dtype
    ad: torch.dtype
    f: bool


_BINARY = {"add": "+", "sub": "-", "mul": "*", "eq": "==", "ne": "!=", "lt": "<", "le": "<=",
           "gt": ">", "ge": ">=", "logical_and": "&&", "logical_or": "||", "bitwise_and": "&",
           "bitwise_or": "|", "bitwise_xor": "^", "lshift": "<<", "rshift": ">>"}
# NOTE: C++ promotes narrow integers to int: these results are cast back to their dtype.
_NARROW = (torch.int8, torch.int16, torch.uint8, torch.int32)


def _binary(o: _Operands, name: str) -> str:
    a = o.a
    if o.dt == torch.bool and name in ("add", "mul"):
        return f"({a[0]} {'||' if name == 'add' else '&&'} {a[1]})"
    if o.dt in _NARROW and name in ("add", "sub", "mul", "lshift"):
        return f"static_cast<{o.t}>({a[0]} {_BINARY[name]} {a[1]})"
    return f"({a[0]} {_BINARY[name]} {a[1]})"


def _extremum(name: str) -> Callable[[_Operands], str]:
    def f(o: _Operands) -> str:
        fn = ("kiln_max" if name == "maximum" else "kiln_min") if o.f else \
            ("std::max" if name == "maximum" else "std::min")
        return f"{fn}<{o.t}>({o.a[0]}, {o.a[1]})"
    return f


def _abs(o: _Operands) -> str:
    x = o.a[0]
    if o.f or o.dt in (torch.int64, torch.int32):
        return f"std::abs({x})"
    return x if o.dt in (torch.bool, torch.uint8) else f"static_cast<{o.t}>(std::abs({x}))"


def _sign(o: _Operands) -> str:
    x, dt = o.a[0], o.dt
    if dt == torch.bool:
        return x
    z = const_str(0, dt)
    if not o.f:
        return f"static_cast<{o.t}>(({z} < {x}) - ({x} < {z}))"
    # NOTE: selects only (NaN stays NaN, +-0 gives +0): converting (0 < x) - (x < 0) to
    # float counts for GCC as a possible trap inside a select, and stops the loop from
    # vectorizing.
    return f"(({x} > {z}) ? {const_str(1, dt)} : (({x} < {z}) ? {const_str(-1, dt)} : (({x} != {x}) ? {x} : {z})))"


def _rounding(name: str) -> Callable[[_Operands], str]:
    def f(o: _Operands) -> str:
        x = o.a[0]
        if not o.f:   # NOTE: integers are already whole
            return x if name != "frac" else const_str(0, o.dt)
        if name == "round":
            return f"std::nearbyint({x})"
        if name == "frac":
            return f"({x} - std::trunc({x}))"
        return f"std::{name}({x})"
    return f


def _float_or_int(float_tpl: str, int_tpl: str) -> Callable[[_Operands], str]:
    """A template per operand kind; ``{0}``/``{1}`` are the operands, ``{t}`` the C++ type."""
    return lambda o: (float_tpl if o.f else int_tpl).format(*o.a, t=o.t)


def _classify(name: str) -> Callable[[_Operands], str]:
    ints = {"isnan": "false", "isinf": "false", "isfinite": "true", "signbit": "({0} < 0)"}
    return lambda o: f"std::{name}({o.a[0]})" if o.f else ints[name].format(*o.a)


# NOTE: one template per op name (the Triton printer has its own table over the same names).
CPP_OPS: dict[str, Callable[[_Operands], str]] = {
    **{name: (lambda o, name=name: _binary(o, name)) for name in _BINARY},
    "logical_xor": lambda o: f"({o.a[0]} != {o.a[1]})",
    "neg": lambda o: f"static_cast<{o.t}>(-{o.a[0]})",
    "truediv": lambda o: f"({o.a[0]} / {o.a[1]})",
    "cast": lambda o: f"({o.a[0]} != 0)" if o.dt == torch.bool else f"static_cast<{o.t}>({o.a[0]})",
    "where": lambda o: f"({o.a[0]} ? {o.a[1]} : {o.a[2]})",
    "maximum": _extremum("maximum"),
    "minimum": _extremum("minimum"),
    "relu": lambda o: (f"kiln_max<{o.t}>({o.a[0]}, {const_str(0, o.dt)})" if o.f
                       else f"std::max<{o.t}>({o.a[0]}, 0)"),
    "sigmoid": lambda o: f"({const_str(1, o.dt)} / ({const_str(1, o.dt)} + std::exp(-{o.a[0]})))",
    "rsqrt": lambda o: f"({const_str(1, o.dt)} / std::sqrt({o.a[0]}))",
    "reciprocal": lambda o: f"({const_str(1, o.dt)} / {o.a[0]})",
    "abs": _abs,
    "sign": _sign,
    **{name: _rounding(name) for name in ("floor", "ceil", "trunc", "round", "frac")},
    "bitwise_not": lambda o: f"static_cast<{o.t}>(~{o.a[0]})",
    "logical_not": lambda o: f"(!{o.a[0]})",
    "floordiv": _float_or_int("kiln_floordiv_float<{t}>({0}, {1})", "kiln_floordiv_int<{t}>({0}, {1})"),
    "truncdiv": _float_or_int("std::trunc({0} / {1})", "kiln_truncdiv_int<{t}>({0}, {1})"),
    "mod": _float_or_int("kiln_mod_float<{t}>({0}, {1})", "kiln_mod_int<{t}>({0}, {1})"),
    "fmod": _float_or_int("std::fmod({0}, {1})", "({1} == 0 ? 0 : {0} % {1})"),
    "pow": _float_or_int("std::pow({0}, {1})", "kiln_pow_int<{t}>({0}, {1})"),
    **{name: _classify(name) for name in ("isnan", "isinf", "isfinite", "signbit")},
}


def op_str(name: str, a: list, args: tuple, dt: torch.dtype) -> str:
    """C++ for Op ``name`` with printed operands ``a`` (exprs ``args``), result dtype dt."""
    ad = args[0].dtype if args else dt
    if name in FLOAT32_FUNCS and dt == torch.float32 and ad == torch.float32:
        # NOTE: inline, vectorizable versions (kiln.codegen.cpp.mathlib): a libm call
        # keeps the whole loop scalar.
        return f"{FLOAT32_FUNCS[name]}({a[0]})"
    rule = CPP_OPS.get(name)
    if rule is not None:
        return rule(_Operands(a, cpp_type(dt), dt, ad, _is_float(ad)))
    if name in _STD:
        return f"std::{name}({', '.join(a)})"
    raise ValueError(f"no C++ for op {name}")


_STD = {"exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sin", "cos", "tan", "tanh",
        "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "sqrt", "erf", "erfc",
        "floor", "ceil", "trunc", "atan2", "copysign", "hypot", "fmax", "fmin", "lgamma"}


class Body:
    """Lines of one loop body with a CSE table (child bodies see the parent's names)."""

    def __init__(self, printer: "KernelPrinter", parent: Optional["Body"] = None):
        self.p = printer
        self.lines: list[str] = []
        self.cse: dict = dict(parent.cse) if parent is not None else {}

    def expr(self, e: ir.Expr) -> str:
        hit = self.cse.get(e)
        if hit is not None:
            return hit
        if isinstance(e, Const):
            s = const_str(e.value, e.dtype)
            self.cse[e] = s
            return s
        if isinstance(e, IndexValue):
            self.p._note(e.expr)  # NOTE: a size symbol used as a value (an int input) is a kernel argument
            s = f"static_cast<{cpp_type(e.dtype)}>({index_str(e.expr)})"
        elif isinstance(e, Load):
            s = self.p.load(self, e)
        elif isinstance(e, Op) and e.name == "masked":
            # NOTE: the value's loads may be out of bounds where the mask is false, so
            # they run inside the if (a ternary of precomputed temporaries would not do).
            m = self.expr(e.args[0])
            o = self.expr(e.args[2])
            name = self.p.tmp()
            child = Body(self.p, self)
            v = child.expr(e.args[1])
            self.lines.append(f"{cpp_type(e.dtype)} {name} = {o};")
            self.lines.append(f"if ({m}) {{")
            self.lines += ["    " + ln for ln in child.lines] + [f"    {name} = {v};", "}"]
            self.cse[e] = name
            return name
        elif isinstance(e, Op):
            a = [self.expr(x) for x in e.args]
            s = op_str(e.name, a, e.args, e.dtype)
        else:
            raise ValueError(f"unknown expression {e!r}")
        name = self.p.tmp()
        self.lines.append(f"{cpp_type(e.dtype)} {name} = {s};")
        self.cse[e] = name
        return name


class KernelPrinter:
    def __init__(self, kernel, buffers: dict):
        self.k = kernel
        self.buffers = buffers
        self._tmp = 0
        self.ptr: dict[str, str] = {}
        self.local: dict[str, str] = {}
        self.args: list = []     # ("ptr", buffer name) | ("size", symbol)
        self.sizes: set = set()
        self.small = False     # the work is known to be below PARALLEL_MIN_WORK

    def tmp(self) -> str:
        self._tmp += 1
        return f"t{self._tmp - 1}"

    def pointer(self, name: str) -> str:
        p = self.ptr.get(name)
        if p is None:
            p = self.ptr[name] = f"p_{name}"
        return p

    def load(self, body: Body, e: Load) -> str:
        if e.buf in self.local:
            return self.local[e.buf]
        index = e.index
        for sym, val, bound in e.indirect:
            if ("ind", sym) in body.cse:
                continue
            body.cse[("ind", sym)] = sym.name
            v = body.expr(val)
            body.lines.append(f"int64_t {sym.name} = kiln_wrap(static_cast<int64_t>({v}), "
                              f"{index_str(bound)});")
            self._note(bound)
        self._note(index)
        dt = self.buffers[e.buf].dtype
        s = self._element(e.buf, index)
        if dt == torch.float16:
            return f"kiln_h2f({s})"
        if dt == torch.bfloat16:
            return f"kiln_bf2f({s})"
        return s

    def _note(self, e) -> None:
        for s in sympy.sympify(e).free_symbols:
            if not s.name.startswith(("x", "r", "y", "ind")):
                self.sizes.add(s)

    def store(self, name: str, index, value: str) -> str:
        dt = self.buffers[name].dtype
        self._note(index)
        if dt == torch.float16:
            value = f"kiln_f2h({value})"
        elif dt == torch.bfloat16:
            value = f"kiln_f2bf({value})"
        return f"{self._element(name, index)} = {value};"

    def _element(self, name: str, index) -> str:
        """``buf[index]`` in memory, or in the kernel's row scratch array of ``name``."""
        row = self.k.rows.get(name)
        if row is not None:
            return f"row_{name}[{index_str(sympy.expand(index - row[0]))}]"
        return f"{self.pointer(name)}[{index_str(index)}]"

    def row_declarations(self) -> list[str]:
        """One scratch array per row buffer, declared inside the outer loops (per thread)."""
        return [f"alignas(64) {cpp_type(self.buffers[name].dtype)} row_{name}[{size}];  "
                f"// {name}: one row, read only in this kernel"
                for name, (_, size) in self.k.rows.items()]

    def print(self) -> str:
        k = self.k
        kk = len(k.outer)
        for r in k.outer:
            self._note(r)
        out: list[str] = []
        indent = "    "
        inner_sizes = []
        for n, inner in zip(k.nodes, k.inner):
            rr = n.rranges if n.is_reduction else inner
            for r in rr:
                self._note(r)
            inner_sizes.append(ir.product(rr))
        work = sympy.expand(ir.product(k.outer) * (sympy.Max(*inner_sizes) if len(inner_sizes) > 1
                                                   else inner_sizes[0]))
        par = f"if({index_str(work)} > {PARALLEL_MIN_WORK}) num_threads(nthreads)"
        # NOTE: GCC (12) does not vectorize a `parallel for simd` loop whose if clause is
        # constant false; such loops are printed as plain `simd` loops (serial anyway).
        self.small = bool(work.is_Integer) and int(work) <= PARALLEL_MIN_WORK
        body_lines: list[str] = []
        top = Body(self)
        pure = not k.has_reduction and all(not i for i in k.inner)
        if k.is_scatter:
            body_lines = self._print_scatter()
        elif self._column_reduction():
            body_lines = self._print_column(par)
        elif pure and kk >= 1:
            # pure pointwise: parallel over all but the innermost dim, simd innermost
            xs = ir.make_vars("x", kk)
            body = Body(self)
            for n in k.nodes:
                v = body.expr(n.expr)
                body.lines.append(self.store_or_local(n, v))
            loops = []
            if kk == 1:
                loops.append("#pragma omp simd" if self.small else f"#pragma omp parallel for simd {par}")
            else:
                loops.append(f"#pragma omp parallel for collapse({kk - 1}) {par}" if kk > 2
                             else f"#pragma omp parallel for {par}")
            for j, (x, r) in enumerate(zip(xs, k.outer)):
                if j == kk - 1 and kk > 1:
                    loops.append("#pragma omp simd")
                loops.append(f"for (int64_t {x} = 0; {x} < {index_str(r)}; {x}++)")
            body_lines = self._nest(loops, body.lines)
        else:
            xs = ir.make_vars("x", kk)
            body = Body(self)
            body.lines += self.row_declarations()
            for n, inner in zip(k.nodes, k.inner):
                self._node(body, n, inner, kk, serial_outer=(kk == 0), par=par)
            if kk:
                loops = [f"#pragma omp parallel for collapse({kk}) {par}" if kk > 1
                         else f"#pragma omp parallel for {par}"]
                loops += [f"for (int64_t {x} = 0; {x} < {index_str(r)}; {x}++)"
                          for x, r in zip(xs, k.outer)]
                body_lines = self._nest(loops, body.lines)
            else:
                body_lines = body.lines
        params = []
        for name in list(self.ptr):
            mine = name in k.stores
            t = cpp_type(self.buffers[name].dtype)
            params.append(f"{'' if mine else 'const '}{t}* __restrict__ {self.ptr[name]}")
            self.args.append(("ptr", name))
        for s in sorted(self.sizes, key=lambda s: s.name):
            params.append(f"int64_t {s.name}")
            self.args.append(("size", s))
        params.append("int nthreads")
        head = f'extern "C" void {k.name}({", ".join(params)})'
        return head + "\n{\n" + "\n".join(indent + ln for ln in top.lines + body_lines) + "\n}\n"

    def _print_scatter(self) -> list[str]:
        """Copy the base, then atomic adds at the indirect targets."""
        n = self.k.nodes[0]
        sc = n.buf.body
        name = n.buf.name
        xs = ir.make_vars("x", len(sc.ranges))
        ys = ir.make_vars("y", len(sc.src_ranges))
        for r in list(sc.ranges) + list(sc.src_ranges):
            self._note(r)
        b = Body(self)
        v = b.expr(sc.base)
        b.lines.append(self.store(name, n.store, v))
        numel = index_str(sympy.expand(ir.product(sc.ranges)))
        loops = [f"#pragma omp parallel for collapse({len(xs)}) if({numel} > {PARALLEL_MIN_WORK}) num_threads(nthreads)"
                 if len(xs) > 1 else f"#pragma omp parallel for if({numel} > {PARALLEL_MIN_WORK}) num_threads(nthreads)"]
        loops += [f"for (int64_t {x} = 0; {x} < {index_str(r)}; {x}++)" for x, r in zip(xs, sc.ranges)]
        out = self._nest(loops, b.lines) if xs else b.lines
        b2 = Body(self)
        val = b2.expr(sc.value)
        for sym, iv, bound in sc.indirect:
            e = b2.expr(iv)
            b2.lines.append(f"int64_t {sym.name} = kiln_wrap(static_cast<int64_t>({e}), {index_str(bound)});")
            self._note(bound)
        self._note(sc.target)
        add = f"{self.pointer(name)}[{index_str(sc.target)}] += {val};"
        work = sympy.expand(ir.product(sc.src_ranges))
        src_numel = index_str(work)
        serial = [f"for (int64_t {y} = 0; {y} < {index_str(r)}; {y}++)" for y, r in zip(ys, sc.src_ranges)]
        if not ys:
            return out + ["{"] + b2.lines + [add, "}"]
        # NOTE: an atomic add costs a locked instruction even on one thread (the embedding
        # backward's scatter ran 10x slower for it): the adds are atomic only when the loop
        # runs on several threads; a loop known to be small is printed serial only.
        plain = self._nest(serial, b2.lines + [add])
        if work.is_Integer and int(work) <= PARALLEL_MIN_WORK:
            return out + plain
        par = [f"#pragma omp parallel for collapse({len(ys)}) num_threads(nthreads)" if len(ys) > 1
               else "#pragma omp parallel for num_threads(nthreads)"] + serial
        atomic = self._nest(par, b2.lines + ["#pragma omp atomic", add])
        return (out + [f"if (nthreads > 1 && {src_numel} > {PARALLEL_MIN_WORK}) {{"]
                + ["    " + ln for ln in atomic] + ["} else {"] + ["    " + ln for ln in plain] + ["}"])

    def _column_reduction(self) -> bool:
        """True for kernels of only sum/prod/max/min reductions whose loads are contiguous
        along the last outer dim and strided along the reduction (e.g. weight grads:
        sums over rows).  Those loop over the reduction outside and a tile of the last
        outer dim inside (vectorized, one accumulator per column)."""
        k = self.k
        if not k.outer or not all(n.is_reduction and n.buf.body.reduction_type in ("sum", "prod", "max", "min")
                                  for n in k.nodes):
            return False
        mine = {n.buf.name for n in k.nodes}
        if any(n.reads & mine for n in k.nodes):
            return False   # a reduction reading another's result needs it complete first
        xl = ir.var("x", len(k.outer) - 1)
        votes = 0
        for n in k.nodes:
            if not n.rranges:
                return False
            rl = ir.var("r", len(n.rranges) - 1)
            for ld in ir.loads(n.expr):
                if ld.indirect:
                    return False
                ix = sympy.expand(ld.index)
                cx, cr = ix.coeff(xl), ix.coeff(rl)
                if cx == 1 and cr != 1 and cr != 0:
                    votes += 1
                elif cr == 1:
                    votes -= 1
        return votes > 0 and len({tuple(n.rranges) for n in k.nodes}) == 1

    def _print_column(self, par: str) -> list[str]:
        k = self.k
        kk = len(k.outer)
        T = 32  # columns per tile
        xs = ir.make_vars("x", kk)
        xl, last = xs[-1], k.outer[-1]
        rr = k.nodes[0].rranges
        rvars = ir.make_vars("r", len(rr))
        lines: list[str] = []
        accs = []
        inner = Body(self)
        for n in k.nodes:
            rtype = n.buf.body.reduction_type
            acc_t = n.buf.body.acc_dtype
            t = cpp_type(acc_t)
            a = self.tmp()
            init = {"sum": const_str(0, acc_t), "prod": const_str(1, acc_t)}.get(rtype)
            if init is None:
                lo = rtype == "max"
                init = (const_str(-math.inf if lo else math.inf, acc_t) if acc_t.is_floating_point else
                        f"std::numeric_limits<{t}>::{'lowest' if lo else 'max'}()")
            accs.append((n, a, t, init, rtype, acc_t))
            v = inner.expr(n.expr)
            slot = f"{a}[{xl} - xb]"
            if rtype == "sum":
                inner.lines.append(f"{slot} += {v};")
            elif rtype == "prod":
                inner.lines.append(f"{slot} *= {v};")
            else:
                fn = ("kiln_max" if rtype == "max" else "kiln_min") if acc_t.is_floating_point else \
                    ("std::max" if rtype == "max" else "std::min")
                inner.lines.append(f"{slot} = {fn}<{t}>({slot}, {v});")
        head = [f"for (int64_t {x} = 0; {x} < {index_str(r)}; {x}++)" for x, r in zip(xs[:-1], k.outer[:-1])]
        head.append(f"for (int64_t xb = 0; xb < {index_str(last)}; xb += {T})")
        pragma = (f"#pragma omp parallel for collapse({kk}) {par}" if kk > 1 else f"#pragma omp parallel for {par}")
        body: list[str] = [f"int64_t xe = std::min<int64_t>(xb + {T}, {index_str(last)});"]
        for n, a, t, init, _, _ in accs:
            body.append(f"{t} {a}[{T}];")
            body.append(f"for (int64_t j = 0; j < {T}; j++) {a}[j] = {init};")
        rloops = [f"for (int64_t {x} = 0; {x} < {index_str(r)}; {x}++)" for x, r in zip(rvars, rr)]
        rloops += ["#pragma omp simd", f"for (int64_t {xl} = xb; {xl} < xe; {xl}++)"]
        for r in rr:
            self._note(r)
        body += self._nest(rloops, inner.lines)
        store = Body(self)
        for n, a, t, init, _, _ in accs:
            store.lines.append(self.store(n.buf.name, n.store, f"{a}[{xl} - xb]"))
        body += self._nest([f"for (int64_t {xl} = xb; {xl} < xe; {xl}++)"], store.lines)
        return self._nest([pragma] + head, body)

    def _nest(self, loops: list[str], inner: list[str]) -> list[str]:
        out, depth = [], 0
        for ln in loops:
            out.append("    " * depth + ln)
            if ln.startswith("for"):
                depth += 1
        ind = "    " * depth
        out[-1] = out[-1] + " {" if out else ""
        out += [ind + ln for ln in inner]
        if loops:
            out.append("    " * (depth - 1) + "}")
        return out

    def store_or_local(self, n, v: str) -> str:
        name = n.buf.name
        if name in self.k.locals:
            self.local[name] = v
            return f"// {name} = {v} (kept in a register)"
        return self.store(name, n.store, v)

    def _node(self, body: Body, n, inner: list, kk: int, serial_outer: bool, par: str) -> None:
        name = n.buf.name
        body.lines.append(f"// {name}: {', '.join(n.buf.origins)}")
        if not n.is_reduction:
            if not inner:
                v = body.expr(n.expr)
                body.lines.append(self.store_or_local(n, v))
                return
            ivars = [ir.var("x", kk + j) for j in range(len(inner))]
            b = Body(self, body)
            v = b.expr(n.expr)
            b.lines.append(self.store(name, n.store, v))
            loops = []
            for j, (x, r) in enumerate(zip(ivars, inner)):
                if j == len(inner) - 1:
                    loops.append("#pragma omp simd")
                loops.append(f"for (int64_t {x} = 0; {x} < {index_str(r)}; {x}++)")
            body.lines += self._nest(loops, b.lines)
            return
        rtype = n.buf.body.reduction_type
        acc_t = n.buf.body.acc_dtype
        t = cpp_type(acc_t)
        acc = self.tmp()
        rvars = ir.make_vars("r", len(n.rranges))
        b = Body(self, body)
        v = b.expr(n.expr)
        vt = cpp_type(n.expr.dtype)
        clause = ""
        nan_fix = ""
        if rtype == "sum":
            body.lines.append(f"{t} {acc} = {const_str(0, acc_t)};")
            b.lines.append(f"{acc} += {v};")
            clause = f"reduction(+:{acc})"
        elif rtype == "prod":
            body.lines.append(f"{t} {acc} = {const_str(1, acc_t)};")
            b.lines.append(f"{acc} *= {v};")
            clause = f"reduction(*:{acc})"
        elif rtype == "any":
            body.lines.append(f"bool {acc} = false;")
            b.lines.append(f"{acc} = {acc} || {v};")
            clause = f"reduction(||:{acc})"
        elif rtype in ("max", "min"):
            lo = rtype == "max"
            if acc_t.is_floating_point:
                init = const_str(-math.inf if lo else math.inf, acc_t)
            elif acc_t == torch.bool:
                init = "false" if lo else "true"
            else:
                init = f"std::numeric_limits<{t}>::{'lowest' if lo else 'max'}()"
            body.lines.append(f"{t} {acc} = {init};")
            if acc_t.is_floating_point:
                # NOTE: a vectorizable max/min (OpenMP max reduction) plus a NaN flag:
                # eager propagates NaN, so a NaN seen anywhere makes the result NaN.  The
                # flag is an int: GCC does not vectorize a bool || reduction next to floats.
                nanf = self.tmp()
                body.lines.append(f"int {nanf} = 0;")
                b.lines.append(f"{nanf} |= ({v} != {v});")
                b.lines.append(f"{acc} = ({acc} {'>' if lo else '<'} {v}) ? {acc} : {v};")
                clause = f"reduction({'max' if lo else 'min'}:{acc}) reduction(|:{nanf})"
                nan_fix = f"if ({nanf}) {acc} = {const_str(math.nan, acc_t)};"
            elif acc_t == torch.bool:
                b.lines.append(f"{acc} = {acc} {'||' if lo else '&&'} {v};")
            else:
                b.lines.append(f"{acc} = std::{'max' if lo else 'min'}<{t}>({acc}, {v});")
                clause = f"reduction({'max' if lo else 'min'}:{acc})"
        elif rtype in ("argmax", "argmin"):
            lo = rtype == "argmax"
            dt = n.expr.dtype
            if dt.is_floating_point:
                init = const_str(-math.inf if lo else math.inf, dt)
            elif dt == torch.bool:
                init = "false" if lo else "true"
            else:
                init = f"std::numeric_limits<{vt}>::{'lowest' if lo else 'max'}()"
            best = self.tmp()
            body.lines.append(f"{vt} {best} = {init};")
            body.lines.append(f"int64_t {acc} = 0;")
            lin = index_str(ir.strided_index(rvars, ir.contiguous_strides(n.rranges)))
            cmp = ">" if lo else "<"
            cond = f"({v} {cmp} {best})"
            if dt.is_floating_point:
                cond = f"({cond} || ({v} != {v} && {best} == {best}))"
            b.lines.append(f"if {cond} {{ {best} = {v}; {acc} = {lin}; }}")
        else:
            raise ValueError(f"reduction {rtype}")
        loops = []
        nr = len(n.rranges)
        if serial_outer and clause and nr:
            # NOTE: a reduction to one value: the reduction loop itself runs in parallel.
            loops.append(f"#pragma omp simd {clause}" if nr == 1 and self.small else
                         f"#pragma omp parallel for simd {clause} {par}" if nr == 1 else
                         f"#pragma omp parallel for collapse({nr}) {clause} {par}")
        inner_simd = bool(clause and nr and not (serial_outer and clause))
        for j, (x, r) in enumerate(zip(rvars, n.rranges)):
            if inner_simd and j == nr - 1:
                # NOTE: simd on the innermost (contiguous) loop only: a collapsed nest
                # indexes with div/mod and GCC vectorizes it poorly (4-6x slower).
                loops.append(f"#pragma omp simd {clause}")
            loops.append(f"for (int64_t {x} = 0; {x} < {index_str(r)}; {x}++)")
        body.lines += self._nest(loops, b.lines) if loops else b.lines
        if nan_fix:
            body.lines.append(nan_fix)
        if name in self.k.locals:
            self.local[name] = acc
        else:
            res = acc if rtype not in ("sum", "prod", "max", "min", "any") else acc
            body.lines.append(self.store(name, n.store, res))
            self.local[name] = acc  # later readers in this kernel read the register


def print_kernels(kernels: list, buffers: dict) -> tuple[str, dict]:
    """One translation unit for ``kernels``; returns (source, {kernel name: args})."""
    parts = [PRELUDE]
    args = {}
    for k in kernels:
        p = KernelPrinter(k, buffers)
        src = p.print()
        origins = []
        for n in k.nodes:
            origins += [o for o in n.buf.origins if o not in origins]
        parts.append(f"// {k.name}: ATen nodes {', '.join(origins)}\n{src}")
        args[k.name] = p.args
    return "\n".join(parts), args
