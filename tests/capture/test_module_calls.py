"""Calls of nn.Modules inside the compiled region: forward hooks, lazy modules, a forward set on
the instance, attribute lookup order, static forwards, and pickling a compiled module."""
from __future__ import annotations

import io
import types

import pytest
import torch

import kiln
from kiln.testing import CompileCounter


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))

    def forward(self, x):
        return self.net(x) * 2


def _hooked_toy():
    torch.manual_seed(0)
    m = Toy()
    seen = []
    for _, sub in m.net.named_modules():
        sub.register_forward_hook(lambda mod, inp, out: seen.append(type(mod).__name__))
    m.net[0].register_forward_pre_hook(lambda mod, inp: (inp[0] * 3,))
    m.net[2].register_forward_hook(lambda mod, inp, out: out + 1)
    m.net[1].register_forward_pre_hook(lambda mod, args, kwargs: ((args[0] - 0.5,), kwargs), with_kwargs=True)
    return m, seen


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_forward_hooks_of_submodules_run_in_one_graph(backend):
    m, seen = _hooked_toy()
    x = torch.randn(3, 4, requires_grad=True)
    ref = m(x)
    ref.sum().backward()
    ref_grad, ref_seen = x.grad.clone(), list(seen)
    x.grad = None
    seen.clear()
    cnt = CompileCounter()
    cm = kiln.compile(m, backend=cnt if backend == "aot_eager" else backend, fullgraph=True)
    for _ in range(2):
        seen.clear()
        out = cm(x)
        out.sum().backward()
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(x.grad, ref_grad)
        x.grad = None
        assert seen == ref_seen  # the hooks' own side effects, in eager's order
    if backend == "aot_eager":
        assert cnt.frame_count == 1


def test_adding_a_hook_to_a_hooked_module_recompiles():
    m, seen = _hooked_toy()
    x = torch.randn(3, 4)
    cm = kiln.compile(m, backend="eager", fullgraph=True)
    cm(x)
    h = m.net[2].register_forward_hook(lambda mod, inp, out: out * 10)
    torch.testing.assert_close(cm(x), m(x))
    h.remove()
    torch.testing.assert_close(cm(x), m(x))


def test_backward_hooks_are_a_graph_break_with_a_reason():
    m = Toy()
    m.net[0].register_full_backward_hook(lambda mod, gi, go: None)
    with pytest.raises(kiln.exc.Unsupported, match="backward hooks"):
        kiln.compile(m, backend="eager", fullgraph=True)(torch.randn(2, 4))


def test_lazy_modules_initialize_on_the_first_compiled_call():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.LazyLinear(6), torch.nn.ReLU(), torch.nn.LazyLinear(1))
    cnt = CompileCounter()
    cm = kiln.compile(m, backend=cnt, fullgraph=True)
    x = torch.randn(5, 3)
    out = cm(x)
    assert type(m[0]) is torch.nn.Linear and m[0].weight.shape == (6, 3)
    torch.testing.assert_close(out, m(x))
    cm(x)
    assert cnt.frame_count == 1


def test_a_forward_set_on_the_instance_is_called_and_guarded():
    class Cos(torch.nn.Module):
        def forward(self, x):
            return torch.cos(x)

    def sin_forward(self, x):
        return torch.sin(x)

    mod = Cos()
    cnt = CompileCounter()
    f = kiln.compile(lambda x: mod(x) + 1, backend=cnt)
    x = torch.randn(4)
    torch.testing.assert_close(f(x), torch.cos(x) + 1)
    mod.forward = types.MethodType(sin_forward, mod)
    torch.testing.assert_close(f(x), torch.sin(x) + 1)
    assert cnt.frame_count == 2


def test_a_method_shadows_a_submodule_of_the_same_name_as_in_python():
    class Base(torch.nn.Module):
        def linear(self, x):
            return x

    class Mod(Base):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(11, 11)  # in _modules: the class's method wins
            self.scale = 3  # in the instance dict: wins over the method below

        def scale(self, x):
            raise RuntimeError("not called")

        def forward(self, x):
            return self.linear(x) * self.scale

    m = Mod()
    x = torch.ones(3, 3)
    torch.testing.assert_close(kiln.compile(m, backend="eager", fullgraph=True)(x), m(x))


def test_a_static_forward_is_called_without_self():
    class Swish(torch.nn.Module):
        @staticmethod
        def forward(x):
            return x * torch.sigmoid(x)

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.act = Swish()

        def forward(self, x):
            return self.act(x) + 1

    m, x = Outer(), torch.randn(4)
    torch.testing.assert_close(kiln.compile(m, backend="eager", fullgraph=True)(x), m(x))


def test_a_compiled_module_pickles_and_loads_compiled_the_same_way():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())
    cm = kiln.compile(m, backend="inductor")
    x = torch.randn(2, 4)
    cm(x)
    buf = io.BytesIO()
    torch.save(cm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded, kiln.capture.OptimizedModule)
    assert loaded._kiln_ctx.backend_name == cm._kiln_ctx.backend_name
    torch.testing.assert_close(loaded(x), m(x))


def test_functional_private_helpers_are_inlined_not_graph_calls():
    # NOTE: MultiheadAttention.forward calls F._canonical_mask / F._none_or_dtype on its masks
    # before F.multi_head_attention_forward: helpers, inlined (none when the masks are None).
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(8, 2, dropout=0.0)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(x, mask):
        return mha(x, x, x, key_padding_mask=mask, need_weights=False)[0]

    opt = kiln.compile(f, backend=backend, fullgraph=True)
    x = torch.randn(3, 2, 8)
    for mask in (None, torch.tensor([[False, False, True], [False, True, True]])):
        torch.testing.assert_close(opt(x, mask), f(x, mask))
    names = [getattr(n.target, "__name__", "") for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert "multi_head_attention_forward" in names
    assert not [n for n in names if n in ("_canonical_mask", "_none_or_dtype")], names
    assert sum(n.op == "call_function" for n in graphs[0].graph.nodes) == 2  # the call and its [0]


class _Stepper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x).relu()

    def training_step(self, x):
        return self(x).sum()


def test_dynamo_ctx_of_a_compiled_module_compiles_other_methods_the_same_way():
    model = _Stepper()
    cc = CompileCounter()
    compiled = kiln.compile(model, backend=cc)
    model.forward = compiled.dynamo_ctx(model.forward)
    model.training_step = compiled.dynamo_ctx(model.training_step)
    x = torch.randn(3, 4)
    got = model.training_step(x)
    torch.testing.assert_close(got, _Stepper.forward(model, x).sum())
    assert cc.frame_count == 1 and cc.op_count == 3  # linear, relu, sum: one frame, forward inlined
