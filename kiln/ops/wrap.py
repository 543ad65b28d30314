"""wrap(body, *args) and checkpoint(body, *args): regions that tracing inlines.

``wrap`` is a region marker: in eager and on fake tensors it calls ``body(*args)``; under
kiln's tracer and functionalization the body is inlined (its ops join the enclosing
graph), as PyTorch's AOT inlines its own wrap.

``checkpoint`` is an activation-checkpointed region (``torch.utils.checkpoint.checkpoint``
with ``use_reentrant=False``): in eager it runs PyTorch's checkpoint when gradients are
needed; traced, the body is inlined with its forward nodes tagged
``meta["recompute"] = "must_recompute"`` (and ``meta["ac_graph_id"]``), so kiln's
partitioners recompute them in backward instead of saving them.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable

import torch

from kiln.ops.base import HigherOrderOperator


class _Region(HigherOrderOperator):
    def check_args(self, body: Callable = None, *args: Any, **kwargs: Any) -> None:
        if not callable(body):
            raise TypeError(f"{self.__name__} needs a callable, got {body!r}")


wrap = _Region("wrap")
checkpoint = _Region("checkpoint")
_REGION_IDS = itertools.count(1)


@wrap.py_impl("eager")
def _wrap_eager(body: Callable, *args: Any, **kwargs: Any) -> Any:
    return body(*args, **kwargs)


wrap.py_impl("fake")(_wrap_eager)


def _inline(mode: Any, body: Callable, *args: Any, **kwargs: Any) -> Any:
    with mode:
        return body(*args, **kwargs)


wrap.py_impl("trace")(_inline)
wrap.py_impl("functionalize")(_inline)


@checkpoint.py_impl("eager")
def _checkpoint_eager(body: Callable, *args: Any, **kwargs: Any) -> Any:
    from kiln.ops.base import _has_fake

    if _has_fake(args, kwargs) or not torch.is_grad_enabled():
        return body(*args, **kwargs)
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    return torch_checkpoint(body, *args, use_reentrant=False, **kwargs)


@checkpoint.py_impl("fake")
def _checkpoint_fake(body: Callable, *args: Any, **kwargs: Any) -> Any:
    return body(*args, **kwargs)


def _checkpoint_traced(mode: Any, body: Callable, *args: Any, **kwargs: Any) -> Any:
    from kiln.tracing.tracer import _RECOMPUTE_REGIONS, recompute_region

    # NOTE: a region inside a region keeps the outer id (one region to recompute).
    rid = _RECOMPUTE_REGIONS[-1] if _RECOMPUTE_REGIONS else next(_REGION_IDS)
    with recompute_region(rid), mode:
        return body(*args, **kwargs)


checkpoint.py_impl("trace")(_checkpoint_traced)
checkpoint.py_impl("functionalize")(_checkpoint_traced)

__all__ = ["wrap", "checkpoint"]
