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

import contextlib
import dataclasses
import os
import sys
import warnings
from typing import Iterator, Optional

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
                    warn: bool = True, stacklevel: Optional[int] = None) -> Fallback:
    """Record (and by default warn about) one fallback; returns the record.

    ``where`` defaults to the file:line of the innermost user frame (not kiln, not
    torch); so does the warning's location unless ``stacklevel`` is given.
    """
    level, frame_where = _user_frame()
    rec = Fallback(stage, what, why, where or frame_where)
    _records.append(rec)
    if warn:
        warnings.warn(str(rec), FallbackWarning, stacklevel=stacklevel or level)
    return rec


def _user_frame() -> tuple[int, str]:
    """The stacklevel (for warnings.warn called from record_fallback) and file:line of
    the innermost frame outside kiln and torch."""
    from kiln.exc import _is_internal

    frame = sys._getframe(2)  # record_fallback's caller
    level = 2
    while frame is not None:
        if not _is_internal(frame.f_code.co_filename):
            return level, f"{frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
        level += 1
    return 2, ""


def recorded(since: int = 0) -> list[Fallback]:
    """The fallbacks recorded in this process (from index ``since`` on)."""
    return list(_records[since:])


def mark() -> int:
    """An index to pass to ``recorded(since=...)`` later."""
    return len(_records)


def clear() -> None:
    _records.clear()


@contextlib.contextmanager
def taken() -> Iterator[list[Fallback]]:
    """Hand the fallbacks recorded inside the block to the caller.

    The yielded list is filled when the block ends, and those records leave the
    process record: the caller is the one that checks them (the OpInfo sweep compares
    them with its list of ops that may run eagerly).
    """
    start = len(_records)
    got: list[Fallback] = []
    try:
        yield got
    finally:
        got.extend(_records[start:])
        del _records[start:]


def strict() -> bool:
    """``KILN_STRICT=1``: kiln's own bugs raise instead of becoming graph breaks.

    NOTE: read at each use (cheap, and only on error paths) so that tests can set it.
    """
    return os.environ.get("KILN_STRICT", "") not in ("", "0")


_FORCE_STAGES = ("aot", "capture")


def forced(stage: str) -> bool:
    """True when ``KILN_TEST_FORCE_FALLBACK`` names ``stage`` (``aot`` or ``capture``).

    A switch for checking the test suite only: it makes that stage give up on every
    graph (so everything runs eagerly, through the normal fallback path), and the
    suite must then fail loudly.  Never set it for real work.
    """
    value = os.environ.get("KILN_TEST_FORCE_FALLBACK", "")
    if not value:
        return False
    names = {v.strip() for v in value.split(",") if v.strip()}
    unknown = names - set(_FORCE_STAGES)
    if unknown:
        raise ValueError(f"KILN_TEST_FORCE_FALLBACK={value!r}: unknown stage(s) {sorted(unknown)}; "
                         f"known: {list(_FORCE_STAGES)}")
    return stage in names


FORCED_REASON = "forced by KILN_TEST_FORCE_FALLBACK (a switch for checking the test suite)"


__all__ = ["Fallback", "record_fallback", "recorded", "mark", "clear", "taken", "strict", "forced",
           "FORCED_REASON"]
