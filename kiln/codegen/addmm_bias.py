"""kiln.codegen.addmm_bias: where a matmul's bias is added -- in the GEMM, or in the next kernel.

In:  a functional ATen ``fx.GraphModule`` (after AOT), whose ``aten.addmm`` calls were
     kept whole by the decomposition table.
Out: the same graph, where each ``addmm(bias, a, b)`` whose result is only read by
     pointwise ops (directly or through views) is ``mm(a, b) + bias`` (scaled by alpha
     and beta as ``addmm`` scales them); the others stay ``addmm`` (an extern GEMM that adds
     the bias in its epilogue).
"""
# NOTE: why.  Decomposed everywhere, the bias add is free where a kernel follows (the
# fc1 -> GELU or proj -> residual + layer norm of a transformer: one more load in a kernel
# that runs anyway), but where the matmul feeds another extern -- the qkv projection
# viewed as q, k, v for scaled_dot_product_attention -- the add became a kernel of its own
# that reads and writes the whole [B, T, 3D] activation (and materialised q, k, v
# contiguously), about 4% of a ViT-B/16 inference step on the H200.  PyTorch's inductor
# makes the same choice (its post-grad "unfuse bias add to pointwise" rule).
from __future__ import annotations

import torch
import torch.fx as fx

from kiln.passes import graph_pass

aten = torch.ops.aten

# NOTE: ops that only reinterpret memory: a pointwise op reading the result through them
# still takes the bias add into its kernel.
_VIEWS = frozenset({
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.expand.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.unsqueeze.default, aten.slice.Tensor, aten.select.int, aten.alias.default,
})

def _pointwise_use(n: fx.Node) -> bool:
    if n.op != "call_function":
        return False
    if n.target in _VIEWS:
        return bool(n.users) and all(_pointwise_use(u) for u in n.users)
    return isinstance(n.target, torch._ops.OpOverload) and torch.Tag.pointwise in n.target.tags


def _node(g: fx.Graph, op, args: tuple) -> fx.Node:
    node = g.call_function(op, args)
    vals = [a.meta["val"] if isinstance(a, fx.Node) else a for a in args]
    node.meta["val"] = op(*vals)   # NOTE: fake tensors dispatch to their own fake mode
    return node


def _unfuse(g: fx.Graph, n: fx.Node) -> None:
    bias, a, b = n.args[:3]
    beta, alpha = n.kwargs.get("beta", 1), n.kwargs.get("alpha", 1)
    with g.inserting_before(n):
        out = _node(g, aten.mm.default, (a, b))
        if alpha != 1:
            out = _node(g, aten.mul.Tensor, (out, alpha))
        if beta != 0:
            term = bias if beta == 1 else _node(g, aten.mul.Tensor, (bias, beta))
            out = _node(g, aten.add.Tensor, (out, term))
    out.meta.update({k: v for k, v in n.meta.items() if k != "val"})
    n.replace_all_uses_with(out)
    g.erase_node(n)


@graph_pass("addmm_bias")
def unfuse_addmm_bias(gm: fx.GraphModule) -> fx.GraphModule:
    """The pass (see the module docstring)."""
    g = gm.graph
    todo = [n for n in g.nodes if n.op == "call_function" and n.target is aten.addmm.default
            and all(isinstance(a, fx.Node) and "val" in a.meta for a in n.args[:3])
            and n.users and all(_pointwise_use(u) for u in n.users)]
    for n in todo:
        _unfuse(g, n)
    if todo:
        g.lint()
        gm.recompile()
    return gm


__all__ = ["unfuse_addmm_bias"]
