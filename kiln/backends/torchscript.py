"""TorchScript backends: ``ts`` (script the captured graph) and ``aot_ts`` (script the
AOT forward/backward graphs).  Both tagged ``debug``, as in PyTorch.

In:  an ``fx.GraphModule`` (torch-level for ``ts``, ATen-level inside ``aot_ts``).
Out: a ``torch.jit.ScriptModule``; when scripting fails the graph runs eagerly and a
     warning says why (a graph that cannot be scripted is never an error here).
"""
from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from kiln.fallbacks import record_fallback

from .common import aot_autograd
from .registry import CompiledFn, register_debug_backend

log = logging.getLogger(__name__)


def _strip_overloads(gm: torch.fx.GraphModule) -> None:
    # NOTE: TorchScript calls ops by packet (aten::add), not by overload (aten.add.Tensor).
    for node in gm.graph.nodes:
        if isinstance(node.target, torch._ops.OpOverload):
            node.target = node.target.overloadpacket


def _script_friendly_args(gm: torch.fx.GraphModule) -> None:
    # NOTE: as PyTorch's ts_compile: `_to_copy(x, dtype=)` -> `to`, torch.device -> str.
    for node in gm.graph.nodes:
        if node.target is torch.ops.aten._to_copy and len(node.args) == 1 and set(node.kwargs) == {"dtype"}:
            node.target = torch.ops.aten.to
        node.kwargs = {k: (v.type if isinstance(v, torch.device) else v) for k, v in node.kwargs.items()}


def ts_compile(gm: torch.fx.GraphModule, example_inputs: list) -> CompiledFn:
    """Script ``gm`` with TorchScript; on failure record a fallback and return ``gm.forward``."""
    try:
        # NOTE: graphs from PyTorch's own capture are lazy GraphModules, whose class TorchScript
        # cannot compile; a plain GraphModule over the same graph scripts fine.
        gm = torch.fx.GraphModule(gm, gm.graph)
        _strip_overloads(gm)
        _script_friendly_args(gm)
        gm.graph.lint()
        gm.recompile()
        with warnings.catch_warnings():
            # NOTE: torch.jit is deprecated in recent PyTorch and warns about fx's own
            # module attributes; none of it is actionable for the user.
            warnings.simplefilter("ignore")
            return torch.jit.script(gm)
    except Exception as e:  # NOTE: scripting coverage is partial; eager is always right
        record_fallback("backend", "ts",
                        f"TorchScript could not script the graph ({type(e).__name__}: {_first_line(e)}); "
                        "running it eagerly")
        return gm.forward


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), "")


def torchscript(gm: torch.fx.GraphModule, example_inputs: list, **kwargs: Any) -> CompiledFn:
    """The ``ts`` backend: the captured graph as a ScriptModule."""
    if kwargs:
        log.warning("ts backend ignoring extra kwargs %s", kwargs)
    return ts_compile(gm, example_inputs)


register_debug_backend(name="ts", compiler_fn=torchscript)


def aot_ts(gm: torch.fx.GraphModule, example_inputs: list, **kwargs: Any) -> CompiledFn:
    """The ``aot_ts`` backend: AOT autograd whose forward/backward graphs are scripted."""
    if kwargs:
        log.warning("aot_ts backend ignoring extra kwargs %s", kwargs)
    return aot_autograd(fw_compiler=ts_compile)(gm, example_inputs)


register_debug_backend(name="aot_ts", compiler_fn=aot_ts)

__all__ = ["ts_compile", "torchscript", "aot_ts"]
