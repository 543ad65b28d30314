"""The ``inductor`` backend name: kiln's code generator (kiln/codegen).

``inductor(gm, example_inputs, mode=None, options=None)`` is
``kiln.codegen.compile_fx``: AOT autograd, then generated kernels for each ATen graph.
Unknown ``mode``/``options`` raise :class:`kiln.exc.InvalidOption` already at
``kiln.compile(...)`` (``inductor.check_options``).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .registry import CompiledFn, register_backend


@register_backend(name="inductor")
def inductor(gm: torch.fx.GraphModule, example_inputs: list, **kwargs: Any) -> CompiledFn:
    """Compile with kiln.codegen (``compile_fx``)."""
    from kiln.codegen import compile_fx  # NOTE: lazy: the registry loads without codegen

    return compile_fx(gm, example_inputs, **kwargs)


def _check_options(mode: Optional[str] = None, options: Optional[dict] = None, **kwargs: Any) -> None:
    from kiln.codegen.compile_fx import check_options

    check_options(mode=mode, options=options, **kwargs)


inductor.check_options = _check_options  # type: ignore[attr-defined]

__all__ = ["inductor"]
