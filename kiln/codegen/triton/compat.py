"""kiln.codegen.triton.compat: math that differs between Triton versions and targets.

In:  an IR op name, printed operands, whether the kernel runs under the interpreter.
Out: Triton source for the op (a string).

On a GPU, transcendental functions go through libdevice
(``triton.language.extra.libdevice`` in Triton 3.x; the prelude imports it from where the
installed Triton has it).  The interpreter (``TRITON_INTERPRET=1``, CPU tensors) has no
libdevice (extern calls raise there), so those kernels use ``tl.math`` where it has the
function and a formula over it otherwise.  :data:`PRELUDE` is the top of every generated
file: imports and the ``@triton.jit`` helpers (Python floor-div/mod, NaN-propagating
max/min, argmax/argmin combine) shared by the kernels.
"""
from __future__ import annotations

from typing import Optional

PRELUDE = '''\
import triton
import triton.language as tl

# NOTE: libdevice moved between Triton releases; the first that imports wins.
try:
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older Triton
    try:
        from triton.language.extra.cuda import libdevice
    except ImportError:
        from triton.language import math as libdevice


@triton.jit
def kiln_max(a, b):
    # NaN-propagating maximum (eager max/amax semantics)
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def kiln_min(a, b):
    return tl.where((a < b) | (a != a), a, b)


@triton.jit
def kiln_mul(a, b):
    return a * b


@triton.jit
def kiln_or(a, b):
    return a | b


@triton.jit
def kiln_sum(a, b):
    return a + b


@triton.jit
def kiln_argmax(v1, i1, v2, i2):
    # first index of the largest value; NaN counts as the largest (eager argmax)
    n1 = v1 != v1
    n2 = v2 != v2
    p = (n1 & (~n2 | (i1 < i2))) | ((~n1 & ~n2) & ((v1 > v2) | ((v1 == v2) & (i1 < i2))))
    return tl.where(p, v1, v2), tl.where(p, i1, i2)


@triton.jit
def kiln_argmin(v1, i1, v2, i2):
    n1 = v1 != v1
    n2 = v2 != v2
    p = (n1 & (~n2 | (i1 < i2))) | ((~n1 & ~n2) & ((v1 < v2) | ((v1 == v2) & (i1 < i2))))
    return tl.where(p, v1, v2), tl.where(p, i1, i2)


@triton.jit
def kiln_floordiv_int(a, b):
    # Python floor division of integers (division by zero gives 0, as the C++ target)
    bb = tl.where(b == 0, 1, b)
    q = a // bb
    q = tl.where(((a % bb) != 0) & ((a < 0) != (bb < 0)), q - 1, q)
    return tl.where(b == 0, 0, q)


@triton.jit
def kiln_mod_int(a, b):
    bb = tl.where(b == 0, 1, b)
    r = a % bb
    r = tl.where((r != 0) & ((r < 0) != (bb < 0)), r + bb, r)
    return tl.where(b == 0, 0, r)


@triton.jit
def kiln_truncdiv_int(a, b):
    bb = tl.where(b == 0, 1, b)
    return tl.where(b == 0, 0, a // bb)


@triton.jit
def kiln_pow_int(a, b):
    r = a * 0 + 1
    base = a
    e = b + a * 0
    for _ in tl.static_range(63):
        r = tl.where((e & 1) != 0, r * base, r)
        base = base * base
        e = e >> 1
    neg = tl.where(a == 1, 1, tl.where(a == -1, tl.where((b & 1) != 0, -1, 1), 0))
    return tl.where(b < 0, neg + r * 0, r)
'''

# NOTE: float-only helpers that need libdevice on the GPU; under the interpreter the
# same names are defined over tl.math formulas (see INTERP_PRELUDE).
GPU_FLOAT_PRELUDE = '''

@triton.jit
def kiln_trunc(x):
    return libdevice.trunc(x)


@triton.jit
def kiln_fmod(a, b):
    return libdevice.fmod(a, b)
'''

INTERP_PRELUDE = '''

@triton.jit
def kiln_trunc(x):
    return tl.where(x < 0, tl.ceil(x), tl.floor(x))


@triton.jit
def kiln_fmod(a, b):
    return a - kiln_trunc(a / b) * b
'''

FLOAT_PRELUDE = '''

@triton.jit
def kiln_mod_float(a, b):
    r = kiln_fmod(a, b)
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)


@triton.jit
def kiln_floordiv_float(a, b):
    m = kiln_fmod(a, b)
    d = (a - m) / b
    d = tl.where((m != 0) & ((b < 0) != (m < 0)), d - 1, d)
    f = tl.floor(d)
    f = tl.where(d - f > 0.5, f + 1, f)
    return tl.where(b == 0, a / b, f)


@triton.jit
def kiln_nearbyint(x):
    # round half to even
    r = tl.floor(x + 0.5)
    return tl.where((r - x == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) != 0), r - 1.0, r)
'''

# libdevice names on the GPU: {IR op: libdevice function}
LIBDEVICE = {n: n for n in (
    "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sin", "cos", "tan", "tanh",
    "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "sqrt", "erf", "erfc",
    "floor", "ceil", "trunc", "atan2", "copysign", "hypot", "fmod", "lgamma", "rsqrt", "pow",
    "nearbyint")}
LIBDEVICE["round"] = "nearbyint"

# Under the interpreter: formulas over tl.math (a -> first operand, b -> second).
INTERP = {
    "exp": "tl.exp({a})", "exp2": "tl.exp2({a})", "log": "tl.log({a})", "log2": "tl.log2({a})",
    "sin": "tl.sin({a})", "cos": "tl.cos({a})", "sqrt": "tl.sqrt({a})", "erf": "tl.erf({a})",
    "floor": "tl.floor({a})", "ceil": "tl.ceil({a})", "rsqrt": "(1.0 / tl.sqrt({a}))",
    "expm1": "(tl.exp({a}) - 1.0)", "log1p": "tl.log(1.0 + {a})",
    "log10": "(tl.log({a}) * 0.4342944819032518)", "tan": "(tl.sin({a}) / tl.cos({a}))",
    "tanh": "(2.0 / (1.0 + tl.exp(-2.0 * {a})) - 1.0)",
    "sinh": "((tl.exp({a}) - tl.exp(-{a})) * 0.5)", "cosh": "((tl.exp({a}) + tl.exp(-{a})) * 0.5)",
    "asinh": "tl.where({a} < 0, -tl.log(-{a} + tl.sqrt({a} * {a} + 1.0)), tl.log({a} + tl.sqrt({a} * {a} + 1.0)))",
    "acosh": "tl.log({a} + tl.sqrt({a} * {a} - 1.0))",
    "atanh": "(0.5 * tl.log((1.0 + {a}) / (1.0 - {a})))",
    "erfc": "(1.0 - tl.erf({a}))", "trunc": "kiln_trunc({a})", "fmod": "kiln_fmod({a}, {b})",
    "hypot": "tl.sqrt({a} * {a} + {b} * {b})", "nearbyint": "kiln_nearbyint({a})",
    "round": "kiln_nearbyint({a})",
    "pow": "tl.where({b} == 0, 1.0 + 0.0 * {a}, tl.where({a} < 0, "
           "tl.where(kiln_fmod({b}, 2.0) == 0, 1.0, -1.0) * tl.exp2({b} * tl.log2(-{a})), "
           "tl.exp2({b} * tl.log2({a}))))",
}


def math_call(name: str, args: list[str], interpret: bool) -> Optional[str]:
    """Triton source for float math op ``name`` (None when this target has none)."""
    a = args[0]
    b = args[1] if len(args) > 1 else None
    if interpret:
        t = INTERP.get(name)
        return t.format(a=a, b=b) if t is not None else None
    fn = LIBDEVICE.get(name)
    if fn is None:
        return None
    return f"libdevice.{fn}({', '.join(args)})"


def prelude(interpret: bool) -> str:
    """The top of a generated file for this target."""
    return PRELUDE + (INTERP_PRELUDE if interpret else GPU_FLOAT_PRELUDE) + FLOAT_PRELUDE


__all__ = ["math_call", "prelude"]
