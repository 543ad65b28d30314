"""torch.autograd.Function.apply in captured code: with gradients needed, its forward and
backward are captured as the fwd/bwd bodies of one ``kiln.ops.autograd_function_apply``
node, so AOT compiles the user's backward; what capture cannot do runs as one opaque call
with a recorded reason."""
import pytest
import torch
from torch.autograd.function import once_differentiable

import kiln
import kiln.ops
from kiln.testing import AotEagerAndRecordGraphs, CompileCounterWithBackend

BACKENDS = ["aot_eager", "inductor"]


def _hop_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is kiln.ops.autograd_function_apply]


def _opaque_nodes(gm, cls):
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and getattr(n.target, "__name__", "") == f"{cls.__name__}_apply"]


def _leaves(args):
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def _fresh(args):
    return [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]


def _scalar(out):
    if isinstance(out, (tuple, list)):
        return sum(o.float().sum() for o in out if isinstance(o, torch.Tensor) and o.requires_grad)
    return out.sum()


def check(fn, args, backend, fullgraph=True):
    """``fn`` compiled vs eager on copies of ``args``: outputs, their requires_grad and the
    grads of the inputs that require grad; returns the counter."""
    kiln.reset()
    cnt = CompileCounterWithBackend(backend)
    ca, ea = _fresh(args), _fresh(args)
    out = kiln.compile(fn, backend=cnt, fullgraph=fullgraph)(*ca)
    ref = fn(*ea)
    torch.testing.assert_close(out, ref)
    outs = out if isinstance(out, (tuple, list)) else [out]
    refs = ref if isinstance(ref, (tuple, list)) else [ref]
    assert [o.requires_grad for o in outs] == [r.requires_grad for r in refs]
    if not _leaves(args):
        return cnt
    _scalar(out).backward()
    _scalar(ref).backward()
    for a, b in zip(_leaves(ca), _leaves(ea)):
        if b.grad is None:
            assert a.grad is None
        else:
            torch.testing.assert_close(a.grad, b.grad)
    return cnt


class XSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, dim):
        ctx.dim = dim
        rmask = ~(mask.to(torch.bool))
        out = x.masked_fill(rmask, torch.tensor(torch.finfo(x.dtype).min))
        out = torch.softmax(out, ctx.dim)
        out.masked_fill_(rmask, 0)
        ctx.save_for_backward(out, rmask)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        (out, rmask) = ctx.saved_tensors
        return torch._softmax_backward_data(grad_output, out, ctx.dim, out.dtype), None, None


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_apply_is_one_hop_with_fwd_and_bwd_bodies(backend):
    def fn(x, mask):
        return XSoftmax.apply(x, mask, 1)

    x = torch.randn(4, 10, requires_grad=True)
    cnt = check(fn, [x, torch.randn(4, 10) < 0], backend)
    assert cnt.frame_count == 1 and cnt.op_count == 2  # the op and its getitem
    (node,) = _hop_nodes(cnt.graphs[0])
    fwd, bwd = (getattr(cnt.graphs[0], a.target) for a in node.args[:2])
    assert any(n.target is torch.softmax for n in fwd.graph.nodes)
    assert any(n.target is torch._softmax_backward_data for n in bwd.graph.nodes)
    assert node.kwargs == {"non_differentiable_idx": []}


class WrongGrad(torch.autograd.Function):
    """A backward that is not the forward's derivative: only the user's backward gives 5."""

    @staticmethod
    def forward(ctx, x):
        return x.sin()

    @staticmethod
    def backward(ctx, g):
        return g * 5


def test_the_users_backward_is_compiled_by_aot():
    kiln.reset()
    rec = AotEagerAndRecordGraphs()
    x = torch.randn(3, requires_grad=True)
    f = kiln.compile(lambda t: WrongGrad.apply(t * 2), backend=rec)
    f(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 10.0))
    (fw,), (bw,) = rec.fw_graphs, rec.bw_graphs
    bw_ops = {n.target for n in bw.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.cos.default not in bw_ops
    assert any("mul" in str(t) for t in bw_ops)
    assert torch.ops.aten.sin.default in {n.target for n in fw.graph.nodes}


class MulAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, scale, flag):
        ctx.save_for_backward(x, y)
        ctx.scale = scale
        ctx.flag = flag
        return x * y * scale, x + y

    @staticmethod
    def backward(ctx, g1, g2):
        x, y = ctx.saved_tensors
        gx = gy = None
        if ctx.needs_input_grad[0]:
            gx = g1 * y * ctx.scale + g2
        if ctx.needs_input_grad[1]:
            gy = g1 * x * ctx.scale + (g2 if ctx.flag else 0)
        return gx, gy, None, None


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_tensors_ctx_constants_several_inputs_and_outputs(backend):
    x, y = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    cnt = check(lambda a, b: MulAdd.apply(a, b, 3.0, True), [x, y], backend)
    assert len(_hop_nodes(cnt.graphs[0])) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_needs_input_grad_follows_requires_grad(backend):
    x, y = torch.randn(3, requires_grad=True), torch.randn(3)
    cnt = check(lambda a, b: MulAdd.apply(a, b, 2, False), [x, y], backend)
    (node,) = _hop_nodes(cnt.graphs[0])
    bwd = getattr(cnt.graphs[0], node.args[1].target)
    out = next(n for n in bwd.graph.nodes if n.op == "output")
    assert out.args[0][1] is None  # needs_input_grad[1] is False: no gradient for y


class Stash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = x.sin()
        ctx.y = y
        ctx.x = x
        return y.cos()

    @staticmethod
    def backward(ctx, g):
        return g * -ctx.y.sin() * ctx.x.cos()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensors_stashed_on_ctx_reach_the_backward(backend):
    cnt = check(lambda a: Stash.apply(a), [torch.randn(5, requires_grad=True)], backend)
    assert len(_hop_nodes(cnt.graphs[0])) == 1


class NonDiff(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        idx = x.argmax(dim=-1)
        out = x * 2
        half = out / 2
        ctx.mark_non_differentiable(idx, half)
        return out, idx, half

    @staticmethod
    def backward(ctx, g, gi, gh):
        return g * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_mark_non_differentiable(backend):
    cnt = check(lambda a: NonDiff.apply(a), [torch.randn(2, 3, requires_grad=True)], backend)
    (node,) = _hop_nodes(cnt.graphs[0])
    assert node.kwargs["non_differentiable_idx"] == [1, 2]


class Once(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.exp()

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * x.exp()


@pytest.mark.parametrize("backend", BACKENDS)
def test_once_differentiable_backward(backend):
    cnt = check(lambda a: Once.apply(a) * 2, [torch.randn(4, requires_grad=True)], backend)
    assert len(_hop_nodes(cnt.graphs[0])) == 1


class PassThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y):
        return x, y * 2

    @staticmethod
    def backward(ctx, gx, gy):
        return gx * 3, gy * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_returning_an_input(backend):
    x, y = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    cnt = check(lambda a, b: PassThrough.apply(a, b), [x, y], backend)
    assert len(_hop_nodes(cnt.graphs[0])) == 1


lin = torch.nn.Linear(4, 3)


class LinFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return x @ w.t() + b

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, g.t() @ x, g.sum(0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_and_dynamic_sizes(backend):
    def fn(x):
        return LinFn.apply(x, lin.weight, lin.bias).relu()

    kiln.reset()
    cnt = CompileCounterWithBackend(backend)
    f = kiln.compile(fn, backend=cnt, dynamic=True, fullgraph=True)
    for n in (5, 7):
        x = torch.randn(n, 4, requires_grad=True)
        lin.zero_grad()
        f(x).sum().backward()
        got = (x.grad, lin.weight.grad.clone(), lin.bias.grad.clone())
        lin.zero_grad()
        x2 = x.detach().requires_grad_()
        fn(x2).sum().backward()
        torch.testing.assert_close(got, (x2.grad, lin.weight.grad, lin.bias.grad))
    assert cnt.frame_count == 1


my_apply = Stash.apply


def test_apply_read_through_a_global_alias():
    cnt = check(lambda a: my_apply(a) + 1, [torch.randn(3, requires_grad=True)], "aot_eager")
    assert len(_hop_nodes(cnt.graphs[0])) == 1


def test_without_grad_it_stays_one_opaque_call():
    cnt = check(lambda a: Stash.apply(a) + 1, [torch.randn(3)], "aot_eager")
    assert not _hop_nodes(cnt.graphs[0]) and len(_opaque_nodes(cnt.graphs[0], Stash)) == 1


# --------------------------------------------------------------------------- fallbacks
calls = []


class DataDependentBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        if g.sum() > 0:
            return g * 2
        return g * 3


class MarksDirty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x.mul_(2)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, g):
        return g * 2


class SideEffectInForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = x * 2
        calls.append(1)
        return y

    @staticmethod
    def backward(ctx, g):
        return g * 2


@pytest.mark.expect_fallback("DataDependentBackward.apply (runs as one opaque call)")
@pytest.mark.expect_fallback("cannot trace aten._local_scalar_dense.default")  # NOTE: AOT, tracing the opaque call
@pytest.mark.parametrize("backend", BACKENDS)
def test_fallback_data_dependent_backward(backend):
    for sign in (1.0, -1.0):
        def fn(x):
            return DataDependentBackward.apply(x) * sign

        cnt = check(fn, [torch.randn(3, requires_grad=True)], backend)
        assert cnt.frame_count == 1 and not _hop_nodes(cnt.graphs[0])
        assert len(_opaque_nodes(cnt.graphs[0], DataDependentBackward)) == 1


@pytest.mark.expect_fallback("ctx.mark_dirty() in a captured autograd.Function")
def test_fallback_mark_dirty():
    cnt = check(lambda a: MarksDirty.apply(a.clone()) + 1, [torch.randn(3, requires_grad=True)], "aot_eager")
    assert cnt.frame_count == 1 and len(_opaque_nodes(cnt.graphs[0], MarksDirty)) == 1


@pytest.mark.expect_fallback("SideEffectInForward.apply (runs as one opaque call)")
def test_fallback_after_a_half_traced_forward_starts_capture_again():
    calls.clear()
    cnt = check(lambda a: SideEffectInForward.apply(a.cos()) + 1, [torch.randn(3, requires_grad=True)], "eager")
    assert cnt.frame_count == 1 and len(_opaque_nodes(cnt.graphs[0], SideEffectInForward)) == 1
    # NOTE: once on fake tensors while capturing the opaque call, once compiled, once eagerly:
    # nothing of the abandoned attempt (its recorded side effect) is replayed.
    assert len(calls) == 3


def _is_transposed(x):
    return not x.is_contiguous() and x.stride()[0] == 1 and x.stride()[1] == x.size()[0]


class LayoutBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lhs, rhs):
        ctx.save_for_backward(lhs, rhs)
        return torch.full_like(lhs, 1.0)

    @staticmethod
    def backward(ctx, dy):
        lhs, rhs = ctx.saved_tensors[:2]
        dlhs = torch.full_like(lhs, 1.0 if _is_transposed(lhs) else 2.0) if ctx.needs_input_grad[0] else None
        drhs = torch.full_like(rhs, 1.0 if _is_transposed(rhs) else 2.0) if ctx.needs_input_grad[1] else None
        return dlhs, drhs, None, None  # NOTE: extra None gradients, which autograd drops


class GradLayoutBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, dy):
        return dy * (3 if dy.is_contiguous() else 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_reads_the_layout_of_saved_tensors(backend):
    x = torch.randn(8, 8, requires_grad=True)
    y = torch.randn(8, 8).transpose(0, 1).requires_grad_(True)
    cnt = check(lambda a, b: LayoutBackward.apply(a, b), [x, y], backend)
    assert len(_hop_nodes(cnt.graphs[0])) == 1


@pytest.mark.expect_fallback("of a gradient in a captured autograd.Function backward")
def test_fallback_backward_reads_the_layout_of_its_gradient():
    x = torch.randn(4, 4, requires_grad=True)
    # NOTE: the gradient of a transposed output arrives transposed in eager
    cnt = check(lambda a: GradLayoutBackward.apply(a).t(), [x], "eager")
    assert not _hop_nodes(cnt.graphs[0]) and len(_opaque_nodes(cnt.graphs[0], GradLayoutBackward)) == 1


@pytest.mark.expect_fallback("GradLayoutBackward.apply (runs as one opaque call)")
def test_fallback_is_counted_as_a_graph_break():
    from kiln.capture import counters

    kiln.reset()
    x = torch.randn(4, 4, requires_grad=True)
    kiln.compile(lambda a: GradLayoutBackward.apply(a) + 1, backend="eager")(x)
    assert list(counters["graph_break"].values()) == [1]
    assert "of a gradient in a captured autograd.Function backward" in next(iter(counters["graph_break"]))


class MatmulFolding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(b)
        ctx.shape = a.size()
        return torch.matmul(a, b)

    @staticmethod
    def backward(ctx, g):
        (b,) = ctx.saved_tensors
        return torch.mm(g.squeeze(), b.t()).view(ctx.shape), None


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_written_in_place_after_the_call(backend):
    def fn(a, b):
        res = MatmulFolding.apply(a, b)
        res.add_(1.0)  # NOTE: the op's outputs are non-leaf tensors, as a Function's are
        return res.sum()

    cnt = check(fn, [torch.randn(4, 1, 2, requires_grad=True), torch.randn(2, 4)], backend)
    assert cnt.frame_count == 1 and len(_hop_nodes(cnt.graphs[0])) == 1


class SetupContextLinear(torch.autograd.Function):
    @staticmethod
    def forward(x, w, bias):
        out = x.mm(w.t())
        return out + bias if bias is not None else out

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, bias = inputs
        ctx.save_for_backward(x, w)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g.mm(w), g.t().mm(x), g.sum(0) if ctx.has_bias else None


@pytest.mark.parametrize("backend", BACKENDS)
def test_function_with_setup_context(backend):
    x, w = torch.randn(2, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    cnt = check(lambda a, b, c: SetupContextLinear.apply(a, b, c), [x, w, torch.randn(4, requires_grad=True)],
                backend)
    assert len(_hop_nodes(cnt.graphs[0])) == 1
    cnt = check(lambda a, b: SetupContextLinear.apply(a, b, None), [x, w], backend)
    assert len(_hop_nodes(cnt.graphs[0])) == 1


def _side_effect_function(i):
    class F(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            calls.append(i)
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    F.__name__ = F.__qualname__ = f"SideEffect{i}"
    return F


@pytest.mark.expect_fallback("runs as one opaque call)")
@pytest.mark.expect_fallback("and so do too many others in this frame")
def test_too_many_recaptures_run_the_frame_eagerly():
    functions = [_side_effect_function(i) for i in range(10)]

    def fn(x):
        for f in functions:
            x = f.apply(x)
        return x

    calls.clear()
    cnt = check(fn, [torch.randn(3, requires_grad=True)], "eager", fullgraph=False)
    assert cnt.frame_count == 0
    # NOTE: the call (run eagerly) and the reference; opaque calls also ran on fakes while capturing
    assert calls[-20:] == list(range(10)) * 2
