"""The bytecode layer of capture (no torch needed: also runs as a script on any CPython 3.11/3.12)."""
from __future__ import annotations

import dis
import sys
import types

from kiln.capture import bytecode as bc


def _outer():
    k = 5

    def f(x, y, *rest):
        a = x + 1
        b = _g(a, y)
        c = a + b + k
        for i in range(2):
            c += i
        return c

    return f


def _g(a, y):
    return a * y


def _call_offsets(fn):
    insts, _ = bc.decode(fn.__code__)
    calls = [i for i in insts if i.opname == "CALL"]
    return insts, calls


def test_resume_after_call_rebuilds_stack_and_closure():
    f = _outer()
    insts, calls = _call_offsets(f)
    call = calls[0]
    nxt = insts[call.index + 1]
    spec = bc.ResumeSpec(f.__code__, nxt.offset, (False,), ("b", "c", "i"), (), "resume")
    code = bc.make_resume_code(spec)
    rf = types.FunctionType(code, f.__globals__, "resume", None, f.__closure__)
    assert spec.argnames[:len(f.__code__.co_varnames)] == list(f.__code__.co_varnames)
    args = {n: None for n in f.__code__.co_varnames}
    args.update(x=1, y=2, rest=(), a=2)
    # the call _g(2, 2) returned 4: continue after it
    assert rf(*args.values(), 4) == f(1, 2)


def test_resume_of_resume_uses_fresh_names():
    f = _outer()
    insts, calls = _call_offsets(f)
    nxt = insts[calls[0].index + 1]
    s1 = bc.ResumeSpec(f.__code__, nxt.offset, (False,), (), (), "r1")
    c1 = bc.make_resume_code(s1)
    s2 = bc.ResumeSpec(c1, 0, (False,), (), (), "r2")
    assert not set(s1.stack_args) & set(s2.stack_args)
    assert len(set(s2.argnames)) == len(s2.argnames)


def test_exception_table_roundtrip():
    def h(x):
        try:
            return x + 1
        finally:
            x = 0

    tab = h.__code__.co_exceptiontable
    assert bc.assemble_exception_table(bc.parse_exception_table(tab)) == tab


def test_with_block_resume_keeps_exception_table():
    class Ctx:
        log = []

        def __enter__(self):
            return self

        def __exit__(self, *a):
            Ctx.log.append("exit")

    def w(x):
        with Ctx():
            y = _g(x, 2)
            z = y + 1
        return z

    insts, calls = _call_offsets(w)
    target = [c for c in calls if c.index + 1 < len(insts) and insts[c.index + 1].argval == "y"][0]
    nxt = insts[target.index + 1]
    spec = bc.ResumeSpec(w.__code__, nxt.offset, (False, False), ("z",), (), "rw")
    rf = types.FunctionType(bc.make_resume_code(spec), w.__globals__, "rw", None, w.__closure__)
    ctx = Ctx()
    assert rf(3, None, None, ctx.__exit__, 6) == 7
    assert Ctx.log == ["exit"]


def test_handler_registry_filters_by_version():
    class H:
        @bc.handles("A", max_version=(3, 11))
        def a311(self, inst):
            pass

        @bc.handles("A", min_version=(3, 12))
        def a312(self, inst):
            pass

        @bc.handles("B")
        def b(self, inst):
            pass

    assert bc.build_dispatch(H, (3, 11)) == {"A": "a311", "B": "b"}
    assert bc.build_dispatch(H, (3, 12)) == {"A": "a312", "B": "b"}


def test_loads_after_sees_loops():
    def loop(x):
        for i in range(3):
            x = x + i
        return x

    insts, _ = bc.decode(loop.__code__)
    assert bc.loads_after(insts, 0) is None


if __name__ == "__main__":
    for name, fn in list(globals().items()):
        if name.startswith("test_"):
            fn()
            print("ok", name)
    print("python", sys.version.split()[0], "all bytecode tests passed")
