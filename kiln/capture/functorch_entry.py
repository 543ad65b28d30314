"""A compiled function called from inside an eager torch.func transform.

In: a call of a kiln-compiled function while a functorch transform is live (the user ran
``torch.func.vmap(compiled_fn)(x)``, ``torch.func.grad(compiled_fn)(x)``, ...): its
tensors are functorch wrappers (batched / grad-tracking) that capture cannot fake, and a
compiled autograd.Function has no vmap or functorch rule.  Out: the function's result,
run eagerly (the transform sees the user's Python ops, as without kiln), or, under
``fullgraph=True`` with a backend other than ``eager``, ``Unsupported`` in PyTorch's
words (wrap the transform inside the compiled function instead).

Each distinct transform stack (kinds, levels, vmap batch size and randomness, grad mode)
is recorded once as a fallback with its reason; calls outside any transform use the
function's compiled entries as usual (they never see functorch wrappers).
"""
from __future__ import annotations

from typing import Any

import torch

from kiln import fallbacks
from kiln.exc import Unsupported

_F = torch._C._functorch
active = torch._C._are_functorch_transforms_active
_REFUSED = {"vmap", "grad", "jvp"}  # NOTE: the transforms PyTorch refuses to compile under


def transform_state() -> tuple:
    """The live functorch transform stack as plain data (one tuple per level)."""
    out = []
    get_stack = getattr(_F, "get_interpreter_stack", None)
    stack = get_stack() if get_stack is not None else [_F.peek_interpreter_stack()]
    for ci in stack or ():
        if ci is None:
            continue
        key = ci.key()
        extra: Any = None
        if key == _F.TransformType.Vmap:
            v = _F.CVmapInterpreterPtr(ci)
            extra = (v.batchSize(), str(v.randomness()))
        elif key == _F.TransformType.Grad:
            extra = _F.CGradInterpreterPtr(ci).prevGradMode()
        out.append((key.name.lower(), ci.level(), extra))
    return tuple(out)


def refusal_message(name: str) -> str:
    return (f"Calling torch.func.{name}(compiled_fn) function from eager mode is not supported. "
            f"Ensure that torch.func.{name} is also called inside the compiled function. "
            "For more information, see PyTorch issue #128711.")


def call_under_transform(cache: Any, args: tuple, kwargs: dict) -> Any:
    """Run ``cache.fn`` eagerly inside the live transform (see module docstring)."""
    state = transform_state()
    seen = cache.__dict__.setdefault("functorch_states", set())
    if state not in seen:
        top = state[-1][0] if state else "vmap"
        ctx = cache.ctx
        if ctx.fullgraph and top in _REFUSED and ctx.backend_name != "eager":
            raise Unsupported(refusal_message(top),
                              why="inside an eager torch.func transform the inputs are functorch wrappers; "
                                  "kiln's compiled graphs have no functorch rules",
                              hint=f"call torch.func.{top} inside the compiled function")
        seen.add(state)
        fn = cache.fn
        fallbacks.record_fallback(
            "capture", f"{fn.__qualname__} ({fn.__code__.co_filename}:{fn.__code__.co_firstlineno})",
            f"called inside an eager torch.func.{top} transform: it runs eagerly there (its inputs are "
            f"functorch wrappers); call the transform inside the compiled function to compile it")
    return cache.fn(*args, **kwargs)


__all__ = ["active", "transform_state", "call_under_transform", "refusal_message"]
