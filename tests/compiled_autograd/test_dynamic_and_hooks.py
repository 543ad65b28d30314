"""Compiled autograd: symbolic sizes, hooks registered before kiln, the cost of a cached
backward's walk, fallbacks on bad input, and CUDA variants of the differential tests.

Every test compares with eager's engine (grads, hook calls) and checks what compiled
autograd did (graphs compiled, template hits, fallbacks with their reasons).
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import kiln
from kiln import compiled_autograd as ca
from kiln import fallbacks
from kiln.testing import CompileCounterWithBackend

sys.path.insert(0, os.path.dirname(__file__))
from test_compiled_autograd import Compiler, assert_same, grads_of  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _fresh():
    kiln.reset()
    yield
    kiln.reset()


def _mlp(device="cpu"):
    # NOTE: feature sizes (6, 10, 3) differ from every batch size used below, so that no
    # size equals another by coincidence (capture's duck sizing would tie them).
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3)).to(device)


def _batches_step(model, model_c, compiler, batches, device="cpu", tol=1e-5):
    for b in batches:
        x = torch.randn(b, 6, device=device)
        model.zero_grad(set_to_none=True)
        model_c.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        with ca.enable(compiler):
            model_c(x).pow(2).mean().backward()
        assert_same(grads_of(model.parameters()), grads_of(model_c.parameters()), tol)


# ---- symbolic sizes --------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_batch_sizes_compile_at_most_twice(device):
    m = _mlp(device)
    mc = copy.deepcopy(m)
    c = Compiler()
    _batches_step(m, mc, c, (4, 8, 16), device)
    assert len(c.graphs) == 2 and ca.counters["compiles"] == 2
    assert ca.counters["dynamic_graphs"] == 1 and ca.counters["dynamic_hits"] == 1
    # the second graph reads its sizes from its inputs
    code = c.graphs[1].code
    assert ".size(0)" in code and "[16" not in code and "[8" not in code, code
    # an exact repeat is a plain cache hit; a fourth size matches the template
    _batches_step(m, mc, c, (8, 5), device)
    assert len(c.graphs) == 2 and ca.counters["cache_hits"] == 1 and ca.counters["dynamic_hits"] == 2


def test_symbolic_graph_through_capture_with_dynamic_true():
    """As the seed does: compiler_fn compiles with ``dynamic=True``; the template is one
    graph for every later batch size."""
    cnt = CompileCounterWithBackend("eager")
    m = _mlp()
    mc = copy.deepcopy(m)
    _batches_step(m, mc, lambda gm: kiln.compile(gm, backend=cnt, fullgraph=True, dynamic=True),
                  (4, 8, 16, 7))
    assert ca.counters["compiles"] == 2
    assert cnt.frame_count == 2, [g.code for g in cnt.graphs]


def test_symbolic_graph_through_inductor():
    m = _mlp()
    mc = copy.deepcopy(m)
    c = Compiler("inductor", dynamic=True)
    _batches_step(m, mc, c, (4, 8, 16), tol=1e-4)
    assert ca.counters["compiles"] == 2


def test_sizes_in_views_and_accumulation():
    """A transformer-ish backward: views over batch*time, sums to the bias, accumulation
    into existing .grads (add_), all at three batch sizes, one template."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.LayerNorm(12), nn.Linear(12, 6))
    mc = copy.deepcopy(m)
    c = Compiler()
    for b in (2, 3, 5):
        x = torch.randn(b, 7, 6)
        m.zero_grad(set_to_none=True)
        mc.zero_grad(set_to_none=True)
        for _ in range(2):  # the second step accumulates
            m(x).flatten(0, 1).softmax(-1).pow(2).sum().backward()
            with ca.enable(c):
                mc(x).flatten(0, 1).softmax(-1).pow(2).sum().backward()
        assert_same(grads_of(m.parameters()), grads_of(mc.parameters()), 1e-5)
    # fresh and accumulating backwards are two structures, each one concrete + one template
    assert ca.counters["compiles"] == 4 and ca.counters["dynamic_hits"] == 2


def test_batch_sizes_with_hooks_and_autograd_grad():
    """Hooks (opaque calls) and autograd.grad's results in a template: each size calls the
    hook once with eager's gradient."""
    m = _mlp()
    calls = {"eager": [], "compiled": []}
    c = Compiler()
    for b in (4, 8, 16):
        x = torch.randn(b, 6, requires_grad=True)
        res = {}
        for tag in ("eager", "compiled"):
            h = m[0](x)
            h.register_hook(lambda g, tag=tag: calls[tag].append(tuple(g.shape)) or g * 2)
            out = m[2](m[1](h)).pow(2).sum()
            if tag == "compiled":
                with ca.enable(c):
                    res[tag] = torch.autograd.grad(out, [x, m[0].weight])
            else:
                res[tag] = torch.autograd.grad(out, [x, m[0].weight])
        assert_same(list(res["eager"]), list(res["compiled"]))
    assert calls["eager"] == calls["compiled"] == [(4, 10), (8, 10), (16, 10)]
    assert ca.counters["compiles"] == 2 and ca.counters["dynamic_hits"] == 1


def test_size_that_changes_the_graph_compiles_again():
    """Batch 1 takes other paths in the formulas (broadcasting): no match with the
    template, the concrete graph is compiled; gradients stay eager's."""
    m = _mlp()
    mc = copy.deepcopy(m)
    c = Compiler()
    _batches_step(m, mc, c, (4, 8, 1))
    assert ca.counters["dynamic_graphs"] == 1
    assert ca.counters["compiles"] in (2, 3)


def test_dims_that_are_not_sizes_stay_literal():
    """sum over dim 1 vs dim 0 at the same sizes are different graphs, never one template."""
    c = Compiler()
    for dim in (0, 1, 0):
        x = torch.randn(4, 5, requires_grad=True)
        xc = x.detach().clone().requires_grad_()
        (x.sum(dim) ** 2).sum().backward()
        with ca.enable(c):
            (xc.sum(dim) ** 2).sum().backward()
        torch.testing.assert_close(x.grad, xc.grad)
    assert ca.counters["compiles"] == 2 and ca.counters["cache_hits"] == 1


# ---- hooks registered before kiln is imported --------------------------------------------------

def _run_script(body: str) -> str:
    code = textwrap.dedent(body)
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                       env={**os.environ, "PYTHONPATH": root}, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_hooks_registered_before_kiln_or_before_compiled_autograd():
    """One fresh process (imports are the point): a hook registered before ``import kiln``
    cannot be seen, so that backward runs in the eager engine with the reason recorded; a
    hook registered after ``import kiln`` but before ``kiln.compiled_autograd`` is imported
    is seen and compiled.  ``import kiln`` installs the wrappers and nothing else."""
    out = _run_script("""
        import sys, time, warnings
        import torch
        x = torch.randn(3, requires_grad=True)
        h = x * 2
        h.register_hook(lambda g: g * 3)          # before kiln exists in this process
        t = time.perf_counter()
        import kiln
        dt = time.perf_counter() - t
        from kiln.compiled_autograd import hooks
        assert hooks._installed
        assert "kiln.capture" not in sys.modules and "kiln.compiled_autograd.engine" not in sys.modules
        y = torch.randn(3, requires_grad=True)
        k = y * 2
        k.register_hook(lambda g: g * 5)          # after import kiln
        k.retain_grad()
        from kiln import compiled_autograd as ca, fallbacks
        warnings.simplefilter("ignore")
        with ca.enable(lambda gm: gm):
            (h * h).sum().backward()
        torch.testing.assert_close(x.grad, 2 * (2 * h.detach()) * 3)
        assert ca.counters["fallbacks"] == 1 and ca.counters["captures"] == 0, ca.counters
        assert any("before kiln was imported" in f.why for f in fallbacks.recorded()), fallbacks.recorded()
        graphs = []
        with ca.enable(lambda gm: graphs.append(gm) or gm):
            (k * k).sum().backward()
        torch.testing.assert_close(y.grad, 2 * (2 * k.detach()) * 5)
        torch.testing.assert_close(k.grad, 2 * k.detach() * 5)
        assert ca.counters["captures"] == 1 and ca.counters["fallbacks"] == 1, ca.counters
        assert "call_hook" in graphs[0].code
        print("import", dt)
    """)
    assert float(out.split()[-1]) < 0.5


def test_node_hooks_are_counted_so_the_walk_probes_them():
    """A node hook registered after a backward that skipped probing is still called."""
    from kiln.compiled_autograd import hooks

    calls = []
    x = torch.randn(3, requires_grad=True)
    (x * 2).sum().backward()  # nothing registered (yet) in this test
    x.grad = None
    y = x * 2
    y.grad_fn.register_prehook(lambda gout: calls.append("pre") or (gout[0] * 5,))
    assert hooks.node_hooks_possible()
    with ca.enable(Compiler()):
        y.sum().backward()
    assert calls == ["pre"]
    torch.testing.assert_close(x.grad, torch.full((3,), 10.0))


# ---- the cost of a cached backward ---------------------------------------------------------------

def test_cached_walk_builds_no_per_node_hook_probe(monkeypatch):
    """On a backward without node hooks the walk registers nothing on the nodes (the old
    walk registered and removed a probe hook twice per node)."""
    from kiln.compiled_autograd import hooks, walk

    # NOTE: as in a process where no node hook was ever registered (other tests register some)
    monkeypatch.setattr(hooks, "_state", [0, 0])
    probes = []
    orig = hooks._probe
    hooks._probe = lambda register: probes.append(1) or orig(register)
    try:
        m = _mlp()
        loss = m(torch.randn(4, 6)).sum()
        plan = walk.collect([loss], [torch.ones(())], None, True)
    finally:
        hooks._probe = orig
    assert probes == [] and len(plan.recs) > 5


# ---- bad input: eager's gradient, with a recorded reason ------------------------------------------

@pytest.mark.expect_fallback("C++ custom autograd Function")
def test_cpp_custom_function_falls_back(monkeypatch):
    """A node without a Python backward formula to trace (a C++ custom Function, named
    ``torch::autograd::CppNode<...>``) is refused by name; the eager engine runs the whole
    backward.  NOTE: building a real C++ Function needs a C++ extension build (a minute);
    the name table is what decides, so a real node's name stands in for it end to end."""
    from kiln.compiled_autograd import walk

    node = type("N", (), {"name": lambda self: "torch::autograd::CppNode<MyFn>"})()
    with pytest.raises(walk.NotTraceable, match="C\\+\\+ custom autograd Function"):
        walk._kind_of(node)
    x = torch.randn(3, requires_grad=True)
    y = (x * 2).exp()
    monkeypatch.setitem(walk.REFUSED, y.grad_fn.name(), walk.REFUSED["CppNode"])
    monkeypatch.setattr(walk, "_KINDS", {})
    with ca.enable(Compiler()):
        y.sum().backward()
    torch.testing.assert_close(x.grad, 2 * y.detach())
    assert ca.counters["fallbacks"] == 1 and ca.counters["captures"] == 0


@pytest.mark.expect_fallback("create_graph=True")
def test_create_graph_gives_eagers_double_backward():
    x = torch.randn(4, requires_grad=True)
    (g,) = torch.autograd.grad(x.sin().sum(), x, create_graph=True)
    expected = torch.autograd.grad(g.sum(), x)[0]
    with ca.enable(Compiler()):
        (gc,) = torch.autograd.grad(x.sin().sum(), x, create_graph=True)
    assert gc.requires_grad
    torch.testing.assert_close(torch.autograd.grad(gc.sum(), x)[0], expected)
    assert any("create_graph=True" in f.why for f in fallbacks.recorded())


@pytest.mark.expect_fallback("sparse")
def test_sparse_grad_with_dense_params_falls_back_whole():
    emb = nn.Embedding(10, 3, sparse=True)
    lin = nn.Linear(3, 2)
    ref_emb, ref_lin = copy.deepcopy(emb), copy.deepcopy(lin)
    idx = torch.tensor([1, 2, 1, 7])
    ref_lin(ref_emb(idx)).sum().backward()
    with ca.enable(Compiler()):
        lin(emb(idx)).sum().backward()
    torch.testing.assert_close(emb.weight.grad.to_dense(), ref_emb.weight.grad.to_dense())
    assert_same(grads_of(lin.parameters()), grads_of(ref_lin.parameters()))
    assert any("sparse" in f.why for f in fallbacks.recorded())


@pytest.mark.parametrize("backend", [None, "eager"])
def test_hook_mutating_global_state_runs_every_backward(backend):
    """A hook that mutates Python state (a counter, a list) runs on every compiled backward,
    at the engine's point (its gradient change included), cached graph or not; through
    capture (``backend="eager"``), the hook is inlined with its side effects replayed."""
    state = {"n": 0, "seen": []}

    def hook(g):
        state["n"] += 1
        state["seen"].append(g.detach().clone())
        return g * state["n"]

    def run(compiled):
        state["n"], state["seen"] = 0, []
        w = torch.ones(3, requires_grad=True)
        w.register_hook(hook)
        c = Compiler(backend)
        for _ in range(3):
            loss = (w * torch.arange(3.0)).sum()
            if compiled:
                with ca.enable(c):
                    loss.backward()
            else:
                loss.backward()
        return w.grad.clone(), [s.clone() for s in state["seen"]]

    eager, comp = run(False), run(True)
    torch.testing.assert_close(eager[0], comp[0])
    assert len(comp[1]) == 3
    for a, b in zip(eager[1], comp[1]):
        torch.testing.assert_close(a, b)
    assert ca.counters["cache_hits"] >= 1


# ---- CUDA variants of the differential suite ------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("backend", [None, "inductor"])
def test_cuda_mlp_and_convnet(backend):
    from test_compiled_autograd import convnet, differential, loss_step, mlp

    def on_cuda(make):
        def build():
            model, inputs = make()
            return model.cuda(), [x.cuda().detach().requires_grad_(x.requires_grad) for x in inputs]
        return build

    # NOTE: the convnet's accumulating step has saved tensors that are views of each other
    # (flatten of the ReLU output); kiln.aot refuses a graph that mutates inputs (the
    # .grads) while some inputs alias, so its second step is left to the MLP.
    for make, steps in ((mlp, 2), (convnet, 1)):
        kiln.reset()
        c = differential(on_cuda(make), loss_step, compiler=Compiler(backend), steps=steps, tol=1e-4)
        assert len(c.graphs) == steps


@needs_cuda
def test_cuda_transformer_block_and_hooks():
    from test_compiled_autograd import differential, loss_step, transformer_block

    def build():
        model, (x,) = transformer_block()
        return model.cuda(), [x.detach().cuda().requires_grad_()]

    c = differential(build, loss_step, tol=1e-4)
    assert len(c.graphs) == 1
    calls = []
    x = torch.ones(3, device="cuda", requires_grad=True)
    x.register_hook(lambda g: calls.append(g.device.type) or g * 2)
    with ca.enable(Compiler()):
        (x * 3).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 6.0, device="cuda"))
    assert calls == ["cuda"]


@needs_cuda
def test_cuda_autograd_grad_and_retain_graph():
    m = _mlp("cuda")
    x = torch.randn(5, 6, device="cuda", requires_grad=True)
    out = m(x).pow(2).sum()
    expected = torch.autograd.grad(out, [x, m[0].weight], retain_graph=True)
    with ca.enable(Compiler()):
        got = torch.autograd.grad(out, [x, m[0].weight], retain_graph=True)
        got2 = torch.autograd.grad(out, [x, m[0].weight])
    assert_same(list(expected), list(got), 1e-4)
    assert_same(list(expected), list(got2), 1e-4)
    assert ca.counters["cache_hits"] == 1


@needs_cuda
def test_cuda_custom_function_and_compiled_forward_with_graph_break():
    from test_compiled_autograd import differential, loss_step, mlp

    def build_fn():
        torch.manual_seed(0)
        return _CudaUsesFunction(3.0).cuda(), [torch.randn(3, 4, device="cuda", requires_grad=True)]

    c = differential(build_fn, loss_step)
    assert len(c.graphs) == 1 and "aten.cos" in c.graphs[0].code

    def build_mlp():
        model, (x,) = mlp()
        return model.cuda(), [x.detach().cuda().requires_grad_()]

    def step(model, inputs):
        def fwd(x):
            h = model[1](model[0](x))
            kiln.graph_break()
            return model[4](model[3](model[2](h)))

        kiln.compile(fwd, backend="aot_eager")(*inputs).pow(2).sum().backward()

    kiln.reset()
    c = differential(build_mlp, step)
    assert len(c.graphs) == 1 and "aten.mm" in c.graphs[0].code


class _CudaUsesFunction(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = scale

    def forward(self, x):
        from test_compiled_autograd import ScaledSin

        return ScaledSin.apply(self.lin(x), self.scale, torch.ones(4, device=x.device))
