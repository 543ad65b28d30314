"""kiln.aot.config: switches of the AOT autograd stage (patchable, like torch._functorch.config).

    from kiln.aot import config
    with config.patch(unlift_effect_tokens=True): ...
    @config.patch(debug_assert=True)
    def test(): ...
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any

# NOTE: exported graphs take effect tokens as inputs and return them, unless
# this is set; then the graph makes its token (prims._make_token) and sinks it.
unlift_effect_tokens: bool = False
# Check at run time that inputs match what was traced (requires_grad, duplicates).
debug_assert: bool = False
# When tracing hits an op that reads data (item(), nonzero()) or has no fake
# kernel, run the function eagerly instead of failing (a warning says why).
fallback_to_eager_on_data_dependence: bool = True
# Let fake tensors made by kiln.aot hand out (meaningless) data pointers.  Off:
# C++ code that reads data while tracing fails with "Cannot access data pointer".
fake_tensor_allow_unsafe_data_ptr_access: bool = False

_DEFAULTS = {k: v for k, v in dict(globals()).items()
             if not k.startswith("_") and isinstance(v, (bool, int, float, str))}


class _Patch(contextlib.ContextDecorator):
    def __init__(self, changes: dict):
        self.changes = changes
        self.saved: list = []

    def __enter__(self):
        mod = sys.modules[__name__]
        for k, v in self.changes.items():
            if k not in _DEFAULTS:
                raise AttributeError(f"kiln.aot.config has no option {k!r}; options: {sorted(_DEFAULTS)}")
            self.saved.append((k, getattr(mod, k)))
            setattr(mod, k, v)
        return self

    def __exit__(self, *exc: Any):
        mod = sys.modules[__name__]
        for k, v in reversed(self.saved):
            setattr(mod, k, v)
        self.saved.clear()
        return False


def patch(arg: Any = None, value: Any = None, **kwargs: Any) -> _Patch:
    """Temporarily change options: ``patch(debug_assert=True)`` or ``patch("debug_assert", True)``."""
    changes = dict(kwargs)
    if isinstance(arg, dict):
        changes.update(arg)
    elif isinstance(arg, str):
        changes[arg] = value
    return _Patch(changes)


def get_config_copy() -> dict:
    mod = sys.modules[__name__]
    return {k: getattr(mod, k) for k in _DEFAULTS}

