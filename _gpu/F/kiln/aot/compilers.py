"""The smallest compilers: ``nop`` and the boxed calling convention."""
from __future__ import annotations

from typing import Any, Callable

import torch.fx as fx


def make_boxed_func(f: Callable) -> Callable:
    """Wrap ``f(*args)`` as ``g(args_list)`` (marked ``_boxed_call``), so the
    runtime can free inputs early."""

    def g(args: list) -> Any:
        return f(*args)

    g._boxed_call = True  # type: ignore[attr-defined]
    return g


def make_boxed_compiler(compiler: Callable) -> Callable:
    def boxed(gm: fx.GraphModule, example_inputs: list) -> Callable:
        return make_boxed_func(compiler(gm, example_inputs))

    return boxed


def nop(gm: fx.GraphModule, example_inputs: list) -> Callable:
    """A compiler that returns the graph itself (runs ATen ops eagerly)."""

    # NOTE: calls ``gm.forward`` (looked up per call, so a recompiled graph is
    # seen), not ``gm(...)``: nn.Module.__call__ costs microseconds per call and
    # graphs made by kiln.aot carry no hooks.
    def run(args: list) -> Any:
        return gm.forward(*args)

    run._boxed_call = True  # type: ignore[attr-defined]
    run._returns_sequence = True  # type: ignore[attr-defined]  # graphs return a tuple/list
    return run


def call_compiled(f: Callable, args: list) -> list:
    """Call a compiled graph with either calling convention; always a list back."""
    out = f(args) if getattr(f, "_boxed_call", False) else f(*args)
    if isinstance(out, (list, tuple)):
        return list(out)
    return [out]
