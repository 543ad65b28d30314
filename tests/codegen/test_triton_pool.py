"""The Triton compile pool (kiln.codegen.triton.pool) on a machine without a GPU.

Kernels printed for the GPU compile for sm_90 (``GPUTarget("cuda", 90, 32)``: Triton's
wheel ships ptxas) in worker processes; the parent then runs the real ``Launcher`` first
call under the compile-only driver: its JIT compile must be a cache hit (Triton's
compilation listener says so), and a launch with other arguments must not be (the check
can fail).  Also: the launch plan is what the first call launches, one pool per process,
identical jobs once, an earlier process's entries skipped, and every failure (a worker
that never starts, one that dies, a job that fails, a pool that cannot start) leaves the
kernel to compile in-process, where a real compile error still raises
KernelCompileError.  One pool (2 workers) serves the whole module.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import sys

import pytest
import torch

pytest.importorskip("triton", reason="optional engine triton is not installed")

from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402

from kiln import exc  # noqa: E402
from kiln.codegen import config, metrics  # noqa: E402
from kiln.codegen.decompose import decomposition_table  # noqa: E402
from kiln.codegen.graph import GraphLowering  # noqa: E402
from kiln.codegen.schedule import Kernel, schedule  # noqa: E402
from kiln.codegen.triton import heuristics, load_kernels, pool, print_kernels, runtime, worker  # noqa: E402
from kiln.codegen.triton.printer import KernelInfo  # noqa: E402
from kiln.codegen.triton.split import split_reductions  # noqa: E402

SM90 = ("cuda", 90, 32)


@pytest.fixture(scope="module", autouse=True)
def _one_pool():
    with config.patch(compile_threads=2):
        yield
    pool.shutdown()


@pytest.fixture(autouse=True)
def _dirs(tmp_path, monkeypatch):
    """A private kiln cache and Triton cache per test."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    with config.patch(cache_dir=str(tmp_path / "kiln")):
        yield tmp_path / "triton-cache"


class Hits:
    """Triton's compilation listener: ``cache_hit`` of every compile in this process."""

    def __enter__(self):
        from triton import knobs

        self.knobs, self.old, self.hits = knobs, knobs.compilation.listener, []
        knobs.compilation.listener = lambda **kw: self.hits.append(kw["cache_hit"])
        return self

    def __exit__(self, *a):
        self.knobs.compilation.listener = self.old


def gpu_kernels(fn, *args):
    """``fn`` lowered and printed for the GPU (not the interpreter), loaded: (launchers,
    lowering)."""
    gm = make_fx(fn, decomposition_table())(*args)
    lw = GraphLowering(gm, list(args)).run()
    split_reductions(lw, lambda b: True)
    kernels = [s for s in schedule(lw).steps if isinstance(s, Kernel)]
    src, infos = print_kernels(kernels, lw.buffers, interpret=False)
    return load_kernels(src, infos, False), lw


def first_call(la, tensors: dict, default=(8, 100)):
    """The launcher's first call with real CPU tensors under the compile-only driver: the
    JIT computes the key and compiles (or hits the cache); the launch itself then fails
    (no GPU), as KernelCompileError."""
    args = [tensors.get(v, torch.empty(default)) for kind, v in la.info.args if kind == "tensor"]
    with worker.compile_only(SM90), pytest.raises(exc.KernelCompileError) as e:
        la(*args)
    return str(e.value)


def _f(x, y):
    return (x.sin() + y).sum(1), x * 2


def test_pool_compile_for_sm90_is_a_cache_hit_for_the_launch(_dirs):
    x, y = torch.randn(8, 100), torch.randn(8, 100)
    las, lw = gpu_kernels(_f, x, y)
    n = pool.precompile(las.values(), pool.launch_hints(lw), target=SM90)
    assert n == len(las) >= 1 and metrics.triton_compiles_submitted == n
    futs = [f for la in las.values() for f in la.pending]
    cf.wait(futs, timeout=120)
    paths = [f.result() for f in futs]
    assert all(p.startswith(str(_dirs)) and os.path.exists(p) for p in paths)
    entries = set(os.listdir(_dirs))
    with Hits() as h:
        for la in las.values():
            first_call(la, {"arg0": x, "arg1": y})
    assert h.hits == [True] * len(las)
    assert set(os.listdir(_dirs)) == entries          # nothing compiled here
    assert metrics.triton_pool_failures == 0
    # NOTE: the same kernel launched with a misaligned input is another specialization:
    # the listener does see a miss
    la = next(la for la in las.values() if ("tensor", "arg0") in la.info.args)
    la._compiled = False
    with Hits() as h:
        first_call(la, {"arg0": torch.empty(8 * 100 + 1)[1:].view(8, 100), "arg1": y})
    assert h.hits == [False]


def test_pool_started_once_jobs_deduped_earlier_process_skipped(_dirs):
    x, y = torch.randn(8, 100), torch.randn(8, 100)
    las, lw = gpu_kernels(_f, x, y)
    p = pool.get_pool()
    assert p is not None and pool.get_pool() is p
    pool.precompile(las.values(), pool.launch_hints(lw), target=SM90)
    futs = [f for la in las.values() for f in la.pending]
    cf.wait(futs, timeout=120)
    submitted = metrics.triton_compiles_submitted
    again, _ = gpu_kernels(_f, x, y)             # the same source: the same module file
    assert pool.precompile(again.values(), pool.launch_hints(lw), target=SM90) == len(futs)
    assert [f for la in again.values() for f in la.pending] == futs    # the same futures
    assert metrics.triton_compiles_submitted == submitted and pool.get_pool() is p
    # NOTE: a new process forgets the jobs; the module's .pool.json says they are in
    # Triton's cache, so none is sent
    marker = next(iter(las.values())).path[:-3] + ".pool.json"
    _until(lambda: os.path.exists(marker))      # written by the last job's done callback
    pool.clear_jobs()
    third, _ = gpu_kernels(_f, x, y)
    assert pool.precompile(third.values(), pool.launch_hints(lw), target=SM90) == 0
    assert metrics.triton_compiles_skipped == len(futs) and metrics.triton_compiles_submitted == submitted
    for path in (f.result() for f in futs):           # the cache entry went away: sent again
        os.remove(path)
    pool.clear_jobs()
    assert pool.precompile(third.values(), pool.launch_hints(lw), target=SM90) == len(futs)
    assert metrics.triton_compiles_submitted == submitted + len(futs)
    cf.wait([f for la in third.values() for f in la.pending], timeout=120)


def _until(cond, timeout: float = 30.0) -> None:
    import time

    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


BROKEN = '''import triton
import triton.language as tl


@triton.jit
def kernel0(in_ptr, xnumel, XBLOCK: tl.constexpr):
    xindex = tl.program_id(0) * XBLOCK + tl.arange(0, XBLOCK)
    tl.store(in_ptr + xindex, tl.load(in_ptr + xindex) + no_such_name, mask=xindex < xnumel)
'''


def test_compile_error_in_worker_compiles_in_process_and_raises():
    info = KernelInfo("kernel0", [("tensor", "arg0")], "pointwise", 64, [], False, 0, False, ["add"])
    la = load_kernels(BROKEN, {"kernel0": info}, False)["kernel0"]
    hints = pool.Hints({}, {"arg0": torch.float32})
    assert pool.precompile([la], hints, target=SM90) == 1
    cf.wait(la.pending, timeout=120)
    assert "no_such_name" in str(la.pending[0].exception())
    with Hits() as h:
        msg = first_call(la, {"arg0": torch.empty(64)})
    assert la.path in msg and "no_such_name" in msg       # today's error, naming the file
    assert metrics.triton_pool_failures == 1 and la.pending == []
    assert h.hits == []                                    # failed before any cache entry


SAYS_READY_THEN_DIES = (
    "import pickle, struct, sys\n"
    "d = pickle.dumps(('ready', sys.argv[1]))\n"
    "sys.stdout.buffer.write(struct.pack('<Q', len(d)) + d); sys.stdout.flush()\n"
    "sys.stdin.buffer.read(8); sys.exit(3)\n")


def _job(la) -> pool.Job:
    return pool.Job(la.path, runtime.module_name(la.path), "kernel0", (("ptr", "float32", True), ("int", 64)),
                    (("XBLOCK", 64), ("num_warps", 2)), SM90, ())


def test_dead_workers_fail_jobs_and_the_kernel_compiles_in_process(monkeypatch):
    import triton

    info = KernelInfo("kernel0", [("tensor", "arg0")], "pointwise", 64, [], False, 0, False, ["add"])
    la = load_kernels(BROKEN.replace(" + no_such_name", " + 1.0"), {"kernel0": info}, False)["kernel0"]
    monkeypatch.setattr(pool, "worker_cmd",
                        lambda: [sys.executable, "-c", SAYS_READY_THEN_DIES, triton.__version__])
    dying = pool._Pool(1)
    futs = [dying.submit(_job(la)) for _ in range(pool.MAX_RESTARTS + 2)]
    cf.wait(futs[:-1], timeout=60)
    assert all(isinstance(f.exception(), pool.PoolError) for f in futs[:-1])   # one per worker life
    pool.wait(futs)                       # no worker left: the last job is taken back, no hang
    assert futs[-1].cancelled() and metrics.triton_pool_failures == pool.MAX_RESTARTS + 1
    la.pending = futs
    with Hits() as h:
        first_call(la, {"arg0": torch.empty(64)})
    assert h.hits == [False]              # compiled here, as without a pool
    dying.shutdown()


def test_queued_job_is_taken_back_and_compiled_here_for_the_launch(monkeypatch):
    info = KernelInfo("kernel0", [("tensor", "arg0")], "pointwise", 64, [], False, 0, False, ["add"])
    la = load_kernels(BROKEN.replace(" + no_such_name", " + 2.0"), {"kernel0": info}, False)["kernel0"]
    (fn, ints, kw), = la.launch_plan([])
    # NOTE: a worker that never says ready takes no job: it stays queued
    monkeypatch.setattr(pool, "worker_cmd", lambda: [sys.executable, "-c", "import sys; sys.exit(3)"])
    silent = pool._Pool(1)
    job = pool._spec(la, fn, ints, kw, SM90, (), pool.Hints({}, {"arg0": torch.float32}))
    f = silent.submit(job)
    silent.threads[0].join(timeout=60)
    assert not f.running() and not f.done()
    with worker.compile_only(SM90), Hits() as h:
        pool.wait([f], la._warm_up)                        # taken back, compiled here
    assert f.cancelled() and h.hits == [False] and metrics.triton_pool_failures == 0
    with Hits() as h:
        first_call(la, {"arg0": torch.empty(64)})
    assert h.hits == []                                    # the launch found it compiled
    silent.shutdown()


def test_pool_that_cannot_start_or_is_off_compiles_in_process(monkeypatch, tmp_path):
    x, y = torch.randn(8, 100), torch.randn(8, 100)
    las, lw = gpu_kernels(_f, x, y)
    monkeypatch.setattr(pool, "_pool", None)
    monkeypatch.setattr(pool, "_pool_failed", False)
    monkeypatch.setattr(pool, "worker_cmd", lambda: [str(tmp_path / "no-such-python")])
    assert pool.precompile(las.values(), pool.launch_hints(lw), target=SM90) == 0
    assert pool._pool is None and pool._pool_failed and metrics.triton_compiles_submitted == 0
    assert all(la.pending == [] for la in las.values())
    with Hits() as h:
        for la in las.values():
            first_call(la, {"arg0": x, "arg1": y})
    assert h.hits == [False] * len(las)
    monkeypatch.setattr(pool, "_pool_failed", False)
    with config.patch(compile_threads=1):
        assert pool.threads() == 1 and pool.get_pool() is None
        assert pool.precompile(las.values(), pool.launch_hints(lw), target=SM90) == 0
    assert pool._pool is None and metrics.triton_compiles_submitted == 0


def test_interpreter_kernels_never_use_the_pool():
    from test_kernels import check

    with config.patch(cpu_backend="triton"):
        check(lambda x: x.sin().sum(0), torch.randn(5, 7))
    assert metrics.triton_compiles_submitted == 0 and metrics.triton_compiles_skipped == 0
    info = KernelInfo("kernel0", [("tensor", "arg0")], "pointwise", 64, [], False, 0, False, [])
    la = runtime.Launcher(None, info, "/nowhere/k0.py", interpret=True)
    assert pool.precompile([la], pool.Hints({}, {"arg0": torch.float32}), target=SM90) == 0
    class Fn:
        __name__ = "kernel0"

    gpu = runtime.Launcher(Fn(), info, "/nowhere/k0.py", interpret=False)
    with runtime._interpret_env(True):    # TRITON_INTERPRET=1 for the whole process
        assert pool.precompile([gpu], pool.Hints({}, {"arg0": torch.float32}), target=SM90) == 0
    assert metrics.triton_compiles_submitted == 0 and gpu.pending == []


def test_launch_plan_is_what_the_first_call_launches(tmp_path, monkeypatch):
    launched = []

    class FakeFn:
        __name__ = "kernel0"

        def __getitem__(self, grid):
            return lambda *a, **kw: launched.append((list(a[1:]), kw))

    def plan_and_call(info, sizes, numels):
        la = runtime.Launcher(FakeFn(), info, str(tmp_path / "kabc.py"), interpret=False)
        plan = la.launch_plan(sizes)
        launched.clear()
        la._launch(la.config_for(numels, (None, *sizes)), numels, (None, *sizes))
        return plan, [("kernel0", a, kw) for a, kw in launched]

    import sympy

    s0 = sympy.Symbol("s0", integer=True, positive=True)
    info = KernelInfo("kernel0", [("tensor", "buf0"), ("size", s0)], "reduction", s0, [100], True, 128,
                      False, [])
    plan, calls = plan_and_call(info, [8], [8, 100])
    assert plan == calls and plan[0][1] == [8, 8, 100] and plan[0][2]["RBLOCK"] == 128
    # NOTE: enough work to autotune: the plan is every candidate the first call times
    import triton.testing

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup=0, rep=0: fn() or 1.0)
    big = KernelInfo("kernel0", [("tensor", "buf0")], "pointwise", 1 << 20, [], False, 0, False, [])
    plan, calls = plan_and_call(big, [], [1 << 20])
    cands = heuristics.autotune_configs("pointwise", 1 << 20, 0, False)
    assert len(plan) == len(cands) > 1 and calls[:len(plan)] == plan
    plan, _ = plan_and_call(big, [], [1 << 20])          # now tuned (the .tune.json): one
    assert len(plan) == 1 and plan[0] == calls[-1]


def test_launch_hints_sizes_dtypes_alignment():
    base = torch.randn(8 * 100 + 1)
    x, y = base[1:].view(8, 100), torch.randn(8, 100, dtype=torch.float64)
    _, lw = gpu_kernels(lambda x, y: x * 2 + y, x, y)
    h = pool.launch_hints(lw)
    assert h.misaligned == {"arg0"} and h.dtypes["arg1"] == torch.float64


def test_forked_child_drops_the_parents_pool():
    p = pool.get_pool()
    assert p is not None
    fut = cf.Future()
    fut.kiln_pid = os.getpid()            # a job of the parent's, never done in the child
    pid = os.fork()
    if pid == 0:                          # the child: no pool of its own yet, no hang
        import signal

        signal.alarm(30)
        ok = pool._pool is None and pool._jobs == {}
        pool.wait([fut])
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and pool.get_pool() is p
