"""kiln.codegen.triton: the Triton target (CUDA tensors; CPU tensors under Triton's interpreter).

``print_kernels(kernels, buffers, interpret=...) -> (source, {name: KernelInfo})`` prints
scheduled kernels (:mod:`.printer`); ``load_kernels(source, infos, interpret)`` writes the
source to the cache and returns launchers (:mod:`.runtime`); ``unavailable_reason(device)``
says why Triton cannot run here (None when it can).  Importing this package does not
import Triton.
"""
from __future__ import annotations

from kiln.codegen.triton.printer import KernelInfo, print_kernels
from kiln.codegen.triton.runtime import Launcher, load_kernels, unavailable_reason

__all__ = ["print_kernels", "load_kernels", "unavailable_reason", "KernelInfo", "Launcher"]
