"""Hoisting repeated access chains out of generated guards."""
import torch

import kiln
from kiln.capture.guard_cse import hoist_guard


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


def test_repeated_chain_is_read_once():
    inner = Counting(w=3)
    outer = Counting(a=inner)
    guard = "outer.a.w == 3 and type(outer.a.w) is int and outer.a is not None"
    new_guard, body = hoist_guard(guard, ["___o = ___graph(outer.a.w)", "return ___o"])
    assert ":=" in new_guard
    result = _run(new_guard, body, outer=outer, ___graph=lambda v: v * 2)
    assert result == 6
    assert outer.reads == 1 and inner.reads == 1


def test_no_binding_inside_or():
    guard, body = hoist_guard("(x.a == 1 or x.a == 2) and x.a > 0", [])
    assert "(x.a == 1 or x.a == 2)" in guard  # nothing bound where it might not run
    ns = Counting(a=2)
    assert _run(guard, ["return 'hit'"], x=ns) == "hit"


def test_body_after_side_effects_keeps_fresh_reads():
    guard, body = hoist_guard("x.a.b == 1 and x.a.b > 0",
                              ["___o = ___graph(x.a.b)", "x.a = None", "return x.a"])
    assert body[-1] == "return x.a"  # read again: the body rebinds x.a first


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
