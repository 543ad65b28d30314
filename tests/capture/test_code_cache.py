"""Compiled entries live with the code object (as PyTorch keeps them on ``co_extra``): every
``kiln.compile`` of a function with the same backend shares them, another backend compiles
its own, and closures made anew from one ``def`` reuse them."""
from __future__ import annotations

import warnings

import pytest
import torch

import kiln
from kiln.capture import config
from kiln.testing import CompileCounter

X = torch.randn(3, 4)


@pytest.fixture(autouse=True)
def _reset():
    kiln.reset()
    yield
    kiln.reset()


def sin_cos(x):
    return x.sin() + x.cos()


def sin_break_cos(x):
    a = x.sin()
    kiln.graph_break()
    return a + x.cos()


@pytest.mark.parametrize("fn, frames", [(sin_cos, 1), (sin_break_cos, 2)])
def test_compiling_again_with_the_same_backend_reuses_the_entries(fn, frames):
    cnt = CompileCounter()
    for _ in range(3):
        torch.testing.assert_close(kiln.compile(fn, backend=cnt)(X), fn(X))
    assert cnt.frame_count == frames
    # NOTE: a backend named by a string is one backend, however often it is named.
    for _ in range(2):
        kiln.compile(fn, backend="eager")(X)
    assert cnt.frame_count == frames


def test_another_backend_compiles_its_own_entries():
    first, second = CompileCounter(), CompileCounter()
    kiln.compile(sin_cos, backend=first)(X)
    kiln.compile(sin_cos, backend=second)(X)
    kiln.compile(sin_cos, backend=first)(X)
    assert (first.frame_count, second.frame_count) == (1, 1)


def test_dynamic_and_fullgraph_settings_are_part_of_the_backend():
    cnt = CompileCounter()
    kiln.compile(sin_cos, backend=cnt)(X)
    kiln.compile(sin_cos, backend=cnt, dynamic=True)(X)
    assert cnt.frame_count == 2
    kiln.compile(sin_break_cos, backend=cnt)(X)
    # NOTE: fullgraph=True never runs an entry compiled with a graph break: it raises.
    with pytest.raises(kiln.exc.Unsupported):
        kiln.compile(sin_break_cos, backend=cnt, fullgraph=True)(X)


def test_reset_drops_the_shared_entries():
    cnt = CompileCounter()
    kiln.compile(sin_cos, backend=cnt)(X)
    kiln.reset()
    kiln.compile(sin_cos, backend=cnt)(X)
    assert cnt.frame_count == 2


def make_adder(v):
    def add(x):
        return x + v * 2

    return add


def make_breaking(v):
    def f(x):
        a = x + v
        kiln.graph_break()
        return a * v

    return f


def test_closures_of_one_def_share_entries_and_read_their_own_cells():
    cnt = CompileCounter()
    adders = [make_adder(torch.full((3, 4), float(i))) for i in range(3)]
    for i, add in enumerate(adders):
        torch.testing.assert_close(kiln.compile(add, backend=cnt)(X), X + 2 * i)
    assert cnt.frame_count == 1


def test_a_shared_entry_resumes_over_the_closure_it_was_called_with():
    cnt = CompileCounter()
    fns = [make_breaking(torch.full((3, 4), float(i))) for i in (2, 3)]
    for i, f in zip((2, 3), fns):
        torch.testing.assert_close(kiln.compile(f, backend=cnt)(X), (X + i) * i)
    assert cnt.frame_count == 2  # NOTE: the frame and its resume function, once each


def test_a_closure_cell_written_by_a_shared_entry_is_the_callers():
    def make_counter():
        total = torch.zeros(3)

        def step(x):
            nonlocal total
            total = total + x
            return total

        return step

    cnt = CompileCounter()
    a, b = kiln.compile(make_counter(), backend=cnt), kiln.compile(make_counter(), backend=cnt)
    one = torch.ones(3)
    a(one), a(one), b(one)
    torch.testing.assert_close(a(one), one * 3)
    torch.testing.assert_close(b(one), one * 2)
    assert cnt.frame_count == 1


def test_functions_with_other_defaults_do_not_share_entries():
    def make(d):
        def f(x, y=d):
            return x + y

        return f

    cnt = CompileCounter()
    f1, f2 = make(torch.ones(3, 4)), make(torch.zeros(3, 4))
    torch.testing.assert_close(kiln.compile(f1, backend=cnt)(X), X + 1)
    torch.testing.assert_close(kiln.compile(f2, backend=cnt)(X), X)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x).relu()


def test_many_instances_compiled_one_by_one_stay_compiled():
    # NOTE: each instance is guarded by identity; the recompile limit counts the entries
    # of one instance (PyTorch's id-matched objects), not every instance's.
    cnt = CompileCounter()
    blocks = [Block() for _ in range(config.cache_size_limit + 3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", kiln.exc.FallbackWarning)
        for b in blocks:
            torch.testing.assert_close(kiln.compile(b, backend=cnt)(X), b(X))
    assert cnt.frame_count == len(blocks)


@config.patch(error_on_recompile=True, automatic_dynamic_shapes=False)
def test_error_on_recompile_raises_with_the_failed_guard_instead_of_compiling_again():
    cnt = CompileCounter()
    opt = kiln.compile(lambda x: x.sin() + 1, backend=cnt)
    opt(X)
    opt(torch.randn(3, 4))  # same guards: no recompile, no error
    with pytest.raises(kiln.exc.RecompileError, match="size mismatch") as info:
        opt(torch.randn(5, 4))
    assert "error_on_recompile" in str(info.value)
    assert cnt.frame_count == 1
    with config.patch(error_on_recompile=False):
        torch.testing.assert_close(opt(torch.randn(5, 4)).shape, torch.Size([5, 4]))
    assert cnt.frame_count == 2


# ---------------------------------------------------------------- cells across a graph break
def test_a_closure_made_before_a_break_writes_the_cell_the_rest_of_the_frame_reads():
    def fn(x):
        total = x

        def add(v):
            nonlocal total
            total = total + v

        add(1)
        kiln.graph_break()
        add(2)
        return total * 2

    cnt = CompileCounter()
    opt = kiln.compile(fn, backend=cnt)
    for _ in range(2):
        torch.testing.assert_close(opt(X), fn(X))
    assert cnt.frame_count == 2


def test_a_cell_assigned_after_the_break_is_seen_by_a_closure_made_before_it():
    def fn(x):
        def scale():
            return x * factor

        if x.sum() > 0:  # NOTE: a data-dependent branch: both ways resume compiled
            x = x + 1
        factor = 3
        return scale()

    cnt = CompileCounter()
    opt = kiln.compile(fn, backend=cnt)
    for t in (X.abs(), -X.abs()):
        torch.testing.assert_close(opt(t), fn(t))


def test_a_backend_reads_the_frames_compile_id_and_shape_guards_from_torchs_compile_context():
    """As under PyTorch's capture, each compile of a frame runs inside torch._guards'
    CompileContext: CompileId(frame id, compile count of that frame), and the ShapeEnv guards
    kiln installs are listed in ``shape_env_guards`` (backends such as AOT's cache key read
    them)."""
    from torch._guards import CompileContext

    seen = []

    def backend(gm, example_inputs):
        ctx = CompileContext.get()
        seen.append((ctx.compile_id.frame_id, ctx.compile_id.frame_compile_id, ctx.shape_env_guards))
        return gm.forward

    def f(x):
        return x.sin() * x.size(0)

    g = kiln.compile(f, backend=backend, dynamic=True)
    x = torch.randn(5, 3)
    torch.testing.assert_close(g(x), f(x))
    assert len(seen) == 1
    g(torch.randn(1, 3))  # size 1 leaves the guarded range: a second compile of the same frame
    assert [s[1] for s in seen] == [0, 1]
    assert seen[0][0] == seen[1][0]
    # the first compile's guards are listed once the frame's guards are built
    assert any("s" in str(e) for e in seen[0][2]), seen[0][2]
    assert CompileContext.try_get() is None  # left after the compile
