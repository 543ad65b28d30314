"""Hoisting repeated access chains out of generated guards (walking the source trees)."""
import torch

import kiln
from kiln.capture.guard_cse import Hoister, hoist_guard, repeated_sources
from kiln.capture.guards import Check, Guard, GuardKind
from kiln.capture.sources import LocalSource


class Counting:
    """An object whose attribute reads are counted (like nn.Module.__getattr__)."""

    def __init__(self, **kw):
        object.__setattr__(self, "_d", kw)
        object.__setattr__(self, "reads", 0)

    def __getattr__(self, name):
        object.__setattr__(self, "reads", self.reads + 1)
        return self._d[name]


def _run(guard, body, **env):
    params = ", ".join(env)
    src = f"def f({params}):\n    if not ({guard}):\n        return 'miss'\n"
    src += "".join(f"    {line}\n" for line in body) or "    pass\n"
    ns = {}
    exec(src, ns)
    return ns["f"](**env)


def _guard(*test):
    return Guard(GuardKind.CONSTANT_MATCH, None, (Check(tuple(test), "r"),))


def test_repeated_chain_is_read_once():
    inner = Counting(w=3)
    outer = Counting(a=inner)
    a = LocalSource("outer").attr("a")
    w = a.attr("w")
    guards = [_guard(w, " == 3"), _guard("type(", w, ") is int"), _guard(a, " is not None")]
    guard, args = hoist_guard(guards, [w])
    assert ":=" in guard and args.startswith("___b")
    result = _run(guard, [f"return ___graph({args})"], outer=outer, ___graph=lambda v: v * 2)
    assert result == 6
    assert outer.reads == 1 and inner.reads == 1


def test_chains_read_once_are_not_bound():
    x = LocalSource("x")
    guard, args = hoist_guard([_guard(x.attr("a"), " == 1"), _guard(x.attr("b"), " == 2")], None)
    assert guard == "(x.a == 1) and (x.b == 2)" and args is None


def test_roots_and_calls_are_never_bound():
    x = LocalSource("x")
    size = x.method_call("size", 0)
    assert repeated_sources([(size, " == 2"), (size, " > 0"), (x, " is not None")]) == set()


def test_text_tests_are_left_alone():
    # shape guards stay text (they may contain `or`): nothing is bound inside them
    x = LocalSource("x")
    g = Guard(GuardKind.SHAPE_ENV, None, (Check(("x.a == 1 or x.a == 2",), "r"),))
    guard, _ = hoist_guard([g, _guard(x.attr("a"), " > 0")], None)
    assert ":=" not in guard
    assert _run(guard, ["return 'hit'"], x=Counting(a=2)) == "hit"


def test_reader_uses_bound_names_only():
    x = LocalSource("x").attr("a")
    h = Hoister({x})
    assert h.read(x) == "x.a"  # not bound yet: read in full, bind nothing
    assert h.bind(x) == "(___b0 := x.a)" and h.read(x) == "___b0" and h.bind(x.attr("c")) == "___b0.c"


def test_compiled_module_guard_reads_each_parameter_once():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    calls = {"n": 0}
    orig = torch.nn.Module.__getattr__

    def counting(self, name):
        calls["n"] += 1
        return orig(self, name)

    c = kiln.compile(m, backend="eager")
    x = torch.randn(2, 4)
    c(x)
    torch.nn.Module.__getattr__ = counting
    try:
        out = c(x)
    finally:
        torch.nn.Module.__getattr__ = orig
    torch.testing.assert_close(out, m(x))
    # 4 parameters: without hoisting the guard walks each chain ~7 times
    assert calls["n"] <= 8, calls
    src = c._kiln_fwd.func._kiln_cache.entries[0].__kiln_source__
    entry = src.split("def ___why")[0]
    # each layer's parameter table is read once, then each parameter once, then locals
    assert entry.count("._parameters") == 2 and entry.count("['weight']") == 2 and entry.count("['bias']") == 2
    assert "___graph(input, ___b" in entry  # the graph call reads the bound locals
