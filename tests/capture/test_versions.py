"""Opcode handlers claim only the CPython versions they were tested on; any other
interpreter gets one clear warning and runs compiled functions eagerly."""
from __future__ import annotations

import dis
import warnings

import pytest
import torch

import kiln
from kiln import fallbacks
from kiln.capture import bytecode as bc
from kiln.capture import convert
from kiln.capture.interpreter import Translator
from kiln.exc import FallbackWarning, Unsupported
from kiln.testing import CompileCounter


def test_default_versions_are_the_tested_ones():
    class H:
        @bc.handles("A")
        def a(self, inst):
            pass

    assert bc.build_dispatch(H, bc.NEWEST_TESTED) == {"A": "a"}
    assert bc.build_dispatch(H, bc.OLDEST_TESTED) == {"A": "a"}
    assert bc.build_dispatch(H, (3, 13)) == {"A": "a"}
    assert bc.build_dispatch(H, (3, 14)) == {}
    assert bc.build_dispatch(H, (3, 10)) == {}


def test_no_translator_handler_claims_an_untested_version():
    claims = [(name, lo, hi) for klass in Translator.__mro__ for name, fn in vars(klass).items()
              for _, lo, hi in getattr(fn, "_kiln_opcodes", ())]
    assert len(claims) > 50
    assert all(bc.OLDEST_TESTED <= lo and hi <= bc.NEWEST_TESTED for _, lo, hi in claims), claims
    assert bc.build_dispatch(Translator, (3, 14)) == {}
    assert "CALL" in bc.build_dispatch(Translator, bc.PY)


def _claims(version: tuple) -> dict:
    """opname -> every handler method claiming it on ``version``."""
    out: dict = {}
    for klass in Translator.__mro__:
        for name, fn in vars(klass).items():
            for ops, lo, hi in getattr(fn, "_kiln_opcodes", ()):
                if lo <= version <= hi:
                    for op in ops:
                        out.setdefault(op, set()).add(name)
    return out


@pytest.mark.parametrize("version", [(3, 11), (3, 12), (3, 13)])
def test_one_handler_per_opcode_and_version(version):
    # NOTE: two claims would make the winner depend on definition order.
    twice = {op: names for op, names in _claims(version).items() if len(names) > 1}
    assert not twice, twice


# Opcodes whose stack effects changed in 3.13, and the handler each version runs.
_CHANGED_IN_313 = {
    "CALL": ("CALL", "CALL_313"),
    "LOAD_ATTR": ("LOAD_ATTR_312", "LOAD_ATTR_313"),
    "LOAD_GLOBAL": ("LOAD_GLOBAL", "LOAD_GLOBAL_313"),
    "LOAD_SUPER_ATTR": ("LOAD_SUPER_ATTR", "LOAD_SUPER_ATTR_313"),
    "CALL_FUNCTION_EX": ("CALL_FUNCTION_EX", "CALL_FUNCTION_EX_313"),
    "MAKE_FUNCTION": ("MAKE_FUNCTION", "MAKE_FUNCTION_313"),
    "FOR_ITER": ("FOR_ITER_312", "FOR_ITER_313"),
    "END_FOR": ("END_FOR", "END_FOR_313"),
    "COMPARE_OP": ("COMPARE_OP", "COMPARE_OP_313"),
    "LOAD_FAST": ("LOAD_FAST", "LOAD_FAST_313"),
}
_NEW_IN_313 = {"CALL_KW", "LOAD_FAST_LOAD_FAST", "STORE_FAST_LOAD_FAST", "STORE_FAST_STORE_FAST", "TO_BOOL",
               "FORMAT_SIMPLE", "FORMAT_WITH_SPEC", "CONVERT_VALUE", "SET_FUNCTION_ATTRIBUTE"}
_GONE_IN_313 = {"KW_NAMES", "FORMAT_VALUE", "PRECALL", "LOAD_METHOD"}


def test_the_313_table_has_its_own_call_and_load_conventions():
    t12, t13 = bc.build_dispatch(Translator, (3, 12)), bc.build_dispatch(Translator, (3, 13))
    for op, (old, new) in _CHANGED_IN_313.items():
        assert (t12[op], t13[op]) == (old, new), op
    assert _NEW_IN_313 <= set(t13) and not _NEW_IN_313 & set(t12)
    assert not _GONE_IN_313 & set(t13)
    assert {op: t13[op] for op in ("RETURN_CONST", "POP_JUMP_IF_NONE", "BINARY_SLICE", "SEND", "END_SEND",
                                   "LOAD_FAST_AND_CLEAR", "CALL_INTRINSIC_1")} == \
        {op: t12[op] for op in ("RETURN_CONST", "POP_JUMP_IF_NONE", "BINARY_SLICE", "SEND", "END_SEND",
                                "LOAD_FAST_AND_CLEAR", "CALL_INTRINSIC_1")}


def test_stack_layouts():
    assert bc.stack_layout((3, 11)) == bc.stack_layout((3, 12))
    new = bc.stack_layout((3, 13))
    assert new.null_after_callable and new.ex_call_null_slot and new.jump_wants_bool and new.closure_via_load_fast
    assert bc.LAYOUT == bc.stack_layout(bc.PY)


def _inline_caches(opname: str) -> int:
    import opcode

    table = opcode._inline_cache_entries  # NOTE: a list by opcode up to 3.12, a dict by name since 3.13
    return table.get(opname, 0) if isinstance(table, dict) else table[dis.opmap[opname]]


def test_resume_prefix_uses_no_instruction_with_inline_caches():
    # NOTE: the prefix of a resume function is emitted without CACHE entries; 3.13 changed
    # cache sizes, so this is checked on each interpreter.
    prefix_ops = ("COPY_FREE_VARS", "MAKE_CELL", "LOAD_FAST", "STORE_DEREF", "RESUME", "DELETE_FAST",
                  "PUSH_NULL", "JUMP_FORWARD", "EXTENDED_ARG")
    assert {op: _inline_caches(op) for op in prefix_ops} == dict.fromkeys(prefix_ops, 0)


# Instructions only on exception paths: capture follows the normal flow, and what an
# exception handler does runs eagerly.
_NOT_ON_THE_TRACED_PATH = {"POP_EXCEPT", "WITH_EXCEPT_START", "CHECK_EXC_MATCH", "CLEANUP_THROW"}


def _sample(x, y, *args, k=1, **kw):
    """A bit of every construct the tests compile (calls, methods, keywords, star calls,
    f-strings, closures, lambdas with defaults, comprehensions, loops, with, super-less
    methods, unpacking, slices, swaps, conditions)."""
    import math

    a, b = y, x
    b, a = a, b
    n = len(args) + k
    s = f"{n!r}:{n:>3}|{n}|{kw!s}"
    d = dict(p=a, q=b)
    t = torch.cat([a, b], dim=0)
    u = math.sqrt(n) + abs(-1)
    f = lambda q=2: q * n  # noqa: E731
    g = [v * 2 for v in (a, b) if v is not None]
    h = {i: i + 1 for i in range(3)}
    for i in range(n):
        if i > 1 and not kw:
            t = t + i
        elif i is None:
            continue
    with torch.no_grad():
        w = t[1:3] * f()
    first, *rest = g
    t[0:1] = 1.0
    try:
        z = y.sum(dim=0, keepdim=True)
    finally:
        z = z + 1
    return t, s, d, u, h, first, rest, w, z, x.view(*x.shape), torch.add(*g), (*args,), +u


def test_handlers_cover_the_instructions_of_compiled_code():
    """Every instruction the sample's normal flow executes has a handler on this CPython
    (on 3.13 this checks the 3.13 table against 3.13's own bytecode)."""
    table = bc.build_dispatch(Translator, bc.PY)
    todo, seen = [_sample.__code__], set()
    while todo:
        code = todo.pop()
        seen |= {i.opname for i in dis.get_instructions(code)}
        todo += [c for c in code.co_consts if hasattr(c, "co_code")]
    missing = seen - set(table) - _NOT_ON_THE_TRACED_PATH
    assert not missing, missing
    if bc.PY >= (3, 13):
        assert {"CALL_KW", "TO_BOOL", "LOAD_FAST_LOAD_FAST", "STORE_FAST_STORE_FAST", "FORMAT_SIMPLE",
                "FORMAT_WITH_SPEC", "CONVERT_VALUE", "SET_FUNCTION_ATTRIBUTE"} <= seen


def test_the_sample_compiles_to_eager_results():
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    cc = CompileCounter()
    got = kiln.compile(_sample, backend=cc)(x.clone(), y, 1, 2, k=3)
    exp = _sample(x.clone(), y, 1, 2, k=3)
    assert len(got) == len(exp)
    for g, e in zip(got, exp):
        if isinstance(e, torch.Tensor):
            torch.testing.assert_close(g, e)
        elif isinstance(e, (list, dict)) and any(isinstance(v, torch.Tensor) for v in
                                                   (e.values() if isinstance(e, dict) else e)):
            torch.testing.assert_close(g, e)
        else:
            assert g == e
    assert cc.frame_count == 1


def test_version_reasons():
    assert bc.unsupported_version_reason((3, 11)) is None
    assert bc.unsupported_version_reason((3, 12)) is None
    assert bc.unsupported_version_reason((3, 13)) is None
    newer = bc.unsupported_version_reason((3, 14))
    assert newer.startswith("Python 3.14 is newer than the versions kiln's bytecode handlers were tested on "
                            "(3.11 to 3.13)") and "run eagerly" in newer
    assert "Python 3.10 is older" in bc.unsupported_version_reason((3, 10))


@pytest.fixture
def python_314(monkeypatch):
    monkeypatch.setattr(bc, "PY", (3, 14))
    monkeypatch.setattr(convert, "_VERSION_WARNED", False)


@pytest.mark.expect_fallback("Python 3.14 is newer")
def test_unknown_version_warns_once_and_runs_eagerly(python_314):
    def f(x):
        return torch.sin(x) + 1

    def g(x):
        return x * 2

    cc = CompileCounter()
    cf, cg = kiln.compile(f, backend=cc), kiln.compile(g, backend=cc)
    x = torch.randn(4)
    start = fallbacks.mark()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [cf(x), cf(x), cg(x), cg(x)]
    torch.testing.assert_close(outs[0], f(x))
    torch.testing.assert_close(outs[2], g(x))
    assert cc.frame_count == 0  # nothing was traced with handlers that do not know 3.14
    ours = [w for w in caught if issubclass(w.category, FallbackWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "Python 3.14 is newer than the versions" in str(ours[0].message)
    recs = fallbacks.recorded(since=start)
    assert len(recs) == 1 and recs[0].stage == "capture"


@pytest.mark.expect_fallback("Python 3.14 is newer")
def test_unknown_version_under_fullgraph_raises(python_314):
    f = kiln.compile(lambda x: x + 1, backend="eager", fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        with pytest.raises(Unsupported, match="tested on"):
            f(torch.randn(2))
