"""View bookkeeping for functionalization: view steps, replay, and inverse scatters.

A view is remembered as a chain of steps from its base.  A step is an
``OpOverload`` applied to the previous tensor with the op's non-tensor
arguments (and, for multi-output views such as ``split``, which output).
Replaying the chain on the base's *current* value regenerates the view after
the base was mutated.  Writing a new value into a view goes the other way: each
step has an inverse "scatter" op (``slice`` -> ``slice_scatter``...); steps
without one (``expand``, ``unfold``...) fall back to ``as_strided_scatter`` on
the base, using the view's geometry relative to a contiguous base.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

aten = torch.ops.aten


@dataclass(frozen=True)
class ViewStep:
    """One view op: ``op(prev, *args, **kwargs)`` (``[index]`` for multi-output views)."""

    op: Any
    args: tuple
    kwargs: dict
    index: Optional[int] = None
    # NOTE: made by a decomposition of another view op (``diagonal`` as ``as_strided``), whose
    # arguments it computed from its input's own geometry.
    decomposed: bool = False

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        out = self.op(t, *self.args, **self.kwargs)
        return out[self.index] if self.index is not None else out


def replay(value: torch.Tensor, chain: tuple) -> torch.Tensor:
    """Apply every step of ``chain`` to ``value``."""
    for step in chain:
        value = step.apply(value)
    return value


def _arg(step: ViewStep, i: int, name: str, default: Any) -> Any:
    if len(step.args) > i:
        return step.args[i]
    return step.kwargs.get(name, default)


def _inv_view(prev, new, step):
    return aten.view.default(new, list(prev.shape))


def _inv_identity(prev, new, step):
    return new


def _inv_slice(prev, new, step):
    dim = _arg(step, 0, "dim", 0)
    start = _arg(step, 1, "start", None)
    end = _arg(step, 2, "end", None)
    st = _arg(step, 3, "step", 1)
    return aten.slice_scatter.default(prev, new, dim, start, end, st)


def _inv_select(prev, new, step):
    return aten.select_scatter.default(prev, new, _arg(step, 0, "dim", 0), _arg(step, 1, "index", 0))


def _inv_diagonal(prev, new, step):
    return aten.diagonal_scatter.default(
        prev, new, _arg(step, 0, "offset", 0), _arg(step, 1, "dim1", 0), _arg(step, 2, "dim2", 1)
    )


def _inv_as_strided(prev, new, step):
    return aten.as_strided_scatter.default(prev, new, *step.args, **step.kwargs)


def _inv_transpose(prev, new, step):
    return aten.transpose.int(new, _arg(step, 0, "dim0", 0), _arg(step, 1, "dim1", 1))


def _inv_t(prev, new, step):
    return aten.t.default(new)


def _inv_permute(prev, new, step):
    dims = [d % prev.dim() for d in _arg(step, 0, "dims", ())]
    inverse = [0] * len(dims)
    for i, d in enumerate(dims):
        inverse[d] = i
    return aten.permute.default(new, inverse)


def _inv_unbind(prev, new, step):
    return aten.select_scatter.default(prev, new, _arg(step, 0, "dim", 0), step.index)


def _inv_split(prev, new, step):
    dim = _arg(step, 1, "dim", 0)
    size = _arg(step, 0, "split_size", 1)
    start = step.index * size
    return aten.slice_scatter.default(prev, new, dim, start, start + new.shape[dim], 1)


def _inv_split_with_sizes(prev, new, step):
    sizes = _arg(step, 0, "split_sizes", ())
    dim = _arg(step, 1, "dim", 0)
    start = sum(sizes[: step.index])
    return aten.slice_scatter.default(prev, new, dim, start, start + sizes[step.index], 1)


def _inv_view_as_real(prev, new, step):
    return aten.view_as_complex.default(new)


def _inv_view_as_complex(prev, new, step):
    return aten.view_as_real.default(new)


def _inv_view_dtype(prev, new, step):
    return aten.view.dtype(new, prev.dtype)


# NOTE: a table keyed by op: each entry maps (prev, new_view_value, step) -> new prev.
INVERSES: dict[Any, Callable] = {
    aten.view.default: _inv_view,
    aten._unsafe_view.default: _inv_view,
    aten._reshape_alias.default: _inv_view,
    aten.squeeze.default: _inv_view,
    aten.squeeze.dim: _inv_view,
    aten.squeeze.dims: _inv_view,
    aten.unsqueeze.default: _inv_view,
    aten.alias.default: _inv_identity,
    aten.detach.default: _inv_identity,
    aten.slice.Tensor: _inv_slice,
    aten.select.int: _inv_select,
    aten.diagonal.default: _inv_diagonal,
    aten.as_strided.default: _inv_as_strided,
    aten.transpose.int: _inv_transpose,
    aten.t.default: _inv_t,
    aten.permute.default: _inv_permute,
    aten.unbind.int: _inv_unbind,
    aten.split.Tensor: _inv_split,
    aten.split_with_sizes.default: _inv_split_with_sizes,
    aten.view_as_real.default: _inv_view_as_real,
    aten.view_as_complex.default: _inv_view_as_complex,
    aten.view.dtype: _inv_view_dtype,
}

# NOTE: in-place view ops change a tensor's metadata, not its data.  Each maps to
# the out-of-place view op whose step is appended to the tensor's chain.
INPLACE_VIEWS: dict[Any, Any] = {
    aten.transpose_.default: aten.transpose.int,
    aten.t_.default: aten.t.default,
    aten.unsqueeze_.default: aten.unsqueeze.default,
    aten.squeeze_.default: aten.squeeze.default,
    aten.squeeze_.dim: aten.squeeze.dim,
    aten.squeeze_.dims: aten.squeeze.dims,
    aten.as_strided_.default: aten.as_strided.default,
    aten.swapdims_.default: aten.transpose.int,
    aten.swapaxes_.default: aten.transpose.int,
    aten.detach_.default: aten.detach.default,
}


def is_view_op(op: Any) -> bool:
    """True when ``op`` returns an alias of its first argument without writing to it."""
    schema = getattr(op, "_schema", None)
    if schema is None or not schema.arguments:
        return False
    a0 = schema.arguments[0].alias_info
    if a0 is None or a0.is_write:
        return False
    return any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)


def scatter_chain(base_value: torch.Tensor, chain: tuple, new: torch.Tensor,
                  geometry: Optional[tuple]) -> torch.Tensor:
    """The base value after writing ``new`` into the view ``replay(base_value, chain)``.

    ``geometry`` is (size, stride, storage_offset) of the view relative to a
    contiguous base; used when some step has no inverse in INVERSES.
    """
    if all(step.op in INVERSES for step in chain):
        prevs = [base_value]
        for step in chain[:-1]:
            prevs.append(step.apply(prevs[-1]))
        for step, prev in zip(reversed(chain), reversed(prevs)):
            new = INVERSES[step.op](prev, new, step)
        return new
    assert geometry is not None
    size, stride, offset = geometry
    base_c = base_value
    if not base_value.is_contiguous():
        base_c = aten.clone.default(base_value, memory_format=torch.contiguous_format)
    return aten.as_strided_scatter.default(base_c, new, list(size), list(stride), offset)
