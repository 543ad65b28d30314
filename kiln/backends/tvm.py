"""The ``tvm`` backend: hand the graph to Apache TVM (Relax frontend) and run the result.

Listed always (as in PyTorch); calling it without the ``tvm`` package raises
:class:`kiln.exc.InvalidBackend` saying what to install.

In:  an ``fx.GraphModule`` taking tensors.  Options (``options={...}`` of kiln.compile):
     ``opt_level`` (default 3), ``target`` (default ``llvm`` / ``cuda``); ``scheduler``
     is accepted for compatibility with PyTorch's backend and ignored.
Out: a callable returning torch tensors on the inputs' device.  Calls that need
     autograd run the graph eagerly (recorded once as a fallback): the compiled module
     has no backward.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Optional

import torch
import torch.utils._pytree as pytree

from kiln.exc import InvalidBackend, user_location
from kiln.fallbacks import record_fallback

from .common import device_from_inputs, real_inputs
from .registry import CompiledFn, register_backend


def has_tvm() -> bool:
    """True when Apache TVM can be imported."""
    return importlib.util.find_spec("tvm") is not None


def _require_tvm() -> Any:
    if not has_tvm():
        raise InvalidBackend(
            "backend 'tvm' needs Apache TVM, which is not installed",
            why="the 'tvm' Python package cannot be imported",
            where=user_location(),
            hint="pip install apache-tvm, or pick another backend (kiln.list_backends())",
        )
    return importlib.import_module("tvm")


def _build(tvm: Any, gm: torch.fx.GraphModule, inputs: list, options: dict) -> Any:
    from tvm import relax
    from tvm.relax.frontend.torch import from_fx

    info = [(tuple(t.shape), str(t.dtype).replace("torch.", "")) for t in inputs]
    mod = from_fx(gm, info)
    device = device_from_inputs(inputs)
    target = options.get("target") or ("cuda" if device.type == "cuda" else "llvm")
    with tvm.transform.PassContext(opt_level=int(options.get("opt_level", 3))):
        exe = relax.build(mod, target=target)
    dev = tvm.cuda(device.index or 0) if device.type == "cuda" else tvm.cpu(0)
    return relax.VirtualMachine(exe, dev), dev


def _to_tvm(tvm: Any, t: torch.Tensor, dev: Any) -> Any:
    # NOTE: TVM >= 0.20 spells it runtime.tensor; older releases nd.array.
    make = getattr(tvm.runtime, "tensor", None) or tvm.nd.array
    return make(t.detach().cpu().numpy(), dev)


def _to_torch(x: Any, device: torch.device) -> Any:
    if isinstance(x, (list, tuple)) or type(x).__name__ == "Array":
        return [_to_torch(v, device) for v in x]
    return torch.from_numpy(x.numpy()).to(device)


@register_backend(name="tvm")
def tvm(gm: torch.fx.GraphModule, example_inputs: list, *, options: Optional[dict] = None, **kwargs: Any) -> CompiledFn:
    """Compile ``gm`` with TVM's Relax frontend (see module docstring)."""
    tvm_mod = _require_tvm()
    inputs = real_inputs(example_inputs)
    if not all(isinstance(t, torch.Tensor) for t in inputs):
        # NOTE: from_fx takes tensor inputs only; eager is always right
        record_fallback("backend", "tvm", "the graph has non-tensor inputs, which TVM's from_fx does not "
                        "take; the graph runs eagerly")
        return gm.forward
    with torch.no_grad():
        out_spec = pytree.tree_flatten(gm(*inputs))[1]
    vm, dev = _build(tvm_mod, gm, inputs, dict(options or {}))
    device = device_from_inputs(inputs)
    recorded = []

    def run(*args: Any) -> Any:
        if torch.is_grad_enabled() and any(a.requires_grad for a in args):
            if not recorded:  # NOTE: once per compiled graph, not per call
                recorded.append(record_fallback("backend", "tvm", "a call needs autograd and the TVM module "
                                                "has no backward; the graph runs eagerly"))
            return gm(*args)
        tvm_args = [_to_tvm(tvm_mod, a, dev) for a in args]
        out = _to_torch(vm["main"](*tvm_args), device)
        flat = out if isinstance(out, list) else [out]
        return pytree.tree_unflatten(flat, out_spec)

    return run


__all__ = ["tvm", "has_tvm"]
