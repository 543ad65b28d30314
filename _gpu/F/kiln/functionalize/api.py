"""functionalize(fn) and the output analysis shared with kiln.aot."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.utils._pytree as pytree

from kiln.functionalize.metadata import (
    ALIAS_OF_INPUT,
    ALIAS_OF_INTERMEDIATE,
    ALIAS_OF_OUTPUT,
    IS_INPUT,
    PLAIN,
    FunctionalMetadata,
    OutputInfo,
)
from kiln.functionalize.mode import FunctionalizeMode

aten = torch.ops.aten


def describe_outputs(mode: FunctionalizeMode, outs: list) -> tuple[list, list]:
    """OutputInfo for each flat output, and the intermediate bases to return too.

    Returns (infos, bases): ``bases`` are the Base records of the intermediates
    some output is a view of (ALIAS_OF_INTERMEDIATE's base_index indexes this
    list); ``base.value`` is what the graph returns, ``base.handle`` its tensor.
    """
    infos, bases, base_ids = [], [], {}
    plain_bases = {}
    for i, o in enumerate(outs):
        if isinstance(o, torch.Tensor):
            r = mode.rec(o)
            if not r.chain and r.base.input_index is None:
                plain_bases.setdefault(id(r.base), i)
    for o in outs:
        if not isinstance(o, torch.Tensor):
            infos.append(OutputInfo(is_tensor=False))
            continue
        r = mode.rec(o)
        info = OutputInfo(requires_grad=o.requires_grad)
        base = r.base
        if _custom_autograd_view(o) or _symbolic_chain(r.chain):
            # NOTE: a view made by a custom autograd.Function (returning an input)
            # has that Function's backward; replaying the view would bypass it.
            # A view with symbolic sizes cannot be re-played on real tensors.
            infos.append(info)
            continue
        if base.input_index is not None and not base.external:
            in_info = mode.input_info[base.input_index]
            if r.handle is base.handle and not r.chain and not in_info.mutates_metadata:
                info.kind, info.base_index = IS_INPUT, base.input_index
            elif not in_info.mutates_storage and not in_info.mutates_metadata:
                info.kind, info.base_index, info.chain = ALIAS_OF_INPUT, base.input_index, r.chain
        elif r.chain and not base.external and not mode.rec(base.handle).chain \
                and base.handle.requires_grad == o.requires_grad:
            # NOTE: a base whose own handle had an in-place view op (unsqueeze_)
            # no longer matches its value; such outputs are returned as plain values.
            # NOTE: (checked above) a base made inside a decomposition is invisible
            # to autograd; views of it that require grad are returned as plain values.
            if id(base) in plain_bases:
                info.kind, info.base_index, info.chain = ALIAS_OF_OUTPUT, plain_bases[id(base)], r.chain
            else:
                if id(base) not in base_ids:
                    base_ids[id(base)] = len(bases)
                    bases.append(base)
                info.kind, info.base_index, info.chain = ALIAS_OF_INTERMEDIATE, base_ids[id(base)], r.chain
        infos.append(info)
    return infos, bases


def _symbolic_chain(chain: tuple) -> bool:
    """True when a view step has symbolic sizes: it cannot be re-played on real
    tensors at run time, so the output is returned by the graph instead."""
    leaves = pytree.tree_leaves([(s.args, s.kwargs) for s in chain])
    return any(isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)) for x in leaves)


def _custom_autograd_view(t: torch.Tensor) -> bool:
    return t.requires_grad and isinstance(t.grad_fn, torch.autograd.function.BackwardCFunction)


def functionalize(fn: Callable, *, write_back: str = "copy_",
                  decompositions: Optional[dict] = None) -> Callable:
    """Wrap ``fn`` so that, traced by make_fx, it records only functional ops.

    write_back: "copy_" appends ``input.copy_(new_value)`` for every mutated
    input (the graph then mutates its inputs only at the very end);
    "outputs" returns ``(outputs, [new values of mutated inputs])`` instead.
    The wrapper's ``.metadata`` is the FunctionalMetadata of its last call.
    Outputs that are views are returned as plain values (the graph is functional).
    """
    if write_back not in ("copy_", "outputs"):
        raise ValueError(f"write_back must be 'copy_' or 'outputs', not {write_back!r}")

    def wrapped(*args, **kwargs):
        flat, spec = pytree.tree_flatten((args, kwargs))
        mode = FunctionalizeMode(decompositions)
        for i, t in enumerate(flat):
            if isinstance(t, torch.Tensor):
                mode.register_input(t, i)
        with mode:
            out = fn(*args, **kwargs)
        out_flat, out_spec = pytree.tree_flatten(out)
        infos, _ = describe_outputs(mode, out_flat)
        values = [mode.value_of(o) for o in out_flat]
        mutated = []
        for i, info in enumerate(mode.input_info):
            if info.mutated and mode.inputs[i] is not None:
                mutated.append((flat[i], mode.inputs[i].value))
        meta = FunctionalMetadata(inputs=mode.input_info, outputs=infos,
                                  grad_enabled_after=torch.is_grad_enabled())
        wrapped.metadata = meta
        result = pytree.tree_unflatten(values, out_spec)
        if write_back == "outputs":
            return result, [v for _, v in mutated]
        for inp, new in mutated:
            if tuple(new.shape) != tuple(inp.shape):
                aten.resize_.default(inp, list(new.shape))
            aten.copy_.default(inp, new)
        return result

    wrapped.metadata = None
    wrapped.__wrapped__ = fn
    return wrapped


__all__ = ["functionalize", "describe_outputs", "PLAIN", "IS_INPUT", "ALIAS_OF_INPUT",
           "ALIAS_OF_OUTPUT", "ALIAS_OF_INTERMEDIATE"]
