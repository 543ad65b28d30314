"""Graph breaks inside grad-mode with-blocks (``no_grad``, ``enable_grad``, ``set_grad_enabled``).

As PyTorch's capture does, the code after the break leaves the blocks, and the resume function
enters them again: it starts in the mode outside them and its graph sets each block's mode
(``_set_grad_enabled`` nodes at its start); nested blocks are all left and entered again; a
``try`` around a with-block runs the rest eagerly, so its ``except`` still catches what the
break's instruction raises; an exception leaves every enclosing block as eager does."""
from __future__ import annotations

import pytest
import torch

import kiln
from kiln.testing import CompileCounter, EagerAndRecordGraphs


@pytest.fixture(autouse=True)
def _reset():
    kiln.reset()
    yield
    kiln.reset()
    torch.set_grad_enabled(True)


def _calls(gm) -> list:
    """The graph's calls: a grad switch as its mode, any other op as its name."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function" and n.op != "call_method":
            continue
        if n.target is torch._C._set_grad_enabled:
            out.append(n.args[0])
        else:
            out.append(getattr(n.target, "__name__", n.target))
    return out


def _same(got, ref) -> None:
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        if isinstance(r, torch.Tensor):
            assert torch.equal(g, r) and g.requires_grad == r.requires_grad
        else:
            assert g == r


def test_the_resume_graph_enters_the_no_grad_block_again():
    def f(x):
        with torch.no_grad():
            kiln.graph_break()
            return x + 1

    cc = CompileCounter()
    x = torch.randn(4, requires_grad=True)
    out = kiln.compile(f, backend=cc)(x)
    # NOTE: the graph before the break only entered the block: no graph; the resume graph
    # is _set_grad_enabled(False), add, _set_grad_enabled(True), as PyTorch's.
    assert (cc.frame_count, cc.op_count) == (1, 3)
    assert not out.requires_grad and torch.is_grad_enabled()

    rec = EagerAndRecordGraphs()
    kiln.reset()
    kiln.compile(f, backend=rec)(x)
    assert [_calls(g) for g in rec.graphs] == [[False, "add", True]]


@pytest.mark.parametrize("grad", [True, False])
def test_nested_blocks_are_left_and_entered_again(grad):
    def f(x):
        with torch.no_grad():
            y = x * 2
            with torch.enable_grad():
                z = x * 3
                kiln.graph_break()
                a = x * 4
                inner = torch.is_grad_enabled()
            b = x * 5
            outer = torch.is_grad_enabled()
        return y, z, a, b, inner, outer, torch.is_grad_enabled()

    x = torch.randn(3, requires_grad=True)
    rec = EagerAndRecordGraphs()
    with torch.set_grad_enabled(grad):
        ref = f(x)
        got = kiln.compile(f, backend=rec)(x)
        assert torch.is_grad_enabled() is grad
    _same(got, ref)
    resume = _calls(rec.graphs[-1])
    # NOTE: entering no_grad then enable_grad again: under grad mode the two switches undo
    # each other (dropped); each block's exit is a switch back.
    assert resume == (["mul", False, "mul", True] if grad else [True, "mul", False, "mul"])


def test_set_grad_enabled_block_and_a_callee_that_switches_the_mode():
    def flip():
        kiln.graph_break()
        torch.set_grad_enabled(True)

    def f(x):
        with torch.set_grad_enabled(False):
            y = x * 2
            flip()  # the break's own call leaves grad mode on for the rest of the block
            z = x * 3
        return y, z, x * 4, torch.is_grad_enabled()

    x = torch.randn(3, requires_grad=True)
    ref = f(x)
    torch.set_grad_enabled(True)
    got = kiln.compile(f, backend="eager")(x)
    _same(got, ref)
    assert torch.is_grad_enabled()


def test_an_exception_from_the_break_leaves_every_enclosing_block():
    def boom():
        raise ValueError("boom")

    def f(x):
        with torch.enable_grad():
            with torch.no_grad():
                y = x * 2
                boom()
        return y

    x = torch.randn(3, requires_grad=True)
    with torch.no_grad():
        with pytest.raises(ValueError, match="boom"):
            kiln.compile(f, backend="eager")(x)
        assert not torch.is_grad_enabled()


def test_a_try_around_a_no_grad_block_catches_what_the_break_raises():
    def boom():
        raise ValueError("boom")

    def f(x):
        try:
            with torch.no_grad():
                y = x * 2
                boom()
        except ValueError:
            y = x * 3
        return y, torch.is_grad_enabled()

    x = torch.randn(3, requires_grad=True)
    got = kiln.compile(f, backend="eager")(x)
    _same(got, f(x))


def test_a_resume_function_run_eagerly_enters_the_block_itself():
    """A break at an instruction the entry cannot run itself (unpacking an ``array.array``):
    the rest of the frame runs eagerly from that instruction, and its prologue enters the
    block again, so the code after the break sees the block's mode."""
    import array

    def f(x, arr):
        with torch.no_grad():
            y = x * 2
            a, b = arr
            z = y * x + a
        return y, z, x * b, torch.is_grad_enabled()

    x = torch.randn(3, requires_grad=True)
    arr = array.array("d", [1.0, 2.0])
    cc = CompileCounter()
    got = kiln.compile(f, backend=cc)(x, arr)
    _same(got, f(x, arr))
    assert cc.frame_count == 1 and torch.is_grad_enabled()


@pytest.mark.parametrize("raises", [False, True])
def test_a_no_grad_block_inside_an_autocast_region(raises):
    """Only the grad-mode block is left and entered again; the autocast region around it
    goes on as before (entered again after the graph), and an exception leaves both."""
    def boom(flag):
        if flag:
            raise ValueError("boom")

    def f(x, flag):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():
                y = x @ x
                boom(flag)
                z = x @ x
            w = x @ x
        return y, z, w, torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")

    x = torch.randn(3, 3, requires_grad=True)
    cf = kiln.compile(f, backend="eager")
    if raises:
        with pytest.raises(ValueError, match="boom"):
            cf(x, True)
        assert torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
        return
    _same(cf(x, False), f(x, False))
