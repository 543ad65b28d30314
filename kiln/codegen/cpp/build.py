"""Compile generated C++ kernels into shared libraries and load them.

In:  one translation unit of C++ source (from the C++ printer) and a readable name.
Out: a ``ctypes.CDLL`` of the compiled library (``load_library``).

The compiler is found once per setting (``config.cpp_compiler``, else ``$CXX``, else
``g++`` then ``clang++``) and checked by compiling a three-line file; its flags are
``config.cpp_opt_flags`` (``-O3``), ``-march=native`` and ``-fopenmp`` where it accepts
them (probed once), ``-shared -fPIC -std=c++17 -fno-math-errno -fno-trapping-math
-ffp-contract=off``.  Libraries go through
:mod:`kiln.codegen.cache`, keyed by the source, the compiler and its flags, so a source
compiled once (in this process or any earlier one) is loaded, not compiled again.

Errors: :class:`kiln.exc.CompilerNotFound` (no working compiler: what ran, what to
install) and :class:`kiln.exc.KernelCompileError` (the source did not compile: the
source file, kept on disk, and the compiler's first error lines).
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import shlex
import shutil
import subprocess
import tempfile
from typing import Optional

from kiln.codegen import cache, config, metrics
from kiln.exc import CompilerNotFound, KernelCompileError

_PROBE_SOURCE = "extern \"C\" int kiln_probe(int x) {\n  return x + 1;\n}\n"
_OPENMP_PROBE = ("#include <omp.h>\nextern \"C\" int kiln_probe(void) {\n"
                 "  int n = 0;\n#pragma omp parallel reduction(+:n)\n  n += 1;\n  return n + omp_get_max_threads();\n}\n")
# NOTE: -fno-math-errno: kernels never read errno, and with errno set by sqrt & co. GCC
# guards each std::sqrt with a branch to the library call, which stops the loop from
# vectorizing (LayerNorm's rsqrt).  It changes no result (unlike -ffast-math).
# NOTE: -ffp-contract=off: GCC fuses a*b+c into one FMA where it likes (the vector loop
# body but not its scalar tail, say), so one value computed in two loops could differ in
# its last bit: var of one element then gave inf ((x - mean)**2 / 0 with x - mean != 0)
# where eager gives NaN.  The math library calls fma() explicitly, which this leaves alone.
# NOTE: -fno-trapping-math: with FP traps assumed possible, GCC 12 does not turn the
# selects of the vectorizable math (exp's clamps, sign) into blends, and no loop that
# calls them vectorizes ("control flow in loop").  Kernels never enable traps; results
# are unchanged (no reassociation, IEEE NaN/inf; only exception flags may differ).
_BASE_FLAGS = ("-shared", "-fPIC", "-std=c++17", "-fno-math-errno", "-fno-trapping-math",
               "-ffp-contract=off")
# NOTE: seconds; a compiler that hangs must not hang the user's program.
_COMPILE_TIMEOUT_S = 600


@dataclasses.dataclass(frozen=True)
class Compiler:
    """A C++ compiler that works, and the flags kiln compiles kernels with."""

    path: str                # absolute path of the executable
    version: str             # first line of ``--version``
    flags: tuple[str, ...]   # every flag, in order, before ``-o out.so src.cpp``
    openmp: bool             # whether ``-fopenmp`` is among them


_compilers: dict[tuple, Compiler] = {}


def _candidates() -> tuple[list[str], str]:
    """Compilers to try, and the setting that chose them (for error messages)."""
    if config.cpp_compiler:
        return [config.cpp_compiler], f"kiln.codegen.config.cpp_compiler={config.cpp_compiler!r}"
    cxx = os.environ.get("CXX", "").strip()
    if cxx:
        return [cxx], f"$CXX={cxx!r}"
    return ["g++", "clang++"], "the default search (g++, then clang++)"


def _run(cmd: list[str], timeout: float = _COMPILE_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)


def _compiles(cxx: str, flags: list[str], source: str) -> tuple[bool, str]:
    """Whether ``cxx flags`` builds ``source`` into a shared library (and the stderr)."""
    with tempfile.TemporaryDirectory(prefix="kiln-probe-") as d:
        src = os.path.join(d, "probe.cpp")
        with open(src, "w") as f:
            f.write(source)
        try:
            r = _run([cxx, *flags, "-o", os.path.join(d, "probe.so"), src], timeout=120)
        except (OSError, subprocess.SubprocessError) as e:
            return False, f"{type(e).__name__}: {e}"
        return r.returncode == 0, r.stderr


def _probe(name: str) -> tuple[Optional[Compiler], str]:
    exe = shutil.which(name) if os.sep not in name else (name if os.access(name, os.X_OK) else None)
    if exe is None:
        return None, f"{name}: not found"
    exe = os.path.abspath(exe)
    # NOTE: probing runs the compiler four times (~0.1 s); a process that finds the same
    # executable (same resolved file, size, mtime) with the same flags reads the result.
    key = _probe_key(exe)
    rec = cache.read_record("compilers", key) if key else None
    if rec is not None:
        try:
            return Compiler(rec["path"], rec["version"], tuple(rec["flags"]), bool(rec["openmp"])), ""
        except (KeyError, TypeError):
            pass
    found, why = _run_probe(exe)
    if found is not None and key:
        cache.write_record("compilers", key, dataclasses.asdict(found))
    return found, why


def _probe_key(exe: str) -> Optional[str]:
    try:
        real = os.path.realpath(exe)
        st = os.stat(real)
    except OSError:
        return None
    return cache.record_key({"exe": exe, "real": real, "size": st.st_size, "mtime": st.st_mtime_ns,
                             "opt": config.cpp_opt_flags, "base": list(_BASE_FLAGS)})


def _run_probe(exe: str) -> tuple[Optional[Compiler], str]:
    try:
        version = (_run([exe, "--version"], timeout=60).stdout.splitlines() or ["?"])[0].strip()
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{exe} --version: {type(e).__name__}: {e}"
    opt = shlex.split(config.cpp_opt_flags)
    ok, err = _compiles(exe, [*opt, *_BASE_FLAGS], _PROBE_SOURCE)
    if not ok:
        return None, f"{exe} {' '.join([*opt, *_BASE_FLAGS])} probe.cpp: {_first_lines(err, 3)}"
    flags = [*opt]
    if _compiles(exe, [*flags, "-march=native", *_BASE_FLAGS], _PROBE_SOURCE)[0]:
        flags.append("-march=native")
    openmp = _compiles(exe, [*flags, "-fopenmp", *_BASE_FLAGS], _OPENMP_PROBE)[0]
    if openmp:
        flags.append("-fopenmp")
    return Compiler(exe, version, tuple([*flags, *_BASE_FLAGS]), openmp), ""


def compiler() -> Compiler:
    """The C++ compiler kernels are built with (found and checked once per setting).

    Raises :class:`kiln.exc.CompilerNotFound` saying what was tried and what to install.
    """
    names, chosen_by = _candidates()
    key = (tuple(names), config.cpp_opt_flags)
    found = _compilers.get(key)
    if found is not None:
        return found
    tried = []
    for name in names:
        found, why = _probe(name)
        if found is not None:
            break
        tried.append(why)
    if found is None:
        raise CompilerNotFound(
            "no working C++ compiler for kiln's CPU kernels",
            why=f"tried {chosen_by}: " + "; ".join(tried),
            hint="install one (e.g. `apt-get install g++`) or point $CXX (or "
                 "kiln.codegen.config.cpp_compiler) at a working C++17 compiler",
        )
    if not found.openmp:
        from kiln.fallbacks import record_fallback

        # NOTE: said once per compiler: every kernel then runs on one thread.
        record_fallback("codegen", "OpenMP", f"{found.path} does not accept -fopenmp; "
                        "CPU kernels are compiled without it and run on one thread")
    _compilers[key] = found
    return found


def _first_lines(stderr: str, n: int = 8) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return "\n".join((errors or lines)[:n]) or "(no output)"


def compile_source(cc: Compiler, source_path: str, out_path: str) -> None:
    """Compile ``source_path`` into the shared library ``out_path`` with ``cc``.

    Raises :class:`kiln.exc.KernelCompileError` naming the source file and the first
    error lines the compiler printed.
    """
    cmd = [cc.path, *cc.flags, "-o", out_path, source_path]
    try:
        r = _run(cmd)
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelCompileError(
            f"could not run the C++ compiler on {source_path}",
            why=f"{type(e).__name__}: {e}",
            hint="check the compiler (kiln.codegen.config.cpp_compiler / $CXX)",
        ) from e
    metrics.cpp_compile_count += 1
    if r.returncode != 0:
        raise KernelCompileError(
            f"generated C++ kernel source did not compile: {source_path}",
            why=f"{os.path.basename(cc.path)} exited with {r.returncode}:\n{_first_lines(r.stderr)}",
            hint="this is a kiln bug: please report it with the source file; the graph runs "
                 "without generated kernels meanwhile",
        )


def load_library(source: str, *, name: str) -> ctypes.CDLL:
    """The compiled library of ``source`` (C++), loaded with ``ctypes.CDLL``.

    ``name`` is a readable label (the graph or kernel) kept in the cache's metadata.
    Identical sources compile once per cache directory and load once per process.
    Raises :class:`kiln.exc.CompilerNotFound` or :class:`kiln.exc.KernelCompileError`.
    """
    cc = compiler()
    return cache.load(source, name=name, compiler=cc, build=compile_source)


__all__ = ["Compiler", "compiler", "compile_source", "load_library"]
