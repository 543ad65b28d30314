"""Tracing one backward into an fx graph.

In:  a :class:`~kiln.compiled_autograd.walk.Plan`.  Out: ``(gm, outputs)``: a GraphModule
``forward(self, inputs: list, hooks: list)`` whose outputs are the new ``.grad`` values
(and ``autograd.grad``'s results), and ``outputs``, what each output is for
(``("grad", leaf)``, ``("retain", i)``, ``("result", k)``).

How: the nodes run for real, in the plan's order, under kiln's dispatch-level tracer
(kiln.tracing), which records the ATen ops each node's backward runs.  ``inputs[i]``
unpacks to ``getitem`` nodes bound to the incoming gradients, saved tensors and old
``.grad``\\ s; a saved tensor that a node unpacks as a new tensor object (saved outputs
are) is found by its storage.  Hooks are not run while tracing: each becomes one
opaque call (``call_hook(hooks[k], grad)``) whose traced value is a copy of its input.
Accumulation into a fresh ``.grad`` is ``torch.clone`` (strides as eager's
AccumulateGrad gives them), into an existing one an in-place ``add_``.

Invariants: tracing changes no user state (no ``.grad``, no hook call, no mutation of an
input: an op that would mutate one stops the trace first).  Anything the graph could
not reproduce on the next call (a tensor read from outside its inputs, a value read
into Python, a sparse gradient) raises NotTraceable.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch.utils._python_dispatch import _disable_current_modes

from kiln.compiled_autograd import hooks as H
from kiln.compiled_autograd.walk import (ACCUMULATE, CPP, KILN_AOT, PYTHON, NodeRec, NotTraceable, Plan,
                                         is_dense, storage_key)
from kiln.tracing.dce import eliminate_dead_code
from kiln.tracing.tracer import Tracer, TracingMode

# ops whose result is read into Python (the graph would bake the value in)
_DATA_DEPENDENT = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.nonzero.default,
}


class _Mode(TracingMode):
    """kiln's tracing mode, refusing what a compiled backward could not repeat."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DATA_DEPENDENT:
            raise NotTraceable(f"a backward reads a tensor's value into Python ({func})")
        schema = func._schema
        if schema.is_mutable:
            for a, v in zip(schema.arguments, args):
                if a.alias_info is not None and a.alias_info.is_write and isinstance(v, torch.Tensor) \
                        and self.tracer.is_input(v):
                    raise NotTraceable(f"a backward mutates its gradient or saved tensor in place ({func})")
        out = super().__torch_dispatch__(func, types, args, kwargs)
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor) and o.layout != torch.strided:
                raise NotTraceable(f"a backward produces a {o.layout} gradient ({func})")
        return out


class CATracer(Tracer):
    """kiln's tracer with the graph's inputs known up front; see the module docstring."""

    def __init__(self, plan: Plan):
        super().__init__(None)
        self.mode = _Mode(self)
        self.plan = plan
        g = self.graph
        self.inputs_ph = g.placeholder("inputs")
        self.hooks_ph = g.placeholder("hooks")
        self.input_nodes: list[fx.Node] = []
        for i, t in enumerate(plan.inputs):
            node = g.call_function(operator.getitem, (self.inputs_ph, i))
            self.bind(t, node)
            self.input_nodes.append(node)
        self._input_set = set(self.input_nodes)
        self._hook_nodes: dict[int, fx.Node] = {}

    def is_input(self, t: torch.Tensor) -> bool:
        node = self.node_of_tensor(t)
        if node is None:
            i = self.plan.by_storage.get(storage_key(t))
            return i is not None
        return node in self._input_set

    def lift_constant(self, value: Any, prefix: str = "_tensor_constant") -> fx.Node:
        if isinstance(value, torch.Tensor):
            i = self.plan.by_storage.get(storage_key(value))
            if i is not None:
                node = self.input_nodes[i]
                self._tensor_nodes[id(value)] = (value, node)
                return node
            # NOTE: a 0-dim CPU tensor made inside a C++ formula from a saved scalar (which
            # is part of the cache key) is a constant of this graph.  Anything else read
            # from outside the inputs could change before the next call.
            if value.dim() != 0 or value.device.type != "cpu":
                raise NotTraceable(f"a backward reads a tensor of shape {tuple(value.shape)} that is "
                                   f"neither a gradient nor a saved tensor of the graph")
        return super().lift_constant(value, prefix)

    def hook_node(self, k: int) -> fx.Node:
        node = self._hook_nodes.get(k)
        if node is None:
            node = self.graph.call_function(operator.getitem, (self.hooks_ph, k))
            self._hook_nodes[k] = node
        return node

    def opaque(self, target: Callable, args: tuple, value: Any, name: str) -> Any:
        """Record ``target(*args)`` as one node whose traced value is ``value``
        (a ``_HookRef(k)`` argument stands for ``hooks[k]``)."""
        args = tuple(self.hook_node(a.k) if isinstance(a, _HookRef) else self.proxy_tree(a) for a in args)
        node = self.graph.create_node("call_function", target, args, {}, name=name)
        self.bind_outputs(node, value)
        return value


def _copy(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        with _disable_current_modes():
            return x.clone()
    return x


# ---- per-kind rules ----------------------------------------------------------------------

def _apply_cpp(tr: CATracer, rec: NodeRec, grads: list) -> list:
    out = rec.node(*grads)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _materialize(rec: NodeRec, grads: list) -> list:
    out = []
    for g, m in zip(grads, rec.node._input_metadata):
        if g is None:
            g = torch.zeros(tuple(m.shape), dtype=m.dtype, device=m.device)
        out.append(g)
    return out


def _to_edges(rec: NodeRec, result: Any) -> list:
    """A Python backward's results (one per forward argument) onto the node's edges."""
    res = list(result) if isinstance(result, (tuple, list)) else [result]
    n_edges = len(rec.edges)
    if len(res) == n_edges:
        return res
    needs = list(rec.node.needs_input_grad)
    if len(res) != len(needs):
        raise NotTraceable(f"{rec.node.name()}: backward returned {len(res)} values for "
                           f"{len(needs)} inputs")
    wanted = [g for g, need in zip(res, needs) if need]
    out: list = []
    for m, _ in rec.node.next_functions:
        out.append(wanted.pop(0) if m is not None and wanted else None)
    return out


def _apply_python(tr: CATracer, rec: NodeRec, grads: list) -> list:
    return _to_edges(rec, rec.node.apply(*_materialize(rec, grads)))


def _apply_kiln_aot(tr: CATracer, rec: NodeRec, grads: list) -> list:
    from kiln.aot.runtime import _merge_saved

    node = rec.node
    art = node._forward_cls._kiln_artifact
    rg = list(art.meta.fw_out_requires_grad)
    tangents = []
    for g, r, f in zip(grads, rg, art.meta.fw_out_fakes):
        if not r:
            continue
        if g is None:
            g = torch.zeros(tuple(f.shape), dtype=f.dtype, device=f.device)
        tangents.append(g.contiguous())
    # NOTE: the backward *graph* (ATen ops) is traced, not the compiled backward: a
    # generated kernel is invisible to the dispatcher.
    outs = art.bw_gm(*_merge_saved(node), *tangents)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    result: list = [None] * art.num_inputs
    for i, g in zip(art.grad_map, outs):
        result[i] = g
    return _to_edges(rec, result)


_APPLY = {CPP: _apply_cpp, PYTHON: _apply_python, KILN_AOT: _apply_kiln_aot}


def _accumulate(tr: CATracer, rec: NodeRec, grad: Optional[torch.Tensor], outputs: list,
                values: list) -> None:
    if grad is None:
        return
    var = rec.variable
    if rec.grad_input is None:
        # NOTE: eager's AccumulateGrad gives a fresh .grad the leaf's strides when the leaf
        # is dense, else contiguous ones.
        dense = is_dense(var)
        if dense and grad.stride() == var.stride():
            new = tr.opaque(torch.clone, (grad,), _copy(grad), "new_grad")
        elif dense:
            with _disable_current_modes():
                val = torch.empty_strided(var.shape, var.stride(), dtype=grad.dtype, device=grad.device)
                val.copy_(grad)
            new = tr.opaque(_clone_strided, (grad, tuple(var.stride())), val, "new_grad")
        else:
            with _disable_current_modes():
                val = grad.clone(memory_format=torch.contiguous_format)
            new = tr.opaque(_clone_contiguous, (grad,), val, "new_grad")
        outputs.append(("grad", rec.leaf))
        values.append(new)
    else:
        old = tr.plan.inputs[rec.grad_input]
        with _disable_current_modes():
            val = old + grad
        node = tr.graph.call_method("add_", (tr.input_nodes[rec.grad_input], tr.proxy_of(grad)))
        tr.bind(val, node)
        new = val
    for k in rec.post_acc_hooks:
        tr.opaque(H.call_post_acc_hook, (_HookRef(k), tr.plan.inputs[rec.var_input], new), None,
                  "post_acc_hook")


def _clone_strided(grad: torch.Tensor, stride: tuple) -> torch.Tensor:
    out = torch.empty_strided(grad.shape, stride, dtype=grad.dtype, device=grad.device)
    return out.copy_(grad)


def _clone_contiguous(grad: torch.Tensor) -> torch.Tensor:
    return torch.clone(grad, memory_format=torch.contiguous_format)


class _HookRef:
    """Stands for ``hooks[k]`` in an opaque call's arguments."""

    def __init__(self, k: int):
        self.k = k


def _validate(grad: Optional[torch.Tensor], meta: Any) -> Optional[torch.Tensor]:
    """Eager's check of a gradient against the input it flows into (under the tracer)."""
    if grad is None:
        return None
    shape = tuple(meta.shape)
    if tuple(grad.shape) != shape:
        try:
            grad = grad.sum_to_size(shape) if shape else grad.sum()
        except RuntimeError as e:
            raise NotTraceable(f"a gradient of shape {tuple(grad.shape)} does not fit {shape}: {e}") from e
    if grad.dtype != meta.dtype:
        grad = grad.to(meta.dtype)
    if grad.device != meta.device:
        grad = grad.to(meta.device)
    return grad


def _add(a: Optional[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
    return b if a is None else a + b


def trace(plan: Plan) -> tuple[fx.GraphModule, list]:
    tr = CATracer(plan)
    recs = plan.recs
    buffers: list[list] = [[None] * r.num_inputs for r in recs]
    outputs: list = []
    values: list = []
    results: list = [None] * plan.num_results
    prev = torch.is_grad_enabled()
    with tr, tr.mode:
        torch._C._set_grad_enabled(False)
        try:
            for ri, nr, gi in plan.roots:
                if gi is not None:
                    g = _validate(plan.inputs[gi], recs[ri].node._input_metadata[nr])
                    buffers[ri][nr] = _add(buffers[ri][nr], g)
            for ri, rec in enumerate(recs):
                _run_node(tr, rec, buffers, ri, outputs, values, results)
        finally:
            torch._C._set_grad_enabled(prev)
    for k, r in enumerate(results):
        if r is not None:
            outputs.append(("result", k))
            values.append(r)
    tr.graph.output(tuple(tr.proxy_of(v) for v in values))
    root = torch.nn.Module()
    for name, value in tr.constants.items():
        setattr(root, name, value)
    gm = fx.GraphModule(root, tr.graph, class_name="CompiledAutograd")
    gm = eliminate_dead_code(gm)
    return gm, outputs


def _run_node(tr: CATracer, rec: NodeRec, buffers: list, ri: int, outputs: list, values: list,
              results: list) -> None:
    grads = buffers[ri]
    buffers[ri] = None  # NOTE: freed as eager frees a node's input buffer
    for slot, hook_ids in rec.tensor_pre_hooks.items():
        for k in hook_ids:
            if grads[slot] is not None:
                grads[slot] = tr.opaque(H.call_hook, (_HookRef(k), grads[slot]), _copy(grads[slot]),
                                        "call_hook")
    for slot, (idx, old_input) in rec.retains.items():
        g = grads[slot]
        if g is None:
            continue
        if old_input is None:
            with _disable_current_modes():
                val = g.clone(memory_format=torch.contiguous_format)
            new = tr.opaque(_clone_contiguous, (g,), val, "retained_grad")
        else:
            new = torch.add(tr.plan.inputs[old_input], g)
        outputs.append(("retain", idx))
        values.append(new)
    for slot, k in rec.captures:
        results[k] = grads[slot]
    if not rec.needed:
        return
    for k in rec.pre_hooks:
        grads = list(tr.opaque(H.call_prehook, (_HookRef(k), *grads), tuple(_copy(g) for g in grads),
                               "call_prehook"))
    if rec.kind == ACCUMULATE:
        _accumulate(tr, rec, grads[0], outputs, values)
        out: list = []
    else:
        try:
            out = _APPLY[rec.kind](tr, rec, grads)
        except NotTraceable as e:
            raise NotTraceable(f"{rec.node.name()}: {e.why}") from None
        if len(out) != len(rec.edges):
            raise NotTraceable(f"{rec.node.name()} returned {len(out)} gradients for {len(rec.edges)} edges")
    for k in rec.post_hooks:
        n_out = len(out)
        out = list(tr.opaque(H.call_posthook, (_HookRef(k), n_out, *out, *grads),
                             tuple(_copy(g) for g in out), "call_posthook"))
    for g, edge in zip(out, rec.edges):
        if g is None or edge is None:
            continue
        j, nr = edge
        g = _validate(g, tr.plan.recs[j].node._input_metadata[nr])
        buf = buffers[j]
        if buf is None:
            raise NotTraceable("a gradient reaches a node that already ran")
        buf[nr] = _add(buf[nr], g)


__all__ = ["trace", "CATracer"]
