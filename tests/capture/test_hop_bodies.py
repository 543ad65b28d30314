"""Higher-order op bodies as PyTorch records them: placeholder names and order, one input per
outer value, graph breaks for mutating objects built earlier, source_fn_stack, static buffers."""
import pytest
import torch
from torch._higher_order_ops.wrap import wrap  # noqa: the user's entry point

import kiln
from kiln.testing import CompileCounterWithBackend


class _Recorder:
    """A backend keeping the graphs it is given (run eagerly)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def _compile(fn, fullgraph=True, **kw):
    kiln.reset()
    rec = _Recorder()
    cnt = CompileCounterWithBackend(rec)
    return kiln.compile(fn, backend=cnt, fullgraph=fullgraph, **kw), cnt, rec


def _hop_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is wrap]


def _placeholders(gm):
    return [n.name for n in gm.graph.nodes if n.op == "placeholder"]


def test_body_placeholders_are_named_after_outer_values():
    def f(d):
        return wrap(lambda d: d["x"].sin() + d["y"][0].cos() - d["y"][1][2].sin(), d)

    d = {"x": torch.randn(()), "y": (torch.randn(()), [None, 1, torch.randn(())])}
    compiled, cnt, rec = _compile(f)
    torch.testing.assert_close(compiled(d), f(d))
    gm = rec.graphs[0]
    (node,) = _hop_nodes(gm)
    body = getattr(gm, node.args[0].target)
    assert _placeholders(body) == [a.name for a in node.args[1:]]
    assert _placeholders(body) == ["l_d_x_", "l_d_y_0_", "l_d_y_1_2_"]


def test_body_inputs_in_first_use_order_one_per_value():
    def f(x, y, z):
        def fn(*, x, y, z):
            z1, z2 = z
            return (x * 2) + y + z1

        return wrap(fn, x=x, y=y, z=z)

    x, y = torch.randn(3), torch.randn(3, 3)
    compiled, cnt, rec = _compile(f)
    torch.testing.assert_close(compiled(x, y, (x, y)), f(x, y, (x, y)))
    (node,) = _hop_nodes(rec.graphs[0])
    # NOTE: z1 is x itself: the body takes x once; z2 is unused
    assert len(node.args) == 3
    xs = torch.randn(3, requires_grad=True)
    out = kiln.compile(f, backend="aot_eager", fullgraph=True)(xs, y, (xs, y))
    (g,) = torch.autograd.grad(out.sum(), xs)
    torch.testing.assert_close(g, torch.full((3,), 9.0))

    def g2(x, y):
        return wrap(lambda a, b: b.cos() + a, x, y)

    compiled, cnt, rec = _compile(g2)
    a, b = torch.randn(3), torch.randn(3)
    torch.testing.assert_close(compiled(a, b), g2(a, b))
    (node,) = _hop_nodes(rec.graphs[0])
    body = getattr(rec.graphs[0], node.args[0].target)
    assert _placeholders(body) == ["l_y_", "l_x_"]  # the body reads y first
    assert [a.name for a in node.args[1:]] == ["l_y_", "l_x_"]


def test_tolist_closure_in_nested_bodies():
    def f(x):
        li = x.tolist()

        def g(x):
            def k(x):
                return li[0] + x

            return wrap(k, x)

        return wrap(g, x)

    x = torch.tensor([1, 2, 3], dtype=torch.int16)
    compiled, cnt, rec = _compile(f)
    torch.testing.assert_close(compiled(x), f(x))
    gm = rec.graphs[0]
    (node,) = _hop_nodes(gm)
    assert [a.name for a in node.args[1:]] == ["item", "l_x_"]
    rows = [n for n in gm.graph.nodes if n.op == "call_function" and n.name == "getitem"]
    assert rows and "example_value" not in rows[0].meta  # a row read, typed by nothing


class Obj:
    pass


@pytest.mark.parametrize("kind", ["set_new", "set_existing", "delete"])
def test_body_mutating_an_object_built_earlier_is_a_graph_break(kind):
    def f(x):
        obj = Obj()
        if kind != "set_new":
            obj.val = 3

        def g(x):
            if kind == "delete":
                del obj.val
            else:
                obj.val = x.dim()
            return x.clone()

        y = wrap(g, x)
        return y + (obj.val if kind != "delete" else 0)

    x = torch.zeros([])
    with pytest.raises(kiln.exc.Unsupported, match="SideEffects"):
        _compile(f)[0](x)
    compiled, cnt, rec = _compile(f, fullgraph=False)
    torch.testing.assert_close(compiled(x), f(x))
    assert all(not _hop_nodes(gm) for gm in rec.graphs)


def test_object_built_inside_the_body_may_change():
    def f(x):
        def g(x):
            obj = Obj()
            obj.val = 2
            return x * obj.val

        return wrap(g, x)

    x = torch.randn(3)
    compiled, cnt, rec = _compile(f)
    torch.testing.assert_close(compiled(x), x * 2)
    assert cnt.frame_count == 1


def _stacks(gm, names):
    out = {}
    for mod in gm.modules():
        for node in mod.graph.nodes:
            if node.name in names:
                out[node.name] = [n for n, _ in node.meta.get("source_fn_stack", [])]
    return out


def test_source_fn_stack_outside_higher_order_ops():
    def f(x):
        return wrap(lambda a: a.cos(), x).sin() + torch.func.vmap(lambda a: a.sum(0))(x)

    x = torch.randn(3, 3)
    compiled, cnt, rec = _compile(f)
    torch.testing.assert_close(compiled(x), f(x))
    got = _stacks(rec.graphs[0], {"sin", "cos", "add", "sum_1", "batched_outputs"})
    # NOTE: the vmap body's result is named after functorch's local (``batched_outputs``), its
    # stack after the name it was made with, as in PyTorch's graph.
    assert got == {"sin": ["sin"], "cos": ["wrap", "cos"], "add": ["add"], "batched_outputs": ["sum_1"]}


def test_module_buffers_keep_static_shapes_under_dynamic():
    z = torch.ones(4, 4)

    class Foo(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.buffer = torch.nn.Buffer(torch.ones(6, 4))

        def forward(self, x, y):
            def true_fn(x):
                return x.sum() + self.buffer.sum() + z.sum()

            def false_fn(x):
                return x.sum() - z.sum() - self.buffer.sum()

            return torch.cond(y, true_fn, false_fn, [x])

    kiln.reset()
    rec = _Recorder()
    compiled = kiln.compile(Foo(), backend=rec, dynamic=True, fullgraph=True)
    for pred in (True, False):
        args = (torch.tensor(pred), torch.tensor(5))
        torch.testing.assert_close(compiled(*args), Foo()(*args))
    gm = rec.graphs[0]
    (cond,) = [n for n in gm.graph.nodes if n.op == "call_function" and "cond" in str(n.target)]
    # buffer (static), x, z and z's one size symbol
    assert len(cond.args[3]) == 4
    buf = next(n for n in gm.graph.nodes if n.op == "placeholder" and "buffer" in n.name)
    assert list(buf.meta["example_value"].shape) == [6, 4]


def test_same_tensor_as_two_operands_gets_numbered_placeholders():
    def f(x):
        return torch.cond(x.sum() > 0, lambda a, b: a * b, lambda a, b: a - b, (x, x))

    compiled, cnt, rec = _compile(f)
    for x in (torch.rand(3), -torch.rand(3)):
        torch.testing.assert_close(compiled(x), f(x))
    gm = rec.graphs[0]
    assert _placeholders(gm.cond_true_0) == ["l_x_", "l_x__1"]
