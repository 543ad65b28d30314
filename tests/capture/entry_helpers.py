"""Helpers shared by capture tests: a compiled function's cache entries."""
from __future__ import annotations


def _entries(compiled):
    """The compiled entries of ``compiled`` (a kiln.compile'd function or module)."""
    cache = getattr(compiled, "_kiln_cache", None)
    if cache is None:
        cache = compiled.__dict__["_kiln_fwd"].func._kiln_cache
    return cache.entries
