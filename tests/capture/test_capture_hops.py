"""Higher-order ops in capture: torch.cond, wrap, checkpoint through kiln.compile and export."""
import pytest
import torch
import torch.utils.checkpoint as cp

import kiln
import kiln.ops
from kiln.codegen import metrics
from kiln.testing import CompileCounterWithBackend

BACKENDS = ["aot_eager", "inductor"]


def _calls(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def _grads(out, leaves):
    gs = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
    return tuple(torch.zeros_like(w) if g is None else g for g, w in zip(gs, leaves))


def check_against(fn, ref_fn, args, backend, fullgraph=True):
    """``fn`` compiled vs ``ref_fn`` eager: values and grads; returns (counter, compiled)."""
    kiln.reset()
    cnt = CompileCounterWithBackend(backend)
    compiled = kiln.compile(fn, backend=cnt, fullgraph=fullgraph)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    out = compiled(*args)
    ref = ref_fn(*args)
    torch.testing.assert_close(out, ref)
    if leaves:
        torch.testing.assert_close(_grads(out, leaves), _grads(ref, leaves))
    return cnt, compiled


def _check(fn, args, backend, fullgraph=True):
    """Compiled vs eager values and grads; returns the counter (graphs it saw) and the compiled fn."""
    return check_against(fn, fn, args, backend, fullgraph)


def _cond_fn(x, y):
    z = x * 2

    def true_fn(a):
        return a.sin() + z

    def false_fn(a):
        return a.cos() - y

    return torch.cond(x.sum() > 0, true_fn, false_fn, (x,)) + 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_cond_values_and_grads_one_graph(backend):
    y = torch.randn(4)
    for sign in (1, -1):
        x = (sign * torch.rand(4) + sign * 0.1).requires_grad_()
        cnt, _ = _check(_cond_fn, (x, y), backend)
        assert cnt.frame_count == 1


def test_cond_graph_has_both_branches_as_subgraphs():
    graphs = []

    def backend(gm, example):
        graphs.append(gm)
        return gm.forward

    kiln.compile(_cond_fn, backend=backend, fullgraph=True)(torch.randn(4), torch.randn(4))
    (gm,) = graphs
    (node,) = _calls(gm, kiln.ops.cond)
    t, f = getattr(gm, node.args[1].target), getattr(gm, node.args[2].target)
    assert isinstance(t, torch.fx.GraphModule) and isinstance(f, torch.fx.GraphModule)
    # x, then the free variables of either branch (z, y), for both subgraphs
    assert len(node.args[3]) == 3
    for sub in (t, f):
        assert len([n for n in sub.graph.nodes if n.op == "placeholder"]) == 3


def test_cond_constant_pred_specialises():
    def f(x):
        return torch.cond(True, lambda a: a.sin(), lambda a: a.cos(), (x,))

    graphs = []
    kiln.compile(f, backend=lambda gm, ex: graphs.append(gm) or gm.forward)(torch.randn(3))
    assert not _calls(graphs[0], kiln.ops.cond)


def test_cond_inductor_compiles_branches():
    metrics.reset()
    x = torch.randn(16)
    _check(_cond_fn, (x, torch.randn(16)), "inductor")
    assert metrics.generated_kernel_count > 0


def test_cond_mismatched_branches_break_with_reason():
    def f(x):
        return torch.cond(x.sum() > 0, lambda a: a.sum(), lambda a: a * 2, (x,))

    with pytest.raises(kiln.exc.Unsupported, match="differs between the branches"):
        kiln.compile(f, backend="eager", fullgraph=True)(torch.randn(3))


_SEEN = []


def _noisy_body(a):
    _SEEN.append(1)
    return a.sin()


def test_body_with_side_effect_is_a_graph_break():
    from torch._higher_order_ops.wrap import wrap  # noqa: the user's entry point

    def f(x):
        return wrap(_noisy_body, x) + 1

    with pytest.raises(kiln.exc.Unsupported, match="SideEffects"):
        kiln.compile(f, backend="eager", fullgraph=True)(torch.randn(3))
    kiln.reset()
    from kiln.capture.cache import CompileContext

    ctx = CompileContext("aot_eager", "test")
    compiled = ctx.wrapper_for(f)
    x = torch.randn(3)
    before = len(_SEEN)
    torch.testing.assert_close(compiled(x), x.sin() + 1)
    assert len(_SEEN) == before + 1  # the body ran eagerly, once
    assert any("SideEffects" in r.reason for r in ctx.break_reasons)


def test_cond_nested():
    def f(x):
        def outer_true(a):
            return torch.cond(a.mean() > 0.5, lambda b: b * 3, lambda b: b * 4, (a,))

        return torch.cond(x.sum() > 0, outer_true, lambda a: a - 1, (x,))

    for x in (torch.rand(3), -torch.rand(3)):
        _check(f, (x.requires_grad_(),), "aot_eager")


def test_cond_export(tmp_path):
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x):
            return torch.cond(x.sum() > 0, lambda a: self.lin(a).relu(), lambda a: a.cos(), (x,))

    m = M()
    ep = kiln.export.export(m, (torch.randn(2, 3),))
    assert len(_calls(ep.graph_module, kiln.ops.cond)) == 1
    path = tmp_path / "cond.kiln"
    kiln.export.save(ep, str(path))
    loaded = kiln.export.load(str(path))
    assert len(_calls(loaded.graph_module, kiln.ops.cond)) == 1
    for x in (torch.rand(2, 3), -torch.rand(2, 3)):
        torch.testing.assert_close(ep.module()(x), m(x))
        torch.testing.assert_close(loaded.module()(x), m(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrap_is_one_node_with_its_free_variables(backend):
    from torch._higher_order_ops.wrap import wrap  # noqa: the user's entry point

    g = torch.randn(3)

    def f(x):
        return wrap(lambda a: a.sin() + g, x)

    graphs = []
    kiln.compile(f, backend=lambda gm, ex: graphs.append(gm) or gm.forward, fullgraph=True)(torch.randn(3))
    (node,) = _calls(graphs[0], wrap)  # NOTE: the object the user called (tests/capture/test_foreign_hops.py)
    assert len(node.args) == 3
    _check(f, (torch.randn(3, requires_grad=True),), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_values_grads_and_recompute(backend):
    def block(x, w):
        return torch.relu(x @ w).sin()

    def f(x, w1, w2):
        return cp.checkpoint(block, cp.checkpoint(block, x, w1, use_reentrant=False), w2,
                             use_reentrant=False)

    args = [torch.randn(8, 8, requires_grad=True) for _ in range(3)]
    cnt, _ = _check(f, args, backend)
    assert cnt.frame_count == 1
    assert len(_calls(cnt.graphs[0], kiln.ops.checkpoint)) == 2 if hasattr(cnt, "graphs") else True


def test_checkpoint_partition_saves_only_region_inputs():
    from kiln.aot import make_boxed_func
    from kiln.backends import aot_autograd

    seen = []

    def fw(gm, ex):
        seen.append(gm)
        return make_boxed_func(gm.forward)

    def f(x, w):
        return cp.checkpoint(lambda a, b: torch.relu(a @ b).sin().cos(), x, w, use_reentrant=False).sum()

    x, w = torch.randn(8, 8, requires_grad=True), torch.randn(8, 8, requires_grad=True)
    kiln.reset()
    kiln.compile(f, backend=aot_autograd(fw_compiler=fw, bw_compiler=fw), fullgraph=True)(x, w).backward()
    bw = seen[1]
    saved = [n.name for n in bw.graph.nodes if n.op == "placeholder" and not n.name.startswith("tangents")]
    assert all(s.startswith("primals") for s in saved), saved


def test_checkpoint_unknown_option_breaks():
    def f(x):
        return cp.checkpoint(torch.sin, x, use_reentrant=False, context_fn=lambda: None)

    with pytest.raises(kiln.exc.Unsupported, match="context_fn"):
        kiln.compile(f, backend="eager", fullgraph=True)(torch.randn(3))


# --------------------------------------------------------------------------- kiln's own ops in user code
def _recording():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    return graphs, backend


def test_kiln_wrap_called_by_user_code_is_one_node():
    graphs, backend = _recording()

    def f(x):
        return kiln.ops.wrap(lambda y: torch.sin(y) + 1, x)

    kiln.reset()
    x = torch.randn(3)
    torch.testing.assert_close(kiln.compile(f, backend=backend, fullgraph=True)(x), torch.sin(x) + 1)
    assert len(graphs) == 1
    (node,) = _calls(graphs[0], kiln.ops.wrap)
    assert len(node.args) == 2  # the body and x


def test_kiln_cond_called_by_user_code():
    graphs, backend = _recording()

    def f(p, x):
        return kiln.ops.cond(p, lambda x: x.sin(), lambda x: x.cos(), (x,))

    kiln.reset()
    x = torch.randn(3)
    c = kiln.compile(f, backend=backend, fullgraph=True)
    torch.testing.assert_close(c(torch.tensor(True), x), x.sin())
    torch.testing.assert_close(c(torch.tensor(False), x), x.cos())
    assert len(_calls(graphs[0], kiln.ops.cond)) == 1


def test_nested_subgraph_names_are_unique_over_the_frame():
    graphs, backend = _recording()

    def inner(x, y):
        z = x + y
        return kiln.ops.wrap(lambda x: kiln.ops.wrap(lambda x: x + z, x), x)

    def f(x, y):
        return kiln.ops.wrap(inner, x, y)

    kiln.reset()
    x, y = torch.randn(3, 3), torch.randn(3, 3)
    torch.testing.assert_close(kiln.compile(f, backend=backend, fullgraph=True)(x, y), x + y + x)
    names = {n for n, _ in graphs[0].named_modules()}
    assert names == {"", "wrap_body_2", "wrap_body_2.wrap_body_1", "wrap_body_2.wrap_body_1.wrap_body_0"}


def test_nested_cond_branch_names():
    graphs, backend = _recording()

    def f(p, q, x):
        def false_fn(q, x):
            return torch.cond(q, lambda x: x.sin(), lambda x: x.cos(), (x,))

        return torch.cond(p, lambda q, x: x + 1, false_fn, (q, x))

    kiln.reset()
    x = torch.randn(3)
    out = kiln.compile(f, backend=backend, fullgraph=True)(torch.tensor(False), torch.tensor(True), x)
    torch.testing.assert_close(out, x.sin())
    names = {n for n, _ in graphs[0].named_modules()}
    assert names == {"", "cond_true_1", "cond_false_1", "cond_false_1.cond_true_0", "cond_false_1.cond_false_0"}
