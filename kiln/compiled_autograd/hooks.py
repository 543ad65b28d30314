"""Hooks of the autograd graph: finding them from Python, and calling them from a graph.

In:  autograd nodes.  Out: the Python hooks that the eager engine would run around each
node, in its order: tensor pre-hooks per input slot, retained-grad tensors, node
pre-hooks, node post-hooks, and a leaf's post-accumulate-grad hooks.  The ``call_*``
functions are what a compiled-autograd graph calls (opaque nodes that run the hook at
run time, so its side effects happen on every backward).

Where each kind lives:

- a leaf's tensor hooks and post-accumulate-grad hooks: ``variable._backward_hooks`` and
  ``variable._post_accumulate_grad_hooks`` (``AccumulateGrad.variable`` is the leaf);
- node hooks (``grad_fn.register_hook`` / ``register_prehook``, which module full
  backward hooks use): read by probing, i.e. registering a no-op hook and reading the
  dict its handle points at (the node's one Python hook dict), then removing it;
- hooks on a non-leaf tensor and ``retain_grad()``: a node does not expose them to
  Python, so ``Tensor.register_hook`` / ``Tensor.retain_grad`` are wrapped (once, when
  this stage is imported) to note them in ``grad_fn.metadata``.

Installed when ``import kiln`` runs (kiln/__init__.py; a few attribute assignments), so
that hooks registered from then on are seen.  What came before cannot be read, so it is
refused instead: :func:`install_seq` lets the walk tell that a node was created before the
wrappers were in place (its autograd sequence number is below the thread's counter at
install time), and such a backward runs in the eager engine with that reason.  Node hooks
are counted as they are registered (``_HookMixin._register_hook``, which the C++
``register_hook``/``register_prehook`` of every node call), so that the walk probes nodes
only once some node hook exists.

NOTE: hooks registered from C++ (``add_post_hook`` of C++ extensions, DDP's reducer) are
invisible from Python; that is a documented limit.  So are hooks on nodes created before
install in a thread other than the one that imported kiln.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

import torch

TENSOR_HOOKS_KEY = "_kiln_ca_tensor_hooks"    # grad_fn.metadata: {output_nr: hooks dict}
RETAINS_GRAD_KEY = "_kiln_ca_retains_grad"    # grad_fn.metadata: {output_nr: weakref(tensor)}

_installed = False
# [node hooks registered since install, autograd sequence number at install (this thread)]
_state = [0, 0]


def install() -> None:
    """Wrap ``torch.Tensor.register_hook`` and ``retain_grad`` to note non-leaf hooks, and
    ``_HookMixin._register_hook`` to count node hooks (see the module docstring)."""
    global _installed
    if _installed:
        return
    _installed = True
    _state[1] = torch.autograd._get_sequence_nr()
    orig_register = torch.Tensor.register_hook
    orig_retain = torch.Tensor.retain_grad
    _count_node_hooks()

    def register_hook(self: torch.Tensor, hook: Callable) -> Any:
        handle = orig_register(self, hook)
        fn = self.grad_fn
        if fn is not None and self._backward_hooks is not None:
            fn.metadata.setdefault(TENSOR_HOOKS_KEY, {})[self.output_nr] = self._backward_hooks
        return handle

    def retain_grad(self: torch.Tensor) -> None:
        orig_retain(self)
        fn = self.grad_fn
        if fn is not None:
            fn.metadata.setdefault(RETAINS_GRAD_KEY, {})[self.output_nr] = weakref.ref(self)

    register_hook.__doc__ = orig_register.__doc__
    retain_grad.__doc__ = orig_retain.__doc__
    register_hook._kiln_orig_hook = orig_register
    torch.Tensor.register_hook = register_hook
    torch.Tensor.retain_grad = retain_grad


def _count_node_hooks() -> None:
    from torch.autograd.function import _HookMixin

    raw = _HookMixin.__dict__.get("_register_hook")
    if not isinstance(raw, staticmethod):
        # NOTE: another torch layout: registrations cannot be counted, so always probe.
        _state[0] = 1
        return
    orig = raw.__func__

    def _register_hook(backward_hooks: Any, hook: Callable) -> Any:
        if hook is not _probe_fn:
            _state[0] += 1
        return orig(backward_hooks, hook)

    _HookMixin._register_hook = staticmethod(_register_hook)


def node_hooks_possible() -> bool:
    """False when no node can hold a Python node hook (none registered since install,
    and no autograd node existed before it): the walk then skips probing."""
    return _state[0] > 0 or _state[1] > 0


def install_seq() -> int:
    """The autograd sequence number of the installing thread when install() ran."""
    return _state[1]


def _probe_fn(*args: Any) -> None:
    return None


def _probe(register: Callable) -> list:
    handle = register(_probe_fn)
    try:
        d = handle.hooks_dict_ref()
        return [] if d is None else [h for h in d.values() if h is not _probe_fn]
    finally:
        handle.remove()


def node_hooks(node: Any) -> tuple[list, list]:
    """(pre-hooks, post-hooks) registered from Python on ``node``, in call order."""
    return _probe(node.register_prehook), _probe(node.register_hook)


def leaf_pre_hooks(variable: torch.Tensor) -> dict[int, list]:
    """{0: [hooks]} of a leaf (the variable of an AccumulateGrad), or {}."""
    d = variable._backward_hooks
    return {0: list(d.values())} if d else {}


def tensor_pre_hooks(metadata: dict) -> dict[int, list]:
    """{input slot: [hooks]} of the non-leaf tensors whose gradient flows into the node
    whose ``metadata`` this is."""
    meta = metadata.get(TENSOR_HOOKS_KEY) if metadata else None
    if not meta:
        return {}
    return {slot: list(d.values()) for slot, d in sorted(meta.items()) if d}


def retained(metadata: dict) -> dict[int, torch.Tensor]:
    """{input slot: live tensor} of non-leaf tensors that called ``retain_grad()``."""
    meta = metadata.get(RETAINS_GRAD_KEY) if metadata else None
    if not meta:
        return {}
    out = {}
    for slot, ref in sorted(meta.items()):
        t = ref()
        if t is not None and t.retains_grad:
            out[slot] = t
    return out


def post_acc_hooks(variable: torch.Tensor) -> list:
    d = getattr(variable, "_post_accumulate_grad_hooks", None)
    return list(d.values()) if d else []


# ---- what a compiled-autograd graph calls -------------------------------------------
# NOTE: plain Python, so that capture (kiln.compile of the graph) inlines them and the
# hook body with them; run eagerly they just call the hook with eager's conventions.

def call_hook(hook: Callable, grad: Any) -> Any:
    """A tensor pre-hook: ``hook(grad)``; None keeps the gradient."""
    result = hook(grad)
    return grad if result is None else result


def call_prehook(hook: Callable, *grads: Any) -> tuple:
    """A node pre-hook: ``hook(grad_outputs)``; None keeps them."""
    result = hook(grads)
    return grads if result is None else tuple(result)


def call_posthook(hook: Callable, n_inputs: int, *grads: Any) -> tuple:
    """A node post-hook: ``hook(grad_inputs, grad_outputs)`` with the node's results
    first (``n_inputs`` of them) and its incoming gradients after; None keeps them."""
    grad_inputs, grad_outputs = grads[:n_inputs], grads[n_inputs:]
    result = hook(grad_inputs, grad_outputs)
    return grad_inputs if result is None else tuple(result)


def call_post_acc_hook(hook: Callable, variable: torch.Tensor, grad: torch.Tensor) -> None:
    """A post-accumulate-grad hook: ``.grad`` is set first, as eager has it when the hook runs."""
    if variable.grad is not grad:
        variable.grad = grad
    hook(variable)


__all__ = ["install", "node_hooks_possible", "install_seq", "node_hooks",
           "leaf_pre_hooks", "tensor_pre_hooks", "retained", "post_acc_hooks",
           "call_hook", "call_prehook", "call_posthook", "call_post_acc_hook"]
