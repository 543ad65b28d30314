"""kiln.compile(..., mode="reduce-overhead"): compiled graphs replayed as CUDA graphs —
parameters recorded in place (never copied), inputs copied only when they moved, one
recording per shape from one memory pool, input mutations replayed; CPU inputs and
dynamic shapes run without CUDA graphs, with the reason recorded."""
from __future__ import annotations

import pytest
import torch

import kiln
from kiln import fallbacks

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x))).softmax(-1)


def _recordings():
    from kiln.backends import cudagraphs

    return cudagraphs.recordings_made - _START[0]


_START = [0]


@pytest.fixture(autouse=True)
def _count_from_here():
    from kiln.backends import cudagraphs

    _START[0] = cudagraphs.recordings_made


@cuda
def test_inference_replays_one_recording_per_shape():
    m = MLP().cuda().eval()
    c = kiln.compile(m, mode="reduce-overhead", dynamic=False)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(4, 16, device="cuda")
            torch.testing.assert_close(c(x), m(x))
        assert _recordings() == 1
        x = torch.randn(6, 16, device="cuda")
        torch.testing.assert_close(c(x), m(x))
        assert _recordings() == 2


@cuda
def test_outputs_of_earlier_calls_are_not_overwritten():
    m = MLP().cuda().eval()
    c = kiln.compile(m, mode="reduce-overhead", dynamic=False)
    with torch.no_grad():
        x1, x2 = torch.randn(4, 16, device="cuda"), torch.randn(4, 16, device="cuda")
        o1 = c(x1)
        c(x1)
        o2 = c(x2)
        torch.testing.assert_close(o1, m(x1))
        torch.testing.assert_close(o2, m(x2))


@cuda
def test_results_are_not_copied_and_held_ones_survive_the_next_call():
    """A replay hands out its outputs in the recording's memory (no copy per call); while a
    result, or a view of one, is still held, the next call runs without the CUDA graph."""
    m = MLP().cuda().eval()
    c = kiln.compile(m, mode="reduce-overhead", dynamic=False)
    x1, x2 = torch.randn(4, 16, device="cuda"), torch.randn(4, 16, device="cuda")
    with torch.no_grad():
        c(x1)
        ptrs = set()
        for x in (x1, x2, x1):
            out = c(x)
            torch.testing.assert_close(out, m(x))
            ptrs.add(out.data_ptr())
            del out
        assert len(ptrs) == 1
        row = c(x1)[1]             # a view keeps the recording's memory alive
        o2 = c(x2)
        assert o2.data_ptr() not in ptrs
        torch.testing.assert_close(row, m(x1)[1])
        torch.testing.assert_close(o2, m(x2))
        del row, o2
        assert c(x2).data_ptr() in ptrs
    assert _recordings() == 1


@cuda
def test_training_step_matches_eager():
    m, ref = MLP().cuda(), MLP().cuda()
    ref.load_state_dict(m.state_dict())
    c = kiln.compile(m, mode="reduce-overhead", dynamic=False)
    for _ in range(3):
        x = torch.randn(4, 16, device="cuda")
        c(x).pow(2).sum().backward()
        ref(x).pow(2).sum().backward()
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)


@cuda
def test_parameter_update_is_seen_by_the_replay():
    """Parameters are recorded in place: an optimizer step (in-place) is visible to the
    next replay without a copy or a new recording."""
    m = MLP().cuda().eval()
    c = kiln.compile(m, mode="reduce-overhead", dynamic=False)
    x = torch.randn(4, 16, device="cuda")
    with torch.no_grad():
        c(x)
        for p in m.parameters():
            p.mul_(0.5)
        torch.testing.assert_close(c(x), m(x))
    assert _recordings() == 1


@cuda
def test_input_mutation_is_replayed():
    def f(x, y):
        y.add_(1)
        return x * 2

    c = kiln.compile(f, mode="reduce-overhead", dynamic=False)
    x, y = torch.randn(8, device="cuda"), torch.zeros(8, device="cuda")
    for i in range(3):
        torch.testing.assert_close(c(x, y), x * 2)
        torch.testing.assert_close(y, torch.full((8,), float(i + 1), device="cuda"))


@cuda
@pytest.mark.expect_fallback("dynamic shapes")
def test_dynamic_shapes_run_without_cuda_graphs_and_say_why():
    c = kiln.compile(lambda x: x.sin() * 2, mode="reduce-overhead", dynamic=True)
    for n in (4, 7):
        x = torch.randn(n, device="cuda")
        torch.testing.assert_close(c(x), x.sin() * 2)
    assert any("dynamic shapes" in r.why for r in fallbacks.recorded())


@pytest.mark.expect_fallback("CUDA graphs need CUDA tensors")
def test_cpu_inputs_run_without_cuda_graphs_and_say_why():
    c = kiln.compile(lambda x: x.sin() * 2, mode="reduce-overhead")
    x = torch.randn(8)
    torch.testing.assert_close(c(x), x.sin() * 2)
    assert any("CUDA graphs need CUDA tensors" in r.why for r in fallbacks.recorded())


@cuda
def test_parameters_passed_as_graph_inputs_are_not_copied_per_replay():
    """A backend under aot_autograd is not told which inputs are parameters: the
    recording finds them (nn.Parameter) and keeps them in place."""
    from kiln.backends.cudagraphs import cudagraphify

    w = torch.nn.Parameter(torch.randn(8, 8, device="cuda"))
    x = torch.randn(4, 8, device="cuda")
    run = cudagraphify(lambda w, x: (x @ w).relu(), [w, x])
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(run(w, x), (x @ w).relu())
        (entry,) = run.recordings.values()
        assert entry.copied == [1] and entry.static_inputs[0] is w
        w.mul_(2)   # an in-place update is what the replay reads
        torch.testing.assert_close(run(w, x), (x @ w).relu())
