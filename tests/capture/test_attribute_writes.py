"""Attribute writes in compiled code: ``x.data = y`` (captured as ``set_`` under no_grad,
through AOT and the backends).

Each test compares compiled with eager results (values, Python-side state, gradients)
and checks the frame and graph counts.
"""
from __future__ import annotations

import pytest
import torch

import kiln
from kiln.testing import CompileCounter, CompileCounterWithBackend


@pytest.fixture(autouse=True)
def _reset():
    kiln.reset()
    yield


# ---------------------------------------------------------------- x.data = y
def _set_data_then_add(x, y):
    x.data = y
    x.add_(1)
    return x


def _set_data_twice(x, y):
    x.data = y
    y.data = torch.zeros([0])
    return x


def _set_data_identity(x, y):
    z = x
    x.data = y
    y.data = torch.zeros([0])
    return torch.tensor(x is z)


def _set_data_after_read(x, y):
    w = y * 2  # y is read (and becomes a graph input) before x
    x.data = y
    y.data = torch.zeros([0])
    return x, w


def _inputs(requires_grad, second=None):
    a = torch.ones([6], requires_grad=requires_grad)
    b = (torch.arange(6.0) if second is None else second).requires_grad_(requires_grad)
    return a, b


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
@pytest.mark.parametrize("fn", [_set_data_then_add, _set_data_twice, _set_data_identity, _set_data_after_read],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_set_data_matches_eager(backend, fn, requires_grad):
    if fn is _set_data_then_add and requires_grad:
        pytest.skip("eager refuses add_ on a leaf that requires grad")
    cnt = CompileCounterWithBackend(backend)
    compiled = kiln.compile(fn, backend=cnt, fullgraph=True)
    for _ in range(3):
        ea, eb = _inputs(requires_grad)
        ca, cb = _inputs(requires_grad)
        out_e, out_c = fn(ea, eb), compiled(ca, cb)
        for e, c in [(ea, ca), (eb, cb)]:
            assert e.shape == c.shape and torch.equal(e.detach(), c.detach())
            assert (e.requires_grad, e.is_leaf) == (c.requires_grad, c.is_leaf)
        for e, c in zip(out_e if isinstance(out_e, tuple) else [out_e],
                        out_c if isinstance(out_c, tuple) else [out_c]):
            assert torch.equal(e.detach(), c.detach())
        if fn in (_set_data_then_add, _set_data_twice):
            assert out_c is ca  # the tensor passed in, as in eager
        if requires_grad:
            g = torch.randn(6)
            ea.backward(g)
            ca.backward(g.clone())
            torch.testing.assert_close(ea.grad, ca.grad)
    assert cnt.frame_count == 1


def test_set_data_shares_memory_and_keeps_the_version_counter():
    def fn(x, y):
        x.data = y
        return x * 1

    x, y = torch.zeros(3), torch.arange(3.0)
    compiled = kiln.compile(fn, backend="eager", fullgraph=True)
    out = compiled(x, y)
    assert x.data_ptr() == y.data_ptr() and torch.equal(out, y)
    assert x._version == 0  # `.data =` is no in-place op in eager: no bump


def test_set_data_graph_is_set_under_no_grad():
    cnt = CompileCounterWithBackend("eager")
    kiln.compile(_set_data_twice, backend=cnt, fullgraph=True)(*_inputs(True))
    (gm,) = cnt.graphs
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert calls.count(torch.Tensor.set_) == 2
    i = calls.index(torch.Tensor.set_)
    assert calls[i - 1] is torch._C._set_grad_enabled and calls[i + 1] is torch._C._set_grad_enabled
    # NOTE: x (the object of the first setattr) is the first placeholder, as in PyTorch's graph
    assert [n.name for n in gm.graph.find_nodes(op="placeholder")] == ["l_x_", "l_y_"]


def test_set_data_of_another_dtype_is_a_graph_break():
    cnt = CompileCounter()
    fn = kiln.compile(_set_data_twice, backend=cnt)
    x, y = torch.ones(2), torch.ones(2, dtype=torch.float64)
    out = fn(x, y)
    assert out is x and x.dtype == torch.float64 and y.numel() == 0


def test_set_data_graph_is_not_timed_by_the_profitability_check():
    from kiln.codegen import config, metrics

    with config.patch(profitability_check=True):
        compiled = kiln.compile(_set_data_after_read, backend="inductor", fullgraph=True)
        a, b = _inputs(False)
        out = compiled(a, b)
    assert a.shape == (6,) and torch.equal(a, torch.arange(6.0)) and b.numel() == 0
    torch.testing.assert_close(out[1], torch.arange(6.0) * 2)
    (d,) = metrics.profitability_decisions
    assert d.kept == "compiled" and "set_" in d.why


# ---------------------------------------------------------------- Tensor.grad
def test_grad_of_a_tensor_made_in_the_region_is_none():
    cnt = CompileCounter()

    def fn(a):
        t = torch.ones(2, 2)
        c = a + t
        return [t.grad, c]

    out = kiln.compile(fn, backend=cnt, fullgraph=True)(torch.ones(2, 2, requires_grad=True))
    assert out[0] is None and torch.equal(out[1].detach(), torch.full((2, 2), 2.0))
    assert (cnt.frame_count, cnt.op_count) == (1, 2)


def test_grad_of_a_parameter_is_an_input_and_guarded():
    model = torch.nn.Linear(2, 1)
    cnt = CompileCounter()

    def fn():
        return [torch.ones(p.grad.size()) for p in model.parameters()], model.bias.grad + 1

    compiled = kiln.compile(fn, backend=cnt, fullgraph=True)
    model(torch.ones(2, 2)).sum().backward()
    ones, g = compiled()
    assert [o.shape for o in ones] == [(1, 2), (1,)] and torch.equal(g, model.bias.grad + 1)
    assert (cnt.frame_count, cnt.op_count) == (1, 3)
    model.bias.grad = torch.full((1,), 5.0)  # another tensor of the same metadata: no recompile
    assert torch.equal(compiled()[1], torch.full((1,), 6.0)) and cnt.frame_count == 1


def test_grad_none_then_set_recompiles():
    cnt = CompileCounter()

    def fn(x):
        g = x.grad
        return x * 2 if g is None else x + g

    compiled = kiln.compile(fn, backend=cnt)
    x = torch.ones(3, requires_grad=True)
    torch.testing.assert_close(compiled(x), fn(x))
    x.grad = torch.full((3,), 5.0)
    torch.testing.assert_close(compiled(x), fn(x))
    assert cnt.frame_count == 2


# ---------------------------------------------------------------- modules and classes
class _Tracker:
    generation = 0


class _SubTracker(_Tracker):
    pass


def test_class_attribute_write_is_replayed_and_guarded():
    cnt = CompileCounter()

    def fn(x, obj):
        _Tracker.generation += 1
        return x + _Tracker.generation + obj.generation  # the instance sees the class's write

    compiled = kiln.compile(fn, backend=cnt, fullgraph=True)
    _Tracker.generation = 0
    obj = _SubTracker()
    assert torch.equal(compiled(torch.zeros(2), obj), torch.full((2,), 2.0))
    assert _Tracker.generation == 1 and "generation" not in vars(_SubTracker)
    # NOTE: the value read is guarded: the next call recompiles and counts on from 1
    assert torch.equal(compiled(torch.zeros(2), obj), torch.full((2,), 4.0))
    assert _Tracker.generation == 2 and cnt.frame_count == 2


def test_super_data_attribute_is_guarded():
    class A:
        a = 4

    class B(A):
        def f(self, x):
            return super().a * x

    cnt = CompileCounter()
    b = B()
    compiled = kiln.compile(b.f, backend=cnt, fullgraph=True)
    x = torch.ones(2)
    assert torch.equal(compiled(x), 4 * x)
    A.a = 5
    assert torch.equal(compiled(x), 5 * x)
    compiled(x)
    assert cnt.frame_count == 2


def test_module_attribute_write_is_replayed():
    import types

    mod = types.ModuleType("kiln_test_mod")
    mod.flag = 1
    cnt = CompileCounter()

    def fn(x, m):
        m.flag = m.flag + 1
        m.extra = "set"
        return x * m.flag  # the write is seen by the read after it

    out = kiln.compile(fn, backend=cnt, fullgraph=True)(torch.ones(2), mod)
    assert torch.equal(out, torch.full((2,), 2.0)) and (mod.flag, mod.extra) == (2, "set")


def test_deterministic_algorithms_set_in_the_region():
    prior = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    seen = []
    cnt = CompileCounter()

    def check_state():
        seen.append((torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled()))

    @kiln.compile(backend=cnt, fullgraph=True)
    def fn(x):
        check_state()
        torch.use_deterministic_algorithms(False, warn_only=False)
        return x + 1

    import torch._inductor.config as inductor_config

    try:
        for _ in range(2):
            torch.use_deterministic_algorithms(True, warn_only=True)
            fn(torch.randn(3))
            assert seen.pop() == (True, True)
            assert not torch.are_deterministic_algorithms_enabled()
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
            assert inductor_config.deterministic is False  # the module write, replayed
        assert cnt.frame_count == 1
    finally:
        torch.use_deterministic_algorithms(prior[0], warn_only=prior[1])


def test_deterministic_state_is_guarded():
    prior = torch.are_deterministic_algorithms_enabled()
    cnt = CompileCounter()
    compiled = kiln.compile(lambda x: x + 1 if torch.are_deterministic_algorithms_enabled() else x - 1,
                            backend=cnt, fullgraph=True)
    x = torch.zeros(2)
    try:
        torch.use_deterministic_algorithms(False)
        assert torch.equal(compiled(x), x - 1)
        torch.use_deterministic_algorithms(True)
        assert torch.equal(compiled(x), x + 1)
        assert cnt.frame_count == 2
    finally:
        torch.use_deterministic_algorithms(prior)


def test_catch_warnings_in_the_region():
    import warnings

    cnt = CompileCounter()
    filters, showwarning = warnings.filters, warnings.showwarning

    @kiln.compile(backend=cnt, fullgraph=True)
    def fn(x):
        with warnings.catch_warnings(record=True) as log:
            y = x.sin()
        return y, log, warnings.catch_warnings(record=True)

    x = torch.randn(8)
    y, log, cm = fn(x)
    assert torch.equal(y, x.sin()) and log == [] and isinstance(cm, warnings.catch_warnings)
    assert fn(x)[2] is not cm and cnt.frame_count == 1
    assert warnings.filters is filters and warnings.showwarning is showwarning


def test_function_wrapped_by_torchs_own_compile_is_inlined():
    cnt_inner, cnt_outer = CompileCounter(), CompileCounter()

    @torch._dynamo.run()
    def fn1(x):
        return torch.sin(x) * 10

    @kiln.compile(backend=cnt_inner, fullgraph=True)
    def fn2(x):
        return fn1(x) + 1

    @kiln.compile(backend=cnt_outer, fullgraph=True)
    def fn3(x):
        return torch.relu(fn2(x))

    x = torch.randn(4, 5)
    torch.testing.assert_close(fn3(x), torch.relu(torch.sin(x) * 10 + 1))
    assert (cnt_inner.frame_count, cnt_outer.frame_count, cnt_outer.op_count) == (0, 1, 4)


def test_missing_class_attribute_recompiles_and_raises_under_fullgraph():
    from kiln.exc import Unsupported

    class A:
        a = 2

    compiled = kiln.compile(lambda x, y: x + y.a, backend="eager", fullgraph=True)
    assert torch.equal(compiled(torch.zeros(2), A()), torch.full((2,), 2.0))
    del A.a
    with pytest.raises(Unsupported, match="no attribute 'a'"):
        compiled(torch.zeros(2), A())


# ---------------------------------------------------------------- user objects and dataclasses
class _PrefixedAttrs:
    setup = False

    def __setattr__(self, key, value):
        assert torch.compiler.is_dynamo_compiling() or _PrefixedAttrs.setup
        super().__setattr__(f"pfx_{key}", value)

    def __getattr__(self, key):
        assert torch.compiler.is_dynamo_compiling() or _PrefixedAttrs.setup
        return self.__dict__[f"pfx_{key}"]


def test_python_setattr_and_getattr_of_an_object_passed_in_are_inlined():
    obj = _PrefixedAttrs()
    object.__setattr__(obj, "pfx_x", torch.randn(8))

    @kiln.compile(backend="eager", fullgraph=True)
    def fn(o):
        o.y = o.x + 1

    fn(obj)
    # NOTE: replayed as object.__setattr__ (what the inlined __setattr__ did), not through
    # __setattr__ again, whose assert would fail outside the region
    assert set(vars(obj)) == {"pfx_x", "pfx_y"}
    assert torch.equal(obj.__dict__["pfx_y"], obj.__dict__["pfx_x"] + 1)


def test_python_setattr_of_an_object_built_in_the_region():
    @kiln.compile(backend="eager", fullgraph=True)
    def fn(x):
        o = _PrefixedAttrs()
        o.x = x
        o.y = o.x + 1
        return o

    x = torch.randn(8)
    o = fn(x)
    assert set(vars(o)) == {"pfx_x", "pfx_y"} and o.__dict__["pfx_x"] is x
    assert torch.equal(o.__dict__["pfx_y"], x + 1)


def test_object_setattr_on_dataclasses_built_in_the_region():
    import dataclasses

    @dataclasses.dataclass
    class A:
        x: torch.Tensor

    @dataclasses.dataclass(frozen=True)
    class F:
        x: torch.Tensor

    def fn(x):
        a, f = A(x), F(x)
        object.__setattr__(a, "x", x + 2)
        object.__setattr__(f, "x", x * 2)
        a.extra = 1
        return a, f

    cnt = CompileCounter()
    x = torch.randn(4)
    a, f = kiln.compile(fn, backend=cnt, fullgraph=True)(x)
    assert torch.equal(a.x, x + 2) and a.extra == 1 and torch.equal(f.x, x * 2)
    assert cnt.frame_count == 1


def test_assigning_a_frozen_dataclass_field_is_a_graph_break():
    import dataclasses

    from kiln.exc import Unsupported

    @dataclasses.dataclass(frozen=True)
    class F:
        x: int

    def fn(x):
        f = F(1)
        f.x = 2
        return x

    with pytest.raises(Unsupported, match="__setattr__"):
        kiln.compile(fn, backend="eager", fullgraph=True)(torch.ones(1))


def test_hasattr_on_a_dataclass_built_in_the_region():
    import dataclasses

    @dataclasses.dataclass
    class D:
        a: torch.Tensor
        b: torch.Tensor
        k = 7

    cnt = CompileCounter()
    x = torch.randn(10)

    @kiln.compile(backend=cnt, fullgraph=True)
    def fn():
        obj = D(x + 1, x - 1)
        if not hasattr(obj, "a") or hasattr(obj, "z"):
            return None
        return obj, obj.k

    obj, k = fn()
    assert isinstance(obj, D) and torch.equal(obj.a, x + 1) and torch.equal(obj.b, x - 1) and k == 7
    assert (cnt.frame_count, cnt.op_count) == (1, 2)
