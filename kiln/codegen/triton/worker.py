"""kiln.codegen.triton.worker: compile one Triton kernel specialization without a GPU.

In:  a request (plain dict): the generated module's ``path`` and import ``module`` name,
     the kernel function ``fn``, its launch ``args`` (``("ptr", tl dtype name, aligned)``
     or ``("int", value)``), launch ``kwargs`` (``XBLOCK``, ``RBLOCK``, ``num_warps``), the
     ``target`` ``(backend, arch, warp_size)`` and ``env`` (the parent's Triton variables).
Out: :func:`compile_request` compiles that specialization into Triton's on-disk cache and
     returns the path of its metadata file (``<TRITON_CACHE_DIR>/<hash>/<name>.json``).

The compile goes through the kernel's own ``JITFunction.warmup`` under
:class:`CompileOnlyDriver`, a Triton driver that only names the target: Triton's JIT
computes the specialization (dtypes, 16-byte alignment, integer divisibility), the options
and the cache key with the same code as at a real launch, so the parent's first launch of
the same arguments finds the entry (a cache hit) instead of compiling.  No CUDA context is
made: the pointers are stand-ins with a ``dtype`` and a ``data_ptr()``.

Run as a script (``python worker.py``) it serves requests from the parent
(:mod:`kiln.codegen.triton.pool`): 8-byte length + pickle frames on stdin; on the stdout
it started with, ``("ready", Triton version)`` once Triton is imported, then one reply per
request, ``("ok", path)`` or ``("err", text)``.  It imports only
Triton (not kiln, not torch), so it starts in a fraction of a second.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import pickle
import struct
import sys
import traceback
from typing import Any, Optional

# NOTE: variables that change how Triton compiles (or where it caches); the parent sends
# its values with every request so a worker started earlier compiles what the parent
# would compile now.
ENV_PREFIXES = ("TRITON_", "MLIR_", "LLVM_", "NVPTX", "AMDGCN_", "DISABLE_", "USE_IR_",
                "ALLOW_", "PTXAS")
# NOTE: a stand-in pointer that is not 16-byte aligned (Triton checks data_ptr % 16).
MISALIGNED_PTR = 8

_modules: dict[str, Any] = {}


class CompileOnlyDriver:
    """A Triton driver for compiling only: the current target, device 0, stream 0."""

    def __init__(self, target: Any):
        self.target = target

    def get_current_target(self) -> Any:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Optional[int] = None) -> int:
        return 0

    def is_active(self) -> bool:
        return True


class StandIn:
    """What Triton's JIT reads of a tensor argument: ``dtype`` and ``data_ptr()``."""

    def __init__(self, dtype: Any, ptr: int = 0):
        self.dtype = dtype
        self._ptr = ptr

    def data_ptr(self) -> int:
        return self._ptr


def gpu_target(target: tuple) -> Any:
    """``(backend, arch, warp_size)`` -> Triton's ``GPUTarget``."""
    from triton.backends.compiler import GPUTarget

    return GPUTarget(*target)


@contextlib.contextmanager
def compile_only(target: tuple):
    """Triton's active driver is a :class:`CompileOnlyDriver` for ``target`` inside."""
    from triton.runtime import driver

    old = getattr(driver, "_active", None)
    driver.set_active(CompileOnlyDriver(gpu_target(target)))
    try:
        yield
    finally:
        # NOTE: reset_active() would build the default driver, which needs a GPU.
        driver._active = old


def set_env(env: dict) -> None:
    """Make this process's Triton-related variables exactly ``env``."""
    for k in list(os.environ):
        if k.startswith(ENV_PREFIXES) and k not in env:
            del os.environ[k]
    os.environ.update(env)
    os.environ.pop("TRITON_INTERPRET", None)   # NOTE: compiled kernels, never the interpreter


def load(path: str, name: str) -> Any:
    """The generated module at ``path``, imported once under the parent's module name
    (Triton's kernel names include it)."""
    mod = _modules.get(path)
    if mod is None:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules[name] = mod
        _modules[path] = mod
    return mod


def stand_in_args(args: list) -> list:
    """Launch arguments from their description (pointers become :class:`StandIn`)."""
    import triton.language as tl

    out = []
    for a in args:
        if a[0] == "ptr":
            out.append(StandIn(getattr(tl, a[1]), 0 if a[2] else MISALIGNED_PTR))
        else:
            out.append(a[1])
    return out


def compile_request(req: dict) -> str:
    """Compile one specialization into Triton's cache; the path of its metadata file."""
    set_env(req["env"])
    fn = getattr(load(req["path"], req["module"]), req["fn"])
    with compile_only(tuple(req["target"])):
        kernel = fn.warmup(*stand_in_args(req["args"]), grid=(1,), **req["kwargs"])
    group = getattr(kernel, "metadata_group", None) or {}
    return next((p for f, p in group.items() if f.endswith(".json")), "")


def _read(f) -> Optional[Any]:
    head = f.read(8)
    if len(head) < 8:
        return None
    (n,) = struct.unpack("<Q", head)
    return pickle.loads(f.read(n))


def _write(f, obj: Any) -> None:
    data = pickle.dumps(obj)
    f.write(struct.pack("<Q", len(data)) + data)
    f.flush()


def _warm_up() -> None:
    """Import what every compile needs before saying ready (jobs wait in the parent's
    queue meanwhile, where its first launch can still take them back)."""
    import triton.compiler  # noqa: F401
    import triton.language as tl

    try:
        from triton.runtime.jit import mangle_type

        # NOTE: the first specialization imports what it looks for (torch, on some Triton)
        mangle_type(StandIn(tl.float32))
    except Exception:  # noqa: BLE001 - only a warm-up
        pass


def main() -> None:
    """Serve requests until stdin closes."""
    inp = sys.stdin.buffer
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)   # NOTE: stray prints go to stderr, never into the reply stream
    import triton

    _warm_up()
    _write(out, ("ready", triton.__version__))
    while True:
        req = _read(inp)
        if req is None:
            return
        try:
            reply = ("ok", compile_request(req))
        except BaseException as e:  # noqa: BLE001 - every failure is a reply
            reply = ("err", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}")
        _write(out, reply)


if __name__ == "__main__":
    # NOTE: run as a script, this folder is sys.path[0]; its files (compat.py, ...) must
    # not shadow top-level modules that Triton or its dependencies import.
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)
    main()
