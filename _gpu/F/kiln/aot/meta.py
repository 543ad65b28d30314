"""Node metadata carried through AOT tracing.

kiln's tracer stamps every node with ``original_aten`` and ``seq_nr`` (the
autograd sequence number shared by a forward op and its backward).  When the
traced function is itself an fx GraphModule (a captured graph), its nodes'
source information (``source_fn_stack``, ``nn_module_stack``, ``stack_trace``)
is copied onto the ATen nodes each one produced, and backward nodes inherit it
from the forward node with the same ``seq_nr``.
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx

SOURCE_KEYS = ("source_fn_stack", "nn_module_stack", "stack_trace", "from_node")


class SourceMetaInterpreter(fx.Interpreter):
    """Runs a GraphModule and stamps the source meta of each node on the ATen
    nodes the active kiln tracer records while running it."""

    def run_node(self, n: fx.Node) -> Any:
        from kiln.tracing import current_tracer

        tracer = current_tracer()
        if tracer is None or n.op in ("placeholder", "output"):
            return super().run_node(n)
        last = tracer.graph._root.prev
        out = super().run_node(n)
        src = {k: n.meta[k] for k in SOURCE_KEYS if k in n.meta}
        if src:
            node = last.next
            while node is not tracer.graph._root:
                for k, v in src.items():
                    node.meta.setdefault(k, v)
                node = node.next
        return out


def propagate_meta(gm: fx.GraphModule) -> None:
    """Give backward nodes the source meta of their forward node (same seq_nr)."""
    fw_by_seq: dict = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.meta.get("autograd_backward"):
            continue
        seq = n.meta.get("seq_nr")
        if seq is not None and any(k in n.meta for k in SOURCE_KEYS):
            fw_by_seq.setdefault(seq, n)
    for n in gm.graph.nodes:
        if n.meta.get("autograd_backward"):
            fw = fw_by_seq.get(n.meta.get("seq_nr"))
            if fw is not None:
                for k in SOURCE_KEYS:
                    if k in fw.meta:
                        n.meta.setdefault(k, fw.meta[k])


def _iter_graph(roots: list):
    seen, stack = set(), [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)


def setup_stacktrace_preservation_hooks(roots: list) -> None:
    """Hook every autograd node reachable from ``roots`` so that, while it runs,
    ``torch.fx.traceback.current_meta`` names it (``in_grad_fn``, ``grad_fn_seq_nr``);
    the keys are removed again when it finishes."""
    import torch.fx.traceback as fx_traceback

    def prehook(seq_nr):
        def hook(grad_output):
            meta = fx_traceback.current_meta
            meta["in_grad_fn"] = meta.get("in_grad_fn", 0) + 1
            meta.setdefault("grad_fn_seq_nr", []).append(seq_nr)
        return hook

    def posthook(grad_input, grad_output):
        meta = fx_traceback.current_meta
        meta["in_grad_fn"] = meta.get("in_grad_fn", 1) - 1
        if meta["in_grad_fn"] <= 0:
            meta.pop("in_grad_fn", None)
        seqs = meta.get("grad_fn_seq_nr")
        if seqs:
            seqs.pop()
        if not seqs:
            meta.pop("grad_fn_seq_nr", None)

    for node in _iter_graph(roots):
        node.register_prehook(prehook(node._sequence_nr()))
        node.register_hook(posthook)
