"""Exceptions raised and caught inside the compiled region behave as in eager: ``try`` /
``except`` / ``finally`` run from the code's exception table, with no graph break; an
exception nothing in the region catches is raised by eager code, as before."""
from __future__ import annotations

import collections.abc

import pytest
import torch

import kiln
from kiln.testing import CompileCounter


@pytest.fixture(autouse=True)
def _reset():
    kiln.reset()
    yield
    kiln.reset()


class TooBig(ValueError):
    pass


def scale(x, k):
    if k > 1:
        raise TooBig("too big", k)
    return x * k


def _one_graph(fn, *args):
    cc = CompileCounter()
    got = kiln.compile(fn, backend=cc)(*args)
    ref = fn(*args)
    torch.testing.assert_close(got, ref)
    assert cc.frame_count == 1, kiln.explain(fn)(*args).break_reasons
    return got


def test_an_exception_from_an_inlined_call_is_caught_by_the_callers_except():
    def f(x):
        try:
            y = scale(x, 3)
        except ValueError as e:
            y = x + e.args[1]
        return y

    assert torch.equal(_one_graph(f, torch.ones(2)), torch.full((2,), 4.0))


def test_finally_runs_on_both_paths_inside_a_loop():
    def f(x):
        out = x
        for k in range(4):
            try:
                out = scale(out, k)
            except TooBig:
                out = out - 1
            finally:
                out = out * 2
        return out

    _one_graph(f, torch.ones(2))


def test_bare_raise_and_raise_from_and_nested_handlers():
    def f(x):
        try:
            try:
                raise KeyError("k")
            except KeyError:
                x = x + 1
                raise
        except LookupError as e:
            x = x * 3 if type(e) is KeyError else x
        try:
            raise RuntimeError("boom") from KeyError("cause")
        except RuntimeError as e:
            x = x + (1 if isinstance(e.__cause__, KeyError) else 0)
        return x

    assert torch.equal(_one_graph(f, torch.ones(2)), torch.full((2,), 7.0))


def test_a_missing_key_raises_keyerror_that_an_except_catches():
    table = {"a": 1.0}

    def f(x):
        try:
            return x + table["missing"]
        except KeyError as err:
            return x - len(err.args)

    _one_graph(f, torch.ones(2))


class Registry(collections.abc.MutableMapping):
    """A mapping whose lookups fall back from a local to a class-wide dict (as transformers'
    attention-function registry): ``get`` catches the KeyError ``__getitem__`` raises."""
    shared = {"sdpa": 3.0}

    def __init__(self):
        self.local = {}

    def __getitem__(self, key):
        if key in self.local:
            return self.local[key]
        return self.shared[key]

    def __setitem__(self, key, value):
        self.local[key] = value

    def __delitem__(self, key):
        del self.local[key]

    def __iter__(self):
        return iter({**self.shared, **self.local})

    def __len__(self):
        return len(self.shared.keys() | self.local.keys())


def test_mapping_get_with_a_default_in_a_loop_stays_one_graph():
    reg = Registry()

    def f(x):
        for _ in range(3):
            x = x + reg.get("eager", 5.0) + reg.get("sdpa", 7.0)
        return x

    assert torch.equal(_one_graph(f, torch.zeros(2)), torch.full((2,), 24.0))


def test_an_exception_nothing_in_the_region_catches_is_raised_by_eager():
    def f(x):
        y = x + 1
        return scale(y, 5)

    with pytest.raises(TooBig, match="too big"):
        kiln.compile(f, backend="eager")(torch.ones(2))


def test_an_exception_inside_a_with_block_leaves_it_as_in_eager():
    def f(x):
        try:
            with torch.no_grad():
                scale(x, 5)
        except TooBig:
            return x * 2, torch.is_grad_enabled()
        return x, None

    x = torch.ones(2, requires_grad=True)
    out, grad_on = kiln.compile(f, backend="eager")(x)
    assert grad_on is True and torch.equal(out, x * 2)


@pytest.mark.expect_fallback("graph break inside an except block")
def test_except_clause_with_a_non_exception_class_is_not_caught_silently():
    def f(x):
        try:
            raise KeyError("k")
        except int:  # eager: TypeError (catching classes that do not inherit from BaseException)
            return x

    with pytest.raises(TypeError):
        kiln.compile(f, backend="eager")(torch.ones(2))


# ---------------------------------------------------------------- found by real models
def test_a_function_marked_constant_is_called_once_while_tracing():
    """``torch._dynamo.assume_constant_result`` marks a function (``_dynamo_marked_constant``;
    transformers marks its version probes so): its result is a constant of the graph."""
    calls = []

    def probe(name):
        calls.append(name)
        import importlib.metadata  # eager-only work kiln cannot trace (vars(), file reads)

        return len(vars(importlib.metadata)) > 0

    probe._dynamo_marked_constant = True

    def f(x):
        return x + 1 if probe("torch") else x - 1

    _one_graph(f, torch.ones(2))
    assert calls == ["torch", "torch"]  # once while tracing, once by the eager reference
    kiln.reset()
    assert kiln.explain(f)(torch.ones(2)).graph_break_count == 0


def test_vmap_over_a_batch_of_size_zero():
    def f(x):
        return torch.vmap(lambda r: r * 2 + 1)(x[2:2])

    assert _one_graph(f, torch.ones(4, 3)).shape == (0, 3)


def test_deep_recursion_is_inlined_to_a_limit_then_breaks():
    def rec(x, n):
        return x + 1 if n == 0 else rec(x, n - 1) * 1

    _one_graph(lambda x: rec(x, 40), torch.ones(2))
    cc = CompileCounter()
    torch.testing.assert_close(kiln.compile(lambda x: rec(x, 120), backend=cc)(torch.ones(2)), rec(torch.ones(2), 120))
    assert cc.frame_count >= 2
