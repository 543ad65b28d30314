"""kiln.codegen.cpp.build: finding and checking the C++ compiler, flags, compile errors,
and what happens end to end when there is no compiler."""
from __future__ import annotations

import os
import stat
import warnings

import pytest
import torch

import kiln
from kiln import fallbacks
from kiln.codegen import config, metrics
from kiln.codegen.cpp import build
from kiln.exc import CompilerNotFound, FallbackWarning, KernelCompileError


def _source(tag: str, body: str = "return x + 1;") -> str:
    # NOTE: a tag per test: distinct sources are distinct cache entries and libraries.
    return f'// {tag}\nextern "C" long long kiln_test_fn(long long x) {{ {body} }}\n'


def test_compiler_found_and_flags():
    cc = build.compiler()
    assert os.path.isabs(cc.path) and os.access(cc.path, os.X_OK)
    assert cc.version
    for flag in ("-O3", "-shared", "-fPIC", "-std=c++17", "-fno-math-errno"):
        assert flag in cc.flags
    assert ("-fopenmp" in cc.flags) == cc.openmp
    assert build.compiler() is cc  # probed once


def test_compiler_probe_is_read_back_by_a_new_process(tmp_cache, monkeypatch):
    """A second process finds the probe's result on disk: no compiler runs to find flags."""
    first = build.compiler()
    build._compilers.clear()
    build.compiler()                       # probes (this cache dir is new) and records it
    build._compilers.clear()               # as a new process would start
    monkeypatch.setattr(build, "_run", lambda *a, **k: pytest.fail("the compiler ran again"))
    again = build.compiler()
    assert again == first and list((tmp_cache / "compilers").rglob("*.json"))


def test_load_library_runs_the_code(tmp_cache):
    lib = build.load_library(_source("runs", "return x * 3 + 1;"), name="runs")
    assert lib.kiln_test_fn(14) == 43
    assert metrics.cpp_compile_count == 1


def test_openmp_kernel_uses_threads(tmp_cache):
    cc = build.compiler()
    # NOTE: the compilers the project runs on (CI's, the GPU machine's) have OpenMP; one
    # without it is covered by test_without_openmp_kernels_compile_serially_and_it_is_said_once (serial kernels, said once).
    assert cc.openmp, f"{cc.path} has no OpenMP: kernels would run on one thread"
    src = ('#include <omp.h>\nextern "C" int kiln_threads(void) { int n = 0;\n'
           '#pragma omp parallel num_threads(2) reduction(+:n)\n n += 1;\n return n; }\n')
    assert build.load_library(src, name="omp").kiln_threads() == 2


def test_compile_error_names_the_kept_source_file(tmp_cache):
    src = _source("broken", "return undeclared_name + x;")
    with pytest.raises(KernelCompileError) as info:
        build.load_library(src, name="broken")
    msg = str(info.value)
    path = next(w for w in msg.split() if w.endswith(".cpp"))
    assert os.path.isfile(path) and open(path).read() == src  # kept on disk
    assert "undeclared_name" in msg and "error" in msg.lower()
    assert not [p for p in (tmp_cache / "cpp").rglob("*.json")]  # no entry for a failed build


def test_missing_compiler_is_a_clear_error():
    with config.patch(cpp_compiler="/nonexistent/g++"):
        with pytest.raises(CompilerNotFound) as info:
            build.compiler()
    msg = str(info.value)
    assert "/nonexistent/g++" in msg and "not found" in msg
    assert "apt-get install g++" in msg and "CXX" in msg


def test_cxx_environment_variable_chooses_the_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/cxx")
    with pytest.raises(CompilerNotFound, match=r"\$CXX='/nonexistent/cxx'"):
        build.compiler()


def _fake_compiler(tmp_path, real: str, refuse: str) -> str:
    """A compiler script that fails when given ``refuse`` and otherwise runs ``real``."""
    path = tmp_path / "cxx-without-flag"
    path.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = "{refuse}" ] && exit 1; done\nexec {real} "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.mark.expect_fallback("does not accept -fopenmp")
def test_without_openmp_kernels_compile_serially_and_it_is_said_once(tmp_path, tmp_cache):
    real = build.compiler().path
    with config.patch(cpp_compiler=_fake_compiler(tmp_path, real, "-fopenmp")):
        with pytest.warns(FallbackWarning, match="does not accept -fopenmp") as record:
            cc = build.compiler()
            assert build.compiler() is cc
        assert not cc.openmp and "-fopenmp" not in cc.flags
        assert len([w for w in record if issubclass(w.category, FallbackWarning)]) == 1
        src = ('#pragma omp parallel for\n'
               'extern "C" long long kiln_serial(long long n) { long long s = 0;\n'
               ' for (long long i = 0; i < n; ++i) s += i; return s; }\n')
        assert build.load_library(src, name="serial").kiln_serial(10) == 45


def test_march_native_is_dropped_when_refused(tmp_path, tmp_cache):
    real = build.compiler().path
    with config.patch(cpp_compiler=_fake_compiler(tmp_path, real, "-march=native")):
        cc = build.compiler()
    assert "-march=native" not in cc.flags and "-O3" in cc.flags


@pytest.mark.expect_fallback("no working C++ compiler")
def test_missing_compiler_runs_aot_eager_with_one_warning():
    def f(x, y):
        return (x.sin() * y).sum()

    x = torch.randn(6, requires_grad=True)
    y = torch.randn(6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = kiln.compile(f, options={"cpp_compiler": "/nonexistent"})
        out = compiled(x, y)
        out.backward()
    warned = [w for w in caught if issubclass(w.category, FallbackWarning)]
    assert len(warned) == 1, [str(w.message) for w in warned]
    msg = str(warned[0].message)
    assert "aot_eager" in msg and "/nonexistent" in msg and "apt-get install g++" in msg
    xr = x.detach().clone().requires_grad_()
    ref = f(xr, y)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, xr.grad)
    assert metrics.graphs_compiled == 0
    rec = [r for r in fallbacks.recorded() if r.stage == "codegen"]
    assert rec and "no working C++ compiler" in rec[-1].why
