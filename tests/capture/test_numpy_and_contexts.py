"""NumPy programs on tensors' ``.numpy()`` and context managers in compiled code, as a user
writes them: ``Tensor.numpy()`` regions, ``min``/``max`` of arrays, NumPy integer scalars
next to symbolic ints, arrays returned from the region; grad-mode switches the code makes
itself, ``no_grad`` around a break in a callee, profilers, ``disable_saved_tensors_hooks``,
user-defined context managers with a break inside; graph node names and stack traces."""
from __future__ import annotations

import warnings

import pytest
import torch

import kiln
from kiln.exc import Unsupported
from kiln.testing import CompileCounter, EagerAndRecordGraphs

np = pytest.importorskip("numpy")


@pytest.fixture(autouse=True)
def _reset():
    kiln.reset()
    yield
    kiln.reset()


def _targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


# ---------------------------------------------------------------- NumPy
def test_a_region_that_only_calls_numpy_compiles_and_returns_an_array():
    cc = CompileCounter()
    x = torch.randn(3)
    got = kiln.compile(lambda t: t.numpy(), backend=cc)(x)
    assert type(got) is np.ndarray and np.array_equal(got, x.numpy())
    assert cc.frame_count == 1
    got[0] = 42.0  # the array is a view of the tensor's memory, as in eager
    assert x[0].item() == 42.0

    cc = CompileCounter()
    w = torch.randn(3, requires_grad=True)
    got = kiln.compile(lambda t: t.numpy(force=True), backend=cc)(w)
    assert type(got) is np.ndarray and np.array_equal(got, w.detach().numpy()) and cc.frame_count == 1


def test_arrays_made_before_a_graph_break_are_used_after_it():
    def f(x, y):
        a = x.numpy()
        b = y.numpy()
        kiln.graph_break()
        return np.add(a, 1), np.add(b, 1)

    cc = CompileCounter()
    opt = kiln.compile(f, backend=cc)
    for _ in range(3):
        x, y = torch.randn(1, 3), torch.randn(1, 3)
        got, ref = opt(x, y), f(x, y)
        assert all(type(g) is np.ndarray and np.allclose(g, r) for g, r in zip(got, ref))
    assert cc.frame_count == 2


def test_min_and_max_of_arrays_are_elementwise():
    def f(a):
        return min(a, 3), max(a, a - 1), min(a[2:4], 5.5)

    a = np.arange(10)
    got = kiln.compile(f, backend="eager", fullgraph=True)(a)
    for g, r in zip(got, (np.minimum(a, 3), np.maximum(a, a - 1), np.minimum(a[2:4], 5.5))):
        assert type(g) is np.ndarray and g.dtype == r.dtype and np.array_equal(g, r)


def test_a_numpy_integer_next_to_a_symbolic_int_keeps_it_symbolic():
    def f(x, a, b):
        return x + (a % b)

    cc = CompileCounter()
    opt = kiln.compile(f, backend=cc, dynamic=True, fullgraph=True)
    x = torch.zeros(4)
    for a in (4096, 4097, 4103):
        assert torch.equal(opt(x, a, np.int64(8)), f(x, a, np.int64(8)))
    assert cc.frame_count == 1 and cc.op_count == 2  # a % b and the add


def test_an_input_array_returned_is_a_new_writeable_array_over_its_memory():
    x = np.broadcast_to(np.arange(3), (2, 3))
    assert not x.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = kiln.compile(lambda a: a, backend="eager", fullgraph=True)(x)
    assert type(y) is np.ndarray and y.flags.writeable and np.array_equal(x, y)
    assert np.shares_memory(x, y)


def test_ndarray_tolist_follows_tensor_tolist():
    def f(a):
        return a.tolist()

    for a in (np.arange(5), np.ones(3)):
        got = kiln.compile(f, backend="eager")(a)
        assert type(got) is list and got == a.tolist()
    with pytest.raises(Unsupported, match="tolist"):
        kiln.compile(f, backend="eager", fullgraph=True)(np.ones(3))


# ---------------------------------------------------------------- grad mode
class SetGrad:
    def __init__(self, mode):
        self.prev = torch.is_grad_enabled()
        self.mode = mode

    def __enter__(self):
        torch._C._set_grad_enabled(self.mode)

    def __exit__(self, *exc):
        torch._C._set_grad_enabled(self.prev)


def test_grad_mode_switches_the_code_makes_are_graph_nodes_even_when_they_change_nothing():
    def f(x):
        with SetGrad(True):
            x = x + 1
            if torch.is_grad_enabled():
                x = x * 2
            x = torch.relu(x)
        return x - 1

    x = torch.rand(2, 3)
    for grad, ops in ((False, 6), (True, 6)):
        kiln.reset()
        cc = CompileCounter()
        with torch.set_grad_enabled(grad):
            assert torch.equal(kiln.compile(f, backend=cc, fullgraph=True)(x), f(x))
            assert torch.is_grad_enabled() is grad
        assert cc.frame_count == 1 and cc.op_count == ops


def test_no_grad_around_a_break_in_a_callee_compiles_no_empty_graph():
    def g(z):
        with torch.no_grad():
            kiln.graph_break()
            return torch.sin(z)

    def f(x, y, z):
        a = torch.mm(x, y)
        g(z)
        return a

    cc = CompileCounter()
    x, y = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4, requires_grad=True)
    out = kiln.compile(f, backend=cc)(x, y, torch.randn(4))
    out.sum().backward()
    assert cc.frame_count == 2 and x.grad is not None and torch.is_grad_enabled()


@pytest.mark.expect_fallback("user-defined context manager")
def test_a_break_inside_a_user_context_manager_runs_the_frame_as_eager_does():
    log = []

    class Logged(SetGrad):
        def __enter__(self):
            log.append("enter")
            super().__enter__()

        def __exit__(self, *exc):
            log.append("exit")
            super().__exit__(*exc)

    def f(x):
        with Logged(False):
            y = x * 2
            kiln.graph_break()
            z = y.sin() + 3
            assert not torch.is_grad_enabled()
        return z

    x = torch.randn(2, 3, requires_grad=True)
    got = kiln.compile(f, backend="eager")(x)
    assert log == ["enter", "exit"] and torch.is_grad_enabled()
    assert torch.allclose(got, f(x)) and not got.requires_grad


@pytest.mark.expect_fallback("user-defined context manager")
@pytest.mark.parametrize("grad", [False, True])
def test_the_managers_enter_and_exit_are_compiled_when_the_frame_runs_eagerly(grad):
    """As PyTorch's eval-frame callback compiles them: `with` calls __enter__ / __exit__ with no
    call instruction, and the eager frame's copy still routes them; a frame that only switches
    grad mode is a graph of that one switch (no restoring node)."""
    def f(x):
        with SetGrad(True):
            x = x + 1
            kiln.graph_break()
            x = torch.relu(x)
        return x - 1

    cc = CompileCounter()
    cf = kiln.compile(f, backend=cc)
    x = torch.randn(2, 3)
    with torch.set_grad_enabled(grad):
        assert torch.equal(cf(x), f(x))
        assert torch.is_grad_enabled() == grad
    assert (cc.frame_count, cc.op_count) == (2, 2)  # __enter__ and __exit__, one switch each


def test_a_frame_that_switches_grad_mode_leaves_it_switched_without_a_restoring_node():
    def f(x):
        y = x * x
        torch.set_grad_enabled(False)
        return y.clone(), y

    for backend in ("eager", "aot_eager", "inductor"):
        rec = EagerAndRecordGraphs() if backend == "eager" else backend
        x = torch.ones(3, requires_grad=True) * 3
        try:
            got = kiln.compile(f, backend=rec, fullgraph=True)(x)
            assert not torch.is_grad_enabled(), backend
        finally:
            torch.set_grad_enabled(True)
        assert got[0].grad_fn is None and got[1].grad_fn is not None, backend
        if backend == "eager":
            switches = [n.args for g in rec.graphs for n in g.graph.nodes
                        if n.target is torch._C._set_grad_enabled]
            assert switches == [(False,)]


# ---------------------------------------------------------------- profilers
@pytest.mark.parametrize("profiler", [torch.profiler, torch.autograd.profiler])
def test_profilers_are_ignored_and_a_break_inside_them_resumes_compiled(profiler):
    def f(x):
        y = x ** 2
        with profiler.profile():
            y = y + 2
            with profiler.record_function("my_function"):
                z = y ** 3
                z.tolist()  # a graph break
                z = z + 1
        return z

    x = torch.randn(2, 2, requires_grad=True)
    cc = CompileCounter()
    assert torch.allclose(kiln.compile(f, backend=cc)(x), f(x))
    assert cc.frame_count == 2


def test_a_profiler_object_used_in_the_region_is_unsupported():
    def f(x):
        with torch.profiler.profile() as p:
            p.step()
        return x + 1

    with pytest.raises(Unsupported, match="profiler"):
        kiln.compile(f, backend="eager", fullgraph=True)(torch.ones(2))


# ---------------------------------------------------------------- saved tensors hooks
_get_msg = torch._C._autograd._saved_tensors_hooks_get_disabled_error_message
_disable = torch._C._autograd._saved_tensors_hooks_disable
_enable = torch._C._autograd._saved_tensors_hooks_enable


def test_disable_saved_tensors_hooks_as_a_decorator_and_a_block():
    seen = []

    def f(z):
        @torch.autograd.graph.disable_saved_tensors_hooks("outer")
        def g(x, y):
            with torch.autograd.graph.disable_saved_tensors_hooks("inner"):
                w = x * y
            return w + x

        x, y = torch.ones(1), torch.zeros(1)
        return g(x, y) + z

    rec = EagerAndRecordGraphs()
    z = torch.randn(())
    assert torch.equal(kiln.compile(f, backend=rec, fullgraph=True)(z), f(z))
    assert _get_msg() is None  # restored after the call
    calls = [(t, n.args) for n in rec.graphs[0].graph.nodes if n.op == "call_function"
             for t in [n.target] if t in (_disable, _enable)]
    assert calls == [(_disable, ("outer",)), (_disable, ("inner",)), (_disable, ("outer",)), (_enable, ())]
    seen.append(len(rec.graphs))

    # the message in force when the frame starts is guarded: inside another disable block, a new entry
    with torch.autograd.graph.disable_saved_tensors_hooks("before"):
        assert torch.equal(kiln.compile(f, backend=rec, fullgraph=True)(z), f(z))
        assert _get_msg() == "before"
    assert len(rec.graphs) == 2 and _get_msg() is None
    last = [n.args for n in rec.graphs[1].graph.nodes if n.op == "call_function" and n.target is _disable]
    assert last[-1] == ("before",)


def test_disable_saved_tensors_hooks_holds_around_a_graph_break():
    def f(x):
        with torch.autograd.graph.disable_saved_tensors_hooks("off here"):
            y = x + 1
            seen = _get_msg()
            kiln.graph_break()
            return y * 2, seen, _get_msg()

    x = torch.randn(())
    got = kiln.compile(f, backend="eager")(x)
    assert torch.equal(got[0], (x + 1) * 2) and got[1:] == ("off here", "off here") and _get_msg() is None

    def g(x):
        with torch.autograd.graph.disable_saved_tensors_hooks("m"):
            inside = _get_msg()
        _disable("direct")
        direct = _get_msg()
        _enable()
        return x + 1, inside, direct, _get_msg()

    got = kiln.compile(g, backend="eager", fullgraph=True)(x)
    assert got[1:] == ("m", "direct", None) and _get_msg() is None


# ---------------------------------------------------------------- graph printing
def test_graph_nodes_are_named_after_locals_and_carry_the_users_stack():
    def f(x):
        x = x + 1
        x = x * 2
        y = torch.relu(x)
        return y - 1

    rec = EagerAndRecordGraphs()
    kiln.compile(f, backend=rec, fullgraph=True)(torch.randn(3))
    gm = rec.graphs[0]
    names = [n.name for n in gm.graph.nodes if n.op == "call_function"]
    assert names == ["x", "x_1", "y", "sub"]
    traces = [n.meta.get("stack_trace") for n in gm.graph.nodes if n.op == "call_function"]
    assert all(__file__ in t and " in f\n" in t for t in traces)
    assert "y = torch.relu(x)" in traces[2]


# ---------------------------------------------------------------- small torch values
def test_is_compiling_is_true_in_the_region():
    fns = [torch.compiler.is_compiling, torch.compiler.is_dynamo_compiling]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fns.append(torch._utils.is_compiling)
    for fn in fns:
        kiln.reset()
        opt = kiln.compile(lambda: torch.ones(2) if fn() else torch.zeros(2), backend="eager")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert torch.equal(opt(), torch.ones(2)), fn


def test_getattr_with_a_default_recompiles_when_the_attribute_appears():
    class Cfg:
        def __init__(self):
            self.val = 0.5

    def f(x, cfg):
        if getattr(cfg, "add_7", False):
            return x + 7
        return x + cfg.val

    cc = CompileCounter()
    opt = kiln.compile(f, backend=cc)
    cfg, v = Cfg(), torch.zeros(1)
    assert opt(v, cfg).item() == 0.5
    cfg.add_7 = True
    assert opt(v, cfg).item() == 7
    del cfg.add_7
    assert opt(v, cfg).item() == 0.5
    assert cc.frame_count == 2
