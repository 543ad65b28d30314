"""Mapping mutating ATen ops to functional ones.

For an op that writes to some of its arguments (``add_``, ``add.out``,
``_native_batch_norm_legit``...) we look for a functional sibling in the same
namespace whose schema takes the same non-``out`` arguments and returns, in
order, the op's non-aliased results followed by the new value of each written
argument (``add_`` -> ``add``, ``add.out`` -> ``add.Tensor``,
``_native_batch_norm_legit`` -> ``_native_batch_norm_legit_functional``).
Ops with no such sibling (e.g. custom ops) are run on clones of the written
arguments inside the graph: still free of mutations of graph inputs and of
aliases, and correct.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import torch

aten = torch.ops.aten


@dataclass(frozen=True)
class MutationPlan:
    """How to run a mutating op functionally.

    ``functional`` is the sibling op (None: clone-and-mutate fallback);
    ``drop`` are the positions of kwarg-only out arguments removed from the call;
    ``written`` are the positions (in the op's schema) of written arguments;
    ``n_plain`` the number of the op's results that alias no argument.
    """

    functional: Optional[Any]
    drop: tuple
    written: tuple
    n_plain: int


def written_args(op: Any) -> tuple:
    schema = op._schema
    return tuple(
        i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write
    )


def is_mutating(op: Any) -> bool:
    schema = getattr(op, "_schema", None)
    return schema is not None and bool(written_args(op))


def _sig(args) -> list:
    return [(a.name, str(a.type)) for a in args]


def _overloads(ns: str, name: str):
    packet = getattr(getattr(torch.ops, ns), name, None)
    if packet is None:
        return []
    out = []
    for ov in packet.overloads():
        try:
            out.append(getattr(packet, ov))
        except Exception:  # noqa: BLE001 - some overloads fail to materialize
            continue
    return out


@functools.lru_cache(maxsize=None)
def plan_for(op: Any) -> MutationPlan:
    """The MutationPlan of a mutating op (cached per op)."""
    schema = op._schema
    written = written_args(op)
    drop = tuple(i for i in written if schema.arguments[i].kwarg_only)
    kept = [a for i, a in enumerate(schema.arguments) if i not in drop]
    n_plain = sum(1 for r in schema.returns if r.alias_info is None or not r.alias_info.is_write)
    want_returns = n_plain + len(written)
    ns, name = schema.name.split("::")
    stem = name[:-1] if name.endswith("_") else name
    candidates = _overloads(ns, stem) + _overloads(ns, stem + "_functional")
    for cand in candidates:
        cs = cand._schema
        if any(a.alias_info is not None for a in cs.arguments):
            continue
        if any(r.alias_info is not None for r in cs.returns):
            continue
        if _sig(cs.arguments) != _sig(kept) or len(cs.returns) != want_returns:
            continue
        return MutationPlan(cand, drop, written, n_plain)
    return MutationPlan(None, drop, written, n_plain)
