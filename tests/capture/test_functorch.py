"""torch.func transforms inside compiled code: vmap, grad, grad_and_value, vjp, jvp, jacrev,
jacfwd, hessian, linearize, functional_call; graph breaks inside them; compiled code called
from inside eager transforms."""
import pytest
import torch
import torch.nn.functional as F

import kiln
from kiln.ops import func_transforms
from kiln.testing import CompileCounterWithBackend

BACKENDS = ["eager", "aot_eager", "inductor"]


def _transform_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and getattr(n.target, "__module__", "") == func_transforms.__name__]


def _check(fn, args, backend="aot_eager", fullgraph=True, grads=True):
    """Compiled vs eager: values, and grads of every input that requires grad; one graph
    with one transform node at least.  Returns the counter."""
    kiln.reset()
    cnt = CompileCounterWithBackend(backend)
    compiled = kiln.compile(fn, backend=cnt, fullgraph=fullgraph)
    out = compiled(*args)
    ref = fn(*args)
    torch.testing.assert_close(out, ref)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if grads and leaves:
        flat = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        flat_ref = [o for o in torch.utils._pytree.tree_leaves(ref) if isinstance(o, torch.Tensor)]
        got = torch.autograd.grad(sum((o * o).sum() for o in flat), leaves, allow_unused=True)
        want = torch.autograd.grad(sum((o * o).sum() for o in flat_ref), leaves, allow_unused=True)
        torch.testing.assert_close(got, want)
    assert cnt.frame_count == 1
    assert _transform_nodes(cnt.graphs[0]), "the transform is one node of the captured graph"
    return cnt


# --------------------------------------------------------------------------- vmap
@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_values_grads_one_graph(backend):
    def f(x):
        return torch.func.vmap(lambda a: a.sin().sum(0) + a.cos().sum(1))(x) * 2

    cnt = _check(f, (torch.randn(4, 3, 3, requires_grad=True),), backend)
    assert len(_transform_nodes(cnt.graphs[0])) == 1


def test_vmap_in_dims_out_dims_and_closure():
    w = torch.randn(3)

    def f(x, y):
        def body(a, b):
            return a * b + w, (a - b).sum()

        return torch.vmap(body, in_dims=(1, None), out_dims=(1, 0))(x, y)

    _check(f, (torch.randn(3, 5, requires_grad=True), torch.randn(3, requires_grad=True)))


def test_vmap_pytree_inputs_kwargs_and_chunks():
    def f(d, y):
        def body(p, scale=1.0):
            return p["a"] * scale + p["b"][0]

        return torch.func.vmap(body, in_dims=({"a": 0, "b": (1,)},), chunk_size=2)(
            {"a": d, "b": (y,)}, scale=3.0)

    _check(f, (torch.randn(5, 4), torch.randn(4, 5)))


def test_nested_vmap_and_vmap_over_grad():
    def f(x):
        inner = torch.func.vmap(lambda a: (a * a).sum())
        return torch.func.vmap(inner)(x) + torch.func.vmap(torch.func.grad(lambda a: a.sin().sum()))(x).sum(-1)

    cnt = _check(f, (torch.randn(2, 3, 4, requires_grad=True),))
    assert len(_transform_nodes(cnt.graphs[0])) == 2


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_vmap_randomness_same_and_different(backend):
    def f(x, randomness):
        return torch.func.vmap(lambda a: a * 0 + torch.rand(6), randomness=randomness)(x)

    x = torch.randn(4, 6)
    kiln.reset()
    cnt = CompileCounterWithBackend(backend)
    compiled = kiln.compile(f, backend=cnt, fullgraph=True)
    same = compiled(x, "same")
    diff = compiled(x, "different")
    assert same.shape == diff.shape == (4, 6)
    assert torch.equal(same, same[:1].expand(4, 6)), "randomness='same': one draw for the batch"
    assert not torch.equal(diff[0], diff[1]), "randomness='different': a draw per example"
    assert cnt.frame_count == 2  # NOTE: the option is a constant of the graph: one graph each


def test_vmap_randomness_error_breaks_and_raises_as_eager():
    def f(x):
        return torch.func.vmap(lambda a: a + torch.rand(3))(x)

    x = torch.randn(2, 3)
    kiln.reset()
    with pytest.raises(kiln.exc.Unsupported, match="randomness"):
        kiln.compile(f, backend="aot_eager", fullgraph=True)(x)
    kiln.reset()
    with pytest.raises(RuntimeError, match="randomness"):  # the eager error, not a kiln crash
        kiln.compile(f, backend="aot_eager")(x)


# --------------------------------------------------------------------------- grad family
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_argnums_and_double_backward(backend):
    def f(x, y):
        gx, gy = torch.func.grad(lambda a, b: (a.sin() * b).sum(), argnums=(0, 1))(x, y)
        return gx * 2 + gy

    _check(f, (torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)), backend)


def test_grad_has_aux_and_grad_and_value():
    def f(x):
        g, aux = torch.func.grad(lambda a: ((a ** 3).sum(), {"m": a.mean(), "k": a.sum()}), has_aux=True)(x)
        (g2, (v, aux2)) = torch.func.grad_and_value(lambda a: ((a * a).sum(), a.max()), has_aux=True)(x)
        return g + aux["m"] * aux["k"], g2 * v + aux2

    _check(f, (torch.randn(5, requires_grad=True),))


def test_vjp_and_vjp_has_aux():
    def f(x, ct):
        out, vjp_fn = torch.func.vjp(lambda a: a.sin() * a, x)
        (g,) = vjp_fn(ct)
        out2, vjp_fn2, aux = torch.func.vjp(lambda a: (a.exp(), a.sum()), x, has_aux=True)
        return out + g + vjp_fn2(ct)[0] * aux + out2

    _check(f, (torch.randn(4, requires_grad=True), torch.randn(4)))


def test_vjp_fn_under_vmap_is_a_jacobian():
    def f(x):
        _, vjp_fn = torch.func.vjp(torch.sin, x)
        return torch.func.vmap(vjp_fn)(torch.eye(3))[0]

    x = torch.randn(3)
    _check(f, (x,))
    torch.testing.assert_close(kiln.compile(f, backend="aot_eager")(x), torch.diag(x.cos()))


def test_jvp_and_linearize():
    def f(x, t):
        out, tan = torch.func.jvp(lambda a: a.sin() * a.sum(), (x,), (t,))
        out3, tan3, aux = torch.func.jvp(lambda a: (a.exp(), a.mean()), (x,), (t,), has_aux=True)
        lo, jvp_fn = torch.func.linearize(torch.tanh, x)
        return out + tan + tan3 * aux + lo + jvp_fn(t) + out3

    _check(f, (torch.randn(4, requires_grad=True), torch.randn(4)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_jacrev_jacfwd_hessian(backend):
    def f(x, y):
        jr = torch.func.jacrev(lambda a, b: a.sin() * b.sum(), argnums=(0, 1))(x, y)
        jf = torch.func.jacfwd(lambda a: a.cos() * a)(x)
        h = torch.func.hessian(lambda a: (a.sin() * a).sum())(x)
        return jr[0] + jr[1] + jf + h

    _check(f, (torch.randn(3, requires_grad=True), torch.randn(3)), backend)


def test_jacrev_has_aux():
    def f(x):
        j, aux = torch.func.jacrev(lambda a: (a.sin(), a.cos().sum()), has_aux=True)(x)
        return j * aux

    _check(f, (torch.randn(3),))


# --------------------------------------------------------------------------- functional_call
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("shift", torch.randn(2))

    def forward(self, x):
        return self.lin(x).relu() + self.shift


def test_functional_call_swaps_parameters_and_buffers():
    net = _Net()
    params = {k: torch.randn_like(v, requires_grad=True) for k, v in net.named_parameters()}
    buffers = {"shift": torch.randn(2)}

    def f(x, params, buffers):
        return torch.func.functional_call(net, (params, buffers), (x,))

    x = torch.randn(4, 3)
    kiln.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    out = kiln.compile(f, backend=cnt, fullgraph=True)(x, params, buffers)
    ref = f(x, params, buffers)
    torch.testing.assert_close(out, ref)
    assert not torch.allclose(out, net(x))  # the given tensors, not the module's own
    got = torch.autograd.grad(out.sum(), list(params.values()))
    want = torch.autograd.grad(ref.sum(), list(params.values()))
    torch.testing.assert_close(got, want)
    assert cnt.frame_count == 1


class _NormNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.bn = torch.nn.BatchNorm1d(2)

    def forward(self, x):
        return self.bn(self.lin(x))


def test_functional_call_updates_given_buffers_like_eager():
    net = _NormNet()
    state = {k: v.clone() for k, v in net.state_dict().items()}

    def f(x, p, b):
        y = net(x)  # the module's own tensors are graph inputs already
        return torch.func.functional_call(net, (p, b), (x,)) + y

    x = torch.randn(4, 3)
    p = {k: torch.randn_like(v).detach() for k, v in net.named_parameters()}
    b_compiled = {k: v.clone() for k, v in net.named_buffers()}
    b_eager = {k: v.clone() for k, v in net.named_buffers()}
    kiln.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    out = kiln.compile(f, backend=cnt, fullgraph=True)(x, p, b_compiled)
    after_compiled = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    ref = f(x, p, b_eager)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(b_compiled, b_eager)  # running stats of the given buffers
    torch.testing.assert_close(after_compiled, net.state_dict())  # and of the module's own
    assert out.requires_grad == ref.requires_grad
    assert cnt.frame_count == 1


def test_functional_call_under_vmap_model_ensemble():
    nets = [_Net() for _ in range(3)]
    params = {k: torch.stack([dict(n.named_parameters())[k].detach() for n in nets]) for k, _ in
              nets[0].named_parameters()}
    base = nets[0]

    def f(params, x):
        return torch.func.vmap(lambda p, xx: torch.func.functional_call(base, p, (xx,)),
                               in_dims=(0, None))(params, x)

    _check(f, (params, torch.randn(4, 3)))


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_training_step_with_vmapped_loss(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    ref_model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    ref_model.load_state_dict(model.state_dict())

    def step(m, opt, x, y):
        opt.zero_grad()
        per_example = torch.vmap(lambda xi, yi: F.mse_loss(m(xi), yi))(x, y)
        loss = per_example.mean()
        loss.backward()
        opt.step()
        return loss.detach()

    kiln.reset()
    cnt = CompileCounterWithBackend(backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    loss_fn = kiln.compile(lambda x, y: torch.vmap(lambda xi, yi: F.mse_loss(model(xi), yi))(x, y).mean(),
                           backend=cnt, fullgraph=True)
    for _ in range(3):
        x, y = torch.randn(6, 4), torch.randn(6, 1)
        opt.zero_grad()
        loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        ref_loss = step(ref_model, ref_opt, x, y)
        torch.testing.assert_close(loss.detach(), ref_loss)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q)
    assert cnt.frame_count == 1


# --------------------------------------------------------------------------- graph breaks
_SEEN = []


def _noisy(a):
    print("inside the transform")
    return a.cos()


def _appends(a):
    _SEEN.append(1)
    return a.sin().sum()


def _break_reasons(fn, *args):
    return [r.reason for r in kiln.explain(fn)(*args).break_reasons]


@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_body_with_print_breaks_with_reason_and_runs_eagerly(transform, capsys):
    def f(x):
        y = x * 2
        if transform == "vmap":
            z = torch.func.vmap(_noisy)(y)
        else:
            z = torch.func.grad(lambda a: _noisy(a).sum())(y)
        return z + 1

    x = torch.randn(3, 2)
    kiln.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    torch.testing.assert_close(kiln.compile(f, backend=cnt)(x), f(x))
    assert "inside the transform" in capsys.readouterr().out  # the body ran (eagerly)
    assert cnt.frame_count == 2  # before and after the transform call
    kiln.reset()
    reasons = _break_reasons(f, x)
    assert any(f"torch.func.{transform}" in r and "print" in r for r in reasons), reasons
    with pytest.raises(kiln.exc.Unsupported, match=f"torch.func.{transform}"):
        kiln.reset()
        kiln.compile(f, backend="aot_eager", fullgraph=True)(x)


def test_lambda_body_with_graph_break_runs_eagerly():
    def f(x):
        return torch.vmap(lambda a: _noisy(a) * 2)(x) + 1

    x = torch.randn(3, 2)
    kiln.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    torch.testing.assert_close(kiln.compile(f, backend=cnt)(x), f(x))
    assert cnt.frame_count == 1  # the `+ 1` after the eager transform call
    assert cnt.graphs and not _transform_nodes(cnt.graphs[0])


def test_lambda_over_a_closure_breaks_and_is_rebuilt():
    scale = 3.0

    def f(x):
        return torch.vmap(lambda a: _noisy(a) * scale)(x) - 1

    x = torch.randn(3, 2)
    kiln.reset()
    torch.testing.assert_close(kiln.compile(f, backend="aot_eager")(x), f(x))


def test_body_with_side_effect_breaks():
    def f(x):
        return torch.func.grad(_appends)(x + 1) * 2

    x = torch.randn(3)
    kiln.reset()
    before = len(_SEEN)
    torch.testing.assert_close(kiln.compile(f, backend="aot_eager")(x), (x + 1).cos() * 2)
    assert len(_SEEN) == before + 1  # the body ran eagerly, once
    kiln.reset()
    assert any("SideEffects" in r for r in _break_reasons(f, x))


def test_transformed_function_returned_from_compiled_code():
    def g(a):
        return a.sin()

    def f():
        return torch.vmap(g, in_dims=1)

    wrapper = kiln.compile(f, backend="aot_eager")()
    x = torch.randn(3, 4)
    torch.testing.assert_close(wrapper(x), torch.vmap(g, in_dims=1)(x))


# --------------------------------------------------------------------------- eager transforms over compiled code
@pytest.mark.expect_fallback("called inside an eager torch.func.vmap transform")
def test_compiled_function_inside_eager_vmap_runs_eagerly():
    def g(a):
        return a.sin() * 2

    kiln.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = kiln.compile(g, backend=cnt)
    x = torch.randn(3, 4)
    with pytest.warns(kiln.fallbacks.FallbackWarning, match="inside an eager torch.func.vmap"):
        torch.testing.assert_close(torch.func.vmap(compiled)(x), g(x))
    torch.testing.assert_close(torch.func.vmap(compiled)(x), g(x))
    assert cnt.frame_count == 0
    torch.testing.assert_close(compiled(x), g(x))  # outside the transform it compiles
    assert cnt.frame_count == 1
    strict = kiln.compile(g, backend="aot_eager", fullgraph=True)
    with pytest.raises(kiln.exc.Unsupported, match=r"Calling torch.func.grad\(compiled_fn\)"):
        torch.func.grad(lambda a: strict(a).sum())(x)


def test_compiled_backward_inside_eager_transform_raises():
    kiln.reset()
    f = kiln.compile(lambda a: a ** 2, backend="aot_eager")
    x = torch.randn(2, requires_grad=True)
    y = f(x)
    with pytest.raises(RuntimeError, match="compiled backward function within vmap/grad/vjp"):
        torch.func.vjp(lambda v: torch.autograd.grad(y, x, v), x)


def test_forward_ad_dual_level_is_not_entered_by_capture():
    fwAD = torch.autograd.forward_ad

    def f(x, t):
        with fwAD.dual_level():
            return fwAD.unpack_dual(fwAD.make_dual(x, t) * 2).tangent

    x, t = torch.randn(3), torch.randn(3)
    kiln.reset()
    with pytest.raises(kiln.exc.Unsupported, match="dual_level"):
        kiln.compile(f, backend="eager", fullgraph=True)(x, t)
    torch.testing.assert_close(kiln.compile(f, backend="aot_eager")(x, t), t * 2)
    with fwAD.dual_level():  # no level left entered by the failed capture
        pass
