"""Minimal stand-in for ``kiln.codegen.cpp.build.load_library``: g++ into a temp folder,
keyed by the hash of the source (no persistent cache, no compiler discovery)."""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

from kiln import exc

_dir = None
_loaded: dict = {}


def load_library(source: str, *, name: str) -> ctypes.CDLL:
    """Compile ``source`` to a shared library and load it (cached per process)."""
    global _dir
    key = hashlib.sha256(source.encode()).hexdigest()[:24]
    lib = _loaded.get(key)
    if lib is not None:
        return lib
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise exc.CompilerNotFound("no C++ compiler found (set $CXX or install g++)")
    if _dir is None:
        _dir = tempfile.mkdtemp(prefix="kiln_kernels_")
    src = os.path.join(_dir, f"{name}_{key}.cpp")
    so = os.path.join(_dir, f"{name}_{key}.so")
    with open(src, "w") as f:
        f.write(source)
    cmd = [cxx, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", src, "-o", so]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise exc.KernelCompileError(f"compiling {src} failed:\n{r.stderr[-4000:]}")
    lib = _loaded[key] = ctypes.CDLL(so)
    return lib
