"""PyTorch's higher-order operators called by user code (``torch.ops.higher_order.*``,
``torch._higher_order_ops.wrap.wrap``): the captured graph's node targets the very object
the user called, and every backend still compiles and runs it (kiln.ops.foreign)."""
import pytest
import torch
from torch._higher_order_ops.wrap import wrap  # the user's entry point

import kiln
import kiln.ops
from kiln.ops.foreign import kiln_graph
from kiln.testing import CompileCounterWithBackend

BACKENDS = ["eager", "aot_eager", "inductor"]


def _calls(gm, target):
    return [n for m in gm.modules() if isinstance(m, torch.fx.GraphModule)
            for n in m.graph.nodes if n.op == "call_function" and n.target is target]


def _recorded(fn, args):
    graphs = []
    kiln.reset()
    kiln.compile(fn, backend=lambda gm, ex: graphs.append(gm) or gm.forward, fullgraph=True)(*args)
    return graphs


def _grads(out, leaves):
    return torch.autograd.grad(out.sum(), leaves)


def _check(fn, args, backend):
    """Compiled vs eager values and grads of the leaves that require grad; the counter."""
    kiln.reset()
    cnt = CompileCounterWithBackend(backend)
    out = kiln.compile(fn, backend=cnt, fullgraph=True)(*args)
    ref = fn(*args)
    torch.testing.assert_close(out, ref)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if leaves:
        torch.testing.assert_close(_grads(out, leaves), _grads(ref, leaves))
    return cnt


def _wrap_fn(x, y):
    return wrap(lambda a: a.sin() * y, x) + 1


def test_wrap_node_targets_the_object_called():
    (gm,) = _recorded(_wrap_fn, (torch.randn(3), torch.randn(3)))
    (node,) = _calls(gm, wrap)
    assert not _calls(gm, kiln.ops.wrap)
    assert "torch.ops.higher_order.wrap(" in gm.code
    # NOTE: the node's getitem outputs and the body's nodes keep their usual shape
    assert [u.target.__name__ for u in node.users] == ["getitem"]
    assert node.args[0].op == "get_attr"


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrap_values_grads_and_one_graph(backend):
    x, y = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    cnt = _check(_wrap_fn, (x, y), backend)
    assert cnt.frame_count == 1 and cnt.op_count >= 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_nested_wrap(backend):
    def f(x):
        return wrap(lambda a: wrap(lambda b: b.cos() + 1, a) * 2, x)

    (gm,) = _recorded(f, (torch.randn(3),))
    assert len(_calls(gm, wrap)) == 2  # NOTE: one in the graph, one in its body
    assert _check(f, (torch.randn(3, requires_grad=True),), backend).frame_count == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_cond_operator(backend):
    op = torch.ops.higher_order.cond

    def f(x):
        return op(x.sum() > 0, lambda a: (a.sin(),), lambda a: (a.cos() * 2,), (x,))[0]

    (gm,) = _recorded(f, (torch.randn(4),))
    assert len(_calls(gm, op)) == 1
    for sign in (1, -1):
        x = (sign * (torch.rand(4) + 0.1)).requires_grad_()
        _check(f, (x,), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_while_loop_and_map_impl_operators(backend):
    loop, mapped = torch.ops.higher_order.while_loop, torch.ops.higher_order.map_impl

    def f(x, xs):
        n, y = loop(lambda i, a: i < 3, lambda i, a: (i + 1, a.sin() + 1), (torch.tensor(0), x), ())
        return y + mapped(lambda r, b: r * b, [xs], [y])[0].sum(0)

    (gm,) = _recorded(f, (torch.randn(3), torch.randn(5, 3)))
    assert len(_calls(gm, loop)) == 1 and len(_calls(gm, mapped)) == 1
    _check(f, (torch.randn(3), torch.randn(5, 3)), backend)


def test_public_functions_keep_kilns_ops():
    def f(x):
        return torch.cond(x.sum() > 0, lambda a: a.sin(), lambda a: a.cos(), (x,))

    (gm,) = _recorded(f, (torch.randn(4),))
    assert len(_calls(gm, kiln.ops.cond)) == 1


def test_kiln_graph_copies_and_leaves_the_users_graph():
    lin = torch.nn.Linear(3, 3)

    def f(x):
        return wrap(lambda a: wrap(lambda b: lin(b), a).relu(), x)

    x = torch.randn(2, 3)
    (gm,) = _recorded(f, (x,))
    code = gm.code
    new = kiln_graph(gm)
    assert new is not gm and new.code != code and gm.code == code
    assert len(_calls(gm, wrap)) == 2 and not _calls(new, wrap)
    assert len(_calls(new, kiln.ops.wrap)) == 2
    assert kiln_graph(new) is new  # nothing foreign left: the graph itself
    # NOTE: the module's parameters are the graph's inputs (capture lifts them)
    args = (x, lin.weight, lin.bias)
    torch.testing.assert_close(new(*args), gm(*args))


def test_aot_of_a_recorded_graph():
    """A user backend handing the captured graph to kiln.aot itself."""
    seen = []

    def backend(gm, example_inputs):
        seen.append(gm)
        return kiln.aot.aot_module_simplified(gm, example_inputs, fw_compiler=kiln.aot.nop)

    kiln.reset()
    x = torch.randn(3, requires_grad=True)
    out = kiln.compile(lambda a: wrap(lambda b: b.exp(), a) * 3, backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(out, x.exp() * 3)
    torch.testing.assert_close(_grads(out, [x]), _grads(x.exp() * 3, [x]))
    assert len(_calls(seen[0], wrap)) == 1  # NOTE: the user's graph keeps the object called


def test_export_of_a_module_calling_wrap():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x):
            return wrap(lambda a: self.lin(a).relu(), x)

    m = M()
    ep = kiln.export.export(m, (torch.randn(2, 3),))
    x = torch.randn(2, 3)
    torch.testing.assert_close(ep.module()(x), m(x))
