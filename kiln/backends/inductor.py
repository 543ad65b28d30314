"""The ``inductor`` backend name: kiln's code generator (kiln/codegen).

``kiln.codegen.compile_fx(gm, example_inputs, **kwargs)`` does the work.  Until that
stage exists, ``inductor`` runs the graph through ``aot_eager`` (same values, same
gradients, no generated kernels) and records that as a fallback (kiln.fallbacks) at
each compile, warning once.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import torch

from kiln.fallbacks import record_fallback

from .registry import CompiledFn, register_backend

_warned = False


def _codegen_compile_fx() -> Any:
    if importlib.util.find_spec("kiln.codegen") is None:
        return None
    return getattr(importlib.import_module("kiln.codegen"), "compile_fx", None)


@register_backend(name="inductor")
def inductor(gm: torch.fx.GraphModule, example_inputs: list, **kwargs: Any) -> CompiledFn:
    """Compile with kiln.codegen; falls back to ``aot_eager`` while codegen is absent."""
    compile_fx = _codegen_compile_fx()
    if compile_fx is not None:
        return compile_fx(gm, example_inputs, **kwargs)
    global _warned
    # NOTE: recorded at every compile (tests see each one), warned about once per process.
    record_fallback("backend", "inductor",
                    "kiln.codegen is not built yet; running through 'aot_eager' "
                    "(correct results, no generated kernels)", warn=not _warned)
    _warned = True
    from .debugging import aot_eager

    return aot_eager(gm, example_inputs)


__all__ = ["inductor"]
