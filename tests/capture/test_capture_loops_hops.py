"""torch.while_loop and map (functorch.experimental.control_flow.map, torch.ops.higher_order.map_impl)
through kiln.compile and export: one graph with one loop node, bodies as subgraphs."""
import pytest
import torch
from functorch.experimental import control_flow

import kiln
import kiln.ops
from kiln.codegen import metrics
from kiln.testing import CompileCounterWithBackend

from test_capture_hops import _calls, _grads, check_against  # noqa: E402

BACKENDS = ["aot_eager", "inductor"]


def _check(fn, ref_fn, args, backend, fullgraph=True):
    """Compiled vs eager values and grads; returns the counter.

    NOTE: the eager reference is the loop written out (``ref_fn``): torch 2.13 runs its own
    eager while_loop / map through torch.compile, which would make these tests slow."""
    return check_against(fn, ref_fn, args, backend, fullgraph)[0]


def _recorded(fn, args, **kw):
    graphs = []
    kiln.reset()
    kiln.compile(fn, backend=lambda gm, ex: graphs.append(gm) or gm.forward, fullgraph=True, **kw)(*args)
    return graphs


def _loop_fn(x, w):
    def cond_fn(i, a):
        return i < 3

    def body_fn(i, a):
        return i + 1, (a * w).sin()  # w: a free variable of the body

    return torch.while_loop(cond_fn, body_fn, (torch.tensor(0), x))[1] + 1


def _loop_ref(x, w):
    for _ in range(3):
        x = (x * w).sin()
    return x + 1


def _map_fn(xs, y):
    return control_flow.map(lambda a, b: (a * b).cos(), xs, y) * 2


def _map_ref(xs, y):
    return torch.stack([(a * y).cos() for a in xs]) * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_while_loop_values_and_grads_one_graph(backend):
    x = torch.randn(8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    cnt = _check(_loop_fn, _loop_ref, (x, w), backend)
    assert cnt.frame_count == 1


def test_while_loop_graph_has_cond_and_body_subgraphs():
    (gm,) = _recorded(_loop_fn, (torch.randn(4), torch.randn(4)))
    (node,) = _calls(gm, kiln.ops.while_loop)
    c, b = getattr(gm, node.args[0].target), getattr(gm, node.args[1].target)
    assert isinstance(c, torch.fx.GraphModule) and isinstance(b, torch.fx.GraphModule)
    assert len(node.args[2]) == 2 and len(node.args[3]) == 1  # (i, x) carried, w lifted
    for sub in (c, b):
        assert len([n for n in sub.graph.nodes if n.op == "placeholder"]) == 3


def test_while_loop_via_higher_order_operator_with_additional_inputs():
    op = torch.ops.higher_order.while_loop

    def f(x, w):
        return op(lambda i, a, v: i < 4, lambda i, a, v: (i + 1, a * v + 1), (torch.tensor(0), x), (w,))[1]

    def unrolled(x, w):
        for _ in range(4):
            x = x * w + 1
        return x

    x, w = torch.randn(4), torch.randn(4)
    (gm,) = _recorded(f, (x, w))
    assert len(_calls(gm, op)) == 1  # NOTE: the object the user called
    kiln.reset()
    w.requires_grad_()
    out = kiln.compile(f, backend="aot_eager", fullgraph=True)(x, w)
    # NOTE: against the unrolled loop: torch 2.13's own eager while_loop gets this gradient
    # wrong when only an additional input requires grad
    torch.testing.assert_close(out, unrolled(x, w))
    torch.testing.assert_close(_grads(out, [w]), _grads(unrolled(x, w), [w]))


def test_while_loop_inductor_compiles_the_bodies():
    metrics.reset()
    _check(_loop_fn, _loop_ref, (torch.randn(32), torch.randn(32)), "inductor")
    assert metrics.generated_kernel_count > 0


def test_while_loop_same_tensor_twice():
    x = torch.randn(8)
    _check(_loop_fn, _loop_ref, (x, x), "inductor")


def test_while_loop_mismatched_body_breaks_with_reason():
    def f(x):
        return torch.while_loop(lambda i, a: i < 3, lambda i, a: (i + 1, a.sum()), (torch.tensor(0), x))

    with pytest.raises(kiln.exc.Unsupported, match=r"body_fn output 1 has shape=\[\].*carried input 1 has "
                                                    r"shape=\[3\]"):
        kiln.compile(f, backend="eager", fullgraph=True)(torch.randn(3))


def test_while_loop_int_carry_is_refused_with_hint():
    def f(x):
        return torch.while_loop(lambda n, a: n < 3, lambda n, a: (n + 1, a * 2), (0, x))

    with pytest.raises(kiln.exc.Unsupported, match="carried input 0 is .*not a tensor") as e:
        kiln.compile(f, backend="eager", fullgraph=True)(torch.randn(3))
    assert "0-d tensor" in str(e.value)


_SEEN = []


def test_body_with_side_effect_or_graph_break_is_refused():
    def noisy(i, a):
        _SEEN.append(1)
        return i + 1, a * 2

    def f(x):
        return torch.while_loop(lambda i, a: i < 3, noisy, (torch.tensor(0), x))

    with pytest.raises(kiln.exc.Unsupported, match="SideEffects"):
        kiln.compile(f, backend="eager", fullgraph=True)(torch.randn(3))

    def breaking(a, b):
        kiln.graph_break()
        return a * b

    def g(xs, y):
        return control_flow.map(breaking, xs, y)

    with pytest.raises(kiln.exc.Unsupported, match="map's body: the body cannot be captured as one graph"):
        kiln.compile(g, backend="eager", fullgraph=True)(torch.randn(2, 3), torch.randn(3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_map_values_and_grads_one_graph(backend):
    xs = torch.randn(4, 3, requires_grad=True)
    y = torch.randn(3, requires_grad=True)
    cnt = _check(_map_fn, _map_ref, (xs, y), backend)
    assert cnt.frame_count == 1


def test_map_graph_has_one_node_and_a_body():
    (gm,) = _recorded(_map_fn, (torch.randn(4, 3), torch.randn(3)))
    (node,) = _calls(gm, kiln.ops.map_impl)
    body = getattr(gm, node.args[0].target)
    phs = [n for n in body.graph.nodes if n.op == "placeholder"]
    assert [list(p.meta["example_value"].shape) for p in phs] == [[3], [3]]
    assert "map" in node.name and list(node.meta["example_value"][0].shape) == [4, 3]


def test_map_pytrees_and_int_args():
    def f(x, y):
        def body(t, k):
            return {"s": t[0] * k + t[1], "m": (t[0].sum(),)}

        out = control_flow.map(body, (x, y), x.size(1))
        return out["s"] + out["m"][0][:, None]

    def ref(x, y):
        return x * x.size(1) + y + x.sum(1)[:, None]

    x = torch.randn(5, 3, requires_grad=True)
    y = torch.randn(5, 3, requires_grad=True)
    for backend in BACKENDS:
        assert _check(f, ref, (x, y), backend).frame_count == 1


def test_map_impl_operator_and_dynamic_shapes():
    op = torch.ops.higher_order.map_impl

    def f(xs, y):
        return op(lambda a, b: a + b, [xs], [y])

    xs, y = torch.randn(4, 3), torch.randn(3)
    (gm,) = _recorded(f, (xs, y))
    assert len(_calls(gm, op)) == 1  # NOTE: the object the user called
    kiln.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    g = kiln.compile(_map_fn, backend=cnt, dynamic=True)
    for n in (4, 5, 7):  # NOTE: not 3, which duck-sizes xs's dim 0 with y's dim
        xs = torch.randn(n, 3)
        torch.testing.assert_close(g(xs, y), _map_ref(xs, y))
    assert cnt.frame_count == 1


def test_map_mismatched_xs_break_with_reason():
    def f(a, b):
        return control_flow.map(lambda t: t[0] + t[1], (a, b))

    with pytest.raises(kiln.exc.Unsupported, match="leading dimensions of mapped xs must be equal"):
        kiln.compile(f, backend="eager", fullgraph=True)(torch.randn(3, 2), torch.randn(4, 2))


def test_compiling_the_entry_point_itself():
    def inner(x):
        return x.sin(), x.cos().T

    for x in (torch.randn(3, 4, 5), torch.randn(5, 3, 4).permute(1, 2, 0)):
        kiln.reset()
        graphs = []
        out = kiln.compile(control_flow.map, backend=lambda gm, ex: graphs.append(gm) or gm.forward,
                           fullgraph=True)(inner, x)
        want = torch.stack([r.sin() for r in x]), torch.stack([r.cos().T for r in x])
        torch.testing.assert_close(out, want)
        (node,) = _calls(graphs[0], kiln.ops.map_impl)
        for fake, real in zip(node.meta["example_value"], want):
            assert fake.shape == real.shape and fake.stride() == real.stride()


def test_export_keeps_one_loop_and_one_map_node(tmp_path):
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x):
            _, y = torch.while_loop(lambda i, a: i < 4, lambda i, a: (i + 1, self.lin(a).tanh()),
                                    (torch.zeros((), dtype=torch.int64), x))
            return control_flow.map(lambda a, b: a * b, y, x[0])

    m = M()
    ep = kiln.export.export(m, (torch.randn(2, 3),))
    assert len(_calls(ep.graph_module, kiln.ops.while_loop)) == 1
    assert len(_calls(ep.graph_module, kiln.ops.map_impl)) == 1
    path = tmp_path / "loops.kiln"
    kiln.export.save(ep, str(path))
    loaded = kiln.export.load(str(path))
    def ref(x):
        y = x
        for _ in range(4):
            y = m.lin(y).tanh()
        return y * x[0]

    for x in (torch.randn(2, 3), torch.randn(2, 3)):
        torch.testing.assert_close(ep.module()(x), ref(x))
        torch.testing.assert_close(loaded.module()(x), ref(x))


def test_nested_map_while_loop_and_cond():
    def f(xs, w):
        def per_row(r, w):
            def body(i, a):
                return i + 1, torch.cond(a.sum() > 0, lambda t: t * w, lambda t: t - w, (a,))

            return torch.while_loop(lambda i, a: i < 2, body, (torch.zeros((), dtype=torch.int64), r))[1]

        return control_flow.map(per_row, xs, w)

    def ref(xs, w):
        out = []
        for a in xs:
            for _ in range(2):
                a = a * w if a.sum() > 0 else a - w
            out.append(a)
        return torch.stack(out)

    xs = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(4, requires_grad=True)
    assert _check(f, ref, (xs, w), "aot_eager").frame_count == 1
