"""Seed 001 (PyTorch's test/dynamo/test_aot_autograd.py): the tests that need capture,
through kiln's API (kiln.optimize / kiln.compile / kiln.capture.export)."""
from __future__ import annotations

import copy
import re

import pytest
import torch

import kiln
from kiln.testing import CompileCounter, CompileCounterWithBackend, compare_equal_outs_and_grads, rand_strided, same


def test_LSTM():
    class Repro(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_mod_model_lstm_lstm = torch.nn.LSTM(64, 64, num_layers=2, bidirectional=True)

        def forward(self, permute: torch.Tensor):
            self_mod_model_lstm_lstm = self.self_mod_model_lstm_lstm(permute)
            return (self_mod_model_lstm_lstm,)

    mod = Repro()
    aot_mod = kiln.optimize("aot_eager")(mod)
    args = [((92, 4, 64), (1, 5888, 92), torch.float32, "cpu", False)]
    args = [rand_strided(sh, st, dt, dev).requires_grad_(rg) for (sh, st, dt, dev, rg) in args]
    eager_result = mod(*args)
    aot_result = aot_mod(*args)
    assert same(eager_result, aot_result)


def test_mutation():
    def fn(param, y):
        prev_grad = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(False)
            param.add_(y)
        finally:
            torch.set_grad_enabled(prev_grad)
        return y

    y = torch.randn(4)
    x = torch.nn.Parameter(torch.randn(4))
    aot_fn = kiln.optimize("aot_eager")(fn)
    aot_fn(x, y)


def _mutation1_fn(_stack0, diagonal_chunked_attention_scores):
    getitem = diagonal_chunked_attention_scores[
        (slice(None, None, None), slice(None, None, None), slice(None, 256, None), slice(None, 257, None))
    ]
    _stack0[(slice(None, None, None), slice(None, -1, None), slice(None, None, None), slice(256, None, None))] = getitem
    view = _stack0.view(1, 12, 1024, 513)
    return (view,)


def test_mutation1():
    x = torch.randn(torch.Size([12, 4, 256, 513]))
    y = torch.randn(torch.Size([12, 3, 512, 513]))
    kiln.optimize("aot_eager")(_mutation1_fn)(x, y)


def test_negative_testing_mutation():
    def fn(_stack0, diagonal_chunked_attention_scores):
        getitem = diagonal_chunked_attention_scores[
            (slice(None, None, None), slice(None, None, None), slice(None, 256, None), slice(None, 257, None))
        ]
        _stack0 = torch.sin(_stack0)
        _stack0[(slice(None, None, None), slice(None, -1, None), slice(None, None, None),
                 slice(256, None, None))] = getitem
        view = _stack0.view(1, 12, 1024, 513)
        return (view,)

    x = torch.randn(torch.Size([12, 4, 256, 513]))
    y = torch.randn(torch.Size([12, 3, 512, 513]))
    kiln.optimize("aot_eager")(fn)(x, y)


def test_negative_testing():
    def fn(x, y):
        return torch.sin(x).add_(y)

    y = torch.randn(4)
    x = torch.randn(4)
    kiln.optimize("aot_eager")(fn)(x, y)


def test_call_fn_with_non_const_inputs_aot_safe():
    class ModuleSpecialFwd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(in_channels=3, out_channels=20, kernel_size=(5, 5))

        def _conv_forward(self, x):
            return self.conv._conv_forward(x, self.conv.weight, self.conv.bias)

        def forward(self, x):
            return self._conv_forward(x)

    mod = ModuleSpecialFwd()
    rx = torch.randn([3, 10, 10])
    real = mod(rx)
    graph, _ = kiln.capture.export(mod)(rx)
    assert same(real, graph(rx))
    aot_fn = kiln.optimize("aot_eager")(graph)
    aot_fn(rx)


def test_call_fn_with_non_const_inputs_aot_unsafe():
    class ModuleSpecialFwd(torch.nn.Module):
        def _some_bad_fwd(self, param, y):
            prev_grad = torch.is_grad_enabled()
            try:
                torch.set_grad_enabled(False)
                param.add_(y)
            finally:
                torch.set_grad_enabled(prev_grad)
            return y

        def forward(self, x, y):
            return self._some_bad_fwd(x, y)

    mod = ModuleSpecialFwd()
    x = torch.nn.Parameter(torch.randn(4))
    y = torch.randn([4])
    real = mod(x, y)
    graph, _ = kiln.capture.export(mod)(x, y)
    assert same(real, graph(x, y))
    aot_fn = kiln.optimize("aot_eager")(graph)
    aot_fn(x, y)


def test_call_fn_with_non_const_inputs_aot_unsafe_control_flow():
    class ModuleSpecialFwd(torch.nn.Module):
        def _some_bad_fwd(self, param, y):
            if y[0][0] < 3:
                return y + param
            return param * y

        def forward(self, x, y):
            a = x * y
            a = self._some_bad_fwd(a, a)
            b = x + y
            return a * b

    mod = ModuleSpecialFwd()
    x = torch.nn.Parameter(torch.randn([2, 2]))
    y = torch.randn([2, 2])
    real = mod(x, y)
    gms = []
    counter = CompileCounter()

    def capturing_fn(gm, inputs):
        gms.append(gm)
        return counter(gm, inputs)

    optimized_mod = kiln.optimize(capturing_fn)(mod)
    assert same(real, optimized_mod(x, y))
    assert counter.frame_count == 4
    assert counter.op_count == 7
    kiln.reset()
    aot_fn = kiln.optimize("aot_eager")(optimized_mod)
    aot_fn(x, y)


class _FailureReason:
    def __init__(self):
        self.reason = None

    def __call__(self, failure):
        self.reason = failure[0]


def test_requires_grad_fake_via_dynamo_recompiles():
    class F(torch.nn.Module):
        def forward(self, x, y):
            return (x + y,)

    x = torch.randn(3, 3, requires_grad=True)
    y = torch.randn(3, 3, requires_grad=True)
    z = torch.randn(3, 3, requires_grad=False)
    cc = CompileCounterWithBackend("aot_eager")
    fr = _FailureReason()
    fxy = kiln.optimize(cc, guard_fail_fn=fr)(F())
    compare_equal_outs_and_grads(None, F(), fxy, (x, y))
    compare_equal_outs_and_grads(None, F(), fxy, (x, z))
    assert "tensor 'L['y']' requires_grad mismatch. expected requires_grad=1" in fr.reason
    fr.reason = None
    assert cc.frame_count == 2

    kiln.reset()
    cc = CompileCounterWithBackend("aot_eager")
    fxz = kiln.optimize(cc, guard_fail_fn=fr)(F())
    compare_equal_outs_and_grads(None, F(), fxz, (x, z))
    compare_equal_outs_and_grads(None, F(), fxz, (x, z))
    assert cc.frame_count == 1
    assert fr.reason is None


def test_double_backward_errors():
    from kiln.aot import DOUBLE_BACKWARD_ERROR as err

    for grad_output in (torch.tensor(1.0, requires_grad=True), None):
        x = torch.tensor(1.0, requires_grad=True)

        def f1(x):
            y = x.sin().exp()
            (gx,) = torch.autograd.grad(y, x, create_graph=True, grad_outputs=grad_output)
            torch.autograd.grad(gx, x)
            return gx

        compiled_f1 = kiln.compile(backend="aot_eager")(f1)
        f1(x)
        with pytest.raises(RuntimeError, match=re.escape(err)):
            compiled_f1(x)

        def f2(x):
            y = x.sin().exp()
            (gx,) = torch.autograd.grad(y, x, create_graph=True, grad_outputs=grad_output)
            return gx

        compiled_f2 = kiln.compile(backend="aot_eager")(f2)
        gx = compiled_f2(x)
        with pytest.raises(RuntimeError, match=re.escape(err)):
            torch.autograd.grad(gx, x)

        def f3(x):
            return x.sin().exp()

        compiled_f3 = kiln.compile(backend="aot_eager")(f3)
        y = compiled_f3(x)
        (gx,) = torch.autograd.grad(y, x, create_graph=True, grad_outputs=grad_output)
        with pytest.raises(RuntimeError, match=re.escape(err)):
            torch.autograd.grad(gx, x)

    def f4(x):
        return x.sin().exp()

    compiled_f4 = kiln.compile(backend="aot_eager")(f4)
    x = torch.tensor(1.0, requires_grad=True)
    y = compiled_f4(x)
    (gx,) = torch.autograd.grad(y, x, create_graph=False, grad_outputs=grad_output)


def test_arg_dupe_via_dynamo_recompiles():
    class F(torch.nn.Module):
        def forward(self, x, y):
            x = x.trunc_()
            y = y.trunc_()
            return (x + y,)

    x = torch.randn(3, 3, requires_grad=True)
    x1, x2, x3, x4 = x.clone(), x.clone(), x.clone(), x.clone()
    y = torch.randn(3, 3, requires_grad=True)
    y1, y2, y4 = y.clone(), y.clone(), y.clone()
    cc = CompileCounterWithBackend("aot_eager")
    fr = _FailureReason()
    fxy = kiln.optimize(cc, guard_fail_fn=fr)(F())
    fxy(x1, y1)
    fxy(x2, y2)
    assert fr.reason is None
    assert cc.frame_count == 1

    kiln.reset()
    cc = CompileCounterWithBackend("aot_eager")
    fxx = kiln.optimize(cc, guard_fail_fn=fr)(F())
    fxx(x3, x3)
    fxx(x4, y4)
    assert cc.frame_count == 2
    assert "L['x'] is L['y']" in fr.reason


def _dupe_case(F, first, second, expect_reason, frames=2):
    cc = CompileCounterWithBackend("aot_eager")
    fr = _FailureReason()
    f = kiln.optimize(cc, guard_fail_fn=fr)(F())
    f(*first)
    f(*second)
    assert cc.frame_count == frames
    if expect_reason is not None:
        assert expect_reason in fr.reason
    kiln.reset()


def _clones(t, n):
    return [t.clone() for _ in range(n)]


def test_arg_dupe_via_dynamo_recompiles_many_args_param_non_tensor_arg():
    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mean = torch.nn.Parameter(torch.randn(3, 3))

        def forward(self, a, b, e, f):
            a.trunc_()
            b.trunc_()
            return (a + b + self.mean) * e * f

    a1, a2 = _clones(torch.randn(3, 3, requires_grad=True), 2)
    b1, b2 = _clones(torch.randn(3, 3, requires_grad=True), 2)
    _dupe_case(F, (a1, a1, 2, 2), (a2, b2, 2, 2), "L['a'] is L['b']")
    c3, c4 = _clones(torch.randn(3, 3, requires_grad=True), 2)
    d3, d4 = _clones(torch.randn(3, 3, requires_grad=True), 2)
    _dupe_case(F, (c3, c3, 3, 3), (c4, d4, 3, 3), "L['a'] is L['b']")


def test_arg_dupe_via_dynamo_recompiles_many_with_global():
    z = None

    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mean = torch.nn.Parameter(torch.randn(3, 3))

        def forward(self, a, b, e, f):
            a.trunc_()
            b.trunc_()
            return (a + b + z + self.mean) * e * f

    a = torch.randn(3, 3, requires_grad=True)
    b = torch.randn(3, 3, requires_grad=True)
    z = a
    a1, a2 = a.clone(), a.clone()
    b1, b2 = b.clone(), b.clone()
    _dupe_case(F, (a1, a1, 2, 2), (a2, b2, 2, 2), "L['a'] is L['b']")


def test_arg_dupe_via_dynamo_recompiles_many_args_param_non_tensor_arg_list():
    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mean = torch.nn.Parameter(torch.randn(3, 3))

        def forward(self, e, f, a, b):
            a.trunc_()
            b.trunc_()
            return (a + b + self.mean) * e[0] * f[0]

    a1, a2 = _clones(torch.randn(3, 3, requires_grad=True), 2)
    b1, b2 = _clones(torch.randn(3, 3, requires_grad=True), 2)
    _dupe_case(F, ([3, 2, 1], [4, 5, 6], a1, a1), ([3, 2, 1], [4, 5, 6], a2, b2), "L['a'] is L['b']")
    c3, c4 = _clones(torch.randn(3, 3, requires_grad=True), 2)
    d3, d4 = _clones(torch.randn(3, 3, requires_grad=True), 2)
    _dupe_case(F, ([3, 2, 1], [4, 5, 6], c3, c3), ([3, 2, 1], [4, 5, 6], c4, d4), None)


def test_arg_dupe_via_dynamo_recompiles_many_args_param():
    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mean = torch.nn.Parameter(torch.randn(3, 3))

        def forward(self, a, b):
            a.trunc_()
            b.trunc_()
            return a + b + self.mean

    a1, a2 = _clones(torch.randn(3, 3, requires_grad=True), 2)
    b1, b2 = _clones(torch.randn(3, 3, requires_grad=True), 2)
    _dupe_case(F, (a1, a1), (a2, b2), "L['a'] is L['b']")
    c3, c4 = _clones(torch.randn(3, 3, requires_grad=True), 2)
    d3, d4 = _clones(torch.randn(3, 3, requires_grad=True), 2)
    _dupe_case(F, (c3, c3), (c4, d4), "L['a'] is L['b']")


def test_arg_dupe_via_dynamo_recompiles_many_args():
    class F(torch.nn.Module):
        def forward(self, a, b, c, d):
            a.trunc_()
            b.trunc_()
            c.trunc_()
            d.trunc_()
            return (a + b + c + d,)

    a1, a2, a3, a4 = _clones(torch.randn(3, 3, requires_grad=True), 4)
    b1, b2, b3, b4 = _clones(torch.randn(3, 3, requires_grad=True), 4)
    _dupe_case(F, (a1, a1, a1, a1), (a2, b2, b2, b2), "L['a'] is L['b']")
    c3, c4 = _clones(torch.randn(3, 3, requires_grad=True), 2)
    d3, d4 = _clones(torch.randn(3, 3, requires_grad=True), 2)
    _dupe_case(F, (a3, b3, c3, c3), (a4, b4, c4, d4), "L['c'] is L['d']")


@pytest.mark.expect_fallback("shares memory with another input")
def test_alias_inputs():
    def fn():
        a = torch.tensor([1])
        a = a[0:1]
        b = a.squeeze()
        a[0] = 0
        if a[0] < 1e5:
            pass
        a[0] = 2
        return b

    ref_output = fn()
    aot_fn = kiln.optimize("aot_eager")(fn)
    actual_output = aot_fn()
    assert torch.equal(ref_output, actual_output)


def test_grad_inputs_alias_inputs():
    class Test(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, y):
            ctx.save_for_backward(x)
            return y

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return x, grad

    def fn(x, y):
        return Test.apply(x, y)

    x = torch.ones(1, requires_grad=True)
    y = torch.ones(1, requires_grad=True)
    compiled_fn = kiln.compile(fn, backend="aot_eager")
    out = compiled_fn(x, y)
    out.sum().backward()


def test_nn_parameter_construction():
    def fn(x):
        y = x.sin()
        z = torch.nn.Parameter(torch.ones(1))
        return y + z

    x = torch.rand((4, 4))
    opt_fn = kiln.optimize("aot_eager")(fn)
    assert same(fn(x), opt_fn(x))


def test_aot_grad_mode_mutation():
    for compiler in ["aot_eager", "inductor"]:
        def f(x):
            y = x * x
            torch.set_grad_enabled(False)
            return y.clone(), y

        f_compiled = kiln.compile(f, backend=compiler, fullgraph=True)
        torch.set_grad_enabled(True)
        x = torch.ones(3, requires_grad=True) * 3
        y_ref = f(x)
        assert torch.is_grad_enabled() is False
        torch.set_grad_enabled(True)
        y = f_compiled(x)
        assert torch.is_grad_enabled() is False
        torch.set_grad_enabled(True)
        assert all(torch.equal(a, b) for a, b in zip(y_ref, y))
        assert y_ref[0].grad_fn is None
        assert y[0].grad_fn is None
        assert y_ref[1].grad_fn is not None
        assert y[1].grad_fn is not None
        g = torch.tensor([-1.0, 2.0, 0.0])
        assert torch.equal(sum(y_ref[1].grad_fn(g)), sum(t for t in y[1].grad_fn.apply(None, g) if t is not None))


def test_aot_autograd_raises_invalid_leaf_set():
    @kiln.compile
    def f(x):
        x.set_(torch.ones(2))

    x = torch.ones(2, requires_grad=True)
    with pytest.raises(RuntimeError, match="is being used in an in-place operation"):
        f(x)


def test_aot_autograd_expand_mutation_functionalizes():
    def fn(x):
        y = x.expand(3, *x.shape)
        y[0, 0].add_(5)
        return y

    opt_fn = kiln.compile(fn, backend="aot_eager")
    x = torch.arange(6)
    x_opt = x.clone().detach()
    assert torch.equal(fn(x), opt_fn(x_opt))
    assert torch.equal(x, x_opt)


def test_aot_autograd_expand_mutation_backwards():
    def fn(x, z):
        y = x.expand(3, *x.shape)
        y[1, 1].mul_(5)
        return y * z

    opt_fn = kiln.compile(fn, backend="aot_eager")
    x = torch.arange(6, dtype=torch.float)
    z = x.clone().detach()
    x_opt = x.clone().detach()
    z_opt = x.clone().detach()
    z.requires_grad = True
    z_opt.requires_grad = True
    res = fn(x, z)
    opt_res = opt_fn(x_opt, z_opt)
    assert torch.equal(res, opt_res)
    res.sum().backward()
    opt_res.sum().backward()
    assert torch.equal(x, x_opt)
    assert torch.equal(z.grad, z_opt.grad)


def test_data_ptr_access_fails_in_forward():
    with torch.library._scoped_library("mylib", "FRAGMENT") as lib:
        torch.library.define("mylib::foo", "(Tensor x) -> Tensor", lib=lib)

        @torch.library.impl("mylib::foo", "CompositeImplicitAutograd", lib=lib)
        def _(x):
            x.data_ptr()
            return x.clone()

        x = torch.randn(3)

        def data_ptr_graph_input(x):
            return torch.ops.mylib.foo(x)

        def data_ptr_graph_intermediate(x):
            y = x.clone()
            return torch.ops.mylib.foo(y)

        for f in [data_ptr_graph_input, data_ptr_graph_intermediate]:
            with pytest.raises(RuntimeError, match="Cannot access data pointer"):
                kiln.make_fx(f, tracing_mode="fake")(x)
            with pytest.raises(RuntimeError, match="Cannot access data pointer"):
                kiln.make_fx(f, tracing_mode="symbolic")(x)
            with pytest.raises(RuntimeError, match="Cannot access data pointer"):
                kiln.compile(f, backend="eager", fullgraph=True)(x)


def test_data_ptr_access_fails_in_backward():
    with torch.library._scoped_library("mylib", "FRAGMENT") as lib:
        torch.library.define("mylib::foo", "(Tensor x) -> Tensor", lib=lib)
        backward_called = False

        class Foo(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.clone()

            @staticmethod
            def backward(ctx, grad):
                nonlocal backward_called
                backward_called = True
                grad.data_ptr()
                return grad.clone()

        @torch.library.impl("mylib::foo", "CompositeImplicitAutograd", lib=lib)
        def _(x):
            return Foo.apply(x)

        def f(x):
            return torch.ops.mylib.foo(x)

        x = torch.randn(3, requires_grad=True)
        with pytest.raises(RuntimeError, match="Cannot access data pointer"):
            kiln.compile(f, backend="aot_eager", fullgraph=True)(x)
        assert backward_called
