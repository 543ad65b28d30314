"""Capture: Python features through kiln.compile, compared with eager (fast, CPU)."""
from __future__ import annotations

import warnings

import pytest
import torch

import kiln
from kiln.capture import config
from kiln.exc import Unsupported
from kiln.testing import CompileCounter


@pytest.fixture(autouse=True)
def _reset():
    kiln.reset()
    prev = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(prev)


def run(fn, *args, frames=None, ops=None, **kwargs):
    cc = CompileCounter()
    opt = kiln.optimize(cc)(fn)
    expected = fn(*args, **kwargs)
    got = opt(*args, **kwargs)
    assert _same(expected, got), (expected, got)
    if frames is not None:
        assert cc.frame_count == frames
    if ops is not None:
        assert cc.op_count == ops
    return cc, opt


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, equal_nan=True)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


X = torch.randn(4, 3)
Y = torch.randn(4, 3)


def test_straight_line_single_graph():
    def f(x, y):
        a = torch.sin(x) + y * 2
        return a.relu().sum(dim=0), a.shape[0]

    run(f, X, Y, frames=1)


def test_python_control_flow_on_constants():
    def f(x, n, flag=True, *, scale=2.0):
        for i in range(n):
            x = x + i
        if flag and n > 2:
            x = x * scale
        return [x, {"n": n}]

    run(f, X, 3, frames=1)
    run(f, X, 3, False, scale=1.5)


def test_closures_nested_functions_and_kwargs():
    k = 3

    def helper(t, *, m=2):
        return t * m + k

    def f(x):
        def inner(t, b=1):
            return helper(t, m=b) - k

        g = lambda t: inner(t, 4)  # noqa: E731
        return g(x) + inner(x)

    run(f, X, frames=1)


def test_list_dict_tuple_ops_and_unpacking():
    def f(x, pair, d):
        a, b = pair
        first, *rest = [a, b, x]
        out = dict(d)
        out["s"] = first + rest[-1]
        xs = [x] * 2 + list(pair)
        return out, tuple(xs), len(xs), sum([1, 2, 3]), isinstance(x, torch.Tensor)

    run(f, X, (X, Y), {"k": 1}, frames=1)


def test_list_mutation_of_input_is_replayed():
    def f(x, lst, d):
        lst.append(x + 1)
        lst[0] = 7
        d["out"] = x * 2
        return x.cos()

    lst, d = [1, 2], {}
    lst2, d2 = [1, 2], {}
    opt = kiln.optimize("eager")(f)
    f(X, lst, d)
    opt(X, lst2, d2)
    assert lst2[0] == 7 and len(lst2) == 3 and torch.allclose(lst2[2], lst[2])
    assert torch.allclose(d2["out"], d["out"])


class Obj:
    def __init__(self):
        self.scale = 2.0
        self.count = 0

    def apply(self, t):
        return t * self.scale


def test_user_object_attributes_and_writes():
    def f(x, o):
        o.count = o.count + 1
        return o.apply(x)

    o1, o2 = Obj(), Obj()
    opt = kiln.optimize("eager")(f)
    assert torch.allclose(opt(X, o1), f(X, o2))
    assert o1.count == 1
    opt(X, o1)
    assert o1.count == 2


GLOBAL_SCALE = 3


def test_global_read_is_guarded_and_write_replayed():
    global GLOBAL_SCALE

    def f(x):
        global GLOBAL_SCALE
        y = x * GLOBAL_SCALE
        GLOBAL_SCALE = GLOBAL_SCALE + 1
        return y

    cc = CompileCounter()
    opt = kiln.optimize(cc)(f)
    GLOBAL_SCALE = 3
    assert torch.allclose(opt(X), X * 3)
    assert GLOBAL_SCALE == 4
    assert torch.allclose(opt(X), X * 4)
    assert cc.frame_count == 2


def test_grad_mode_contexts():
    def f(x):
        with torch.no_grad():
            a = x * 2
        with torch.enable_grad():
            b = x * 3
        with torch.set_grad_enabled(False):
            c = x + 1
        return a, b, c

    x = torch.randn(3, requires_grad=True)
    cc, opt = run(f, x, frames=1)
    a, b, c = opt(x)
    assert not a.requires_grad and b.requires_grad and not c.requires_grad
    assert torch.is_grad_enabled()


def test_module_params_and_buffers_are_inputs():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 5)
            self.seq = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(5, 2))
            self.blocks = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Tanh()])
            self.register_buffer("shift", torch.ones(2))

        def forward(self, x):
            y = self.seq(self.lin(x))
            for b in self.blocks:
                y = b(y)
            return y + self.shift

    m = M()
    gms = []

    def backend(gm, ex):
        gms.append(gm)
        return gm.forward

    om = kiln.compile(m, backend=backend)
    assert torch.allclose(om(X), m(X))
    names = [n.target for n in gms[0].graph.nodes if n.op == "placeholder"]
    assert names[0] == "L_x_" and len(names) == 6
    # the compiled module keeps the module interface
    assert set(om.state_dict()) == {"_orig_mod." + k for k in m.state_dict()}
    om.eval()
    assert not m.training and om.lin is m.lin


def test_autograd_function_apply():
    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    def f(x):
        return Double.apply(x).sum()

    x = torch.randn(3, requires_grad=True)
    opt = kiln.compile(f, backend="eager")
    opt(x).backward()
    assert torch.allclose(x.grad, torch.full((3,), 2.0))


def test_register_hook_on_input_is_replayed():
    def f(x, y):
        x.register_hook(lambda g: g * 3)
        return x * y

    x = torch.randn(2, requires_grad=True)
    y = torch.randn(2)
    out = kiln.compile(f, backend="eager")(x, y)
    out.sum().backward()
    assert torch.allclose(x.grad, 3 * y)


def test_graph_break_on_print_and_item():
    def f(x):
        a = x.sin()
        print("hello")
        b = a.sum().item()
        return a * b

    cc, _ = run(f, X)
    assert cc.frame_count == 3  # sin | sum | mul


def test_data_dependent_branch_splits_into_frames():
    def f(x):
        y = x.sum()
        if y > 0:
            return x + 1
        return x - 1

    run(f, X, frames=2)
    run(f, -X.abs())


@pytest.mark.expect_fallback("graph break in loop")
def test_break_inside_loop_and_with_block():
    def f(x):
        for i in range(3):
            x = x + i
            kiln.graph_break()
        with torch.no_grad():
            y = x * 2
            kiln.graph_break()
            y = y + 1
        return y

    x = torch.randn(3, requires_grad=True)
    cc, opt = run(f, x)
    assert not opt(x).requires_grad and torch.is_grad_enabled()


def test_fullgraph_raises_unsupported_with_what_where_hint():
    def f(x):
        print("boo")
        return x + 1

    with pytest.raises(Unsupported) as info:
        kiln.compile(f, backend="eager", fullgraph=True)(X)
    e = info.value
    assert "call to builtin print" in str(e)
    assert "test_capture.py" in e.where and "print" in e.where
    assert e.hint


def test_optimize_assert_raises():
    def f(x):
        return x.item()

    with pytest.raises(Unsupported):
        kiln.optimize_assert("eager")(f)(torch.tensor(1.0))


def test_guard_failure_recompiles_and_reports():
    reasons = []
    cc = CompileCounter()
    opt = kiln.optimize(cc, guard_fail_fn=lambda f: reasons.append(f[0]))(lambda x: x * 2)
    opt(torch.randn(3))
    opt(torch.randn(3))
    assert cc.frame_count == 1 and not reasons
    opt(torch.randn(4))
    assert cc.frame_count == 2 and "size mismatch" in reasons[0]
    opt(torch.randn(3, dtype=torch.float64))
    assert "dtype mismatch" in reasons[-1]


@pytest.mark.expect_fallback("reached cache_size_limit (2)")
def test_cache_limit_falls_back_to_eager_with_one_warning():
    cc = CompileCounter()
    # NOTE: dynamic=False: under automatic dynamic the int would become a graph input.
    opt = kiln.optimize(cc, dynamic=False)(lambda x, n: x + n)
    with config.patch(cache_size_limit=2), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for n in range(5):
            assert torch.allclose(opt(X, n), X + n)
    assert cc.frame_count == 2
    msgs = [str(m.message) for m in w if "cache_size_limit" in str(m.message)]
    assert len(msgs) == 1 and "L['n']" in msgs[0]


def test_disable_runs_eagerly():
    @kiln.disable
    def side(x):
        return x.numpy().sum()

    def f(x):
        return x + side(x)

    run(f, X)


def test_recursion_and_user_exceptions_behave_as_eager():
    def fact(n, x):
        return x if n == 0 else fact(n - 1, x * n)

    run(fact, 4, X)

    def bad(x):
        return x + torch.ones(7)

    with pytest.raises(RuntimeError):
        kiln.compile(bad, backend="eager")(X)


def test_explain_counts():
    def f(x):
        x = torch.sin(x)
        kiln.graph_break()
        return torch.cos(x)

    out = kiln.explain(f)(X)
    assert out.graph_count == 2 and out.graph_break_count == 1 and out.op_count == 2
    assert "graph_break" in out.break_reasons[0].reason
    assert "Graph Count" in str(out)


def test_export_whole_graph_and_module_params():
    lin = torch.nn.Linear(3, 2)

    def f(x, y):
        return lin(x).relu() + y.sum()

    gm, guards = kiln.capture.export(f)(X, Y)
    assert torch.allclose(gm(X, Y), f(X, Y))
    assert guards

    def g(x):
        print("x")
        return x

    with pytest.raises(Unsupported):
        kiln.capture.export(g)(X)


def test_tensor_methods_slicing_and_setitem():
    def f(x):
        y = x.clone()
        y[0, 1:] = 0
        z = y[:, None, ...].transpose(0, 1).reshape(-1)
        return z.view(4, 3).T.contiguous(), x.dim(), x.size(1), x.dtype

    run(f, X, frames=1)


def _scale(x, s):
    return x * s


@torch.no_grad()
def _no_grad_double(x):
    return x * 2


def test_super_partial_decorators_and_comprehensions():
    import functools

    class Base(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x)

    class Child(Base):
        def forward(self, x):
            return super().forward(x) * 2

    def f(x, m, xs):
        p = functools.partial(_scale, s=3)
        ys = [t * 2 for t in xs]
        d = {i: t + 1 for i, t in enumerate(xs)}
        odd = list(filter(lambda k: k % 2, map(lambda k: k + 1, range(4))))
        return m(x) + p(x) + _no_grad_double(x) + ys[1] + d[0], odd

    x = torch.randn(3, 3, requires_grad=True)
    cc, opt = run(f, x, Child(), [torch.randn(3), torch.randn(3)], frames=1)


def test_while_loop_ternary_and_string_formatting():
    def f(x, n):
        i = 0
        while i < n:
            x = x * 2 if i % 2 else x + 1
            i += 1
        name = f"step{i}-{n:02d}"
        return x, name.upper(), "a,b".split(",")

    run(f, X, 3, frames=1)


def _gen(xs):
    for x in xs:
        yield x * 2


def test_generators_imports_and_hasattr():
    def f(x, xs):
        import math

        s = sum(t.sum() for t in xs)
        a = any(t > 3 for t in [1, 5])
        g = list(_gen(xs))
        return x + s + g[0], a, hasattr(x, "no_such_attr"), math.pi

    run(f, X, [X, Y], frames=1)


def test_break_with_argument_captured_by_closure():
    # an argument that is also a cell (captured by a comprehension after a break)
    def f(self_like, x, **kwargs):
        print("break")
        keys = {k: kwargs.get(k, self_like) for k in ("a", "b")}
        return x * keys["a"] + keys["b"]

    run(f, 2, X, a=3)


def test_custom_getattribute_objects_are_read_and_guarded():
    class Cfg:
        def __init__(self):
            self.scale = 2.0

        def __getattribute__(self, name):
            return object.__getattribute__(self, name)

    def f(x, cfg):
        return x * cfg.scale

    cfg = Cfg()
    cc, opt = run(f, X, cfg, frames=1)
    cfg.scale = 3.0
    assert torch.allclose(opt(X, cfg), X * 3.0)
    assert cc.frame_count == 2


class _Reg(dict):
    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default


def test_break_inside_try_keeps_exception_handling():
    reg = _Reg(a=1)

    def f(x, k):
        try:
            v = reg[k]  # a break on a dict subclass, inside try
        except KeyError:
            v = 10
        return x + v

    run(f, X, "missing")
    run(f, X, "a")
    kiln.reset()

    def g(x):
        with torch.no_grad():
            print("break inside with")
            y = x * 2
        return y, torch.is_grad_enabled()

    x = torch.randn(2, requires_grad=True)
    cc, opt = run(g, x)
    assert not opt(x)[0].requires_grad and torch.is_grad_enabled()


class _Registry(dict):
    def lookup(self, k, default=None):
        return super().get(k, default)


def test_dict_subclass_dataclass_environ_finfo_weakref():
    import dataclasses
    import os
    import weakref

    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor
        loss: object = None

    reg = _Registry(a=2)
    holder = Obj()
    ref = weakref.ref(holder)

    def f(x):
        s = reg.lookup("a") + ("a" in reg) + len(list(reg.keys()))
        flag = os.environ.get("KILN_TEST_UNSET_VAR", "0") == "1"
        m = torch.finfo(x.dtype).min
        o = Out(logits=x * s)
        return Out(logits=o.logits + ref().scale, loss=torch.full_like(x, m)), flag

    out, flag = kiln.compile(f, backend="eager", fullgraph=True)(X)
    ref_out, ref_flag = f(X)
    assert isinstance(out, Out) and torch.allclose(out.logits, ref_out.logits) and flag is ref_flag
    assert torch.equal(out.loss, ref_out.loss)


def test_module_list_slices_and_strict_zip_around_a_break():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(3, 3) for _ in range(3)])

        def forward(self, x):
            for layer in self.layers[:2]:
                x = layer(x)
            kiln.graph_break()
            for a, b in zip([1, 2], [3, 4], strict=True):
                x = x + a * b
            return x

    m = M()
    cc = CompileCounter()
    om = kiln.optimize(cc)(m)
    assert torch.allclose(om(X), m(X))
    assert cc.frame_count == 2


def test_live_iterator_argument_is_advanced_as_eager_advances_it():
    def f(it, x):
        return next(it) * x

    cf = kiln.compile(f, backend="eager")
    for make in (lambda: iter([1, 2, 3]), lambda: iter((1, 2, 3)), lambda: iter(range(1, 4))):
        it, ref_it = make(), make()
        got = [cf(it, X) for _ in range(2)]
        assert all(torch.equal(a, f(ref_it, X)) for a in got)
        assert next(it) == next(ref_it) == 3


@pytest.mark.expect_fallback("graph break in loop")
def test_break_in_a_long_loop_runs_the_frame_eagerly_and_compiles_its_callees():
    """As in PyTorch: a break inside a loop body would break again on every iteration, so the
    frame runs eagerly; the functions it calls are compiled once, as frames of their own."""
    def step(x):
        return (x + 1) * 0.5

    def f(x):
        x = x.sin()
        for _ in range(100):
            x = step(x)
            kiln.graph_break()
        return x

    def g(x):
        for _ in range(40):
            x = step(x) if x.sum() > 0 else x + 2     # a data-dependent branch in the loop
        return x

    for fn, ops in ((f, 2), (g, 2)):
        kiln.reset()
        cc = CompileCounter()
        cf = kiln.compile(fn, backend=cc)
        for _ in range(2):
            torch.testing.assert_close(cf(X), fn(X))
        assert (cc.frame_count, cc.op_count) == (1, ops)      # step, compiled once


def test_star_calls_and_unary_positive():
    def g(a, *rest, **kw):
        return a + sum(rest) + kw.get("k", 0)

    def f(x, args, kw):
        return g(x, *args, 1, **kw, z=0), +x

    run(f, X, [2, 3], {"k": 4}, frames=1)


def test_generator_with_side_effects_is_not_unrolled():
    def gen(log):
        for i in range(3):
            log.append(i)
            yield i

    def f(x, log):
        first = next(gen(log))
        return x + first

    log_ref, log = [], []
    ref = f(X, log_ref)
    got = kiln.compile(f, backend="eager")(X, log)
    assert torch.allclose(ref, got) and log == log_ref == [0]


def test_break_inside_no_grad_block_resumes_compiled_and_restores_on_error():
    def f(x):
        with torch.no_grad():
            y = x * 2
            print("break inside no_grad")
            z = y + 1
        return z * x

    x = torch.randn(3, requires_grad=True)
    cc, opt = run(f, x)
    assert cc.frame_count == 2  # the code after the break is compiled again
    assert torch.is_grad_enabled()

    def g(x, bad):
        with torch.no_grad():
            y = x * 2
            y = y + bad()  # raises in the generated code
        return y

    def boom():
        raise ValueError("boom")

    with pytest.raises(ValueError):
        kiln.compile(g, backend="eager")(x, boom)
    assert torch.is_grad_enabled()


def test_library_code_is_matched_by_folder_not_by_prefix():
    """Code in torch's own folder is library code (run, never captured); code in a
    sibling package whose name starts with "torch" (torchvision, torchaudio) is user-level
    model code and gets captured."""
    import os

    from kiln.capture.cache import is_library_code

    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    inside = compile("def f(x):\n    return x + 1\n", os.path.join(torch_dir, "nn", "m.py"), "exec")
    sibling = compile("def f(x):\n    return x + 1\n", torch_dir + "vision" + os.sep + "resnet.py", "exec")
    assert is_library_code(inside)
    assert not is_library_code(sibling)

    ns: dict = {}
    exec(sibling, ns)
    out = kiln.explain(ns["f"])(torch.ones(3))
    assert out.graph_count == 1


def test_noop_context_managers_stay_in_graph_and_survive_a_break_inside():
    """contextlib.nullcontext and torch.autocast(enabled=False) (transformers' rotary embedding
    uses both) change nothing in the graph; a break inside such a block still compiles the rest."""
    import contextlib

    def f(x):
        with contextlib.nullcontext():
            y = x.sin()
        with torch.autocast("cpu", enabled=False):
            y = y * 2
        with contextlib.nullcontext(y) as z:
            kiln.graph_break()
            z = z + 1
        return z.cos()

    x = torch.randn(3)
    out = kiln.explain(f)(x)
    assert (out.graph_count, out.graph_break_count) == (2, 1)
    run(f, x, frames=2)


def test_autocast_state_is_guarded():
    """A graph traced outside autocast is not reused inside an autocast region (and back)."""
    def f(x):
        if torch.is_autocast_enabled("cpu"):
            return x + 1
        return x - 1

    reasons = []
    g = kiln.optimize("eager", guard_fail_fn=lambda fail: reasons.append(fail[0]))(f)
    x = torch.ones(2)
    assert torch.equal(g(x), f(x))
    with torch.autocast("cpu"):
        assert torch.equal(g(x), f(x))
    assert torch.equal(g(x), f(x))
    assert reasons[0] == "GLOBAL_STATE changed: autocast (expected disabled)"


@pytest.mark.expect_fallback("generator or coroutine function")
def test_a_function_that_runs_eagerly_says_why_in_explain():
    """A frame kiln cannot capture at all runs eagerly, and explain names it with the reason
    (a model reported with zero graphs must not look like a fast compile)."""
    def gen(x):
        yield x + 1

    ex = kiln.explain(gen)(torch.ones(2))
    assert ex.graph_count == 0
    assert len(ex.eager_frames) == 1 and "generator" in ex.eager_frames[0] and "gen" in ex.eager_frames[0]
    assert "Eager Frames:" in str(ex)


def test_compile_a_builtin_torch_function():
    # NOTE: a C function has no frame: a Python function calling it is compiled (one graph).
    from kiln.testing import CompileCounter

    kiln.reset()
    cc = CompileCounter()
    opt = kiln.compile(torch.sin, backend=cc, fullgraph=True)
    x = torch.randn(5, 10)
    assert torch.equal(opt(x), torch.sin(x))
    assert (cc.frame_count, cc.op_count) == (1, 1)
    assert torch.equal(kiln.compile(torch.add, backend="eager")(x, x, alpha=2), x + 2 * x)


def test_relative_import_inside_compiled_function(tmp_path, monkeypatch):
    import importlib
    import textwrap

    from kiln.testing import CompileCounter

    pkg = tmp_path / "kiln_relpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "consts.py").write_text("import torch\nSCALE = torch.tensor(3.0)\n")
    (pkg / "user.py").write_text(textwrap.dedent("""
        def from_module(x):
            from .consts import SCALE
            return x * SCALE

        def the_module(x):
            from . import consts
            return x * consts.SCALE
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    user = importlib.import_module("kiln_relpkg.user")
    importlib.import_module("kiln_relpkg.consts")
    kiln.reset()
    x = torch.randn(4)
    for fn in (user.from_module, user.the_module):
        cc = CompileCounter()
        assert torch.equal(kiln.compile(fn, backend=cc, fullgraph=True)(x), x * 3)
        assert cc.frame_count == 1


def test_torch_jit_trace_of_a_compiled_function_raises():
    opt = kiln.compile(lambda x: x + 1, backend="eager", dynamic=True)
    with pytest.raises(RuntimeError, match="torch.jit.trace"):
        torch.jit.trace(opt, torch.randn(3))
    assert torch.equal(opt(torch.ones(2)), torch.full((2,), 2.0))
