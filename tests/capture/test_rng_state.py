"""RNG state getters and setters in compiled code: graph breaks (they are not ATen operations,
so an AOT graph would lose them), the random ops on either side compiled."""
from __future__ import annotations

import pytest
import torch

import kiln
from kiln.testing import CompileCounter


@pytest.fixture(autouse=True)
def _reset():
    kiln.reset()
    yield


def replay():
    state = torch.get_rng_state()
    before = torch.rand(100)
    torch.set_rng_state(state)
    after = torch.rand(100)
    return before, after


def test_set_rng_state_replays_the_draw():
    cc = CompileCounter()
    before, after = kiln.compile(replay, backend=cc)()
    assert torch.equal(before, after)
    assert (cc.frame_count, cc.op_count) == (2, 2)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_set_rng_state_replays_under_aot(backend):
    before, after = kiln.compile(replay, backend=backend)()
    assert torch.equal(before, after)


def test_rng_state_is_a_break_under_fullgraph():
    with pytest.raises(kiln.exc.Unsupported, match="get_rng_state"):
        kiln.compile(replay, backend="eager", fullgraph=True)()
