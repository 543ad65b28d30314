"""Compiled autograd, differential: every backward compared with eager's engine.

Each test builds the same program twice (same seed), runs its backward eagerly and under
``kiln.compiled_autograd.enable``, and compares ``.grad``\\ s, results, hook calls; it
also checks that the compiled path really ran (graphs traced, cache hits) or that a
fallback happened with its reason.
"""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kiln
from kiln import compiled_autograd as ca

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
import zoo  # noqa: E402


class Compiler:
    """A compiler_fn that counts its graphs; ``backend=None`` runs the graph as it is."""

    def __init__(self, backend=None, **kw):
        self.backend = backend
        self.kw = kw
        self.graphs: list = []

    def __call__(self, gm):
        self.graphs.append(gm)
        if self.backend is None:
            return gm
        return kiln.compile(gm, backend=self.backend, **self.kw)


@pytest.fixture(autouse=True)
def _fresh():
    kiln.reset()
    yield
    kiln.reset()


def grads_of(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


def assert_same(a, b, tol=1e-5):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        if x is None or y is None:
            assert x is None and y is None, f"grad {i}: {x} vs {y}"
            continue
        torch.testing.assert_close(x, y, rtol=tol, atol=tol, msg=lambda m: f"grad {i}: {m}")


def differential(make, step, compiler=None, steps=1, tol=1e-5):
    """Run ``step(model, inputs)`` (which calls backward) eagerly and compiled; compare grads."""
    torch.manual_seed(0)
    model, inputs = make()
    model_c = copy.deepcopy(model)
    inputs_c = [x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x
                for x in inputs]
    compiler = compiler or Compiler()
    for _ in range(steps):
        step(model, inputs)
        with ca.enable(compiler):
            step(model_c, inputs_c)
        assert_same(grads_of(model.parameters()), grads_of(model_c.parameters()), tol)
        assert_same([x.grad for x in inputs if isinstance(x, torch.Tensor)],
                    [x.grad for x in inputs_c if isinstance(x, torch.Tensor)], tol)
    return compiler


def loss_step(model, inputs):
    model(*inputs).float().pow(2).mean().backward()


def mlp():
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    return m, [torch.randn(5, 8, requires_grad=True)]


def convnet():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 2 * 2, 3))
    return m, [torch.randn(2, 3, 8, 8)]


def transformer_block():
    cfg = zoo.GPTConfig(block_size=8, n_head=2, n_embd=16)
    return zoo.Block(cfg), [torch.randn(2, 8, 16, requires_grad=True)]


# ---- models -----------------------------------------------------------------------------

def test_mlp_grads_and_cache():
    c = differential(mlp, loss_step, steps=3)
    # NOTE: step 1 traces into a fresh .grad (clone), steps 2 and 3 accumulate (add_): two
    # structures, one graph each; step 3 is a cache hit.
    assert len(c.graphs) == 2
    assert ca.counters["captures"] == 2 and ca.counters["cache_hits"] == 1
    code = c.graphs[0].code
    assert "torch.clone" in code and "aten.mm" in code and "hooks" in code
    assert "add_" in c.graphs[1].code


def test_convnet():
    c = differential(convnet, loss_step)
    assert len(c.graphs) == 1
    assert "convolution_backward" in c.graphs[0].code


def test_transformer_block():
    c = differential(transformer_block, loss_step, tol=1e-4)
    assert len(c.graphs) == 1


def test_training_step_through_codegen():
    """The whole backward, accumulation included, as one graph through kiln's inductor."""
    c = Compiler("inductor")

    def step(model, inputs):
        model.zero_grad(set_to_none=False) if model[0].weight.grad is not None else None
        loss_step(model, inputs)

    differential(mlp, step, compiler=c, steps=2, tol=1e-4)
    assert len(c.graphs) == 2  # fresh .grads, then accumulation into zeroed ones
    assert ca.counters["compiles"] == 2


def test_compiled_graph_through_aot_eager_is_one_capture():
    seen = []

    def backend(gm, example):
        seen.append(gm)
        return kiln.backends.lookup_backend("aot_eager")(gm, example)

    differential(mlp, loss_step, compiler=Compiler(backend, fullgraph=True))
    assert len(seen) == 1


def test_fresh_grad_takes_the_leaf_strides():
    def run(compiled):
        w = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).t().detach().requires_grad_()
        loss = (w * torch.arange(4.0)).sum()
        if compiled:
            with ca.enable(Compiler()):
                loss.backward()
        else:
            loss.backward()
        return w.grad

    eager, compiled = run(False), run(True)
    torch.testing.assert_close(eager, compiled)
    assert compiled.stride() == eager.stride() == (1, 3)


# ---- custom Function ----------------------------------------------------------------------

class ScaledSin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, w):
        ctx.save_for_backward(x)
        ctx.scale = scale
        return torch.sin(x) * scale * w

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * ctx.scale * torch.cos(x), None, None


class UsesFunction(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = scale

    def forward(self, x):
        return ScaledSin.apply(self.lin(x), self.scale, torch.ones(4))


def test_custom_function():
    c = differential(lambda: (UsesFunction(3.0), [torch.randn(3, 4, requires_grad=True)]), loss_step)
    assert len(c.graphs) == 1 and "aten.cos" in c.graphs[0].code


def test_custom_function_scalar_is_part_of_the_key():
    torch.manual_seed(0)
    m = UsesFunction(2.0)
    x = torch.randn(3, 4)
    c = Compiler()
    expected = []
    for s in (2.0, 5.0):
        m.scale = s
        m.zero_grad(set_to_none=True)
        loss_step(m, [x])
        expected.append(m.lin.weight.grad.clone())
        m.zero_grad(set_to_none=True)
        with ca.enable(c):
            loss_step(m, [x])
        torch.testing.assert_close(m.lin.weight.grad, expected[-1])
    assert len(c.graphs) == 2


# ---- hooks ----------------------------------------------------------------------------------

def test_hooks_on_leaves_and_intermediates():
    calls = {"eager": [], "compiled": []}

    def make_step(tag):
        def step(model, inputs):
            (x,) = inputs
            h = model[0](x)
            h.register_hook(lambda g: (calls[tag].append("mid"), g * 2)[1])
            out = model[2](model[1](h))
            out.sum().backward()
        return step

    torch.manual_seed(0)
    model, (x,) = mlp()
    model_c = copy.deepcopy(model)
    xc = x.detach().clone().requires_grad_()
    x.register_hook(lambda g: calls["eager"].append("leaf"))
    xc.register_hook(lambda g: calls["compiled"].append("leaf"))
    for _ in range(2):
        make_step("eager")(model, [x])
        c = Compiler()
        with ca.enable(c):
            make_step("compiled")(model_c, [xc])
        assert "call_hook" in c.graphs[0].code
    assert calls["eager"] == calls["compiled"] == ["mid", "leaf"] * 2
    assert_same(grads_of(model.parameters()), grads_of(model_c.parameters()))
    assert_same([x.grad], [xc.grad])


def test_hook_replaces_gradient_and_sees_global_state():
    seen = []

    def hook(g):
        seen.append(g.sum().item())
        return g * 3

    def run(compiled):
        w = torch.ones(3, requires_grad=True)
        w.register_hook(hook)
        loss = (w * torch.arange(3.0)).sum()
        if compiled:
            with ca.enable(Compiler()):
                loss.backward()
        else:
            loss.backward()
        return w.grad

    torch.testing.assert_close(run(False), run(True))
    assert seen == [3.0, 3.0]


def test_module_full_backward_hook():
    got = {"eager": [], "compiled": []}

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))

    def run(tag, compiled):
        m = make()

        def hook(mod, gin, gout):
            got[tag].append((tuple(None if g is None else g.clone() for g in gin), gout[0].clone()))
            return (gin[0] * 0.5,)

        m[2].register_full_backward_hook(hook)
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
        loss = m(x).sum()
        if compiled:
            c = Compiler()
            with ca.enable(c):
                loss.backward()
            assert len(c.graphs) == 1 and "call_posthook" in c.graphs[0].code
        else:
            loss.backward()
        return [p.grad for p in m.parameters()] + [x.grad]

    assert_same(run("eager", False), run("compiled", True))
    assert len(got["eager"]) == len(got["compiled"]) == 1
    torch.testing.assert_close(got["eager"][0][1], got["compiled"][0][1])


def test_post_accumulate_grad_hook():
    log = {"eager": [], "compiled": []}

    def run(tag, compiled):
        w = torch.ones(3, requires_grad=True)
        w.register_post_accumulate_grad_hook(lambda p: log[tag].append(p.grad.clone()))
        loss = (w * w).sum()
        if compiled:
            with ca.enable(Compiler()):
                loss.backward()
        else:
            loss.backward()
        return w.grad

    torch.testing.assert_close(run("eager", False), run("compiled", True))
    assert len(log["compiled"]) == 1
    torch.testing.assert_close(log["eager"][0], log["compiled"][0])


def test_retain_grad_on_intermediate():
    def run(compiled):
        x = torch.randn(3, generator=torch.Generator().manual_seed(0), requires_grad=True)
        h = x.exp()
        h.retain_grad()
        loss = (h * h).sum()
        if compiled:
            with ca.enable(Compiler()):
                loss.backward()
        else:
            loss.backward()
        return [x.grad, h.grad]

    assert_same(run(False), run(True))


# ---- engine entry points ----------------------------------------------------------------------

def test_retain_graph_twice():
    torch.manual_seed(0)
    m, (x,) = mlp()
    mc = copy.deepcopy(m)
    loss, loss_c = m(x).sum(), mc(x).sum()
    c = Compiler()
    for _ in range(2):
        loss.backward(retain_graph=True)
        with ca.enable(c):
            loss_c.backward(retain_graph=True)
    assert_same(grads_of(m.parameters()), grads_of(mc.parameters()))
    # a third backward without retain_graph frees the graph; the next one raises, as eager's
    loss.backward()
    with ca.enable(c):
        loss_c.backward()
    assert len(c.graphs) == 2  # fresh grads, then accumulation (cache hit for the third)
    assert ca.counters["cache_hits"] == 1
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        with ca.enable(c):
            loss_c.backward()


def test_autograd_grad():
    torch.manual_seed(0)
    m, (x,) = mlp()
    h_eager = m[0](x)
    out = m[2:](m[1](h_eager)).pow(2).sum()
    expected = torch.autograd.grad(out, [x, h_eager, m[0].weight], retain_graph=True)
    c = Compiler()
    with ca.enable(c):
        got = torch.autograd.grad(out, [x, h_eager, m[0].weight])
    assert_same(list(expected), list(got))
    assert len(c.graphs) == 1
    # autograd.grad does not touch .grad
    assert all(p.grad is None for p in m.parameters()) and x.grad is None


def test_kiln_compiled_forward_with_graph_break():
    def make():
        return mlp()

    def step(model, inputs):
        def fwd(x):
            h = model[1](model[0](x))
            kiln.graph_break()
            return model[4](model[3](model[2](h)))

        f = kiln.compile(fwd, backend="aot_eager")
        f(*inputs).pow(2).sum().backward()

    c = differential(make, step)
    assert len(c.graphs) == 1
    # the two compiled regions' backward graphs are inlined: no opaque call of a compiled backward
    code = c.graphs[0].code
    assert "aten.mm" in code and "CompiledFunction" not in code


def test_seed_hook_through_compiled_forward():
    from kiln.ops import trace_wrapped

    def invoke(g):
        return trace_wrapped(g, fn=lambda t: t * t)

    for backend in ("eager", "aot_eager"):
        kiln.reset()
        x = torch.tensor([0.5, 0.5], requires_grad=True)
        y = torch.tensor([0.5, 0.5], requires_grad=True)

        def fn(x, y):
            x.register_hook(invoke)
            return x * y

        out = kiln.optimize(backend)(fn)(x, y)
        with ca.enable(Compiler("eager", fullgraph=True)):
            out.backward(torch.tensor([2.0, 2.0]))
        torch.testing.assert_close(x.grad, (y * 2.0) ** 2)
        torch.testing.assert_close(y.grad, x.detach() * 2.0)


# ---- fallbacks ------------------------------------------------------------------------------

@pytest.mark.expect_fallback("create_graph=True")
def test_double_backward_falls_back():
    x = torch.randn(3, requires_grad=True)
    c = Compiler()
    with ca.enable(c):
        (g,) = torch.autograd.grad(x.pow(3).sum(), x, create_graph=True)
        g.sum().backward()
    torch.testing.assert_close(x.grad, 6 * x.detach())
    # the first backward (create_graph=True) ran eagerly; the second, through the graph
    # it created, is an ordinary backward and is compiled
    assert ca.counters["fallbacks"] == 1 and len(c.graphs) == 1


@pytest.mark.expect_fallback("sparse")
def test_sparse_gradient_falls_back():
    emb = nn.Embedding(10, 3, sparse=True)
    ref = copy.deepcopy(emb)
    idx = torch.tensor([1, 2, 1])
    ref(idx).sum().backward()
    with ca.enable(Compiler()):
        emb(idx).sum().backward()
    assert emb.weight.grad.is_sparse
    torch.testing.assert_close(emb.weight.grad.to_dense(), ref.weight.grad.to_dense())


class ReadsItem(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * float(x.sum().item())


@pytest.mark.expect_fallback("value into Python")
def test_data_dependent_backward_falls_back():
    x = torch.randn(4, requires_grad=True)
    ReadsItem.apply(x).sum().backward()
    expected = x.grad.clone()
    x.grad = None
    with ca.enable(Compiler()):
        ReadsItem.apply(x).sum().backward()
    torch.testing.assert_close(x.grad, expected)


class ClosesOverTensor(torch.autograd.Function):
    w = torch.randn(4)

    @staticmethod
    def forward(ctx, x):
        return x * ClosesOverTensor.w

    @staticmethod
    def backward(ctx, g):
        return g * ClosesOverTensor.w


@pytest.mark.expect_fallback("neither a gradient nor a saved tensor")
def test_backward_reading_outside_tensor_falls_back():
    x = torch.randn(4, requires_grad=True)
    with ca.enable(Compiler()):
        ClosesOverTensor.apply(x).sum().backward()
    torch.testing.assert_close(x.grad, ClosesOverTensor.w)


def test_printing_hook_without_fullgraph_breaks_in_capture(capsys):
    """Without fullgraph, capture breaks the graph at the print: the hook runs eagerly
    between the compiled pieces, once per backward, with its gradient change."""
    graphs = []

    def backend(gm, example):
        graphs.append(gm)
        return gm

    def hook(g):
        print("in hook")
        return g * 2

    x = torch.ones(3, requires_grad=True)
    x.register_hook(hook)
    for i in range(2):
        with ca.enable(Compiler(backend)):
            (x * 3).sum().backward()
        torch.testing.assert_close(x.grad, torch.full((3,), 6.0 * (i + 1)))
    assert capsys.readouterr().out.count("in hook") == 2
    assert len(graphs) >= 2  # a graph before the break and one after


def test_printing_hook_under_fullgraph_raises():
    def hook(g):
        print("in hook")
        return g

    x = torch.ones(3, requires_grad=True)
    x.register_hook(hook)
    with pytest.raises(kiln.exc.Unsupported, match="print"):
        with ca.enable(Compiler("eager", fullgraph=True)):
            (x * 3).sum().backward()


def test_disabled_outside_the_block():
    x = torch.ones(3, requires_grad=True)
    c = Compiler()
    with ca.enable(c):
        pass
    (x * 2).sum().backward()
    assert not c.graphs and ca.counters["captures"] == 0
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))


# ---- the bench column --------------------------------------------------------------------

def test_bench_kiln_ca_column_runs_the_step_through_compiled_autograd():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    from bench import cases, compilers, measure

    (comp,), _ = compilers.parse("kiln+ca:eager", "cpu")
    assert comp.kind == "kiln_ca"
    wl = cases.build("train_step", "train", "quick", "cpu")
    ref_model = copy.deepcopy(wl.model)
    ref = measure.make_step(ref_model, cases.Workload(ref_model, wl.inputs, wl.config), True)
    step = measure.make_step(comp.wrap(wl.model), wl, True)
    for _ in range(2):
        ref()
        step()
    assert ca.counters["captures"] == 1 and ca.counters["cache_hits"] == 1
    assert_same(grads_of(ref_model.parameters()), grads_of(wl.model.parameters()), tol=1e-4)
