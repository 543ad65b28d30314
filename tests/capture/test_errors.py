"""What a user sees when capture gives up: the error names their file:line and source
line, the traceback starts at their call, and kiln's own bugs are graph breaks for users
but raise under KILN_STRICT=1."""
from __future__ import annotations

import os
import traceback

import pytest
import torch

import kiln
from kiln import fallbacks
from kiln.capture.interpreter import Translator
from kiln.exc import Unsupported

X = torch.randn(3)
HERE = os.path.abspath(__file__)


def _prints(x):
    y = x + 1
    print("a graph break")  # the line the error must name
    return y


def test_fullgraph_message_names_file_line_and_source():
    with pytest.raises(Unsupported) as info:
        kiln.compile(_prints, backend="eager", fullgraph=True)(X)
    msg = str(info.value)
    line = _prints.__code__.co_firstlineno + 2
    assert f"{HERE}:{line}" in msg, msg
    assert 'print("a graph break")' in msg, msg
    assert "call to builtin print" in msg and "Hint:" in msg


def test_fullgraph_traceback_starts_at_the_users_call():
    with pytest.raises(Unsupported) as info:
        kiln.compile(_prints, backend="eager", fullgraph=True)(X)
    frames = traceback.extract_tb(info.value.__traceback__)
    kiln_dir = os.path.dirname(os.path.abspath(kiln.__file__)) + os.sep
    files = [os.path.abspath(f.filename) for f in frames]
    assert files[0] == HERE, files
    ours = [f for f in files if f.startswith(kiln_dir)]
    others = [f for f in files if f != HERE and not f.startswith(kiln_dir)]
    assert len(ours) <= 2 and not others, files


def test_traceback_keeps_the_users_frames_between_compiled_calls():
    def inner(x):
        return _prints(x)

    def outer(x):
        return inner(x) * 2

    with pytest.raises(Unsupported) as info:
        kiln.compile(outer, backend="eager", fullgraph=True)(X)
    files = [os.path.abspath(f.filename) for f in traceback.extract_tb(info.value.__traceback__)]
    kiln_dir = os.path.dirname(os.path.abspath(kiln.__file__)) + os.sep
    assert files[0] == HERE and sum(f.startswith(kiln_dir) for f in files) <= 2, files


def test_where_set_after_construction_is_in_the_message():
    e = Unsupported("something", why="because")
    assert "Where" not in str(e)
    e.where = "user.py:3\n    x = 1"
    assert "Where: user.py:3" in str(e) and "x = 1" in str(e) and "user.py:3" in e.args[0]
    assert e.with_where("other.py:9") is e and "other.py:9" in str(e)


# --------------------------------------------------------------------------- strict mode


@pytest.fixture
def broken_binary_add(monkeypatch):
    """An opcode handler with a bug (a Python exception kiln did not mean to raise)."""
    from kiln.capture import interpreter

    def boom(self, inst):
        raise KeyError("a kiln bug")

    name = interpreter._DISPATCH.get("BINARY_OP")
    assert name is not None
    monkeypatch.setattr(Translator, name, boom)
    kiln.reset()
    yield
    kiln.reset()


def _adds(x):
    y = torch.sin(x)
    return torch.cos(y + 1)


def test_internal_error_raises_under_strict(broken_binary_add, monkeypatch):
    monkeypatch.setenv("KILN_STRICT", "1")
    with pytest.raises(KeyError, match="a kiln bug"):
        kiln.compile(_adds, backend="eager")(X)


def test_internal_error_is_a_graph_break_for_users(broken_binary_add, monkeypatch):
    monkeypatch.setenv("KILN_STRICT", "0")
    ex = kiln.explain(_adds)(X)
    assert torch.allclose(kiln.compile(_adds, backend="eager")(X), torch.cos(torch.sin(X) + 1))
    reasons = [r.reason for r in ex.break_reasons]
    assert any("internal limitation: KeyError: 'a kiln bug'" in r for r in reasons), str(ex)


def test_strict_is_on_in_the_test_suite():
    assert fallbacks.strict()
