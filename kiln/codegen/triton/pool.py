"""kiln.codegen.triton.pool: Triton kernels compiled ahead of their first launch, in parallel.

In:  the :class:`~kiln.codegen.triton.runtime.Launcher` objects of a graph's CUDA kernels,
     size hints for its symbols and which of its tensors are not 16-byte aligned
     (:func:`launch_hints`).
Out: :func:`precompile` sends one job per (kernel, launch config) that the first call
     will launch (the default config, or the autotune candidates when it will tune) to
     worker processes and hands each launcher the futures of its jobs; the launcher's
     first call :func:`wait` s for them, then launches: Triton's JIT finds each kernel in
     its on-disk cache (``TRITON_CACHE_DIR``, default ``~/.triton/cache``), filled by the
     workers, instead of compiling it.  A graph's compile time is the slowest kernel's
     (per worker), not the sum.

Workers (:mod:`.worker`) are plain ``python worker.py`` subprocesses, started once per
process on the first job (``config.compile_threads`` of them, default
``min(os.cpu_count(), 8)``; 1 means no pool) and stopped at exit.  They compile for the
GPU target the parent's Triton reports, with no CUDA context of their own (and no
multiprocessing: see :func:`worker_cmd`).

A job waits in the queue until a worker has said it is ready; a first launch that finds
one of its jobs still there takes it back (cancels it) and compiles in-process, so a
pool still starting never makes a graph slower than compiling serially.  Nothing here can
fail the user's program: a pool that cannot start, a worker that dies, a job that fails
or takes longer than :data:`WAIT_S` only means the kernel compiles in-process at its
first launch, as without the pool (where a real compile error raises
:class:`kiln.exc.KernelCompileError` naming the file).

Identical jobs run once per process (same module file, kernel, arguments, config, target
and Triton variables); a job an earlier process did (recorded in ``<module>.pool.json``
beside the module file, with the path of Triton's metadata file while it exists) is not
sent at all, so a second process compiling the same model starts no workers.  Triton
variables set in the parent (``TRITON_*``, ...) go with every job; Triton settings changed
in Python (``triton.knobs``) do not: such a kernel simply compiles again at its launch.
"""
from __future__ import annotations

import atexit
import concurrent.futures as cf
import contextlib
import dataclasses
import json
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterable, Optional

from kiln.codegen import config, metrics

# NOTE: a first launch waits at most this long for its kernel's jobs, then compiles
# in-process (a stuck worker must not hang the program).
WAIT_S = 300.0
# NOTE: a worker that dies is replaced this many times; then its jobs fail fast (and
# compile in-process).
MAX_RESTARTS = 2

_lock = threading.Lock()
_pool: Optional["_Pool"] = None
_pool_failed = False
_jobs: dict = {}
_marker_lock = threading.Lock()
_unrecorded: dict = {}     # module path -> [jobs not done yet, {job key: metadata path}]


def threads() -> int:
    """How many worker processes the pool has (1: no pool)."""
    n = config.compile_threads
    if n is None:
        n = min(os.cpu_count() or 1, 8)
    return max(1, int(n))


@dataclasses.dataclass(frozen=True)
class Job:
    """One kernel specialization to compile: everything its Triton cache key depends on."""

    path: str           # the generated module file
    module: str         # its import name
    fn: str             # the @triton.jit function
    args: tuple         # ("ptr", tl dtype name, aligned) | ("int", value)
    kwargs: tuple       # sorted (name, value) launch options: XBLOCK, RBLOCK, num_warps
    target: tuple       # (backend, arch, warp_size)
    env: tuple          # sorted (name, value) Triton variables of the parent

    def request(self) -> dict:
        return {"path": self.path, "module": self.module, "fn": self.fn, "args": list(self.args),
                "kwargs": dict(self.kwargs), "target": list(self.target), "env": dict(self.env)}

    def key(self) -> str:
        """The job as a string (its entry in the module's ``.pool.json``)."""
        return json.dumps([self.fn, self.args, self.kwargs, self.target, self.env])


class PoolError(RuntimeError):
    """A job did not run: its worker died or could not start."""


class _Worker:
    """One ``python worker.py`` child: :meth:`ready` waits for its hello, :meth:`call`
    sends a request and returns the reply; both raise :class:`PoolError` when it died."""

    def __init__(self, cmd: list, env: dict):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=None if _debug() else subprocess.DEVNULL,
                                     env=env, close_fds=True)

    def _recv(self) -> Any:
        head = self.proc.stdout.read(8)
        if len(head) < 8:
            raise PoolError(f"compile worker {self.proc.pid} exited ({self.proc.poll()})")
        (n,) = struct.unpack("<Q", head)
        return pickle.loads(self.proc.stdout.read(n))

    def ready(self, version: str) -> None:
        """Wait until the worker has imported Triton; it must be the parent's version
        (another Triton would fill another cache)."""
        hello = self._recv()
        if not (isinstance(hello, tuple) and hello[:2] == ("ready", version)):
            raise PoolError(f"compile worker {self.proc.pid} said {hello!r}, not ready {version}")

    def call(self, req: dict) -> tuple:
        data = pickle.dumps(req)
        try:
            self.proc.stdin.write(struct.pack("<Q", len(data)) + data)
            self.proc.stdin.flush()
        except (OSError, ValueError) as e:
            raise PoolError(f"compile worker {self.proc.pid}: {e}") from e
        return self._recv()

    def close(self, timeout: float = 2.0) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=timeout)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            self.proc.kill()
            self.proc.wait()


def worker_cmd() -> list:
    """The command line of a worker (patchable in tests)."""
    # NOTE: not multiprocessing: "fork" would copy the parent's CUDA state, and "spawn"
    # (or "forkserver") imports the user's __main__ again in every worker, which re-runs a
    # script without an `if __name__ == "__main__"` guard (model loading included).  A
    # fresh interpreter on worker.py imports Triton only, and starts in ~0.3 s.
    return [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")]


def _worker_env() -> dict:
    env = dict(os.environ)
    try:
        import triton

        # NOTE: the worker must import the parent's Triton, wherever sys.path found it.
        site = os.path.dirname(os.path.dirname(os.path.abspath(triton.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (site, env.get("PYTHONPATH")) if p)
    except ImportError:
        pass
    env["CUDA_VISIBLE_DEVICES"] = ""   # NOTE: workers compile only; never a GPU context
    env.pop("TRITON_INTERPRET", None)
    return env


class _Pool:
    """``n`` workers fed from one queue, each by a thread of this process.  A thread
    takes jobs only once its worker is ready, so jobs wait in the queue meanwhile, where
    :func:`wait` can take them back (cancel) and compile them in-process."""

    def __init__(self, n: int):
        import triton

        self.pid = os.getpid()
        self.closing = False
        self.version = triton.__version__
        self.queue: queue.Queue = queue.Queue()
        self.cmd, self.env = worker_cmd(), _worker_env()
        self.workers: list = []
        try:
            for _ in range(n):
                self.workers.append(_Worker(self.cmd, self.env))
        except Exception:
            for w in self.workers:
                w.close(timeout=0.1)
            raise   # NOTE: no pool (get_pool records it)
        self.threads = [threading.Thread(target=self._serve, args=(i,), daemon=True,
                                         name=f"kiln-triton-compile-{i}") for i in range(n)]
        for t in self.threads:
            t.start()

    def submit(self, job: Job) -> cf.Future:
        fut: cf.Future = cf.Future()
        fut.kiln_pid, fut.kiln_job = self.pid, job
        self.queue.put((job, fut))
        return fut

    def _serve(self, i: int) -> None:
        """Run jobs on worker ``i``, replacing it when it dies (at most MAX_RESTARTS
        times; then this thread takes no more jobs)."""
        for attempt in range(MAX_RESTARTS + 1):
            if self.closing:
                return
            try:
                w = self.workers[i] if attempt == 0 else _Worker(self.cmd, self.env)
                self.workers[i] = w
                w.ready(self.version)
            except Exception as e:  # noqa: BLE001 - a worker that cannot start: try another
                _log(f"Triton compile worker not ready: {type(e).__name__}: {e}")
                if self.workers[i] is not None:
                    self.workers[i].close(timeout=0.1)
                self.workers[i] = None
                continue
            if not self._run_jobs(w):
                return
            w.close(timeout=0.1)
            self.workers[i] = None

    def _run_jobs(self, w: _Worker) -> bool:
        """Jobs from the queue on ``w`` until shutdown (False) or until ``w`` dies (True)."""
        while True:
            item = self.queue.get()
            if item is None:
                return False
            job, fut = item
            if not fut.set_running_or_notify_cancel():
                continue   # NOTE: taken back by wait(): compiled in-process
            try:
                status, value = w.call(job.request())
            except Exception as e:  # noqa: BLE001 - a dead worker fails its job, never the program
                fut.set_exception(e if isinstance(e, PoolError) else PoolError(f"{type(e).__name__}: {e}"))
                return True
            if status == "ok":
                fut.set_result(value)
            else:
                fut.set_exception(RuntimeError(value))

    def shutdown(self, timeout: float = 1.0) -> None:
        """Stop the threads and workers; a worker still compiling after ``timeout``
        seconds is killed (Triton writes its cache entries atomically)."""
        self.closing = True
        for _ in self.threads:
            self.queue.put(None)
        live = [w for w in list(self.workers) if w is not None]
        for w in live:
            with contextlib.suppress(OSError, ValueError):
                w.proc.stdin.close()
        deadline = time.monotonic() + timeout
        for w in live:
            w.close(timeout=max(0.0, deadline - time.monotonic()))


def _debug() -> bool:
    from kiln.passes import should_log

    return should_log("codegen")


def _log(msg: str) -> None:
    if _debug():
        print(f"[kiln codegen] {msg}", file=sys.stderr)


def get_pool() -> Optional[_Pool]:
    """The process's pool, started on first use (None: no pool, or it cannot start)."""
    global _pool, _pool_failed
    with _lock:
        if _pool is not None and _pool.pid != os.getpid():
            _pool = None             # NOTE: a forked child: its parent's workers are not ours
            _jobs.clear()
        if _pool is None and not _pool_failed and threads() > 1:
            try:
                _pool = _Pool(threads())
            except Exception as e:  # noqa: BLE001 - no pool: kernels compile in-process
                _pool_failed = True
                _log(f"Triton compile pool did not start: {type(e).__name__}: {e}")
        return _pool


def shutdown() -> None:
    """Stop the workers (at exit; a later job starts a new pool)."""
    global _pool, _pool_failed
    with _lock:
        p, _pool, _pool_failed = _pool, None, False
        _jobs.clear()
    if p is not None and p.pid == os.getpid():
        p.shutdown()


atexit.register(shutdown)


def _after_fork_in_child() -> None:
    """A forked child has none of its parent's threads: fresh locks, no pool, no jobs."""
    global _lock, _marker_lock, _pool
    _lock, _marker_lock = threading.Lock(), threading.Lock()
    if _pool is not None:
        # NOTE: kept, never closed: closing its pipes here could flush a half-written
        # request of the parent's into a worker
        _forked_away.append(_pool)
    _pool = None
    _jobs.clear()
    _unrecorded.clear()


_forked_away: list = []


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _env() -> tuple:
    from kiln.codegen.triton.worker import ENV_PREFIXES

    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
    try:
        from triton._C.libtriton import get_cache_invalidating_env_vars

        env.update(get_cache_invalidating_env_vars())
    except (ImportError, AttributeError):   # NOTE: not in every Triton
        pass
    env.pop("TRITON_INTERPRET", None)
    return tuple(sorted(env.items()))


def current_target() -> Optional[tuple]:
    """``(backend, arch, warp_size)`` of the GPU Triton launches on now (None: unknown)."""
    try:
        from triton.runtime import driver

        t = driver.active.get_current_target()
        return (t.backend, t.arch, t.warp_size)
    except Exception:  # noqa: BLE001 - no target: no pool
        return None


def _marker(path: str) -> str:
    return path[:-3] + ".pool.json"


def _read_marker(path: str) -> dict:
    try:
        with open(_marker(path)) as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _record(job: Job, fut: cf.Future) -> None:
    """Done callback: once all of a module's jobs are done, the compiled ones (with the
    path of Triton's metadata file) and those taken back to compile in-process (with "",
    unchecked) go into the module's ``.pool.json``; failed ones do not."""
    with _marker_lock:
        entry = _unrecorded.setdefault(job.path, [1, {}])
        entry[0] -= 1
        if fut.cancelled():
            entry[1][job.key()] = ""
        elif fut.exception() is None and fut.result():
            entry[1][job.key()] = fut.result()
        if entry[0] > 0:
            return
        del _unrecorded[job.path]
        if not entry[1]:
            return
        d = _read_marker(job.path)
        d.update(entry[1])
        tmp = f"{_marker(job.path)}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(d, f, indent=0, sort_keys=True)
            os.replace(tmp, _marker(job.path))
        except OSError:
            pass


def _done_before(job: Job, done: dict) -> bool:
    """Whether an earlier process compiled ``job`` (and its Triton cache entry is still
    there, where the path is known)."""
    entry = done.get(job.key())
    return entry is not None and (entry == "" or os.path.exists(entry))


def submit(job: Job, done: Optional[dict] = None) -> Optional[cf.Future]:
    """The future of ``job`` (one per identical job); None when it needs no compile (an
    earlier process's cache entry still exists) or there is no pool."""
    with _lock:
        fut = _jobs.get(job)
    if fut is not None:
        return fut
    if _done_before(job, _read_marker(job.path) if done is None else done):
        metrics.triton_compiles_skipped += 1
        return None
    pool = get_pool()
    if pool is None:
        return None
    with _lock:
        fut = _jobs.get(job)
        if fut is None:
            with _marker_lock:
                _unrecorded.setdefault(job.path, [0, {}])[0] += 1
            fut = pool.submit(job)
            _jobs[job] = fut
            metrics.triton_compiles_submitted += 1
            fut.add_done_callback(lambda f, job=job: _record(job, f))
    return fut


def wait(futures: Iterable[cf.Future], compile_here: Optional[Callable[[Job], Any]] = None) -> None:
    """Wait for ``futures``, at most :data:`WAIT_S` in all.  Meanwhile a job that no
    worker has started is taken back (cancelled) and, one at a time, compiled by
    ``compile_here(job)`` in this process: the caller helps with its own jobs, and a pool
    still starting never makes a first launch later than compiling serially.  Nothing
    raises: failures are counted (and logged with ``KILN_LOGS=codegen``), and the launch
    then compiles that kernel in-process, as without the pool."""
    # NOTE: in a forked child, the parent's futures are never completed here
    futures = [f for f in futures if getattr(f, "kiln_pid", None) == os.getpid()]
    end = time.monotonic() + WAIT_S
    while True:
        left = [f for f in futures if not f.done()]
        if not left or time.monotonic() >= end:
            break
        taken = next((f for f in left if f.cancel()), None)
        if taken is None:
            cf.wait(left, timeout=max(0.0, end - time.monotonic()), return_when=cf.FIRST_COMPLETED)
        elif compile_here is not None:
            try:
                compile_here(taken.kiln_job)
            except Exception as e:  # noqa: BLE001 - the launch compiles it again (and raises)
                _log(f"a Triton compile in this process failed: {type(e).__name__}: {e}")
    for f in futures:
        if f.cancelled():
            continue
        err = f.exception(timeout=0) if f.done() else TimeoutError(f"not done in {WAIT_S} s")
        if err is not None:
            metrics.triton_pool_failures += 1
            _log(f"a Triton compile job failed (the kernel compiles in-process): {err}")


@dataclasses.dataclass
class Hints:
    """What a graph's first call will pass its kernels, as far as it is known at compile
    time: a value per size symbol (the traced hints), the dtype of each tensor (buffer
    name -> torch dtype), and the tensors whose data is not 16-byte aligned."""

    sizes: dict
    dtypes: dict
    misaligned: set = dataclasses.field(default_factory=set)


def _spec(launcher, fn: str, ints: list, kwargs: dict, target: tuple, env: tuple,
          hints: Hints) -> Job:
    from kiln.codegen.triton.ops import TL_TYPES
    from kiln.codegen.triton.runtime import module_name

    args: list = []
    for kind, v in launcher.info.args:
        if kind == "tensor":
            tl_name = TL_TYPES[hints.dtypes[v]].removeprefix("tl.")
            args.append(("ptr", tl_name, v not in hints.misaligned))
    args += [("int", int(i)) for i in ints]
    return Job(launcher.path, module_name(launcher.path), fn, tuple(args),
               tuple(sorted(kwargs.items())), tuple(target), env)


def precompile(launchers: Iterable, hints: Hints, target: Optional[tuple] = None) -> int:
    """Send the jobs of ``launchers``' first calls to the pool; each launcher keeps the
    futures of its own jobs (``launcher.pending``).  ``target``: ``(backend, arch,
    warp_size)``, default :func:`current_target`.  Returns the number of futures handed
    out (0 without a pool)."""
    try:
        return _precompile(launchers, hints, target)
    except Exception as e:  # noqa: BLE001 - the pool only saves time; it never fails a compile
        from kiln.fallbacks import strict

        if strict():
            raise
        _log(f"Triton compile jobs not sent: {type(e).__name__}: {e}")
        return 0


def _precompile(launchers: Iterable, hints: Hints, target: Optional[tuple]) -> int:
    from kiln.codegen.triton.runtime import _interpreting

    if threads() <= 1 or _interpreting():
        return 0   # NOTE: TRITON_INTERPRET set for the whole process: nothing compiles
    target = target or current_target()
    if target is None or target[0] != "cuda":
        return 0   # NOTE: the compile-only driver is tested for CUDA targets only
    env = _env()
    plans = []
    for la in launchers:
        if la.interpret:
            continue
        try:
            plan = la.launch_plan([hints.sizes[s] for kind, s in la.info.args if kind == "size"])
        except (KeyError, TypeError, ValueError):
            continue   # NOTE: a size without a hint: that kernel compiles at its launch
        plans.append((la, plan))
    n = 0
    done: dict = {}
    # NOTE: in program order, each kernel's configs together: workers take jobs from the
    # front (the next launches), a waiting first launch takes back its own from the back.
    for la, plan in plans:
        if la.path not in done:
            done[la.path] = _read_marker(la.path)
        for fn, ints, kw in plan:
            try:
                job = _spec(la, fn, ints, kw, target, env, hints)
            except KeyError:
                break   # NOTE: a dtype Triton has no name for: compiles at its launch
            fut = submit(job, done[la.path])
            if fut is not None:
                la.pending.append(fut)
                n += 1
    return n


def launch_hints(lowered) -> Hints:
    """The :class:`Hints` of a :class:`~kiln.codegen.graph.GraphLowering`: inputs and
    constants with a storage offset that breaks 16-byte alignment are misaligned; the
    kernels' own buffers are allocated aligned (and so, presumably, extern results)."""
    import sympy

    sizes = {s: int(v) for s, v in lowered.var_to_val.items()
             if isinstance(s, sympy.Symbol) and sympy.sympify(v).is_Integer}
    misaligned = set()
    for i, (name, buf) in enumerate(lowered.inputs):
        x = lowered.example_inputs[i] if i < len(lowered.example_inputs) else None
        off = getattr(x, "storage_offset", None)
        off = off() if callable(off) else None
        # NOTE: never int() a SymInt offset (that would guard on it): assume aligned
        if type(off) is int and (off * x.element_size()) % 16:
            misaligned.add(name)
    for name, t in lowered.constants.items():
        try:
            if t.data_ptr() % 16:
                misaligned.add(name)
        except RuntimeError:
            pass
    dtypes = {name: b.dtype for name, b in lowered.buffers.items()}
    return Hints(sizes, dtypes, misaligned)


def clear_jobs() -> None:
    """Forget the jobs sent so far (tests; the workers keep running)."""
    with _lock:
        _jobs.clear()


__all__ = ["precompile", "wait", "submit", "launch_hints", "threads", "shutdown", "Job", "Hints",
           "current_target", "clear_jobs", "WAIT_S"]
