"""kiln.codegen.cpp.mathlib: vectorizable float32 transcendental functions for the C++ kernels.

Out: :data:`MATH_PRELUDE`, C++ source (``static inline`` functions, always inlined) that
the printer puts after its own prelude, and :data:`FLOAT32_FUNCS`, the ops it covers
(op name -> C++ function name): exp, expm1, log, log1p, tanh, erf, sigmoid, sin, cos.

Why: ``std::exp`` and friends are calls into libm, and GCC/clang do not vectorize a loop
that calls them (without ``-ffast-math``, which kiln does not use), so one ``exp`` in a
fused loop made the whole loop scalar.  These functions are straight-line code (selects,
no branches, no calls besides ``fma``/``fabs``/``copysign``, which compile to single
instructions), so ``#pragma omp simd`` loops using them vectorize.

Method (the usual one of vector math libraries): reduce the argument exactly (``fma``
with a two-part constant; for sin/cos a table of 2/pi by exponent, see kiln_trig_reduce),
approximate on the small interval with a polynomial (near-minimax fits, coefficients
rounded to float; each is named with what it approximates and on which interval),
rebuild the result with integer bit operations, and settle the special inputs (NaN,
+-inf, +-0, overflow, underflow, subnormals) with ternaries.  Error against a float64
reference, measured over all 2^32 float32 inputs: exp 1.01 ulp, expm1 1.19, log 0.88,
log1p 0.88, tanh 1.40, erf 1.15, sigmoid 2.48 (above -87.3; below, e^-x overflows and the
result is 0 where it should be subnormal, as eager's), sin 0.94, cos 0.94.  Tests:
``tests/codegen/test_cpp_math.py``.

NOTE: what stops GCC from vectorizing is easy to reintroduce: a libm call (floor, fmin,
nearbyint without -fno-math-errno), a branch, a conversion (int to float, double to
float) that ends up inside one arm of a select (GCC counts it as a possible trap and gives
up if-converting), an unsigned table index (no gather).  The vectorization test compiles
kernels with GCC's report and fails on a scalar loop.

NOTE: float64 keeps ``std::`` calls (scalar): kiln's models run in float32, and a float64
implementation of each function would need its own polynomials.
"""
from __future__ import annotations

import mpmath


def _trig_tables() -> str:
    """C++ arrays kiln_trig_ghi/glo[e] = (2^(max(e,1)-150) * 2/pi mod 4) as hi + lo doubles,
    for the 256 biased float32 exponents e (hex literals, exact)."""
    with mpmath.workprec(400):   # NOTE: 2^104 * 2/pi mod 4 to 106 bits needs ~210
        two_over_pi = 2 / mpmath.pi
        hi, lo = [], []
        for e in range(256):
            g = mpmath.fmod(mpmath.ldexp(two_over_pi, max(e, 1) - 150), 4)
            hi.append(float(g))
            lo.append(float(g - hi[-1]))

    def arr(name: str, vals: list) -> str:
        rows = [", ".join(v.hex() for v in vals[i:i + 4]) for i in range(0, 256, 4)]
        return f"static const double {name}[256] = {{\n    " + ",\n    ".join(rows) + "};\n"

    return arr("kiln_trig_ghi", hi) + arr("kiln_trig_glo", lo)


MATH_PRELUDE = r"""
#define KILN_MATH static inline __attribute__((always_inline))
// NOTE: the reductions below rely on fused multiply-adds (exact products); without FMA
// instructions std::fma is a slow library call, so such targets keep libm (the #else).
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA) || defined(__FP_FAST_FMAF)
#define KILN_VECMATH 1
KILN_MATH uint32_t kiln_f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
KILN_MATH float kiln_u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
// 2^n for n in [-126, 127], from its bits.
KILN_MATH float kiln_pow2i(int32_t n) { return kiln_u2f((uint32_t)(n + 127) << 23); }

// (e^r - 1 - r) / r^2 for r in [-ln2/2, ln2/2] (relative error of e^r below 4e-9).
KILN_MATH float kiln_exp_poly(float r) {
    float p = std::fma(0.00138146128f, r, 0.00836871006f);
    p = std::fma(p, r, 0.041668389f);
    p = std::fma(p, r, 0.166665211f);
    return std::fma(p, r, 0.49999994f);
}

// x = n*ln2 + rh + rl with n an integer and |rh| <= ln2/2, for |x| < 2^21; for other x
// (NaN, +-inf) n and rh are garbage (no UB: bit operations on unsigned integers).
KILN_MATH float kiln_exp_reduce(float x, int32_t* n, float* rl) {
    // NOTE: adding 1.5*2^23 rounds x*log2(e) to an integer (round to nearest, the mode
    // kernels run in) without a call: nearbyint/floor are library calls without
    // -ffast-math, which would stop the loop from vectorizing.
    float t = std::fma(x, 1.44269504f, 12582912.0f);
    float nf = t - 12582912.0f;
    *n = (int32_t)(kiln_f2u(t) - 0x4B400000u);
    *rl = nf * 1.90465432e-09f;             // nf * (float(ln2) - ln2), rounded
    return std::fma(nf, -0.693147182f, x);  // exact: the result is a multiple of 2^-25, < 0.5
}

// e^(rh + rl) - 1 - rh for |rl| << |rh| <= ln2/2 (rl up to 3e-7: its product with rh counts).
KILN_MATH float kiln_exp_tail(float rh, float rl) {
    return std::fma(rh * rh, kiln_exp_poly(rh), std::fma(rl, rh, rl));
}

// e^x = p * 2^n with p in [sqrt(1/2), sqrt(2)] (the core of exp; see kiln_exp_reduce for x).
KILN_MATH float kiln_exp_mant(float x, int32_t* n) {
    float rl;
    float rh = kiln_exp_reduce(x, n, &rl);
    return 1.0f + (rh + kiln_exp_tail(rh, rl));
}

// e^x for x in [-87, 88] (normal results) or NaN: no clamps, one scaling (internal use).
KILN_MATH float kiln_exp_normal(float x) {
    int32_t n;
    float p = kiln_exp_mant(x, &n);
    return p * kiln_pow2i(n);
}

KILN_MATH float kiln_expf(float x) {
    // NOTE: the clamp keeps n <= 128: e^89 overflows to inf by itself below (so does +inf);
    // below -104 (e^x under half the smallest subnormal, -inf included) the last select
    // gives 0.  NaN passes both (comparisons are false) and propagates.  (A second clamp
    // instead of the select costs GCC twice the instructions: it merges the two.)
    int32_t n;
    float p = kiln_exp_mant(x > 89.0f ? 89.0f : x, &n);
    // NOTE: 2^n in two factors: n = 128 and subnormal results (n < -126) are out of one
    // factor's range; the second product rounds once.
    int32_t n1 = n >> 1;
    float y = (p * kiln_pow2i(n1)) * kiln_pow2i(n - n1);
    return x < -104.0f ? 0.0f : y;
}

KILN_MATH float kiln_expm1f(float x) {
    // NOTE: above 89 the result overflows (as for exp; n - 1 <= 127 below); below -20 it
    // rounds to -1 (the last selects).
    float xc = x > 89.0f ? 89.0f : x;
    int32_t n; float rl;
    float rh = kiln_exp_reduce(xc, &n, &rl);
    // e^x - 1 = 2 * (u*(rh + tail) + (u - 1/2)) with u = 2^(n-1) (u - 1/2 is exact for
    // n <= 25; for larger n the -1 no longer matters); u*rh + (u - 1/2) first: it is
    // exact or nearly so, where adding the tail first would round off bits of the result.
    float u = kiln_pow2i(n - 1);
    float y = 2.0f * std::fma(u, kiln_exp_tail(rh, rl), std::fma(u, rh, u - 0.5f));
    y = x < -20.0f ? -1.0f : y;
    // NOTE: tiny x (and -0.0, whose sign the sum above loses) are their own expm1.
    return std::fabs(x) < 2.98e-8f ? x : y;
}

KILN_MATH float kiln_sigmoidf(float x) { return 1.0f / (1.0f + kiln_expf(-x)); }

KILN_MATH float kiln_tanhf(float x) {
    // |x| < 0.5625: tanh(x) = x + x*z*P(z), z = x^2 (relative error below 2e-9).
    float a = std::fabs(x);
    float z = a * a;
    float p = std::fma(-0.00617981562f, z, 0.0210074633f);
    p = std::fma(p, z, -0.0538374297f);
    p = std::fma(p, z, 0.133324519f);
    p = std::fma(p, z, -0.333333135f);
    float small = std::fma(a * z, p, a);
    // beyond: tanh|x| = 1 - 2/(e^(2|x|) + 1) (at least 1/2, so the subtraction loses no
    // bits)
    // (a clamped at 9.5, where tanh is 1 in float: e^(2a) stays normal; NaN passes).
    float big = 1.0f - 2.0f / (kiln_exp_normal(2.0f * (a > 9.5f ? 9.5f : a)) + 1.0f);
    // NOTE: the sign goes on last, which keeps -0.0 (x + x*z*P(z) would give +0.0).
    return std::copysign(a < 0.5625f ? small : big, x);
}

// (log1p(f) - f) / f^2 for f in [sqrt(1/2) - 1, sqrt(2) - 1] (relative error of log1p(f)
// below 5e-9).
KILN_MATH float kiln_log_poly(float f) {
    float p = std::fma(-0.0762185603f, f, 0.129044935f);
    p = std::fma(p, f, -0.132429853f);
    p = std::fma(p, f, 0.141818136f);
    p = std::fma(p, f, -0.166090816f);
    p = std::fma(p, f, 0.200019747f);
    p = std::fma(p, f, -0.250015825f);
    p = std::fma(p, f, 0.333333254f);
    return std::fma(p, f, -0.499999881f);
}

// log(x) + c for normal positive x (c a small correction, |c| << |log x|): x = 2^k * z
// with z in [sqrt(1/2), sqrt(2)) taken from the bits, then log x = k*ln2 + log1p(z - 1).
KILN_MATH float kiln_log_core(float x, float k_adjust, float c) {
    uint32_t u = kiln_f2u(x);
    uint32_t t = u - 0x3f3504f3u;              // bits of sqrt(1/2)
    // NOTE: k as a float through the bits of 1.5*2^23 + k, not (float)int: a conversion
    // counts as a possible trap, which stops GCC from if-converting the selects around.
    float k = kiln_u2f(0x4B400000u + (uint32_t)((int32_t)t >> 23)) - 12582912.0f + k_adjust;
    float f = kiln_u2f(u - (t & 0xff800000u)) - 1.0f;  // exact
    // NOTE: k*ln2 in two parts, float(ln2) (the product exact inside the last fma) and
    // ln2 - float(ln2), added with the small terms.
    float small = std::fma(f * f, kiln_log_poly(f), std::fma(k, -1.90465432e-09f, c));
    return std::fma(k, 0.693147182f, f + small);
}

KILN_MATH float kiln_logf(float x) {
    // NOTE: subnormal x is scaled by 2^23 first (its exponent field does not hold k).
    bool sub = x < 1.17549435e-38f;
    float y = kiln_log_core(sub ? x * 8388608.0f : x, sub ? -23.0f : 0.0f, 0.0f);
    y = x == std::numeric_limits<float>::infinity() ? x : y;
    y = x < 0.0f ? std::numeric_limits<float>::quiet_NaN() : y;
    y = x == 0.0f ? -std::numeric_limits<float>::infinity() : y;
    return x != x ? x : y;
}

KILN_MATH float kiln_log1pf(float x) {
    // NOTE: u = 1 + x rounded and e its rounding error (two-sum, exact):
    // log1p(x) = log(u + e) ~= log(u) + e/u.  u is 0 or at least 2^-24 (normal) for x >= -1.
    float u = 1.0f + x;
    float b = u - 1.0f;
    float e = (1.0f - (u - b)) + (x - b);
    float y = kiln_log_core(u, 0.0f, e / u);
    y = x == std::numeric_limits<float>::infinity() ? x : y;
    y = x < -1.0f ? std::numeric_limits<float>::quiet_NaN() : y;
    y = x == -1.0f ? -std::numeric_limits<float>::infinity() : y;
    y = x == 0.0f ? x : y;   // keeps -0.0
    return x != x ? x : y;
}

KILN_MATH float kiln_erff(float x) {
    float a = std::fabs(x);
    // |x| < 1: erf(x)/x - 1 as a polynomial in x^2 (relative error below 2e-9).
    // NOTE: without the -1, rounding the leading 2/sqrt(pi) to float alone costs 1 ulp.
    float z = x * x;
    float p = std::fma(7.85386146e-05f, z, -0.000801019371f);
    p = std::fma(p, z, 0.00518832775f);
    p = std::fma(p, z, -0.0268538129f);
    p = std::fma(p, z, 0.112835854f);
    p = std::fma(p, z, -0.37612626f);
    p = std::fma(p, z, 0.128379166f);
    float small = std::fma(x, p, x);
    // 1 <= |x|: log(erfc|x|) as a polynomial in |x| on [1, 4] (error below 2e-9 relative
    // to erf); erf rounds to 1 beyond 3.92, where a is clamped.
    float c = a > 4.0f ? 4.0f : a;
    float q = std::fma(0.000186379213f, c, -0.00294765853f);
    q = std::fma(q, c, 0.0218380652f);
    q = std::fma(q, c, -0.103106759f);
    q = std::fma(q, c, -0.638144851f);
    q = std::fma(q, c, -1.12708914f);
    q = std::fma(q, c, -0.000341522828f);
    float big = std::copysign(1.0f - kiln_exp_normal(q), x);   // q in [-18, -1.8]
    return a < 1.0f ? small : big;
}
""" + _trig_tables() + r"""
// sin and cos: |x| = (k + f) * pi/2 with k an integer and |f| <= 1/2, found for every
// float x (no separate large-argument path) in float64: |x| = m * 2^(e-150) (m the 24-bit
// significand, e the biased exponent), so |x| * 2/pi mod 4 = m * G[e] mod 4 with
// G[e] = 2^(e-150) * 2/pi mod 4, tabulated as two doubles (106 bits; kiln_trig_g*).
// NOTE: a Cody-Waite reduction with constants only, the usual fast path, loses the
// result for |x| beyond 2^20 or so; libraries branch to a table-based reduction there,
// which a vectorized loop cannot do per lane.  The two table loads (gathers) cost about
// as much as the rest.
KILN_MATH uint64_t kiln_d2u(double f) { uint64_t u; std::memcpy(&u, &f, 8); return u; }
KILN_MATH double kiln_u2d(uint64_t u) { double f; std::memcpy(&f, &u, 8); return f; }

// f * pi/2 (|f| <= 1/2, absolute error below 2^-75) and k mod 2^32 in *q; NaN for +-inf, NaN.
KILN_MATH double kiln_trig_reduce(float x, uint32_t* q) {
    uint32_t u = kiln_f2u(x) & 0x7fffffffu;
    uint32_t e = u >> 23;
    uint32_t m = (u & 0x7fffffu) | (e != 0 ? 0x800000u : 0u);   // subnormals: G[0] = G[1]
    double md = kiln_u2d(0x4330000000000000ull | (uint64_t)m) - 4503599627370496.0;   // exact
    // NOTE: a signed index: GCC does not gather with an unsigned one.
    int32_t i = (int32_t)e;
    double gh = kiln_trig_ghi[i], gl = kiln_trig_glo[i];
    double ph = md * gh;
    double pl = std::fma(md, gh, -ph);                  // ph + pl = m * gh exactly
    double t = ph + 6755399441055744.0;                 // 1.5*2^52: rounds ph (< 2^26)
    double kd = t - 6755399441055744.0;
    *q = (uint32_t)kiln_d2u(t);
    double f = (ph - kd) + std::fma(md, gl, pl);
    // NOTE: + (x - x) makes +-inf and NaN give NaN without a select on the result (a
    // select there lets GCC sink the conversions into a branch, which stops if-conversion).
    return std::fma(f, 1.5707963267948966, (double)(x - x));
}

// sin(r + k*pi/2) for |r| <= pi/4 (double r, evaluated in float on r = rf + rl).
KILN_MATH float kiln_trig_eval(double r, uint32_t k) {
    float rf = (float)r;
    float rl = (float)(r - (double)rf);
    float z = rf * rf;
    // sin r = r + r*z*S(z), S(z) = (sin(r)/r - 1)/z (relative error below 4e-9)
    float s = std::fma(-0.000195152184f, z, 0.0083321603f);
    s = std::fma(s, z, -0.166666552f);
    s = rf + std::fma(rf * z, s, rl);
    // cos r = 1 - z/2 + z^2*C(z), C(z) = (cos(r) - 1 + z/2)/z^2 (error below 2e-10); 1 - z/2
    // as w plus its rounding error; the rl term is -sin(r)*rl.
    float hz = 0.5f * z;
    float w = 1.0f - hz;
    float c = std::fma(2.44330822e-05f, z, -0.00138873153f);
    c = std::fma(c, z, 0.0416666456f);
    c = w + (((1.0f - w) - hz) + std::fma(z * z, c, -rf * rl));
    float v = (k & 1) ? c : s;
    return kiln_u2f(kiln_f2u(v) ^ ((k & 2u) << 30));    // k = 2, 3: negated
}

KILN_MATH float kiln_sinf(float x) {
    uint32_t k;
    double r = kiln_trig_reduce(x, &k);
    return kiln_u2f(kiln_f2u(kiln_trig_eval(r, k)) ^ (kiln_f2u(x) & 0x80000000u));   // odd
}

KILN_MATH float kiln_cosf(float x) {
    uint32_t k;
    double r = kiln_trig_reduce(x, &k);
    return kiln_trig_eval(r, k + 1);   // cos y = sin(y + pi/2)
}
#else
KILN_MATH float kiln_expf(float x) { return std::exp(x); }
KILN_MATH float kiln_expm1f(float x) { return std::expm1(x); }
KILN_MATH float kiln_logf(float x) { return std::log(x); }
KILN_MATH float kiln_log1pf(float x) { return std::log1p(x); }
KILN_MATH float kiln_tanhf(float x) { return std::tanh(x); }
KILN_MATH float kiln_erff(float x) { return std::erf(x); }
KILN_MATH float kiln_sigmoidf(float x) { return 1.0f / (1.0f + std::exp(-x)); }
KILN_MATH float kiln_sinf(float x) { return std::sin(x); }
KILN_MATH float kiln_cosf(float x) { return std::cos(x); }
#endif
"""

# NOTE: ops whose float32 form calls the functions above (the printer's op names).
FLOAT32_FUNCS = {"exp": "kiln_expf", "expm1": "kiln_expm1f", "log": "kiln_logf",
                 "log1p": "kiln_log1pf", "tanh": "kiln_tanhf", "erf": "kiln_erff",
                 "sigmoid": "kiln_sigmoidf", "sin": "kiln_sinf", "cos": "kiln_cosf"}

__all__ = ["MATH_PRELUDE", "FLOAT32_FUNCS"]
