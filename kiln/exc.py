"""kiln's error types, in one module.

Every error a user sees from kiln says what happened, why, where in their code
(file:line) and what to do.  The helpers here build such messages.
"""
from __future__ import annotations

import linecache
import os
import sys
import traceback
import types
from typing import Optional

# NOTE: folders end with the separator, so that torch's does not also match torchvision's.
_KILN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_DIR: Optional[str] = None


def _torch_dir() -> str:
    global _TORCH_DIR
    if _TORCH_DIR is None:
        import torch

        _TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
    return _TORCH_DIR


def _is_internal(filename: str) -> bool:
    if filename.startswith("<"):
        return True  # NOTE: generated code ("<kiln f>"), <frozen ...>, <string>
    f = os.path.abspath(filename)
    return (
        f.startswith(_KILN_DIR)
        or f.startswith(_torch_dir())
        or "/contextlib.py" in f
        or "/functools.py" in f
    )


def user_frame_summary(skip_internal: bool = True) -> Optional[traceback.FrameSummary]:
    """The innermost stack frame that belongs to user code (not kiln, not torch)."""
    for fs in reversed(traceback.extract_stack()):
        if skip_internal and _is_internal(fs.filename):
            continue
        return fs
    return None


def format_location(filename: str, lineno: int, source: Optional[str] = None) -> str:
    """`file:line` plus the source line, as shown in kiln's error messages."""
    if source is None:
        source = linecache.getline(filename, lineno).strip()
    loc = f"{filename}:{lineno}"
    return f"{loc}\n    {source}" if source else loc


def user_location() -> str:
    fs = user_frame_summary()
    if fs is None:
        return "<unknown location>"
    return format_location(fs.filename, fs.lineno or 0, fs.line)


class KilnError(Exception):
    """Base class of every error kiln raises on purpose.

    The message is built from ``what``, ``why``, ``where`` and ``hint`` each time it is
    shown, so a location filled in after construction (capture learns the user's
    file:line only when the error reaches the frame being translated) is part of
    ``str(e)``.
    """

    def __init__(self, what: str, *, why: str = "", where: str = "", hint: str = ""):
        self.what = what
        self.why = why
        self.hint = hint
        self._where = where
        super().__init__(self._format())

    @property
    def where(self) -> str:
        return self._where

    @where.setter
    def where(self, value: str) -> None:
        # NOTE: args[0] is what pickling, repr() and some tools use; keep it in step.
        self._where = value
        self.args = (self._format(),)

    def with_where(self, where: str) -> "KilnError":
        """Set ``where`` (the user's file:line and source line); returns ``self``."""
        self.where = where
        return self

    def __str__(self) -> str:
        return self._format()

    def _format(self) -> str:
        parts = [self.what]
        if self.why:
            parts.append(f"Why: {self.why}")
        if self.where:
            parts.append(f"Where: {self.where}")
        if self.hint:
            parts.append(f"Hint: {self.hint}")
        return "\n".join(parts)


class TracingError(KilnError):
    """make_fx could not trace the function (bad output type, missing meta kernel...)."""


class DataDependentError(TracingError, RuntimeError):
    """A traced function read tensor data where only metadata exists (fake mode)."""


class UnsupportedOperatorError(TracingError):
    """An operator has no kernel for the mode being traced (e.g. no meta kernel)."""


class FunctionalizationError(KilnError):
    """A mutation or view pattern could not be made functional."""


class BannedInCompile(FunctionalizationError, RuntimeError):
    """The program does what compilation refuses by design, as PyTorch's does (a mutation
    through an ``as_strided`` view of a view). Raised to the user even where other backend
    failures fall back to eager: the message carries the workaround."""


class BackendCompilerFailed(KilnError, RuntimeError):
    """A backend raised while compiling a graph (a RuntimeError, as in PyTorch)."""

    def __init__(self, backend_name: str, inner: BaseException, where: str = ""):
        self.backend_name = backend_name
        self.inner = inner
        super().__init__(
            f"backend '{backend_name}' raised {type(inner).__name__}: {inner}",
            why="the backend compiler failed on the captured graph",
            where=where,
            hint="set fullgraph=False to fall back to eager, or fix the backend",
        )


class GraphInvariantError(KilnError):
    """The verifier (KILN_CHECK=1) found a malformed graph after a pass."""


class InvalidBackend(KilnError):
    """An unknown backend name, or a backend that returned a non-callable."""


class Unsupported(KilnError):
    """Capture met something it cannot put in a graph (a graph break).

    Raised to the user only under fullgraph=True / nopython=True; otherwise the
    compiler breaks the graph there and runs that part eagerly.
    """


class TorchRuntimeError(KilnError, RuntimeError):
    """A torch call failed on fake tensors whose sizes come from tensor data: raised to the
    caller of the compiled function, as PyTorch's capture raises its TorchRuntimeError."""


class CodegenError(KilnError):
    """kiln's code generator failed on a graph (a kiln bug: the graph falls back)."""


class CompilerNotFound(CodegenError):
    """No working C++ compiler for CPU kernels (what ran, what to install)."""


class KernelCompileError(CodegenError):
    """Generated kernel source did not compile (names the source file and ATen nodes)."""


class InvalidOption(KilnError, ValueError):
    """An unknown compile option or mode, or a value of the wrong type (lists the known ones)."""


class FallbackWarning(UserWarning):
    """Some part of a program ran eagerly (or on a slower path) instead of compiled.

    Every fallback goes through :func:`kiln.fallbacks.record_fallback`, which warns
    with this category and keeps a record that ``kiln.explain`` shows.
    """


class ExportError(KilnError, RuntimeError):
    """kiln.export could not export the program as asked (a RuntimeError, as PyTorch's)."""


class ConstraintViolationError(ExportError):
    """The program does not allow the dynamic shapes it was exported (or, with dims marked by
    mark_dynamic, compiled) with; the hint lists suggested fixes."""


class ForbiddenCallError(KilnError, AssertionError):
    """A function that must run before compiling (``mark_dynamic``...) was called inside the
    compiled region (an AssertionError, as PyTorch's)."""


class ExportInputError(ExportError, ValueError):
    """An exported program's module() was called with inputs outside its signature
    (structure, dtype, rank, a static size, a Dim's range)."""


class SerializationError(ExportError):
    """kiln.export.load refused a file: not an exported program, truncated, corrupt,
    tampered with, or of another schema version."""


class RecompileLimitExceeded(KilnError):
    """A code object was recompiled more often than the cache limit allows."""


class RecompileError(KilnError):
    """A compiled function would compile again while ``kiln.capture.config.error_on_recompile``
    is set (PyTorch's RecompileError): its guards failed on new inputs."""


def user_traceback(tb: Optional[types.TracebackType]) -> Optional[types.TracebackType]:
    """``tb`` without kiln's and torch's frames (and generated code): what a user is shown
    for a kiln error raised out of a compiled call (their frames stay, in order)."""
    kept = []
    while tb is not None:
        if not _is_internal(tb.tb_frame.f_code.co_filename):
            kept.append(tb)
        tb = tb.tb_next
    out = None
    for t in reversed(kept):
        out = types.TracebackType(out, t.tb_frame, t.tb_lasti, t.tb_lineno)
    return out


def internal_frames_stripped(tb_lines: list[str]) -> list[str]:
    return [l for l in tb_lines if _KILN_DIR not in l]


__all__ = [
    "KilnError",
    "TracingError",
    "DataDependentError",
    "UnsupportedOperatorError",
    "FunctionalizationError",
    "BackendCompilerFailed",
    "InvalidBackend",
    "GraphInvariantError",
    "Unsupported",
    "RecompileLimitExceeded",
    "RecompileError",
    "ExportError",
    "ConstraintViolationError",
    "ExportInputError",
    "SerializationError",
    "FallbackWarning",
    "CodegenError",
    "CompilerNotFound",
    "KernelCompileError",
    "InvalidOption",
    "user_location",
    "user_frame_summary",
    "format_location",
    "user_traceback",
]

del sys
