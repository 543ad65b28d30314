"""The one recording point for fallbacks: every place where kiln gives up on
compiling something and runs it eagerly (capture giving up on a frame, a backend
failing, AOT giving up, codegen falling back to an extern call or to the ATen graph).

``record_fallback(stage, what, why)`` warns once with :class:`kiln.exc.FallbackWarning`
(message ``kiln.<stage>: <what>: <why>``) and appends a :class:`Fallback` record to
the list that ``kiln.explain`` reports and that tests inspect (``recorded()``).
A fallback is correct behaviour for users; tests fail on the ones they did not
declare (``@pytest.mark.expect_fallback("reason")``).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

from kiln.exc import FallbackWarning


@dataclasses.dataclass(frozen=True)
class Fallback:
    stage: str            # "capture", "backend", "aot", "codegen", ...
    what: str             # what ran eagerly: a function, a graph, a kernel
    why: str              # the reason, in words a user can act on
    where: str = ""       # the user's file:line when known

    def __str__(self) -> str:
        loc = f" [{self.where}]" if self.where else ""
        return f"kiln.{self.stage}: {self.what}: {self.why}{loc}"


_records: list[Fallback] = []


def record_fallback(stage: str, what: str, why: str, *, where: str = "",
                    warn: bool = True, stacklevel: int = 3) -> Fallback:
    """Record (and by default warn about) one fallback; returns the record."""
    rec = Fallback(stage, what, why, where)
    _records.append(rec)
    if warn:
        warnings.warn(str(rec), FallbackWarning, stacklevel=stacklevel)
    return rec


def recorded(since: int = 0) -> list[Fallback]:
    """The fallbacks recorded in this process (from index ``since`` on)."""
    return list(_records[since:])


def mark() -> int:
    """An index to pass to ``recorded(since=...)`` later."""
    return len(_records)


def clear() -> None:
    _records.clear()


__all__ = ["Fallback", "record_fallback", "recorded", "mark", "clear"]

del Optional
