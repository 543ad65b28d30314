"""The backend registry: names -> compiler functions.

A backend is any ``callable(gm: torch.fx.GraphModule, example_inputs: list) -> callable``
(PyTorch's custom-backend convention).  The registry maps short names
(``"eager"``, ``"aot_eager"``, ...) to such callables and carries tags
(``"debug"``, ``"experimental"``) used to hide helper backends from
:func:`list_backends`.

Invariants:
  * a name is registered at most once (re-registering the *same* function is a no-op);
  * every registered function gets a ``_tags`` tuple attribute, as PyTorch's registry does;
  * a backend may declare an availability check (``available=``); unavailable backends
    are not listed, and looking one up raises :class:`kiln.exc.InvalidBackend` saying why.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Union

import torch

from kiln.exc import InvalidBackend, user_location

# The backend kiln.compile and kiln.optimize use when none is given (README says the same).
# NOTE: this line is the one place to change it.
DEFAULT_BACKEND = "inductor"

CompiledFn = Callable[..., Any]
CompilerFn = Callable[[torch.fx.GraphModule, list], CompiledFn]

# name -> compiler function
_COMPILER_FNS: dict[str, CompilerFn] = {}
# name -> () -> Optional[str]: None when usable, else the reason it is not.
_UNAVAILABLE_REASON: dict[str, Callable[[], Optional[str]]] = {}
# name -> tags (kept here too: not every callable accepts a `_tags` attribute)
_TAGS: dict[str, tuple[str, ...]] = {}


def register_backend(
    compiler_fn: Optional[CompilerFn] = None,
    name: Optional[str] = None,
    tags: Sequence[str] = (),
    *,
    available: Optional[Callable[[], Optional[str]]] = None,
) -> Any:
    """Add ``compiler_fn`` to the registry under ``name`` (default: its ``__name__``).

    Usable as ``@register_backend``, ``@register_backend(name=..., tags=...)`` or a
    plain call.  ``available``, if given, is called at list/lookup time and returns
    ``None`` when the backend can run here, or a string saying what is missing.
    Returns ``compiler_fn`` (so the decorator leaves the function usable).
    """
    if compiler_fn is None:
        return functools.partial(register_backend, name=name, tags=tags, available=available)
    if not callable(compiler_fn):
        raise InvalidBackend(
            f"register_backend got a non-callable {type(compiler_fn).__name__}",
            why="a backend must be callable(gm, example_inputs) -> callable",
            where=user_location(),
            hint="pass a function or an object with __call__",
        )
    name = name or compiler_fn.__name__
    existing = _COMPILER_FNS.get(name)
    if existing is not None and existing is not compiler_fn:
        raise InvalidBackend(
            f"a backend named {name!r} is already registered",
            why=f"it is {getattr(existing, '__qualname__', existing)!r}; names must be unique",
            where=user_location(),
            hint="pick another name with register_backend(name=...)",
        )
    _COMPILER_FNS[name] = compiler_fn
    try:
        compiler_fn._tags = tuple(tags)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        # NOTE: bound methods and some builtins refuse attributes; keep tags beside them.
        pass
    _TAGS[name] = tuple(tags)
    if available is not None:
        _UNAVAILABLE_REASON[name] = available
    return compiler_fn


register_debug_backend = functools.partial(register_backend, tags=("debug",))
register_experimental_backend = functools.partial(register_backend, tags=("experimental",))


def _unavailable_reason(name: str) -> Optional[str]:
    check = _UNAVAILABLE_REASON.get(name)
    return None if check is None else check()


def lookup_backend(compiler_fn: Union[str, CompilerFn]) -> CompilerFn:
    """Turn a backend name into its compiler function; callables pass through unchanged.

    Raises :class:`kiln.exc.InvalidBackend` for an unknown name (the message lists the
    known ones) or for a backend that cannot run on this machine (saying what is missing).
    """
    if not isinstance(compiler_fn, str):
        if not callable(compiler_fn):
            raise InvalidBackend(
                f"backend must be a name or a callable, got {type(compiler_fn).__name__}",
                why="a backend is callable(gm, example_inputs) -> callable",
                where=user_location(),
                hint=f"use one of {list_backends(exclude_tags=None)} or pass a function",
            )
        return compiler_fn
    _ensure_builtins()
    fn = _COMPILER_FNS.get(compiler_fn)
    if fn is None:
        raise InvalidBackend(
            f"Invalid backend: {compiler_fn!r}",
            why="no backend is registered under that name",
            where=user_location(),
            hint=f"known backends: {', '.join(list_backends(exclude_tags=None))}",
        )
    reason = _unavailable_reason(compiler_fn)
    if reason is not None:
        raise InvalidBackend(
            f"backend {compiler_fn!r} is not available here",
            why=reason,
            where=user_location(),
            hint=f"install what is missing, or use one of: {', '.join(list_backends())}",
        )
    return fn


def list_backends(exclude_tags: Optional[Sequence[str]] = ("debug", "experimental")) -> list[str]:
    """Sorted names usable as ``kiln.compile(..., backend=name)``.

    Backends carrying any tag in ``exclude_tags`` are left out (``None`` or ``()``
    keeps all); backends unavailable on this machine are always left out.
    """
    _ensure_builtins()
    excluded = set(exclude_tags or ())
    return sorted(
        name
        for name in _COMPILER_FNS
        if not excluded.intersection(_TAGS.get(name, ()))
        and _unavailable_reason(name) is None
    )


def backend_name(compiler_fn: Any) -> str:
    """A readable name for a backend (registered name, class or function name)."""
    if isinstance(compiler_fn, str):
        return compiler_fn
    for name, fn in _COMPILER_FNS.items():
        if fn is compiler_fn:
            return name
    name = getattr(compiler_fn, "compiler_name", None) or getattr(compiler_fn, "__name__", None)
    return name or type(compiler_fn).__name__


@functools.lru_cache(None)
def _ensure_builtins() -> None:
    # NOTE: importing the package registers kiln's own backends; done lazily so that
    # `registry` can be imported on its own without a cycle.
    import kiln.backends  # noqa: F401


__all__ = [
    "DEFAULT_BACKEND",
    "register_backend",
    "register_debug_backend",
    "register_experimental_backend",
    "lookup_backend",
    "list_backends",
    "backend_name",
    "CompilerFn",
    "CompiledFn",
]
