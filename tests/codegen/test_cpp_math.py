"""kiln's float32 math functions for the C++ kernels (kiln.codegen.cpp.mathlib), through
compiled programs: the error in ulps against a float64 reference over a dense sweep of
float32 values (every 4099th bit pattern of both signs, subnormals included, a fine grid
on [-12, 12] and the special values), agreement with eager, eager's exact results at the
special inputs, the printed kernels calling the helpers (float32 only), their loops
vectorized (sqrt too), and the libm fallback of the prelude (targets without
FMA) compiling."""
from __future__ import annotations

import ctypes
import dataclasses
import re
import subprocess

import pytest
import torch
import torch.nn.functional as F

from kiln.aot import aot_function
from kiln.codegen.cpp import build, mathlib
from kiln.codegen.cpp.printer import PRELUDE
from kiln.codegen.decompose import decomposition_table
from kiln.codegen.graph import compile_aten_graph

# op -> (function, max ulp against float64, C++ helper).  The bounds are the measured
# maxima over all 2^32 inputs (exp 1.01, expm1 1.19, log 0.88, log1p 0.88, tanh 1.40,
# erf 1.15, sigmoid 2.3 above -87.3, sin 0.94, cos 0.94) rounded up.
FUNCS = {
    "exp": (torch.exp, 1.5, "kiln_expf"),
    "expm1": (torch.expm1, 1.5, "kiln_expm1f"),
    "log": (torch.log, 1.0, "kiln_logf"),
    "log1p": (torch.log1p, 1.0, "kiln_log1pf"),
    "tanh": (torch.tanh, 1.5, "kiln_tanhf"),
    "erf": (torch.erf, 1.5, "kiln_erff"),
    "sigmoid": (torch.sigmoid, 2.5, "kiln_sigmoidf"),
    "sin": (torch.sin, 1.0, "kiln_sinf"),
    "cos": (torch.cos, 1.0, "kiln_cosf"),
}
# NOTE: eager's own error is below 1 ulp for each (measured), so kiln and eager differ by
# at most kiln's bound plus one.
EAGER_SLACK = 1.0
FLT_MIN = 2.0 ** -126

SPECIALS = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e30, -1e30, 1e-30, -1e-30,
            -1.0, -2.0, 1.0, 200.0, -200.0, 3.4028235e38, -3.4028235e38, 12582912.0]


class Recorder:
    """A compile_aten_graph that keeps the kernel source it made."""

    def __init__(self):
        self.sources: list[str] = []

    def __call__(self, gm, example_inputs):
        f = compile_aten_graph(gm, example_inputs)
        self.sources.append(f.kernel_source)
        return f

    @property
    def kernels(self) -> str:
        """The kernels' source without the shared prelude."""
        return "\n".join(s.replace(PRELUDE, "") for s in self.sources)


def compiled(fn):
    rec = Recorder()
    return aot_function(fn, rec, rec, decompositions=decomposition_table()), rec


def sweep() -> torch.Tensor:
    bits = torch.arange(0, 2 ** 32, 4099, dtype=torch.int64)
    bits = torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits).to(torch.int32)
    return torch.cat([bits.view(torch.float32), torch.tensor(SPECIALS),
                      torch.linspace(-12, 12, 200001)])


def ulp_error(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|y - ref| in float32 ulps of ref (float64; 2^-149 below 2^-126); 0 where both are
    NaN or y is the inf that ref rounds to, inf where only one is NaN."""
    _, e = torch.frexp(ref)
    ulp = torch.ldexp(torch.ones_like(ref), (e - 24).clamp(min=-149))
    err = (y.double() - ref).abs() / ulp
    same_special = (y.isnan() & ref.isnan()) | (torch.isinf(ref.float()) & (y.double() == ref.float().double()))
    err = torch.where(same_special, torch.zeros_like(err), err)
    return torch.where(err.isnan(), torch.full_like(err, float("inf")), err)


def _worst(err: torch.Tensor, x: torch.Tensor) -> str:
    i = int(err.argmax())
    return f"max {err[i].item():.3g} ulp at x={x[i].item()!r}"


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_accuracy_against_float64_and_eager(name):
    fn, bound, _ = FUNCS[name]
    x = sweep()
    cf, rec = compiled(fn)
    got = cf(x)
    assert f"= {FUNCS[name][2]}(" in rec.kernels, rec.kernels
    err = ulp_error(got, fn(x.double()))
    if name == "sigmoid":
        # NOTE: below -88.7 e^-x overflows and the result is 0 (eager too) instead of a
        # subnormal: an absolute error under FLT_MIN there.
        tiny = (x < -87.0) & ((got.double() - fn(x.double())).abs() <= FLT_MIN)
        err = torch.where(tiny, torch.zeros_like(err), err)
    assert err.max().item() <= bound, f"{name}: {_worst(err, x)} against float64"
    diff = ulp_error(got, fn(x).double())
    if name == "sigmoid":
        diff = torch.where(tiny, torch.zeros_like(diff), diff)
    assert diff.max().item() <= bound + EAGER_SLACK, f"{name}: {_worst(diff, x)} against eager"


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_special_values_equal_eager(name):
    """Results that are special (NaN, +-inf, +-0 with its sign, +-1, or x itself) equal
    eager's exactly; the others are within the accuracy bound."""
    fn, bound, _ = FUNCS[name]
    x = torch.tensor(SPECIALS)
    got, want = compiled(fn)[0](x), fn(x)
    assert torch.equal(got.isnan(), want.isnan()), (x, got, want)
    exact = ~want.isnan() & (want.isinf() | (want == 0) | (want.abs() == 1) | (want == x))
    assert (exact | want.isnan()).sum() >= 6
    assert torch.equal(got[exact], want[exact]), (x, got, want)
    assert torch.equal(got[exact].signbit(), want[exact].signbit()), (x, got, want)   # -0.0
    assert ulp_error(got, want.double()).max().item() <= bound + EAGER_SLACK, (x, got, want)


def test_composites_match_eager():
    """GELU (erf and tanh forms), SiLU, softmax and log_softmax: decompositions onto the
    helpers, compared with eager's fused kernels."""
    torch.manual_seed(0)
    x = torch.randn(64, 257) * 4
    fns = [F.gelu, lambda t: F.gelu(t, approximate="tanh"), F.silu, lambda t: torch.softmax(t, -1),
           lambda t: torch.log_softmax(t, -1), lambda t: torch.sigmoid(t) * torch.tanh(t).exp()]
    for fn in fns:
        got = compiled(fn)[0](x)
        torch.testing.assert_close(got, fn(x), rtol=2e-6, atol=1e-6)


def test_source_uses_helpers_for_float32_only():
    def fn(x):
        return torch.sigmoid(torch.tanh(x.exp()) + torch.erf(x) + torch.log1p(x.abs()) + x.abs().log() + x.expm1()
                             + x.sin() * x.cos())

    x = torch.randn(8, 16)
    cf, rec = compiled(fn)
    torch.testing.assert_close(cf(x), fn(x))
    for helper in mathlib.FLOAT32_FUNCS.values():
        assert f"= {helper}(" in rec.kernels, helper
    assert not re.search(r"std::(exp|expm1|log|log1p|tanh|erf|sin|cos)\(", rec.kernels), rec.kernels
    # float16 computes in float32: the same helpers
    cf, rec = compiled(lambda t: t.exp().tanh())
    cf(x.half())
    assert "= kiln_expf(" in rec.kernels and "= kiln_tanhf(" in rec.kernels
    # float64 keeps libm
    cf, rec = compiled(lambda t: torch.sigmoid(t.exp().tanh()))
    xd = x.double()
    torch.testing.assert_close(cf(xd), torch.sigmoid(xd.exp().tanh()))
    assert "std::exp(" in rec.kernels and "std::tanh(" in rec.kernels and "kiln_" not in rec.kernels


def _has_fma(cc: build.Compiler) -> bool:
    r = subprocess.run([cc.path, *[f for f in cc.flags if f.startswith("-m")], "-dM", "-E", "-x", "c++", "-"],
                       input="", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    return any(m in r.stdout for m in ("__FMA__", "__ARM_FEATURE_FMA", "__FP_FAST_FMAF "))


def _simd_loops(lines: list[str]) -> list[tuple[int, int]]:
    """(pragma line, closing brace line), 1-based, of each loop under ``#pragma omp ... simd``."""
    out = []
    for i, ln in enumerate(lines):
        if not (ln.strip().startswith("#pragma omp") and " simd" in ln):
            continue
        depth, opened, k = 0, False, i + 1
        while not (opened and depth == 0):
            depth += lines[k].count("{") - lines[k].count("}")
            opened = opened or depth > 0
            k += 1
        out.append((i + 1, k))
    return out


def test_loops_with_math_vectorize(tmp_path):
    cc = build.compiler()
    if not _has_fma(cc):
        pytest.skip("needs a CPU with FMA instructions (a device feature; without it the helpers are "
                    "libm calls, which test_libm_fallback_without_fma covers)")
    clang = "clang" in cc.version.lower()
    report = ["-Rpass=loop-vectorize"] if clang else ["-fopt-info-vec-optimized"]
    # NOTE: sin/cos are left out: their argument reduction reads a table of doubles per
    # lane, which GCC 12 does not vectorize for AVX2 ("no vectype"); they are exact, and
    # scalar there
    fns = [lambda t: torch.sigmoid(torch.tanh(t.exp()) + torch.erf(t) + torch.log1p(t.abs()) + t.abs().log() + t.expm1()),
           # NOTE: sign as selects (an int-to-float conversion in a select stops GCC)
           lambda t: torch.sign(t) * t,
           lambda t: torch.softmax(t, -1), F.gelu, F.silu,
           # NOTE: std::sqrt vectorizes only without errno (build flags)
           lambda t: torch.rsqrt(t.abs() + 1) * t]
    for fn in fns:
        cf, rec = compiled(fn)
        cf(torch.randn(64, 256))
        src = tmp_path / "k.cpp"
        src.write_text(rec.sources[0])
        r = subprocess.run([cc.path, *cc.flags, *report, "-o", str(tmp_path / "k.so"), str(src)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        pat = r"k\.cpp:(\d+):\d+: remark: vectorized loop" if clang else r"k\.cpp:(\d+):\d+: optimized: loop vectorized"
        done = {int(m) for m in re.findall(pat, r.stderr)}
        loops = _simd_loops(rec.sources[0].splitlines())
        kernel_loops = [lo for lo in loops if lo[0] > PRELUDE.count("\n")]
        assert kernel_loops
        for first, last in kernel_loops:
            assert any(first <= d <= last for d in done), (first, last, sorted(done), rec.kernels)


def test_libm_fallback_without_fma(tmp_path):
    """The #else branch of the prelude (no FMA instructions) compiles and computes."""
    cc = build.compiler()
    undef = ("-U__FMA__", "-U__ARM_FEATURE_FMA", "-U__FP_FAST_FMAF", "-Wno-builtin-macro-redefined")
    cc = dataclasses.replace(cc, flags=(*cc.flags, *undef))
    calls = "\n".join(f"        case {i}: y[j] = {h}(x[j]); break;" for i, (_, _, h) in enumerate(FUNCS.values()))
    src = tmp_path / "fallback.cpp"
    src.write_text(PRELUDE + "\n#ifdef KILN_VECMATH\n#error vectorized branch taken\n#endif\n"
                   'extern "C" void run(const float* x, float* y, int64_t n, int op) {\n'
                   "    for (int64_t j = 0; j < n; j++) switch (op) {\n" + calls + "\n    }\n}\n")
    build.compile_source(cc, str(src), str(tmp_path / "fallback.so"))
    lib = ctypes.CDLL(str(tmp_path / "fallback.so"))
    x = torch.linspace(-5, 5, 101)
    for i, (fn, _, _) in enumerate(FUNCS.values()):
        y = torch.empty_like(x)
        lib.run(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(y.data_ptr()), ctypes.c_int64(x.numel()), ctypes.c_int(i))
        torch.testing.assert_close(y, fn(x), equal_nan=True)


def test_funcs_table_names_prelude_functions():
    for helper in mathlib.FLOAT32_FUNCS.values():
        assert f"KILN_MATH float {helper}(float x)" in mathlib.MATH_PRELUDE
