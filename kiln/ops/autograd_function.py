"""autograd_function_apply(fwd, bwd, *operands, non_differentiable_idx=()): a captured
``torch.autograd.Function`` as one op.

In: ``fwd``, a callable (capture gives a torch-level GraphModule) of ``(*operands)``
returning ``(outputs, saved)``: a tuple of the Function's traced outputs and a tuple of the
values its backward reads (what it saved, stashed on ``ctx``, or any intermediate);
``bwd``, a callable of ``(*grad_outputs, *saved)`` (one grad per tensor output of ``fwd``)
returning one gradient (or None) per operand; ``non_differentiable_idx``: positions of the
outputs the Function marked non-differentiable.  Out: ``outputs`` (a tuple).

Rules:
  autograd   grad mode on and an operand requires grad: a ``torch.autograd.Function`` runs
             ``fwd`` in its forward (grad off, as autograd runs a Function's forward), saves
             ``saved`` and runs ``bwd`` in its backward.  Under kiln's tracer (AOT's joint
             trace) both bodies are therefore traced inline: the forward's ops into the
             forward graph, the user's backward into the backward graph, as PyTorch's AOT
             desugars its own ``autograd_function_apply``.
  eager, fake  ``fwd(*operands)[0]`` (nothing needs a backward).
  trace, functionalize  the same, inlined into the enclosing trace.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from kiln.ops.base import HigherOrderOperator


class AutogradFunctionApply(HigherOrderOperator):
    def __init__(self) -> None:
        super().__init__("autograd_function_apply")

    def check_args(self, fwd: Any = None, bwd: Any = None, *operands: Any, **kwargs: Any) -> None:
        if not callable(fwd) or not callable(bwd):
            raise TypeError("autograd_function_apply takes two callables: (fwd, bwd, *operands)")
        extra = set(kwargs) - {"non_differentiable_idx"}
        if extra:
            raise TypeError(f"autograd_function_apply got unexpected keyword arguments {sorted(extra)}")

    def __call__(self, fwd: Callable, bwd: Callable, *operands: Any,
                 non_differentiable_idx: Sequence[int] = ()) -> tuple:
        self.check_args(fwd, bwd, *operands)
        if _needs_grad(operands):
            return _ApplyFunction.apply(fwd, bwd, tuple(non_differentiable_idx), *operands)
        return self.dispatch(fwd, bwd, *operands)


autograd_function_apply = AutogradFunctionApply()


def _needs_grad(operands: Sequence[Any]) -> bool:
    return torch.is_grad_enabled() and any(isinstance(o, torch.Tensor) and o.requires_grad for o in operands)


def _forward_only(fwd: Callable, bwd: Callable, *operands: Any) -> tuple:
    with torch.no_grad():
        outs, _ = fwd(*operands)
    return tuple(outs)


autograd_function_apply.py_impl("eager")(_forward_only)
autograd_function_apply.py_impl("fake")(_forward_only)


def _forward_inline(mode: Any, fwd: Callable, bwd: Callable, *operands: Any) -> tuple:
    with mode:
        return _forward_only(fwd, bwd, *operands)


autograd_function_apply.py_impl("trace")(_forward_inline)
autograd_function_apply.py_impl("functionalize")(_forward_inline)


class _ApplyFunction(torch.autograd.Function):
    """The autograd rule: ``fwd`` in forward, ``bwd`` over the saved values in backward."""

    @staticmethod
    def forward(ctx, fwd, bwd, non_diff, *operands):
        outs, saved = fwd(*operands)
        outs, saved = tuple(outs), tuple(saved)
        # NOTE: tensors go through save_for_backward (autograd checks their versions and
        # frees them after backward); SymInts and constants are kept on ctx as they are.
        ctx.tensor_saved = [isinstance(s, torch.Tensor) for s in saved]
        ctx.other_saved = [s for s in saved if not isinstance(s, torch.Tensor)]
        ctx.save_for_backward(*[s for s in saved if isinstance(s, torch.Tensor)])
        ctx.bwd = bwd
        ctx.n_operands = len(operands)
        ctx.tensor_outs = [i for i, o in enumerate(outs) if isinstance(o, torch.Tensor)]
        marked = [outs[i] for i in non_diff if isinstance(outs[i], torch.Tensor)]
        if marked:
            ctx.mark_non_differentiable(*marked)
        return outs

    @staticmethod
    def backward(ctx, *grads):
        tensors, others = iter(ctx.saved_tensors), iter(ctx.other_saved)
        saved = [next(tensors) if t else next(others) for t in ctx.tensor_saved]
        gs = [grads[i] for i in ctx.tensor_outs]
        out = tuple(ctx.bwd(*gs, *saved))
        if len(out) != ctx.n_operands:
            raise RuntimeError(f"autograd_function_apply: the backward returned {len(out)} gradients, "
                               f"expected {ctx.n_operands} (one per operand)")
        return (None, None, None) + out


__all__ = ["autograd_function_apply", "AutogradFunctionApply"]
