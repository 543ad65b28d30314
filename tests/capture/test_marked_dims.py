"""Dims marked dynamic or static before compiling (kiln.mark_dynamic and PyTorch's
torch._dynamo.mark_dynamic, which set the same tensor attributes)."""
from __future__ import annotations

import pytest
import torch

import kiln
from kiln.testing import CompileCounter


def _fn(x):
    return (x * 2).sum(0)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_marked_dim_is_symbolic_from_the_first_compile(backend):
    cnt = CompileCounter() if backend == "aot_eager" else None
    f = kiln.compile(_fn, backend=cnt or backend)
    for n in (5, 7, 9):
        x = torch.randn(n, 3)
        kiln.mark_dynamic(x, 0)
        torch.testing.assert_close(f(x), _fn(x))
    if cnt is not None:
        assert cnt.frame_count == 1


def test_pytorchs_mark_dynamic_is_read_the_same_way():
    cnt = CompileCounter()
    f = kiln.compile(_fn, backend=cnt)
    for n in (5, 7):
        x = torch.randn(n, 3)
        torch._dynamo.mark_dynamic(x, 0)
        f(x)
    assert cnt.frame_count == 1


def test_a_marked_dim_the_code_specializes_is_an_error():
    def f(x):
        if x.shape[0] == 3:
            return x.sin()
        return x.cos()

    x = torch.randn(3, 2)
    kiln.mark_dynamic(x, 0)
    with pytest.raises(torch.fx.experimental.symbolic_shapes.ConstraintViolationError,
                       match="inferred to be a constant"):
        kiln.compile(f, backend="eager")(x)
    with pytest.raises(kiln.exc.ConstraintViolationError):
        kiln.compile(f, backend="eager")(x)


def test_a_range_is_checked_against_the_size_and_the_guards():
    def f(x):
        if x.shape[0] == 3:
            return x.sin()
        return x.cos()

    x = torch.randn(8, 2)
    kiln.mark_dynamic(x, 0, min=2, max=5)
    with pytest.raises(kiln.exc.ConstraintViolationError, match="8 not in range"):
        kiln.compile(f, backend="eager")(x)
    y = torch.randn(8, 2)
    kiln.mark_dynamic(y, 0, min=2, max=10)
    with pytest.raises(kiln.exc.ConstraintViolationError, match="!= 3"):
        kiln.compile(f, backend="eager")(y)
    z = torch.randn(8, 2)
    kiln.mark_dynamic(z, 0, min=4, max=10)  # every size in [4, 10] passes `!= 3`
    torch.testing.assert_close(kiln.compile(f, backend="eager")(z), z.cos())


def test_maybe_mark_dynamic_allows_specialization():
    def f(x):
        return x.sin() if x.shape[0] == 3 else x.cos()

    x = torch.randn(3, 2)
    kiln.maybe_mark_dynamic(x, 0)
    torch.testing.assert_close(kiln.compile(f, backend="eager")(x), x.sin())


def test_mark_static_keeps_a_dim_static_under_automatic_dynamic():
    cnt = CompileCounter()
    f = kiln.compile(_fn, backend=cnt)
    for n in (5, 6, 7):
        x = torch.randn(n, 3)
        kiln.mark_static(x, 0)
        f(x)
    assert cnt.frame_count == 3  # without the mark the second size change compiles dynamic


def test_new_marks_on_an_input_recompile():
    cnt = CompileCounter()
    f = kiln.compile(_fn, backend=cnt)
    x = torch.randn(4, 3)
    kiln.mark_dynamic(x, 0)
    f(x)
    f(torch.randn(4, 3))  # unmarked: the dynamic entry serves it
    assert cnt.frame_count == 1
    y = torch.randn(4, 3)
    kiln.mark_dynamic(y, 1)
    f(y)
    assert cnt.frame_count == 2


def test_marking_inside_the_compiled_region_is_an_error():
    def f(x):
        kiln.mark_dynamic(x, 0)
        return x * x

    with pytest.raises(AssertionError, match="forbidden callable"):
        kiln.compile(f, backend="eager")(torch.randn(3))
