"""Capture settings (patchable module attributes)."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

# Compiled entries kept per function before falling back to eager.
cache_size_limit: int = 8


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
