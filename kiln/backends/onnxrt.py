"""The ``onnxrt`` backend: export the graph to ONNX and run it with onnxruntime.

Registered always, listed only where ``onnxruntime`` (and ``onnx``) can be imported;
looking it up elsewhere raises :class:`kiln.exc.InvalidBackend` saying what to install.

In:  an ``fx.GraphModule`` whose inputs are tensors (non-tensor inputs are baked in as
     constants at export, as the capture stage guards on their values).
Out: a callable returning the graph's outputs, in the graph's output structure, on the
     inputs' device.  Calls that need autograd (an input requiring grad under grad mode)
     run the graph eagerly instead (recorded once as a fallback): an ONNX session has
     no backward.
"""
from __future__ import annotations

import importlib.util
import io
import warnings
from typing import Any, Optional

import torch
import torch.utils._pytree as pytree

from kiln.fallbacks import record_fallback

from .common import device_from_inputs, real_inputs
from .registry import CompiledFn, register_backend


def has_onnxruntime() -> bool:
    """True when onnxruntime and onnx are importable."""
    return _missing() is None


def _missing() -> Optional[str]:
    for mod in ("onnxruntime", "onnx"):
        if importlib.util.find_spec(mod) is None:
            return f"the {mod!r} package is not installed (pip install onnxruntime onnx)"
    return None


def _export(gm: torch.fx.GraphModule, inputs: list, n_tensors: int) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NOTE: the TorchScript-based exporter warns it is deprecated
        torch.onnx.export(
            gm,
            tuple(inputs),
            buf,
            input_names=[f"input_{i}" for i in range(n_tensors)],
            dynamo=False,  # NOTE: the dynamo exporter would run torch's own capture stack
        )
    return buf.getvalue()


def _providers(device: torch.device) -> list[str]:
    import onnxruntime

    wanted = ["CUDAExecutionProvider"] if device.type == "cuda" else []
    available = set(onnxruntime.get_available_providers())
    return [p for p in wanted if p in available] + ["CPUExecutionProvider"]


_NEEDS_GRAD = "a call needs autograd and an ONNX session has no backward; the graph runs eagerly"


@register_backend(name="onnxrt", available=_missing)
def onnxrt(gm: torch.fx.GraphModule, example_inputs: list, **kwargs: Any) -> CompiledFn:
    """Compile ``gm`` to an onnxruntime InferenceSession (see module docstring)."""
    import onnxruntime

    inputs = real_inputs(example_inputs)
    with torch.no_grad():
        out_spec = pytree.tree_flatten(gm(*inputs))[1]
    n_tensors = sum(isinstance(x, torch.Tensor) for x in inputs)
    device = device_from_inputs(inputs)
    session = onnxruntime.InferenceSession(_export(gm, inputs, n_tensors), providers=_providers(device))
    # NOTE: the exporter drops inputs the graph never reads; feed only those it kept.
    kept = {i.name for i in session.get_inputs()}
    recorded = []

    def run(*args: Any) -> Any:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            if not recorded:  # NOTE: once per compiled graph, not per call
                recorded.append(record_fallback("backend", "onnxrt", _NEEDS_GRAD))
            return gm(*args)
        feeds = {f"input_{i}": t.detach().cpu().numpy() for i, t in enumerate(tensors) if f"input_{i}" in kept}
        outs = [torch.from_numpy(o).to(device) for o in session.run(None, feeds)]
        return pytree.tree_unflatten(outs, out_spec)

    return run


__all__ = ["onnxrt", "has_onnxruntime"]
