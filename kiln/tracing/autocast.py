"""Autocast regions as data: what captured graphs, generated code and AOT call.

In:  a region's values ``(device_type, dtype, enabled, cache_enabled)`` (those of
     ``torch.autocast``; ``cache_enabled=None`` reads the global setting), or the state a
     region found on entry (``prev``: enabled, dtype, cache_enabled of its device).
Out: the thread-local autocast state changed as ``torch.autocast.__enter__`` /
     ``__exit__`` change it (nesting count and cache included).

A region entered and left inside one graph is a pair of nodes, exactly as PyTorch
records it: ``torch.amp._enter_autocast(*values) -> mode`` and
``torch.amp._exit_autocast(mode)``.  Tracing such a graph (make_fx / AOT) runs those
calls, so the dispatcher applies autocast to the ops in between and the ATen graph
holds the casts explicitly (no autocast state is needed to run it).  A region that a
graph break cuts in two keeps the state set across the break (as grad mode is): the
second part leaves it with :class:`AutocastExit`, an ``__exit__`` that restores the
recorded ``prev`` state without needing the mode object of the first part.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
import torch.fx as fx


def _enter_impl(*vals: Any) -> Any:
    mode = torch.autocast(*vals)
    mode.__enter__()
    return mode


def _exit_impl(mode: Any) -> None:
    mode.__exit__(None, None, None)


# NOTE: PyTorch's own graph functions where this torch has them (fx and its backends know
# them as side-effectful); the same behaviour written out otherwise.
enter_autocast = getattr(torch.amp, "_enter_autocast", None) or _enter_impl
exit_autocast = getattr(torch.amp, "_exit_autocast", None) or _exit_impl


def restore_autocast(device: str, enabled: bool, dtype: torch.dtype, cache_enabled: bool) -> None:
    """Leave a region of ``device`` as ``torch.autocast.__exit__`` does, back to the
    recorded state (``enabled``, ``dtype``, ``cache_enabled``) the region found."""
    if torch.autocast_decrement_nesting() == 0:
        torch.clear_autocast_cache()
    torch.set_autocast_enabled(device, enabled)
    torch.set_autocast_dtype(device, dtype)
    torch.set_autocast_cache_enabled(cache_enabled)


for _fn in (enter_autocast, exit_autocast, restore_autocast):
    # NOTE: graph nodes with an effect and no users (a region re-entered at the end of a
    # graph) must survive fx's dead-code elimination.
    fx.node._side_effectful_functions.add(_fn)


class AutocastExit:
    """The ``__exit__`` of a region entered before a graph break: restores ``prev``.

    ``values`` are the region's own (to enter it again), ``prev`` the state it found.
    Plain data (compared by value), so that a resume function receiving one is guarded on
    its fields, not on its identity."""

    __slots__ = ("values", "prev")

    def __init__(self, values: tuple, prev: tuple):
        self.values = tuple(values)
        self.prev = tuple(prev)

    @property
    def device(self) -> str:
        return self.values[0]

    def __call__(self, *exc: Any) -> None:
        restore_autocast(self.device, *self.prev)

    def __repr__(self) -> str:
        return f"AutocastExit(values={self.values!r}, prev={self.prev!r})"


def region_state(device: str) -> tuple:
    """(enabled, dtype, cache_enabled) of ``device`` now: what a region entering would save."""
    return (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device), torch.is_autocast_cache_enabled())


@contextlib.contextmanager
def no_autocast_cache() -> Iterator[None]:
    """Tracing: no cached casts (a cache entry would hold a fake tensor, and a cast served
    from the cache is no node of the graph)."""
    prev = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(prev)


def without_autocast() -> Any:
    """A context in which the dispatcher applies no autocast (nothing to do when none is on):
    ATen graphs traced under autocast hold their casts already and must run as traced."""
    if torch._C._is_any_autocast_enabled():
        return torch._C._DisableAutocast()
    return contextlib.nullcontext()


def autocast_key() -> Optional[tuple]:
    """The autocast state a trace depends on (None when autocast is off), for cache keys."""
    if not torch._C._is_any_autocast_enabled():
        return None
    return tuple((d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d))


__all__ = ["enter_autocast", "exit_autocast", "restore_autocast", "AutocastExit", "region_state",
           "no_autocast_cache", "without_autocast", "autocast_key"]
