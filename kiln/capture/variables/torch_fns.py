"""Torch functions: most become graph nodes; a table handles the special ones."""
from __future__ import annotations

import types
from typing import Any, Callable

import torch

from .base import VT, ConstantVT, unsupported


def _is_grad_enabled(tx) -> VT:
    return ConstantVT(tx.output.grad_enabled)


def _set_grad_enabled_call(tx, mode: VT) -> VT:
    from .objects import GradModeVT

    return GradModeVT.entered_now(tx, bool(mode.const()))


def _grad_ctx(mode: bool) -> Callable:
    def run(tx) -> VT:
        from .objects import GradModeVT

        return GradModeVT(mode)

    return run


def _raw_set_grad(tx, mode: VT) -> VT:
    mode = bool(mode.const())
    if mode == tx.output.grad_enabled:
        # NOTE: a call the code makes itself is a graph node even when it changes nothing (as
        # in PyTorch's capture; only the grad-mode context managers' switches are coalesced).
        tx.output.graph.call_function(torch._C._set_grad_enabled, (mode,))
    tx.output.set_grad_enabled(mode)
    return ConstantVT(None)


def _deterministic_state(tx) -> list:
    """[mode, warn_only] of ``torch.use_deterministic_algorithms`` as the traced code has it:
    what it set, else the state at the frame's start (which every entry's global-state
    guard checks, guards.global_state)."""
    out = tx.output
    state = out.__dict__.get("deterministic_state")
    if state is None:
        state = [torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()]
        out.deterministic_state = state
    return state


def _get_deterministic(index: int) -> Callable:
    return lambda tx: ConstantVT(_deterministic_state(tx)[index])


def _set_deterministic(tx, mode: VT, warn_only: VT = None) -> VT:
    """``torch._C._set_deterministic_algorithms``: a graph node (run where the code ran it),
    not run while tracing; later reads in the region see the new state."""
    state = _deterministic_state(tx)
    state[:] = [bool(mode.const()), bool(warn_only.const()) if warn_only is not None else False]
    tx.output.graph.call_function(torch._C._set_deterministic_algorithms, (state[0],), {"warn_only": state[1]})
    return ConstantVT(None)


def _break(what: str, why: str = "") -> Callable:
    def run(tx, *args, **kwargs):
        unsupported(what, why=why)

    return run


def _const(value: Any) -> Callable:
    return lambda tx, *a, **k: ConstantVT(value)


def _is_tensor(tx, x: VT) -> VT:
    return ConstantVT(issubclass(x.python_type(), torch.Tensor))


def _array_to_tensor(fn: Any) -> Callable:
    """``torch.from_numpy(a)`` / ``torch.as_tensor(a)`` of a traced NumPy array: its tensor."""
    def run(tx, *args, **kwargs):
        from .numpy_vt import NdarrayVT
        from .tensor import TensorVT

        if len(args) == 1 and not kwargs and isinstance(args[0], NdarrayVT):
            return TensorVT(args[0].node, args[0].fake)
        return tx.output.call_graph("call_function", fn, list(args), dict(kwargs))

    return run


def _rng_state_functions() -> dict:
    """RNG state getters and setters: graph breaks, as in PyTorch's capture.
    NOTE: they are not ATen operations, so AOT tracing would drop them from its graph and the
    random ops around them would draw from the wrong state."""
    named = {"torch.get_rng_state": torch.get_rng_state, "torch.set_rng_state": torch.set_rng_state,
             "torch.cuda.get_rng_state": torch.cuda.get_rng_state,
             "torch.cuda.set_rng_state": torch.cuda.set_rng_state,
             "torch.cuda.manual_seed": torch.cuda.manual_seed,
             "torch.cuda.manual_seed_all": torch.cuda.manual_seed_all}
    why = "RNG state getters and setters are not captured (they are not ATen operations)"
    return {fn: _break(f"call to {name}", why) for name, fn in named.items()}


def _special() -> dict:
    from kiln.capture.api import graph_break

    table = {
        torch.is_grad_enabled: _is_grad_enabled,
        torch.set_grad_enabled: _set_grad_enabled_call,
        torch.no_grad: _grad_ctx(False),
        torch.enable_grad: _grad_ctx(True),
        torch._C._set_grad_enabled: _raw_set_grad,
        torch._C._get_deterministic_algorithms: _get_deterministic(0),
        torch._C._get_deterministic_algorithms_warn_only: _get_deterministic(1),
        torch._C._set_deterministic_algorithms: _set_deterministic,
        graph_break: _break("call to graph_break()", "the user asked for a graph break"),
        torch.autograd.grad: _break("call to torch.autograd.grad", "autograd runs eagerly"),
        torch.autograd.backward: _break("call to torch.autograd.backward", "autograd runs eagerly"),
        torch.manual_seed: _break("call to torch.manual_seed", "global RNG state change"),
        torch.is_tensor: _is_tensor,
        torch._C._get_tracing_state: _const(None),
        torch.jit.is_scripting: _const(False),
        torch.jit.is_tracing: _const(False),
        torch.compiler.is_compiling: _const(True),
        # NOTE: kiln's capture stands where TorchDynamo does: code asking whether Dynamo
        # traces it takes the path it takes under Dynamo.
        torch.compiler.is_dynamo_compiling: _const(True),
        torch._utils.is_compiling: _const(True),
        torch.inference_mode: _break("torch.inference_mode", "inference mode is not captured"),
        # NOTE: forward-AD levels are process state; run on fakes they would stay entered.
        torch._C._enter_dual_level: _break("torch.autograd.forward_ad.dual_level",
                                           "forward-mode AD levels are not captured"),
        torch._C._exit_dual_level: _break("torch.autograd.forward_ad.dual_level",
                                          "forward-mode AD levels are not captured"),
        torch.from_numpy: _array_to_tensor(torch.from_numpy),
        torch.as_tensor: _array_to_tensor(torch.as_tensor),
    }
    table.update(_rng_state_functions())
    from .saved_hooks import saved_hooks_functions

    table.update(saved_hooks_functions())
    from .profiler import profiler_functions

    table.update(profiler_functions())
    from .autocast import autocast_functions
    from .scalars import shape_oracle_functions, torch_check, torch_check_is_size, torch_tensor

    table.update(autocast_functions())
    table.update({torch._check: torch_check, torch._check_is_size: torch_check_is_size,
                  torch.tensor: torch_tensor})
    table.update(shape_oracle_functions())
    dyn = getattr(torch, "_dynamo", None)
    if dyn is not None and "graph_break" in getattr(dyn, "__dict__", {}):
        table[dyn.__dict__["graph_break"]] = table[graph_break]
    if dyn is not None and callable(getattr(dyn, "__dict__", {}).get("is_compiling")):
        table[dyn.__dict__["is_compiling"]] = _const(True)
    return table


_SPECIAL: dict = {}

# NOTE: PyTorch callables that are graph breaks, named by (module, qualified name) so that
# kiln needs not import their modules.
_BREAK_BY_NAME = {
    ("torch._C._dynamo.eval_frame", "unsupported"):
        _break("call to torch._dynamo's unsupported()", "the function is a graph break by design"),
}


def _forbidden(tx, *args, **kwargs):
    from kiln.exc import ForbiddenCallError

    raise ForbiddenCallError("Attempt to trace forbidden callable: a dim-marking function "
                             "(mark_dynamic, mark_static...) called inside the compiled region",
                             why="dims are marked on an input before it is passed to a compiled function",
                             hint="call it on the tensor before calling the compiled function")


def _by_name(fn: Any):
    from ..marked_dims import is_marking_function

    # NOTE: functions only: reading __qualname__ of any other object could run its __getattr__.
    if not isinstance(fn, (types.FunctionType, types.BuiltinFunctionType)):
        return None
    try:
        found = _BREAK_BY_NAME.get((getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)))
    except TypeError:
        return None
    return _forbidden if found is None and is_marking_function(fn) else found


def is_special(fn: Any) -> bool:
    if not _SPECIAL:
        _SPECIAL.update(_special())
    try:
        return fn in _SPECIAL or _by_name(fn) is not None
    except TypeError:
        return False


def call_torch(tx, fn: Any, args: list, kwargs: dict) -> VT:
    if not _SPECIAL:
        _SPECIAL.update(_special())
    try:
        handler = _SPECIAL.get(fn)
    except TypeError:
        handler = None
    if handler is None:
        handler = _by_name(fn)
    if handler is not None:
        return handler(tx, *args, **kwargs)
    return tx.output.call_graph("call_function", fn, list(args), dict(kwargs))
