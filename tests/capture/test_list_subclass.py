"""Python subclasses of ``list`` (kiln/capture/variables/list_subclass.py).

A processor list (``class Processors(list)`` with a ``__call__``), passed in or built in
the compiled region: list's own methods act on its items, the class's Python methods are
inlined, mutations of a list from the caller are replayed, a list built in the region is
rebuilt as its own class, all in one graph where PyTorch's capture makes one.
"""
from __future__ import annotations

import pytest
import torch

import kiln
from kiln.testing import CompileCounter, same


class Processors(list):
    def __call__(self, x):
        for p in self:
            x = p(x)
        return x

    def clear(self):  # a list method of its own: inlined, not list's
        pass

    def scaled_len(self):
        return len(self) * 10

    def append_twice(self, x):
        self.extend([x, x])


class Tagged(list):
    def __init__(self, items, tag):
        super().__init__(items)
        self.tag = tag


def merge(default, custom):
    if len(custom) == 0:
        return default
    for d in default:
        for c in custom:
            if type(c) is type(d):
                raise ValueError
    default.extend(custom)
    return default


def compiled(fn, **kw):
    cc = CompileCounter()
    return kiln.compile(fn, backend=cc, **kw), cc


def setup_function():
    kiln.reset()


def test_input_list_subclass_len_iteration_and_replayed_extend():
    def f(x, left, right):
        return merge(left, right)(x)

    opt, cc = compiled(f, fullgraph=True)
    x = torch.randn(8)
    l1 = Processors([torch.nn.ReLU(), torch.nn.Sigmoid()])
    assert same(opt(x, l1, Processors([])), torch.sigmoid(torch.relu(x)))
    assert (cc.frame_count, cc.op_count) == (1, 2)
    l3 = Processors([torch.nn.SiLU()])
    out = opt(x, l1, l3)
    assert same(out, torch.nn.functional.silu(torch.sigmoid(torch.relu(x))))
    # NOTE: the extend of a list from the caller happened (replayed after the graph)
    assert len(l1) == 3 and type(l1) is Processors and isinstance(l1[2], torch.nn.SiLU)
    assert cc.frame_count == 2  # the length guard of `right` failed


def test_list_subclass_built_in_region_is_not_rebuilt_when_unused():
    def f(a, b):
        l = Processors()
        l.extend([True])
        l.append(a)
        l.extend([b])
        l.pop(0)
        l.append(l.scaled_len())
        return sum(l)

    opt, cc = compiled(f, fullgraph=True)
    a, b = torch.randn(5), torch.randn(5)
    assert same(opt(a, b), a + b + 20)
    assert cc.frame_count == 1


def test_list_subclass_built_in_region_is_returned_as_its_class():
    def f(a, b):
        l1 = Processors([a + 1])
        l2 = Processors([b + 2])
        l1.extend(l2)
        l1.append_twice(a * 3)
        l1[0] = l1[0] * 2
        return l1

    opt, cc = compiled(f, fullgraph=True)
    a, b = torch.randn(5), torch.randn(5)
    out = opt(a, b)
    want = f(a, b)
    assert type(out) is Processors and len(out) == 4 and out.scaled_len() == 40
    assert all(same(x, y) for x, y in zip(out, want))
    assert cc.frame_count == 1


def test_list_subclass_with_init_and_attributes():
    def f(x):
        t = Tagged([x, x + 1], "pair")
        t.tag = t.tag + "!"
        return t, len(t), t.tag

    opt, _ = compiled(f, fullgraph=True)
    x = torch.randn(3)
    out, n, tag = opt(x)
    assert type(out) is Tagged and out.tag == "pair!" and (n, tag) == (2, "pair!")
    assert same(out[1], x + 1)


def test_input_list_subclass_setitem_delitem_and_attributes():
    def f(l, x):
        present = 2 in l
        l[0] = x * 2
        del l[1]
        l.tag = "seen"
        return l[0] + len(l), bool(l), present and 2 not in l[1:]

    opt, cc = compiled(f, fullgraph=True)
    x = torch.randn(3)
    l = Tagged([1, 2, 3], "t")
    out, truth, present = opt(l, x)
    assert same(out, x * 2 + 2) and truth is True and present is True
    assert len(l) == 2 and same(l[0], x * 2) and l[1] == 3 and l.tag == "seen"


def test_overridden_item_access_stays_a_user_object():
    class Odd(list):
        def __getitem__(self, i):
            return list.__getitem__(self, i) + 1

    def f(x, l):
        return x + len(l)

    # NOTE: list's slots are not its own: not modelled as a list (a graph break, never a
    # wrong answer)
    opt = kiln.compile(f, backend="eager")
    assert same(opt(torch.ones(2), Odd([1, 2])), torch.ones(2) + 2)


def test_a_method_of_the_class_is_inlined_not_lists():
    def f(x, l):
        l.clear()  # Processors.clear does nothing
        return x + len(l)

    opt, cc = compiled(f, fullgraph=True)
    l = Processors([1, 2])
    assert same(opt(torch.ones(2), l), torch.ones(2) + 2)
    assert len(l) == 2


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
