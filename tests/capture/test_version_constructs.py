"""Constructs whose bytecode differs between CPython 3.11, 3.12 and 3.13, compiled and
compared with eager.

They run on every version; each test names the instructions it exercises on 3.13
(the NULL after the callable in CALL, CALL_KW, LOAD_FAST_LOAD_FAST and the other
superinstructions, TO_BOOL, FORMAT_SIMPLE / FORMAT_WITH_SPEC / CONVERT_VALUE,
MAKE_FUNCTION + SET_FUNCTION_ATTRIBUTE, closures built with LOAD_FAST, FOR_ITER
skipping END_FOR + POP_TOP), so that a 3.13 interpreter runs them through its own
handlers and graph-break code.
"""
from __future__ import annotations

import dis

import pytest
import torch

import kiln
from kiln.capture import bytecode as bc
from kiln.testing import CompileCounter


@pytest.fixture(autouse=True)
def _reset():
    kiln.reset()
    yield


def run(fn, *args, frames: int, ops=None, **kwargs):
    cc = CompileCounter()
    expected = fn(*args, **kwargs)
    got = kiln.compile(fn, backend=cc)(*args, **kwargs)
    torch.testing.assert_close(got, expected)
    assert cc.frame_count == frames, cc.frame_count
    if ops is not None:
        assert cc.op_count == ops, cc.op_count
    return cc


def opnames(fn) -> set:
    out = set()
    todo = [fn.__code__]
    while todo:
        code = todo.pop()
        out |= {i.opname for i in dis.get_instructions(code)}
        todo += [c for c in code.co_consts if hasattr(c, "co_code")]
    return out


X = torch.randn(4, 3)
Y = torch.randn(4, 3)


def test_calls_of_globals_attributes_methods_and_locals():
    # 3.13: LOAD_GLOBAL / LOAD_ATTR push the NULL above the callable; a local callable
    # gets PUSH_NULL after it.
    def f(x, y):
        act = torch.relu
        a = torch.sin(x)           # LOAD_GLOBAL torch; LOAD_ATTR sin; PUSH_NULL
        b = x.add(y)               # method load: [method, self]
        c = abs(a)                 # LOAD_GLOBAL abs + NULL
        return act(a + b + c).sum(dim=0)

    run(f, X, Y, frames=1, ops=7)


def test_keyword_calls():
    # 3.13: CALL_KW with the names tuple on top (KW_NAMES is gone)
    def f(x, y):
        a = torch.sum(x, dim=1, keepdim=True)
        b = x.clamp(min=-0.5, max=0.5)
        d = dict(p=y, q=2)
        return a + b * d["q"] + d["p"]

    if bc.PY >= (3, 13):
        assert "CALL_KW" in opnames(f)
    run(f, X, Y, frames=1)


def test_star_calls():
    # CALL_FUNCTION_EX: 3.13 always has the NULL slot next to the callable
    def g(a, b, *, scale=1.0):
        return (a - b) * scale

    def f(x, y):
        args = (x, y)
        kw = {"scale": 3.0}
        return g(*args, **kw) + x.view(*x.shape) + torch.add(*args)

    run(f, X, Y, frames=1)


def test_fstrings_with_conversions_and_specs():
    # 3.13: CONVERT_VALUE, FORMAT_SIMPLE, FORMAT_WITH_SPEC
    def f(x, n, name):
        tag = f"{name!r}:{n:>4}|{n!s}|{n}|{1.5:.2f}|{name!a}"
        return x * len(tag), tag

    if bc.PY >= (3, 13):
        assert {"CONVERT_VALUE", "FORMAT_SIMPLE", "FORMAT_WITH_SPEC"} <= opnames(f)
    cc = CompileCounter()
    got = kiln.compile(f, backend=cc)(X, 7, "ab")
    exp = f(X, 7, "ab")
    torch.testing.assert_close(got[0], exp[0])
    assert got[1] == exp[1] and cc.frame_count == 1


def test_nested_functions_with_defaults_closures_and_annotations():
    # 3.13: MAKE_FUNCTION makes a bare function, SET_FUNCTION_ATTRIBUTE adds the
    # closure (built with LOAD_FAST of the cells), defaults, kwdefaults, annotations
    def f(x, y):
        k = 2.0

        def inner(a, b=y, *, c=3.0) -> torch.Tensor:
            return a * k + b * c

        scale = lambda t, s=0.5: t * s + k  # noqa: E731
        return inner(x) + scale(x) + inner(x, b=x, c=1.0), inner.__annotations__["return"] is torch.Tensor

    if bc.PY >= (3, 13):
        assert "SET_FUNCTION_ATTRIBUTE" in opnames(f)
    run(f, X, Y, frames=1)


def test_local_superinstructions_swap_and_comprehensions():
    # 3.13: LOAD_FAST_LOAD_FAST, STORE_FAST_STORE_FAST, STORE_FAST_LOAD_FAST
    def f(x, y):
        x, y = y, x
        parts = [t * 2 for t in (x, y) if t is not None]
        return x - y + parts[0] + parts[1]

    if bc.PY >= (3, 13):
        assert {"LOAD_FAST_LOAD_FAST", "STORE_FAST_STORE_FAST", "STORE_FAST_LOAD_FAST"} <= opnames(f)
    run(f, X, Y, frames=1)


def test_for_loops_and_conditions_on_python_values():
    # 3.13: FOR_ITER skips END_FOR + POP_TOP; TO_BOOL and COMPARE_OP's bool flag before jumps
    def f(x, n, flags):
        out = x
        for i in range(n):
            if i % 2 == 0 and flags[i]:
                out = out + i
            elif not flags:
                out = out * 2
            if i > 1:
                out = out - 1
        for a, b in zip(flags, [x, x]):
            out = out + (b if a else -b)
        return out

    if bc.PY >= (3, 13):
        assert "TO_BOOL" in opnames(f)
    run(f, X, 4, [True, False, True, True], frames=1)


def test_super_method_and_attribute():
    # 3.13: LOAD_SUPER_ATTR pushes [attr, NULL]
    class Base(torch.nn.Module):
        def forward(self, x):
            return x + 1

    class Child(Base):
        scale = 2.0

        def forward(self, x):
            fwd = super().forward  # the attribute form (no method flag)
            return super().forward(x) * 2 + fwd(x) + self.scale

    m = Child()
    run(m, X, frames=1)


def test_with_block_exit_call():
    # the with-exit call passes None as CALL's self_or_null slot on 3.13
    def f(x):
        with torch.no_grad():
            a = x * 2
        return a + x

    xr = X.clone().requires_grad_()
    run(f, xr, frames=1)


# ---------------------------------------------------------------- graph breaks
def test_break_on_tensor_condition_after_compare_and_to_bool():
    # 3.13: COMPARE_OP bool(>) / TO_BOOL leave the tensor for the jump: both branches resume
    def f(x):
        y = x * 2
        if y.sum() > 0:
            y = y + 1
        else:
            y = y - 1
        if y.abs().sum():
            y = y * 3
        return y

    run(f, X.abs(), frames=3)
    kiln.reset()
    run(f, -X.abs(), frames=3)


def test_break_on_not_of_a_tensor():
    # 3.13: TO_BOOL; UNARY_NOT on a tensor runs in the generated code
    def f(x):
        flag = not (x > 10).any()
        return x + 1 if flag else x - 1

    run(f, X, frames=2)


class _Flag:
    """A condition whose truth test cannot be traced (it prints)."""

    def __init__(self, value):
        self.value = value

    def __bool__(self):
        print("bool of _Flag")
        return self.value


@pytest.mark.parametrize("value", [True, False])
def test_break_on_a_python_condition_runs_its_jump_on_a_bool(value, capsys):
    # 3.13's POP_JUMP_IF_* read an exact bool: the eager jump gets bool(value)
    def f(x, flag):
        y = x * 2
        if flag:
            y = y + 1
        return y - 3

    cc = CompileCounter()
    got = kiln.compile(f, backend=cc)(X, _Flag(value))
    torch.testing.assert_close(got, f(X, _Flag(value)))
    assert capsys.readouterr().out.count("bool of _Flag") == 2  # once eagerly, once compiled
    assert cc.frame_count == 1  # the graph before the break; the rest runs eagerly


def test_break_at_calls_keeps_operands():
    # the break at CALL / CALL_KW / CALL_FUNCTION_EX rebuilds [callable, NULL|self, args]
    def f(x, y):
        a = x.add(y)
        b = torch.mul(a, 2)
        kiln.graph_break()
        c = torch.sum(b, dim=0, keepdim=True)
        print("between", end="")
        d = torch.cat(*[[c, c]])
        return d.sin() + a.cos().sum(dim=0)

    run(f, X, Y, frames=3)


def test_break_inside_a_method_call_argument():
    # the break happens while the method pair is on the stack below the pending argument
    def helper(t):
        print("", end="")
        return t + 1

    def f(x, y):
        return x.mul(helper(y)).sum(dim=0)

    run(f, X, Y, frames=2)


def test_break_with_keyword_call_pending():
    def helper(t, *, k):
        kiln.graph_break()
        return t * k

    def f(x):
        return torch.sum(helper(x, k=3), dim=0, keepdim=True) + 1

    run(f, X, frames=2)  # helper after its break | the caller after the call


def test_resume_with_cells_and_closures_after_the_break():
    # 3.13 builds closures with LOAD_FAST of the cell's slot: the resume function must move
    # those slots with the cells when its varnames grow
    def f(x, y):
        a = x + 1
        kiln.graph_break()

        def g(t):
            return t * a + y

        h = lambda: a * 2  # noqa: E731
        return g(x) + h()

    run(f, X, Y, frames=2)


@pytest.mark.expect_fallback("graph break in loop")
def test_break_in_a_loop_body_runs_the_frame_eagerly():
    # NOTE: as PyTorch: the frame is skipped (on every version), its callee compiled.
    def step(x):
        return x + 1

    def f(x, n):
        for _ in range(n):
            x = step(x)
            kiln.graph_break()
        return x * 2

    run(f, X, 3, frames=1)
