"""kiln.codegen.triton.runtime: Triton kernel source -> launchable kernels.

In:  a module source from :func:`kiln.codegen.triton.printer.print_kernels` and its
     :class:`~kiln.codegen.triton.printer.KernelInfo` per kernel.
Out: :func:`load_kernels` -> ``{kernel name: Launcher}``; ``launcher(*tensors, *sizes)``
     runs the kernel (grid ``cdiv(xnumel, XBLOCK)``).

The source is written once to ``<cache_dir>/triton/<hash>.py`` (content hash of the
source and the Triton version: Triton's JIT reads its functions' source from real files)
and imported from there; identical sources load once per process.  Kernels for CPU
tensors are decorated with ``TRITON_INTERPRET=1`` set (Triton's interpreter runs them
with numpy); CUDA kernels compile for the GPU.  On CUDA, a kernel with enough work times
a few configs from :mod:`heuristics` on its first call and keeps the winner in
``<hash>.tune.json`` beside the source (plain JSON, per kernel and numel); a config that
runs out of memory or resources is dropped.  A kernel that fails to compile raises
:class:`kiln.exc.KernelCompileError` naming the file.  :meth:`Launcher.launch_plan` says
what a first call will launch (configs, int arguments) before it runs, so that
:mod:`.pool` can compile those kernels in worker processes; the first call waits for
them (``Launcher.pending``) and then finds them in Triton's cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import sys
import threading
from typing import Any, Callable, Optional

import sympy

from kiln import exc
from kiln.codegen import config
from kiln.codegen.triton import heuristics, launch

_modules: dict[str, Any] = {}
_lock = threading.Lock()


def triton_version() -> str:
    import triton

    return triton.__version__


def cache_path(source: str, interpret: bool) -> str:
    h = hashlib.sha256((source + "\0" + triton_version() + ("\0interp" if interpret else "")).encode())
    d = os.path.join(config.cache_dir, "triton")
    os.makedirs(d, exist_ok=True)
    return os.path.join(d, f"k{h.hexdigest()[:32]}.py")


@contextlib.contextmanager
def _interpret_env(on: bool):
    old = os.environ.get("TRITON_INTERPRET")
    if on:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if on:
            if old is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old


def _interpreting() -> bool:
    """Whether ``@triton.jit`` decorates for the interpreter right now."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):   # NOTE: Triton < 3.3 reads the variable itself
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


def module_name(path: str) -> str:
    """The import name of the generated module at ``path`` (Triton's kernel names and
    cache keys include it: the compile workers import it under the same name)."""
    return "kiln_triton_" + os.path.basename(path)[:-3]


def load_module(source: str, interpret: bool) -> tuple[Any, str]:
    """Import ``source`` from its content-hash file (written once); (module, path)."""
    path = cache_path(source, interpret)
    with _lock:
        mod = _modules.get(path)
        if mod is not None:
            return mod, path
        if not os.path.exists(path):
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(source)
            os.replace(tmp, path)   # NOTE: atomic: a racing process sees all or nothing
        name = module_name(path)
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        with _interpret_env(interpret):
            if interpret and not _interpreting():
                raise exc.CodegenError("Triton kernels for CPU tensors need Triton's interpreter, "
                                       "which this Triton does not enable from TRITON_INTERPRET")
            try:
                spec.loader.exec_module(mod)
            except Exception as e:  # noqa: BLE001 - a bad generated file
                raise exc.KernelCompileError(f"generated Triton module {path} failed to load: "
                                             f"{type(e).__name__}: {e}") from e
        sys.modules[name] = mod
        _modules[path] = mod
        return mod, path


def _size_fn(exprs: list, syms: list) -> Callable:
    """``f(*size values) -> [int(e) for e in exprs]`` compiled from the size expressions."""
    from kiln.codegen.wrapper import pyexpr

    names = [s.name for s in syms]
    body = "[" + ", ".join(pyexpr(sympy.sympify(e)) for e in exprs) + "]"
    ns: dict = {}
    exec(f"def f({', '.join(names)}):\n    return {body}\n", ns)
    return ns["f"]


def _is_oom(e: BaseException) -> bool:
    name = type(e).__name__
    return name in ("OutOfMemoryError", "OutOfResources") or "out of memory" in str(e).lower()


class Launcher:
    """Runs one kernel: ``launcher(*tensors, *sizes)`` in the printer's argument order."""

    def __init__(self, fn: Any, info, path: str, interpret: bool):
        self.fn = fn
        self.info = info
        self.path = path
        self.interpret = interpret
        self.n_tensors = sum(1 for kind, _ in info.args if kind == "tensor")
        syms = [v for kind, v in info.args if kind == "size"]
        self._numels = _size_fn([info.xnumel] + list(info.rnumels), syms)
        self._configs: dict = {}
        self._tune_file = path[:-3] + ".tune.json"
        self._compiled = False
        self._fast: dict = {}   # (sizes, alignment) -> the direct launches of one call
        self.pending: list = []   # futures of this kernel's compile jobs (pool.precompile)

    def config_for(self, numels: list, args: tuple) -> dict:
        key = ",".join(map(str, numels))
        cfg = self._configs.get(key)
        if cfg is not None:
            return cfg
        cfg = self._default_config(numels)
        if self._tunes(numels):
            cfg = self._tuned(key, numels, args, cfg)
        self._configs[key] = cfg
        return cfg

    def _default_config(self, numels: list) -> dict:
        info = self.info
        xn, rn = numels[0], max(numels[1:], default=0)
        if info.persistent:
            rn = info.rblock
        if info.kind == "scatter":
            return {"XBLOCK": heuristics.INTERP_TILE if self.interpret else 1024, "RBLOCK": 1, "num_warps": 4}
        cfg = heuristics.default_config(info.kind, xn, rn, info.persistent, self.interpret)
        if info.persistent:
            cfg["RBLOCK"] = info.rblock
        return cfg

    def _tunes(self, numels: list) -> bool:
        """Whether the first call with these numels times configs (GPU, enough work)."""
        xn, rn = numels[0], max(numels[1:], default=0)
        if self.info.persistent:
            rn = self.info.rblock
        return (self.info.kind != "scatter" and not self.interpret
                and xn * max(rn, 1) >= heuristics.AUTOTUNE_MIN_WORK)

    def _candidates(self, numels: list) -> list:
        info = self.info
        xn, rn = numels[0], max(numels[1:], default=0)
        cands = heuristics.autotune_configs(info.kind, xn, info.rblock if info.persistent else rn,
                                            info.persistent, config.max_autotune)
        return [dict(c, RBLOCK=info.rblock) if info.persistent else c for c in cands]

    def launch_plan(self, sizes: list) -> list:
        """What the first call with size values ``sizes`` launches, before running:
        ``[(function name, int args, launch kwargs)]``, the config it keeps first (the
        tuned one when the tune file has it, else the default), then the autotune
        candidates it would time.  A launch passes the tensors, then the int args."""
        numels = [int(v) for v in self._numels(*sizes)]
        if numels[0] == 0 and self.info.kind != "scatter":
            return []
        cfgs = [self._default_config(numels)]
        if self._tunes(numels):
            saved = _read_json(self._tune_file).get(self.info.name, {}).get(",".join(map(str, numels)))
            cfgs = [saved] if saved is not None else self._candidates(numels)
        out: list = []
        for cfg in cfgs:
            for fn, _grid, ints, kw in self._calls(cfg, numels):
                job = (fn.__name__, [int(v) for v in sizes] + ints, kw)
                if job not in out:
                    out.append(job)
        return out

    def _tuned(self, key: str, numels: list, args: tuple, default: dict) -> dict:
        saved = _read_json(self._tune_file).get(self.info.name, {})
        if key in saved:
            return saved[key]
        import triton.testing

        info = self.info
        best, best_t = default, float("inf")
        # NOTE: a few ms per config tell the configs of one kernel apart; do_bench's
        # warm-up/repeat of 5/20 ms made tuning the largest part of a cold GPU compile
        warm_ms, rep_ms = (5, 20) if config.max_autotune else (1, 5)
        for c in self._candidates(numels):
            try:
                t = triton.testing.do_bench(lambda c=c: self._launch(c, numels, args),
                                            warmup=warm_ms, rep=rep_ms)
            except Exception as e:  # noqa: BLE001
                if _is_oom(e):
                    continue   # NOTE: this config does not fit: drop it
                raise
            if t < best_t:
                best, best_t = c, t
        allj = _read_json(self._tune_file)
        allj.setdefault(info.name, {})[key] = best
        _write_json(self._tune_file, allj)
        return best

    def _calls(self, cfg: dict, numels: list) -> list:
        """The launches of one call with config ``cfg``: ``[(jit function, grid, trailing
        int args, kwargs)]`` (the launch args are the call's args, then the ints)."""
        if self.info.kind == "scatter":
            out = []
            for fn, n in zip(self.fn, numels[:2]):
                if n:
                    xb = min(heuristics.next_pow2(n), cfg["XBLOCK"])
                    kw = {"XBLOCK": xb} if self.interpret else {"XBLOCK": xb, "num_warps": heuristics._warps(xb)}
                    out.append((fn, ((n + xb - 1) // xb,), [n], kw))
            return out
        xb = cfg["XBLOCK"]
        kw = {"XBLOCK": xb}
        if self.info.kind != "pointwise":
            kw["RBLOCK"] = cfg["RBLOCK"]
        if not self.interpret:
            kw["num_warps"] = cfg["num_warps"]
        return [(self.fn, ((numels[0] + xb - 1) // xb,), list(numels), kw)]

    def _warm_up(self, job) -> None:
        """Compile a :class:`~kiln.codegen.triton.pool.Job` of this kernel here, without
        launching (Triton's ``warmup``; the launch then finds it in the JIT's cache)."""
        from kiln.codegen.triton.worker import stand_in_args

        fns = self.fn if isinstance(self.fn, tuple) else (self.fn,)
        fn = next(f for f in fns if f.__name__ == job.fn)
        fn.warmup(*stand_in_args(job.args), grid=(1,), **dict(job.kwargs))

    def _launch(self, cfg: dict, numels: list, args: tuple) -> None:
        for fn, grid, ints, kw in self._calls(cfg, numels):
            fn[grid](*args, *ints, **kw)

    def __call__(self, *args: Any) -> None:
        n = self.n_tensors
        fast = self._fast.get((args[n:], launch.alignment_key(args[:n])))
        if fast is None:
            self._first_call(args)
            return
        for go in fast:
            go(args)

    def _first_call(self, args: tuple) -> None:
        """A call whose sizes or alignment this launcher has not seen: choose (or tune)
        the config, launch through the JIT (compiling on the very first call), then
        keep the direct launches for the next call like it."""
        sizes = args[self.n_tensors:]
        numels = [int(v) for v in self._numels(*sizes)]
        key = (sizes, launch.alignment_key(args[:self.n_tensors]))
        if numels[0] == 0 and self.info.kind != "scatter":
            self._fast[key] = ()
            return
        if self.pending:
            from kiln.codegen.triton import pool

            # NOTE: this kernel's configs compile in the pool; its Triton cache entries
            # are then there for the JIT below (a job that failed compiles here instead)
            pool.wait(self.pending, self._warm_up)
            self.pending = []
        cfg = None
        try:
            # NOTE: the first launch (or autotuning) compiles the kernel
            cfg = self.config_for(numels, args)
            self._launch(cfg, numels, args)
        except Exception as e:  # noqa: BLE001 - first launch compiles
            if _is_oom(e):
                raise
            raise exc.KernelCompileError(
                f"Triton kernel {self.info.name} (ATen nodes {', '.join(self.info.origins)}) "
                f"in {self.path} failed: {type(e).__name__}: {e}") from e
        self._compiled = True
        self._fast[key] = self._direct(cfg, numels, args)

    def _direct(self, cfg: dict, numels: list, args: tuple) -> tuple:
        """The launches of a call like ``args`` with ``cfg``, each a closure over one
        compiled kernel (through the JIT where a direct launch is not possible)."""
        out = []
        for fn, grid, ints, kw in self._calls(cfg, numels):
            go = None if self.interpret else launch.direct(fn, grid, args, ints, kw)
            if go is None:
                def go(a, fn=fn, grid=grid, ints=ints, kw=kw):
                    fn[grid](*a, *ints, **kw)
            out.append(go)
        return tuple(out)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json(path: str, d: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(d, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def load_kernels(source: str, infos: dict, interpret: bool) -> dict[str, Launcher]:
    """``{name: Launcher}`` for the kernels of ``source``."""
    mod, path = load_module(source, interpret)
    def fn(name, info):
        if info.kind == "scatter":
            return (getattr(mod, f"{name}_base"), getattr(mod, f"{name}_scatter"))
        return getattr(mod, name)

    return {name: Launcher(fn(name, info), info, path, interpret) for name, info in infos.items()}


def eager_on_kernel_error(call: Callable, gm: Any) -> Callable:
    """``call`` (a boxed compiled graph) that, when a Triton kernel fails to compile at
    its first launch, records a fallback naming the kernel file and from then on runs
    the ATen graph ``gm`` eagerly."""
    from kiln.fallbacks import record_fallback

    state = {"eager": False}

    def run(args: list) -> Any:
        if state["eager"]:
            out = gm(*args)
            args.clear()
            return out
        saved = list(args)   # NOTE: the wrapper clears args; eager needs them again
        try:
            return call(args)
        except exc.KernelCompileError as e:
            state["eager"] = True
            record_fallback("codegen", "a Triton kernel", f"the ATen graph runs eagerly: {e}")
            return gm(*saved)

    for attr in ("source", "kernel_source", "kernel_count", "uses_triton"):
        setattr(run, attr, getattr(call, attr, None))
    run._boxed_call = True
    run._returns_sequence = True
    return run


def unavailable_reason(device_type: str = "cuda") -> Optional[str]:
    """Why Triton cannot run kernels for ``device_type`` tensors here (None when it can)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install triton)"
    if device_type == "cpu":
        return None
    if device_type != "cuda":
        return f"Triton does not target {device_type} tensors"
    import torch

    if not torch.cuda.is_available():
        return "CUDA is not available"
    if torch.version.hip is None:
        major, minor = torch.cuda.get_device_capability()
        if major < 7:
            return (f"Triton needs a GPU of compute capability 7.0 or newer; this one is "
                    f"{major}.{minor}")
    return None


__all__ = ["load_kernels", "Launcher", "unavailable_reason", "cache_path", "eager_on_kernel_error"]
