"""Checking the fallbacks a test recorded against the ones it declared.

In:  the ``kiln.fallbacks.Fallback`` records of a test and its declarations, pairs of
     (substring of the reason, required).  Out: None when they agree, else a message
     naming each undeclared fallback, or each required declaration that matched none.
The test suite's root conftest fails a test on that message.
"""
from __future__ import annotations

from typing import Optional, Sequence

from kiln.fallbacks import Fallback


def fallback_mismatch(what: str, got: Sequence[Fallback], declared: Sequence[tuple[str, bool]]) -> Optional[str]:
    """Why ``got`` does not match ``declared`` (``what`` names the test), or None."""
    undeclared = [f for f in got if not any(r in str(f) for r, _ in declared)]
    if undeclared:
        shown = "\n  ".join(str(f) for f in undeclared)
        return (f"{what}: kiln fell back to eager {len(undeclared)} time(s), which the test did not "
                f"declare:\n  {shown}\n(declare an intended one with @pytest.mark.expect_fallback(\"reason\"))")
    missing = [r for r, required in declared if required and not any(r in str(f) for f in got)]
    if missing:
        shown = "\n  ".join(str(f) for f in got) or "(none)"
        return f"{what}: declared fallback(s) {missing} did not happen; recorded:\n  {shown}"
    return None


__all__ = ["fallback_mismatch"]
