"""kiln.codegen.triton.launch: launching a compiled Triton kernel without the JIT's run().

In:  a ``@triton.jit`` function, the grid, positional arguments and launch keywords of
     one launch that has already run once through the JIT (so the kernel is compiled).
Out: :func:`direct` -> ``launch(call_args)``, a closure that hands ``call_args`` (the
     launcher's tensors and sizes; the trailing ints and constexprs are fixed) straight
     to the compiled kernel's C launcher, or None where that is not possible (Triton's
     interpreter, an old Triton, a launch hook set by a profiler): the caller then keeps
     launching through ``fn[grid](...)``.
"""
# NOTE: ``JITFunction.run`` binds the arguments, computes the specialization key (one
# Python call per argument), looks the kernel up and checks the globals it read on every
# launch: tens of microseconds, which on a small graph of several kernels made the
# compiled graph slower than eager (the attention inference row).  The key of a fast
# entry (:class:`~kiln.codegen.triton.runtime.Launcher` keeps them) holds everything the
# JIT specializes on that can change between calls of one graph: the int arguments and
# each tensor's 16-byte alignment; dtypes are fixed by the graph.
from __future__ import annotations

from typing import Any, Callable, Optional

_support: Optional[bool] = None


def _supported() -> bool:
    """Whether this Triton's compiled kernels take the launch arguments kiln passes
    (``run(grid0, grid1, grid2, stream, function, packed_metadata, launch_metadata,
    enter_hook, exit_hook, *every argument including constexprs)``: Triton 3.3 on)."""
    global _support
    if _support is None:
        import triton

        try:
            major, minor = (int(p) for p in triton.__version__.split(".")[:2])
        except ValueError:
            major, minor = 0, 0
        _support = (major, minor) >= (3, 3)
    return _support


def _hook(h: Any) -> Any:
    """A launch hook, or None where there is none: Triton 3.5 on keeps an empty
    ``HookChain`` object in the knob rather than None."""
    if h is None or getattr(h, "calls", True) == []:
        return None
    return h


def _hooks() -> tuple[Any, Any]:
    from triton import knobs

    return _hook(knobs.runtime.launch_enter_hook), _hook(knobs.runtime.launch_exit_hook)


def direct(fn: Any, grid: tuple, call_args: tuple, ints: list, kw: dict) -> Optional[Callable]:
    """The direct launch of ``fn[grid](*call_args, *ints, **kw)`` (see the module doc)."""
    if not _supported() or not hasattr(fn, "warmup") or not hasattr(fn, "arg_names"):
        return None
    enter, exit_hook = _hooks()
    if enter is not None or exit_hook is not None:
        # NOTE: a profiler's hook wants launch metadata: let the JIT build it.  The hooks
        # are read when the launch is made: one set later (a profiler started after the
        # first call) is not seen by these launches
        return None
    names = list(fn.arg_names)
    n_pos = len(call_args) + len(ints)
    if any(n not in kw for n in names[n_pos:]) or n_pos > len(names):
        return None
    from triton.runtime import driver

    kernel = fn.warmup(*call_args, *ints, grid=grid, **kw)
    if kernel is None:
        return None
    run = kernel.run          # NOTE: loads the binary (and its C launcher) once
    function, meta = kernel.function, kernel.packed_metadata
    tail = tuple(ints) + tuple(kw[n] for n in names[n_pos:])
    g0, g1, g2 = (tuple(grid) + (1, 1))[:3]
    stream = _stream_getter(driver)

    def launch(args: tuple) -> None:
        run(g0, g1, g2, stream(), function, meta, None, None, None, *args, *tail)

    return launch


def _stream_getter(driver: Any) -> Callable[[], int]:
    """The current CUDA stream of the current device, as the launcher takes it.

    NOTE: torch's two C entry points (what inductor's wrapper calls) skip the Python
    layers of ``torch.cuda.current_device()`` (a lazy-init check per call): a few
    microseconds of every launch, and a training step of a small MLP launches ~20."""
    import torch

    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    dev = getattr(torch._C, "_cuda_getDevice", None)
    if raw is not None and dev is not None and driver.active.get_current_stream is raw:
        return lambda: raw(dev())
    get_device, get_stream = driver.active.get_current_device, driver.active.get_current_stream
    return lambda: get_stream(get_device())


def alignment_key(tensors: tuple) -> int:
    """A bit per tensor that is not 16-byte aligned (Triton specializes on it)."""
    key = 0
    for i, t in enumerate(tensors):
        if t.data_ptr() & 15:
            key |= 1 << i
    return key


__all__ = ["direct", "alignment_key"]
