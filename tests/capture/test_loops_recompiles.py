"""Graph breaks inside loops, frames that run eagerly with compiled callees, recompiles
(automatic dynamic shapes, closures, global state): kiln behaves as PyTorch's capture does."""
from __future__ import annotations

import dis
import sys
import traceback

import pytest
import torch

import kiln
from kiln.capture import config, counters
from kiln.capture.routed_calls import RouteError, maybe_has_backedge, route_calls, routed_function
from kiln.testing import CompileCounter

X = torch.randn(4)


@pytest.fixture(autouse=True)
def _reset():
    kiln.reset()
    yield
    kiln.reset()


def _compiled(fn, **kw):
    cnt = CompileCounter()
    return kiln.compile(fn, backend=cnt, **kw), cnt


# ---------------------------------------------------------------- a graph break in a loop
def inner(x):
    return torch.sin(x)


@pytest.mark.expect_fallback("graph break in loop")
def test_break_in_a_for_loop_runs_the_frame_eagerly_and_compiles_what_it_calls():
    def fn(x):
        for _ in range(100):
            inner(x)
            kiln.graph_break()
        return x

    opt, cnt = _compiled(fn)
    assert torch.equal(opt(X), fn(X))
    assert (cnt.frame_count, cnt.op_count) == (1, 1)       # inner, once; not 100 resumes
    opt(X)
    assert cnt.frame_count == 1
    assert "graph break in loop: call to graph_break()" in counters["unimplemented"]
    assert not counters["graph_break"]


@pytest.mark.expect_fallback("graph break in loop")
def test_break_in_a_while_loop_and_a_data_dependent_branch_in_a_loop():
    def fn(x):
        i = 20
        while i > 10:
            x = inner(x)
            i -= 1
            kiln.graph_break()
        return x

    def branchy(x):
        for _ in range(5):
            x = inner(x) if x.sum() > 0 else x + 1
        return x

    for f in (fn, branchy):
        kiln.reset()
        opt, cnt = _compiled(f)
        torch.testing.assert_close(opt(X), f(X))
        assert cnt.frame_count == 1


@pytest.mark.expect_fallback("graph break in loop")
def test_only_the_frame_whose_loop_breaks_runs_eagerly():
    def looping(x):
        for _ in range(3):
            x += 1
            kiln.graph_break()
        return x

    def fn(x):
        x += 2
        looping(x)
        x += 3
        return x

    opt, cnt = _compiled(fn)
    a, b = X.clone(), X.clone()
    torch.testing.assert_close(opt(a), fn(b))
    assert (cnt.frame_count, cnt.op_count) == (2, 2)        # the graphs before and after the call


@pytest.mark.expect_fallback("graph break in loop")
def test_nested_frames_with_breaking_loops():
    def inner_loop(x):
        i = 3
        while i > 0:
            i -= 1
            x += 1
            kiln.graph_break()
        return x

    def middle(x):
        inner_loop(x)
        return torch.sin(x)

    def fn(x):
        i = 20
        while i > 10:
            x = middle(x)
            i -= 1
            kiln.graph_break()
        return x

    opt, cnt = _compiled(fn)
    a, b = X.clone(), X.clone()
    torch.testing.assert_close(opt(a), fn(b))
    assert (cnt.frame_count, cnt.op_count) == (1, 1)        # middle's sin, after its eager call


def test_a_break_after_the_loop_still_resumes_compiled():
    def fn(x):
        for _ in range(3):
            x = x + 1
        kiln.graph_break()
        return x * 2

    opt, cnt = _compiled(fn)
    torch.testing.assert_close(opt(X), fn(X))
    assert cnt.frame_count == 2


@pytest.mark.expect_fallback("graph break in loop")
def test_the_eager_frame_keeps_python_semantics():
    class Acc:
        def __init__(self):
            self.log = []

        def add(self, v, *, scale=1):
            self.log.append(v * scale)
            return v

    def fn(x, acc, *rest, **kw):
        total = 0
        for i, r in enumerate(rest):
            try:
                total += acc.add(r, scale=kw.get("s", 1))
                kiln.graph_break()
                if i == 1:
                    raise ValueError(i)
            except ValueError as e:
                total += e.args[0] * 100
        return x + total, [inner(x) for _ in range(2)]

    a, b = Acc(), Acc()
    opt, _ = _compiled(fn)
    got, ref = opt(X, a, 1, 2, 3, s=2), fn(X, b, 1, 2, 3, s=2)
    torch.testing.assert_close(got, ref)
    assert a.log == b.log == [2, 4, 6]


# ---------------------------------------------------------------- disable(recursive=False)
def test_disable_non_recursive_runs_only_that_frame_eagerly():
    def helper(x):
        return torch.cos(x) * 2

    @kiln.disable(recursive=False)
    def disabled(x):
        return helper(x) + helper(x + 1)

    class M(torch.nn.Module):
        @torch.compiler.disable(recursive=False)
        def forward(self, x):
            return helper(x) - 1

    m = M()

    def fn(x):
        return disabled(x) + m(x)

    opt, cnt = _compiled(fn)
    torch.testing.assert_close(opt(X), fn(X))
    # helper is compiled once (its later calls hit); the disabled frames' own ops (+, -) run
    # eagerly; fn's graph after the breaks has the last +.
    assert (cnt.frame_count, cnt.op_count) == (2, 3)
    opt(X)
    assert cnt.frame_count == 2


def test_disable_recursive_runs_callees_eagerly_too():
    def helper(x):
        return torch.cos(x) * 2

    @kiln.disable
    def disabled(x):
        return helper(x)

    def fn(x):
        return disabled(x) + 1

    opt, cnt = _compiled(fn)
    torch.testing.assert_close(opt(X), fn(X))
    assert cnt.op_count == 1                                 # only fn's + 1


# ---------------------------------------------------------------- routed calls (bytecode)
def _calls_of(fn, *args, **kwargs):
    seen = []

    def hook(f):
        seen.append(getattr(f, "__name__", type(f).__name__))
        return f

    routed = routed_function(fn, hook)
    assert routed is not None
    return routed(*args, **kwargs), seen


def test_routed_copy_sends_every_call_through_the_hook():
    class Base:
        def m(self, v):
            return v + 1

    class Child(Base):
        def m(self, v):
            return super().m(v) * 2

    def g(a, b=2, *, c=3):
        return a + b + c

    def fn(obj, items, **kw):
        out = [g(1), g(1, 2, c=4), obj.m(3), max(*items), dict(**kw)]
        try:
            out.append(int("x"))
        except ValueError:
            out.append(len(items))
        with open(__file__) as f:
            out.append(bool(f.readline()))
        for i in range(2):
            out.append((g if i else abs)(-1))
        return out

    # NOTE: zero-argument super() in the copy; from 3.12 LOAD_SUPER_ATTR makes no call to super
    assert _calls_of(Child.m, Child(), 3) == (8, ["super", "m"] if sys.version_info < (3, 12) else ["m"])
    got, seen = _calls_of(fn, Child(), [4, 9], z=1)
    assert got == fn(Child(), [4, 9], z=1)
    for name in ("g", "m", "max", "dict", "int", "len", "open", "range", "abs", "readline"):
        assert name in seen, (name, seen)


def test_routed_copy_keeps_line_numbers_and_refuses_generators():
    def fn(x):
        y = abs(x)
        return undefined_name + y  # noqa: F821

    routed = routed_function(fn, lambda f: f)
    with pytest.raises(NameError) as info:
        routed(-1)
    last = traceback.extract_tb(info.value.__traceback__)[-1]
    assert last.lineno == fn.__code__.co_firstlineno + 2 and "undefined_name" in last.line

    def gen():
        yield abs(1)

    with pytest.raises(RouteError):
        route_calls(gen.__code__, lambda f: f)
    assert routed_function(gen, lambda f: f) is None


def test_routed_copy_of_many_library_functions_behaves_the_same():
    import difflib
    import json
    import textwrap

    count = [0]

    def hook(f):
        count[0] += 1
        return f

    for fn, args in ((difflib.unified_diff, None), (textwrap.fill, ("hello world " * 20, 30)),
                     (json.dumps, ({"a": [1, 2.5, None]},)), (textwrap.dedent, ("  a\n  b\n",))):
        if args is None:
            continue
        routed = routed_function(fn, hook)
        assert routed(*args) == fn(*args)
    assert count[0] > 0


def test_backedge_heuristic_is_pytorchs():
    def fn(x):
        for _ in range(3):
            x = abs(x)
        y = abs(x)
        while True:
            if y:
                return y
            y = abs(y)

    calls = [i.offset for i in dis.get_instructions(fn) if i.opname == "CALL"]
    first, after, in_while = calls[-3], calls[-2], calls[-1]
    assert maybe_has_backedge(fn.__code__, first)
    assert not maybe_has_backedge(fn.__code__, after)       # a return comes before the jump back
    assert maybe_has_backedge(fn.__code__, in_while)


# ---------------------------------------------------------------- automatic dynamic
def test_an_argument_that_changes_between_tensor_and_int_becomes_dynamic():
    def foo(x, y):
        return x * y

    opt, cnt = _compiled(foo)
    for n, y in ((2, None), (3, 3), (4, None), (4, None), (5, 4), (5, 4), (6, None)):
        yv = torch.randn(n) if y is None else y
        torch.testing.assert_close(opt(torch.randn(n).abs(), yv) * 0, foo(torch.randn(n), yv) * 0)
    assert cnt.frame_count == 3


def test_parameter_shapes_follow_force_parameter_static_shapes():
    w = torch.nn.Parameter(torch.randn(3, 2))

    def foo(x):
        return x @ w

    for static, frames in ((True, 4), (False, 2)):
        kiln.reset()
        with config.patch(force_parameter_static_shapes=static):
            opt, cnt = _compiled(foo, fullgraph=True)
            for n in (1, 10, 11, 15, 15):
                p = torch.nn.Parameter(torch.randn(n, 3))
                torch.testing.assert_close(opt(p), foo(p))
        assert cnt.frame_count == frames


# ---------------------------------------------------------------- closures, global state
def closure_adder(val):
    def add(x):
        return torch.sin(x + val)

    return add


def test_a_closure_argument_is_guarded_by_its_code_and_what_it_captures():
    def fn(x, other_fn):
        return other_fn(x + 1) - 1

    opt, cnt = _compiled(fn, fullgraph=True)
    for f in (closure_adder(5), closure_adder(5), closure_adder(torch.randn(4)), closure_adder(torch.randn(4))):
        torch.testing.assert_close(opt(X, f), fn(X, f))
    assert cnt.frame_count == 2
    torch.testing.assert_close(opt(X, closure_adder(7)), fn(X, closure_adder(7)))   # the cell is guarded


def test_ints_captured_by_closures_become_dynamic():
    def make(i):
        def g(y):
            return y + i

        return g

    def h(x, g):
        return g(x)

    opt, cnt = _compiled(h)
    for i in range(10):
        torch.testing.assert_close(opt(X, make(i)), h(X, make(i)))
    assert cnt.frame_count == 2


def test_defaults_of_a_closure_argument_are_guarded():
    def fn(x, f):
        return f(x)

    opt, cnt = _compiled(fn)
    fs = [lambda x, k=k: x * k for k in (2.0, 3.0)]
    for f in fs + fs:
        torch.testing.assert_close(opt(X, f), fn(X, f))
    assert cnt.frame_count == 2


def test_closure_argument_writing_its_cell_writes_the_callers_cell():
    def counter():
        n = 0

        def bump(x):
            nonlocal n
            n += 1
            return x + n

        return bump, lambda: n

    def fn(x, f):
        return f(x)

    opt, _ = _compiled(fn)
    b1, read1 = counter()
    b2, read2 = counter()
    opt(X, b1)
    opt(X, b2)
    opt(X, b2)
    assert (read1(), read2()) == (1, 2)


def test_global_state_changes_recompile():
    reasons = []
    cnt = CompileCounter()

    def fn(x):
        return x + 1

    opt = kiln.optimize(cnt, guard_fail_fn=lambda g: reasons.append(g.reason))(fn)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        opt(X)
        torch.use_deterministic_algorithms(not before)
        opt(X)
        torch.use_deterministic_algorithms(before)
        opt(X)
    finally:
        torch.use_deterministic_algorithms(before)
    assert cnt.frame_count == 2
    assert any("GLOBAL_STATE changed: deterministic_algorithms" in r for r in reasons), reasons
