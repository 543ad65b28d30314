"""Seed 003 (PyTorch's test/dynamo/test_backends.py) through kiln's API."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import kiln
from kiln.backends.debugging import ExplainWithBackend
from kiln.testing import same


@pytest.fixture(autouse=True)
def _reset():
    kiln.reset()
    yield
    kiln.reset()


class Seq(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(10, 10), torch.nn.ReLU(), torch.nn.Linear(10, 10), torch.nn.Sigmoid(),
        )

    def forward(self, x):
        return self.layers(x)


def _fn(a, bc, d):
    b, c = bc
    return a / d - b / c


def _inputs():
    return torch.empty(2).fill_(1), torch.empty(2).fill_(2), torch.empty(2).fill_(3), 4


def test_example_inputs():
    r1 = None

    def compiler_fn(graph, example_inputs):
        nonlocal r1
        r1 = graph(*example_inputs)[0]
        return graph.forward

    a, b, c, d = _inputs()
    r2 = _fn(a, (b, c), d)
    r3 = kiln.optimize_assert(compiler_fn)(_fn)(a, (b, c), d)
    assert r1 is not None
    assert r1.size() == r2.size() and r1.stride() == r2.stride() and r1.dtype == r2.dtype
    assert r1.size() == r3.size() and r1.stride() == r3.stride() and r1.dtype == r3.dtype


def test_example_inputs_runtime_use():
    r1 = None

    def compiler_fn(graph, example_inputs):
        def fwd(*args):
            nonlocal r1
            r = graph.forward(*args)
            r1 = r[0]
            return r

        return fwd

    a, b, c, d = _inputs()
    r2 = _fn(a, (b, c), d)
    r3 = kiln.optimize_assert(compiler_fn)(_fn)(a, (b, c), d)
    assert r1 is not None
    assert same(r1, r2) and same(r1, r3)


def _check_backend_works(backend, options=None):
    model = Seq().eval()
    inp = torch.randn(2, 10)
    r1 = model(inp)
    r2 = kiln.compile(model, backend=backend, options=options)(inp)
    assert same(r1, r2.float(), tol=0.01)


def _available(name):
    try:
        kiln.lookup_backend(name)
        return True
    except Exception:
        return False


def test_eager():
    _check_backend_works("eager")


def test_eager_noexcept():
    _check_backend_works("eager_noexcept")


def test_torchscript():
    _check_backend_works("ts")


def test_aot_eager():
    _check_backend_works("aot_eager")


def test_aot_eager_decomp_partition():
    _check_backend_works("aot_eager_decomp_partition")


def test_aot_ts():
    _check_backend_works("aot_ts")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.expect_fallback("are not CUDA tensors", required=False)
def test_aot_cudagraphs():
    _check_backend_works("cudagraphs")


@pytest.mark.expect_fallback("an ONNX session has no backward")
@pytest.mark.skipif(not _available("onnxrt"), reason="needs the optional onnxruntime engine")
def test_onnxrt():
    _check_backend_works("onnxrt")


# NOTE: the tvm name is listed even without the package; then every graph falls back to
# eager with a reason naming what to install, which is what the test checks there.
@pytest.mark.skipif(not _available("tvm"), reason="needs the optional tvm engine")
@pytest.mark.expect_fallback("needs Apache TVM, which is not installed",
                             required=importlib.util.find_spec("tvm") is None)
def test_tvm():
    _check_backend_works("tvm")
    _check_backend_works("tvm", options={"scheduler": None})
    _check_backend_works("tvm", options={"opt_level": 0})


def test_list_backends():
    assert "inductor" in kiln.list_backends()
    assert "inductor" in kiln.list_backends(exclude_tags=None)
    assert "eager" not in kiln.list_backends()
    assert "eager" not in kiln.list_backends(exclude_tags=["debug"])
    assert "eager" in kiln.list_backends(exclude_tags=[])


def test_inplace_normalize():
    def fn(a, b):
        x = torch.cos(a)
        x += b
        return torch.sin(x)

    a = torch.randn(10)
    b = torch.randn(10).to(torch.float64)
    ref = fn(a, b)
    res = kiln.optimize("aot_eager")(fn)(a, b)
    assert same(ref, res)


@pytest.mark.skipif(not torch.backends.mps.is_available(), reason="needs an MPS device")
def test_mps_not_supported():
    model = Seq().to("mps")
    example_input = torch.randn(1, 10).to("mps")
    with pytest.raises(RuntimeError):
        kiln.compile(model, backend="inductor")(example_input)


def test_explain_with_backend():
    def fn3(x):
        x = torch.sin(x)
        kiln.graph_break()
        x = torch.sin(x)
        return x

    def fn2(x):
        x = torch.cos(x)
        x = fn3(x)
        x = torch.cos(x)
        return x

    def fn1(x):
        x = torch.tan(x)
        x = fn2(x)
        x = torch.tan(x)
        return x

    def fn(x):
        x = torch.sigmoid(x)
        x = fn1(x)
        x = torch.sigmoid(x)
        return x

    eb = ExplainWithBackend("inductor")
    optimized_fn = kiln.compile(fn, backend=eb)
    input_tensor = torch.randn(5)
    result = optimized_fn(input_tensor)
    assert torch.allclose(result, fn(input_tensor))
    explain_output = eb.output()
    explain_str = str(explain_output)
    for section in ("Graph Count", "Graph Break Count", "Op Count", "Break Reasons"):
        assert section in explain_str
    assert explain_output.graph_count == 8
    assert explain_output.graph_break_count == 7
    assert explain_output.op_count == 8


def test_register_backend_api():
    backend_run = False

    @kiln.register_backend
    def my_custom_backend(gm, example_inputs):
        nonlocal backend_run
        backend_run = True
        return gm.forward

    def f(x):
        return torch.relu(x)

    kiln.compile(f, backend="my_custom_backend")(torch.randn(3, 3))
    assert backend_run


def test_aot_autograd_api():
    from kiln.aot import make_boxed_func
    from kiln.backends import aot_autograd

    backend_run = False

    def my_compiler(gm, example_inputs):
        nonlocal backend_run
        backend_run = True
        return make_boxed_func(gm.forward)

    my_backend = aot_autograd(fw_compiler=my_compiler)

    def f(x):
        return torch.relu(x)

    kiln.compile(f, backend=my_backend)(torch.randn(3, 3))
    assert backend_run


def test_lookup_backend():
    from kiln import list_backends, lookup_backend

    list_backends()
    backend_run = False

    def my_compiler(gm, example_inputs):
        nonlocal backend_run
        backend_run = True
        try:
            trt_compiled = lookup_backend("tensorrt")(gm, example_inputs)
            if trt_compiled is not None:
                return trt_compiled
        except Exception:
            pass
        try:
            inductor_compiled = lookup_backend("inductor")(gm, example_inputs)
            if inductor_compiled is not None:
                return inductor_compiled
        except Exception:
            pass
        return gm.forward

    def f(x):
        return torch.relu(x)

    kiln.compile(f, backend=my_compiler)(torch.randn(3, 3))
    assert backend_run
