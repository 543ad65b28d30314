"""Capture settings (patchable module attributes)."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

# Compiled entries kept per function before falling back to eager.
cache_size_limit: int = 8

# dynamic=None: after a recompile caused by a changed size, compile that dim as a
# symbolic size (PyTorch's automatic_dynamic_shapes).  False: dynamic=None is static.
automatic_dynamic_shapes: bool = True


@contextlib.contextmanager
def patch(**changes: Any) -> Iterator[None]:
    """Temporarily set config values: ``with config.patch(cache_size_limit=2): ...``."""
    g = globals()
    old = {k: g[k] for k in changes}
    g.update(changes)
    try:
        yield
    finally:
        g.update(old)
