"""kiln.codegen.cpp: the C++/OpenMP target (printer; building goes through ``load_library``).

``load_library(source, *, name) -> ctypes.CDLL`` is the one place kernels are compiled;
it comes from :mod:`kiln.codegen.cpp.build` when present, else from a minimal local
stand-in (:mod:`kiln.codegen.cpp._build_stub`).
"""
from __future__ import annotations

try:  # NOTE: the full builder (cache, compiler discovery) lands in cpp/build.py
    from kiln.codegen.cpp.build import load_library
except ImportError:  # pragma: no cover - until then
    from kiln.codegen.cpp._build_stub import load_library

from kiln.codegen.cpp.printer import print_kernels

__all__ = ["load_library", "print_kernels"]
