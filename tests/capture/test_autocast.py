"""torch.autocast regions captured in the graph, carried through AOT and codegen.

Capture records ``torch.amp._enter_autocast`` / ``_exit_autocast`` nodes around the
region's ops (as PyTorch does); tracing those graphs (AOT) makes the dispatcher apply
autocast, so the ATen graphs hold the casts explicitly and run with autocast off.
Everything is compared with eager: values (bf16 tolerances where kernels differ), output
dtypes, gradients (dtype and values), graph and break counts.
"""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import kiln
from kiln.backends import aot_autograd
from kiln.codegen import metrics
from kiln.exc import Unsupported
from kiln.testing import CompileCounter, CompileCounterWithBackend

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
import zoo  # noqa: E402

BF16 = torch.bfloat16
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _reset():
    kiln.reset()
    yield
    assert not torch._C._is_any_autocast_enabled(), "a test left autocast on"


def close(a, b, tol: float = 2e-2) -> bool:
    """Equal within bf16 rounding: the relative norm of the difference (exact dtypes/shapes)."""
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b))
    if not isinstance(a, torch.Tensor):
        return a == b
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    a, b = a.double(), b.double()
    return bool((a - b).norm() <= tol * b.norm() + 1e-6)


def leaves(*shapes, device="cpu"):
    torch.manual_seed(0)
    return [torch.randn(*s, device=device, requires_grad=True) for s in shapes]


def grads_of(fn, args):
    """fn(*args) and the grads of a scalar loss over its tensor outputs (float)."""
    for a in args:
        a.grad = None
    out = fn(*args)
    outs = out if isinstance(out, tuple) else (out,)
    # NOTE: a weighted sum: under a plain sum, softmax's gradient is zero up to rounding
    # (its rows sum to 1), and bf16 rounding noise then dominates the gradients compared
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)).to(o.device)
               for i, o in enumerate(outs) if isinstance(o, torch.Tensor)]
    sum((o.float() * wt).sum() for o, wt in zip((o for o in outs if isinstance(o, torch.Tensor)), weights)
        if o.requires_grad).backward()
    return out, [a.grad for a in args]


def region(x, w):
    with torch.autocast("cpu", dtype=BF16):
        y = x @ w
        e = torch.is_autocast_enabled("cpu")
        d = torch.get_autocast_dtype("cpu")
        with torch.autocast("cpu", enabled=False):
            z = y.float() @ w
            off = torch.is_autocast_enabled("cpu")
        y = torch.relu(y) + z.to(y.dtype)
    return y.float().sum(), y.dtype, z.dtype, e, d, off, torch.is_autocast_enabled("cpu")


def test_region_is_one_graph_with_enter_and_exit_nodes():
    x, w = leaves((8, 8), (8, 8))
    cnt = CompileCounterWithBackend("eager")
    out = kiln.compile(region, backend=cnt)(x, w)
    ref = region(x, w)
    assert out[1:] == ref[1:] == (BF16, torch.float32, True, BF16, False, False)
    assert torch.equal(out[0], ref[0])
    assert cnt.frame_count == 1
    targets = [n.target for n in cnt.graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count(torch.amp._enter_autocast) == 2 and targets.count(torch.amp._exit_autocast) == 2
    assert kiln.explain(region)(x, w).graph_break_count == 0


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_region_values_dtypes_and_grads_match_eager(backend):
    x, w = leaves((16, 16), (16, 16))
    metrics.reset()
    out, got = grads_of(kiln.compile(region, backend=backend), [x, w])
    ref, want = grads_of(region, [x, w])
    assert out[1:] == ref[1:]
    assert close(out[0], ref[0]) and close(got, want)
    assert all(g.dtype == torch.float32 for g in got)
    if backend == "inductor":
        assert metrics.generated_kernel_count > 0


def test_aten_graphs_hold_the_casts_and_no_autocast_state():
    graphs = []

    def keep(gm, example):
        graphs.append(gm)
        return gm

    def f(x, w):
        with torch.autocast("cpu", dtype=BF16):
            return (x @ w).relu()

    x, w = leaves((4, 4), (4, 4))
    out = kiln.compile(f, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))(x, w)
    out.float().sum().backward()
    assert out.dtype == BF16 and x.grad.dtype == torch.float32
    fw, bw = graphs
    for gm in graphs:
        targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
        assert torch.amp._enter_autocast not in targets and torch.amp._exit_autocast not in targets
    casts = [n for n in fw.graph.nodes if n.target is torch.ops.aten._to_copy.default]
    assert len(casts) == 2 and all(n.kwargs["dtype"] == BF16 for n in casts)
    mm = next(n for n in fw.graph.nodes if n.target is torch.ops.aten.mm.default)
    assert mm.meta["val"].dtype == BF16
    # the backward casts the gradients back to the inputs' dtype, as eager's autograd does
    assert any(n.target is torch.ops.aten._to_copy.default and n.kwargs.get("dtype") == torch.float32
               for n in bw.graph.nodes)


def test_autocast_spellings_and_the_decorator():
    def amp(x, w):
        with torch.amp.autocast("cpu", dtype=BF16):
            return x @ w

    def cpu_amp(x, w):
        with torch.cpu.amp.autocast():
            return x @ w

    @torch.autocast("cpu", dtype=BF16)
    def decorated(x, w):
        return torch.mm(x, w)

    def calls_decorated(x, w):
        return decorated(x, w) * 2

    x, w = leaves((4, 4), (4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.cpu.amp.autocast is deprecated
        for fn in (amp, cpu_amp, calls_decorated):
            cnt = CompileCounter()
            out = kiln.compile(fn, backend=cnt)(x, w)
            ref = fn(x, w)
            assert out.dtype == ref.dtype == BF16 and torch.equal(out, ref)
            assert cnt.frame_count == 1, fn.__name__


def test_enabled_false_inside_enabled_and_nested_dtypes():
    def f(x):
        with torch.autocast("cpu", dtype=BF16):
            a = x @ x
            with torch.autocast("cpu", enabled=False):
                b = x @ x
                with torch.autocast("cpu", dtype=torch.float16):
                    c = x @ x
                    d = torch.get_autocast_dtype("cpu")
            e = x @ x
        return a, b, c, d, e, x @ x

    x = torch.randn(4, 4)
    cnt = CompileCounter()
    out = kiln.compile(f, backend=cnt)(x)
    ref = f(x)
    assert [t.dtype for t in out[:3]] + [out[3]] + [t.dtype for t in out[4:]] == \
        [BF16, torch.float32, torch.float16, torch.float16, BF16, torch.float32]
    assert all(torch.equal(a, b) for a, b in zip(out[:3] + out[4:], ref[:3] + ref[4:]))
    assert cnt.frame_count == 1


def test_graph_break_inside_the_region_resumes_inside_it():
    def f(x, w):
        with torch.autocast("cpu", dtype=BF16):
            y = x @ w
            kiln.graph_break()
            z = y @ w
            on = torch.is_autocast_enabled("cpu")
        return z.float().sum(), z.dtype, on, torch.is_autocast_enabled("cpu")

    x, w = leaves((8, 8), (8, 8))
    ex = kiln.explain(f)(x, w)
    assert (ex.graph_count, ex.graph_break_count) == (2, 1)
    kiln.reset()
    reasons = []
    cnt = CompileCounter()
    cf = kiln.optimize(cnt, guard_fail_fn=reasons.append)(f)
    for _ in range(3):
        out = cf(x, w)
        assert not torch.is_autocast_enabled("cpu")
    ref = f(x, w)
    assert out[1:] == ref[1:] == (BF16, True, False)
    assert torch.equal(out[0], ref[0])
    assert cnt.frame_count == 2 and not reasons  # the resume function is compiled once


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_graph_break_inside_the_region_grads(backend):
    def f(x, w):
        with torch.autocast("cpu", dtype=BF16):
            y = torch.relu(x @ w)
            kiln.graph_break()
            z = torch.tanh(y @ w)
        return z.float() * 2

    x, w = leaves((8, 8), (8, 8))
    out, got = grads_of(kiln.compile(f, backend=backend), [x, w])
    ref, want = grads_of(f, [x, w])
    assert out.dtype == ref.dtype and close(out, ref) and close(got, want)


def test_break_inside_nested_regions():
    def f(x):
        with torch.autocast("cpu", dtype=BF16):
            a = x @ x
            with torch.autocast("cpu", enabled=False):
                b = x @ x
                kiln.graph_break()
                c = x @ x
            d = x @ x
        return a, b, c, d, x @ x

    x = torch.randn(4, 4)
    cnt = CompileCounter()
    out = kiln.compile(f, backend=cnt)(x)
    ref = f(x)
    assert [t.dtype for t in out] == [t.dtype for t in ref] == [BF16, torch.float32, torch.float32, BF16,
                                                               torch.float32]
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert cnt.frame_count == 2


def test_called_inside_a_user_region_and_outside():
    """No region in the function: the autocast state of the call is guarded, traced under
    and run with autocast off around the compiled graphs (they hold the casts)."""
    def f(x, w):
        y = x @ w
        with torch.autocast("cpu", enabled=False):
            z = y.float() @ w
        return (torch.softmax(y, -1) * z).sum(), y.dtype

    x, w = leaves((8, 8), (8, 8))
    cf = kiln.compile(f, backend="aot_eager")
    for a in (x, w):
        a.grad = None
    with torch.autocast("cpu", dtype=BF16):
        out = cf(x, w)
    out[0].backward()
    got = [x.grad, w.grad]
    x.grad = w.grad = None
    with torch.autocast("cpu", dtype=BF16):
        ref = f(x, w)
    ref[0].backward()
    assert out[1] == ref[1] == BF16 and close(out[0], ref[0]) and close(got, [x.grad, w.grad])
    plain, want = cf(x, w), f(x, w)  # outside the region: a new entry, fp32
    assert plain[1] == torch.float32 and torch.allclose(plain[0], want[0])


def test_default_dtype_is_guarded():
    def f(x):
        with torch.autocast("cpu"):
            return x @ x

    x = torch.randn(4, 4)
    cnt = CompileCounter()
    cf = kiln.compile(f, backend=cnt)
    assert cf(x).dtype == BF16
    prev = torch.get_autocast_dtype("cpu")
    torch.set_autocast_dtype("cpu", torch.float16)
    try:
        assert cf(x).dtype == f(x).dtype == torch.float16
    finally:
        torch.set_autocast_dtype("cpu", prev)
    assert cnt.frame_count == 2


def test_nested_region_without_dtype_takes_the_outer_regions_dtype():
    # NOTE: the inner region's default dtype is the one the outer region set inside the graph,
    # not the caller's (a guard on the caller's failed on the call it was compiled for).
    def f(x):
        with torch.autocast("cpu", dtype=torch.float16):
            with torch.autocast("cpu", enabled=False):
                a = x @ x
            with torch.autocast("cpu"):
                b = x @ x
        return a, b

    x = torch.randn(4, 4)
    cnt = CompileCounter()
    cf = kiln.compile(f, backend=cnt)
    for _ in range(2):
        out, ref = cf(x), f(x)
        assert [t.dtype for t in out] == [t.dtype for t in ref] == [torch.float32, torch.float16]
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert cnt.frame_count == 1


def test_fullgraph_and_raw_state_setters():
    def f(x):
        with torch.autocast("cpu", dtype=BF16):
            return x @ x

    x = torch.randn(4, 4)
    assert kiln.compile(f, backend="eager", fullgraph=True)(x).dtype == BF16

    def raw(x):
        torch.set_autocast_enabled("cpu", True)
        y = x @ x
        torch.set_autocast_enabled("cpu", False)
        return y

    with pytest.raises(Unsupported, match="set_autocast_enabled"):
        kiln.compile(raw, backend="eager", fullgraph=True)(x)
    assert not torch.is_autocast_enabled("cpu")
    ex = kiln.explain(raw)(x)
    assert "set_autocast_enabled" in ex.break_reasons[0].reason
    kiln.reset()
    got, want = kiln.compile(raw, backend="eager")(x), raw(x)
    assert got.dtype == want.dtype == BF16 and torch.equal(got, want)
    assert not torch.is_autocast_enabled("cpu")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.LayerNorm(64), nn.ReLU(),
                         nn.Linear(64, 8))


def _train(model, step_fn, batches):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for x, y in batches:
        loss = step_fn(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses


def _amp_step(model, x, y):
    with torch.autocast("cpu", dtype=BF16):
        out = model(x)
        loss = nn.functional.mse_loss(out.float(), y)
    return loss


def _same_updates(model, ref_model, init, tol):
    """Each parameter moved as eager's did: the difference is small against eager's update."""
    for p, q, p0 in zip(model.parameters(), ref_model.parameters(), init):
        p, q = p.detach(), q.detach()
        assert float((p - q).norm()) <= tol * float((q - p0).norm()) + 1e-7, p.shape


# NOTE: aot_eager runs the same ATen kernels as eager (same roundings: equal up to fp32
# noise); generated kernels keep bf16 pointwise chains in float32 and LayerNorm's
# statistics as its decomposition rounds them, so its updates differ at bf16 level.
_UPDATE_TOL = {"aot_eager": 1e-3, "inductor": 0.1}


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_mlp_training_steps_under_autocast(backend):
    torch.manual_seed(1)
    batches = [(torch.randn(32, 16), torch.randn(32, 8)) for _ in range(3)]
    ref_model, model = _mlp(), _mlp()
    init = [p.detach().clone() for p in model.parameters()]
    want = _train(ref_model, _amp_step, batches)
    cnt = CompileCounterWithBackend(backend)
    got = _train(model, kiln.compile(_amp_step, backend=cnt), batches)
    assert close(got, want)
    _same_updates(model, ref_model, init, _UPDATE_TOL[backend])
    assert cnt.frame_count == 1


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_transformer_block_under_autocast(backend):
    torch.manual_seed(0)
    block = zoo.Block(zoo.GPTConfig(n_embd=32, n_head=2))
    x = torch.randn(2, 8, 32, requires_grad=True)

    def f(block, x):
        with torch.autocast("cpu", dtype=BF16):
            return block(x)

    cnt = CompileCounterWithBackend(backend)
    params = [x, *block.parameters()]
    out, got = grads_of(lambda x, *p: kiln.compile(f, backend=cnt)(block, x), params)
    ref, want = grads_of(lambda x, *p: f(block, x), params)
    assert out.dtype == ref.dtype  # the residual stream stays fp32, the branches ran in bf16
    assert close(out, ref) and close(got, want)
    assert cnt.frame_count == 1


# ----------------------------------------------------------------------------- CUDA
@CUDA
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_cuda_region_values_and_grads(dtype, backend):
    def f(x, w):
        with torch.autocast("cuda", dtype=dtype):
            y = torch.relu(x @ w)
            with torch.autocast("cuda", enabled=False):
                z = y.float() @ w
            out = torch.softmax(y, -1) + z.to(y.dtype)
        return out, torch.is_autocast_enabled("cuda")

    x, w = leaves((32, 32), (32, 32), device="cuda")
    cnt = CompileCounterWithBackend(backend)
    out, got = grads_of(kiln.compile(f, backend=cnt), [x, w])
    ref, want = grads_of(f, [x, w])
    assert out[0].dtype == ref[0].dtype and out[1] == ref[1] is False
    assert close(out[0], ref[0]) and close(got, want)
    assert cnt.frame_count == 1


@CUDA
def test_cuda_break_inside_region_and_amp_spelling():
    def f(x, w):
        with torch.cuda.amp.autocast():
            y = x @ w
            kiln.graph_break()
            z = y @ w
        return z

    x, w = leaves((16, 16), (16, 16), device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        cnt = CompileCounter()
        out, got = grads_of(kiln.compile(f, backend=cnt), [x, w])
        ref, want = grads_of(f, [x, w])
    assert out.dtype == ref.dtype == torch.float16
    assert close(out, ref) and close(got, want)
    assert cnt.frame_count == 2


@CUDA
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_cuda_mlp_training_steps_under_autocast(backend):
    def step(model, x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return nn.functional.mse_loss(model(x).float(), y)

    torch.manual_seed(1)
    batches = [(torch.randn(32, 16, device="cuda"), torch.randn(32, 8, device="cuda")) for _ in range(3)]
    ref_model, model = _mlp().cuda(), _mlp().cuda()
    init = [p.detach().clone() for p in model.parameters()]
    want = _train(ref_model, step, batches)
    got = _train(model, kiln.compile(step, backend=backend), batches)
    assert close(got, want)
    _same_updates(model, ref_model, init, _UPDATE_TOL[backend])
