"""kiln.codegen.cpp: the C++/OpenMP target (printer; building goes through ``load_library``).

``load_library(source, *, name) -> ctypes.CDLL`` (:mod:`kiln.codegen.cpp.build`) is the
one place kernels are compiled: compiler discovery, flags, the hash-keyed file cache.
"""
from __future__ import annotations

from kiln.codegen.cpp.build import load_library
from kiln.codegen.cpp.printer import print_kernels

__all__ = ["load_library", "print_kernels"]
