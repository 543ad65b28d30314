"""kiln.codegen.causal_mask: constant attention masks that are the causal pattern become
``is_causal``; constant masks that hide nothing are dropped.

In:  a torch-level ``fx.GraphModule`` from capture (before AOT), whose
     ``scaled_dot_product_attention`` calls may take an ``attn_mask`` built in the graph.
Out: the same graph, where such a mask depends on no graph input (it is built from
     constants: ``arange`` of static sizes, comparisons, ``new_ones``, ``expand``...) and,
     evaluated once here, is exactly the causal pattern -- a bool mask equal to
     ``ones(L, L).tril()``, or an additive float mask that is 0 on and below the diagonal
     and ``-inf`` (or the dtype's most negative value) above it, broadcast over batch and
     heads -- the call takes ``is_causal=True`` and no mask.  A constant mask that hides
     nothing (bool all ``True``, additive all ``0``) is dropped: the call takes no mask.
     The mask's nodes that nothing else uses are removed.
"""
# NOTE: why.  Libraries build an explicit mask whenever they see a compiler: transformers'
# ``sdpa_mask`` skips its "no mask, is_causal=True" shortcut when
# ``torch.compiler.is_compiling()`` (it cannot tell there whether the mask may be
# dropped).  Eager GPT-2 then runs attention with ``is_causal=True`` and a compiled GPT-2
# runs it with a materialized [B, H, L, L] mask: the attention kernel reads the mask and
# cannot skip the masked-out blocks, about 10% of a GPT-2-small inference step on the
# GPU.  With static sizes the mask is a constant, so the question is decidable here.
# Symbolic sizes make the mask depend on a size input: it is left as it is.
# NOTE: why masks that hide nothing.  transformers (5.x) builds BERT's padding mask as an
# all-True bool tensor expanded over the query positions (last-dim stride 0) when it sees a
# compiler, and passes None in eager.  GPU fused attention kernels require the mask's last
# dim to have stride 1, so the compiled call fell to math attention (two bmm and a softmax
# over [B, H, L, L]) where eager runs the memory-efficient kernel.  Dropping a mask that
# masks nothing is exact.
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx

from kiln.passes import graph_pass

_SDPA = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)

# NOTE: a mask built from these is not a constant (random draws, uninitialized memory).
_NOT_CONSTANT = ("rand", "normal", "bernoulli", "dropout", "empty", "uniform", "multinomial",
                 "poisson", "exponential", "geometric", "cauchy", "random")

rewritten: int = 0   # NOTE: how many attention calls this pass changed in this process (tests)


def _mask_arg(n: fx.Node) -> tuple[Optional[fx.Node], bool]:
    """(the call's attn_mask node, whether the call already is causal)."""
    mask = n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None)
    causal = n.kwargs.get("is_causal", n.args[5] if len(n.args) > 5 else False)
    return (mask if isinstance(mask, fx.Node) else None), bool(causal)


def _constant_nodes(root: fx.Node) -> Optional[set]:
    """Every node ``root`` is computed from, or None if one is an input, an attribute
    (buffers can change between calls) or a draw that is not a constant."""
    seen: set = set()
    todo = [root]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        if n.op not in ("call_function", "call_method"):
            return None
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        if any(w in str(name).lower() for w in _NOT_CONSTANT):
            return None
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen


def _evaluate(gm: fx.GraphModule, nodes: set, root: fx.Node) -> Optional[torch.Tensor]:
    env: dict = {}
    try:
        for n in gm.graph.nodes:
            if n not in nodes:
                continue
            args = fx.node.map_arg(n.args, env.__getitem__)
            kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
            if n.op == "call_function":
                env[n] = n.target(*args, **kwargs)
            else:
                env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
    except Exception:  # noqa: BLE001 - whatever cannot be evaluated here stays in the graph
        return None
    out = env.get(root)
    return out if isinstance(out, torch.Tensor) else None


def is_causal_mask(m: torch.Tensor) -> bool:
    """Whether ``m`` (broadcast over its leading dims) is the causal mask of a square
    [L, L] attention: bool ``tril``, or additive 0 / very negative."""
    if m.dim() < 2 or m.shape[-1] != m.shape[-2] or m.shape[-1] < 2:
        return False
    L = m.shape[-1]
    keep = torch.ones(L, L, dtype=torch.bool, device=m.device).tril()
    if m.dtype == torch.bool:
        return bool((m == keep).all())
    if not m.is_floating_point():
        return False
    low = torch.finfo(m.dtype).min / 2
    return bool((m.masked_fill(~keep, 0) == 0).all()) and bool((m.masked_fill(keep, low) <= low).all())


def hides_nothing(m: torch.Tensor) -> bool:
    """Whether ``m`` is a mask that keeps every position: bool all True, additive all 0."""
    if m.dtype == torch.bool:
        return bool(m.all())
    return m.is_floating_point() and bool((m == 0).all())


def _classify(m: torch.Tensor) -> Optional[str]:
    """What a constant mask is: "causal", "none" (hides nothing), or None (keep it)."""
    if is_causal_mask(m):
        return "causal"
    return "none" if hides_nothing(m) else None


def _rewrite(n: fx.Node, kind: str) -> None:
    """Drop the call's mask; a causal one becomes ``is_causal=True``."""
    args, kwargs = list(n.args), dict(n.kwargs)
    if len(args) > 3:
        args[3] = None
    kwargs.pop("attn_mask", None)
    if kind == "causal":
        if len(args) > 5:
            args[5] = True
        else:
            kwargs["is_causal"] = True
    if len(args) <= 3:
        kwargs["attn_mask"] = None
    n.args, n.kwargs = tuple(args), kwargs


def _inplace(n: fx.Node) -> bool:
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    return str(name).endswith("_") and not str(name).endswith("__")


def _erase_unused(gm: fx.GraphModule, nodes: set) -> None:
    # NOTE: nodes the mask shares with the rest of the graph (the positions' arange) stay;
    # an in-place method stays too (its operand may be used elsewhere).
    for n in reversed(list(gm.graph.nodes)):
        if n in nodes and not n.users and not _inplace(n):
            gm.graph.erase_node(n)


@graph_pass("causal_mask")
def causal_masks_to_is_causal(gm: fx.GraphModule) -> fx.GraphModule:
    """The pass (see the module docstring)."""
    global rewritten
    folded: dict[fx.Node, Any] = {}     # mask node -> (its nodes, "causal" | "none") or None
    changed: list = []
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in _SDPA:
            continue
        mask, causal = _mask_arg(n)
        if mask is None or causal:
            continue
        if mask not in folded:
            nodes = _constant_nodes(mask)
            value = None if nodes is None else _evaluate(gm, nodes, mask)
            kind = None if value is None else _classify(value)
            folded[mask] = None if kind is None else (nodes, kind)
        if folded[mask] is not None:
            _rewrite(n, folded[mask][1])
            changed.append(mask)
    for mask in dict.fromkeys(changed):
        _erase_unused(gm, folded[mask][0])
    if changed:
        rewritten += len(changed)
        gm.recompile()
    return gm


__all__ = ["causal_masks_to_is_causal", "hides_nothing", "is_causal_mask"]
