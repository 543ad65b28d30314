"""Capture of torch's own Python values: dtype, device, finfo/iinfo, Size, the named
tuples of ``torch.return_types``, Python builtins over tensors, tensor attributes and
predicates, and ``Tensor.numpy()`` (a graph break with a reason)."""
from __future__ import annotations

import pytest
import torch

import kiln
from kiln.exc import Unsupported
from kiln.testing import CompileCounter


@pytest.fixture(autouse=True)
def _reset():
    kiln.reset()
    yield


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def full(fn, *args, ops=None):
    cc = CompileCounter()
    expected = fn(*args)
    got = kiln.compile(fn, backend=cc, fullgraph=True)(*args)
    assert same(expected, got), (expected, got)
    assert cc.frame_count == 1
    if ops is not None:
        assert cc.op_count == ops, cc.op_count
    return got


X = torch.randn(4, 3)
Y = torch.randn(4, 3)


def test_return_types_keep_their_class_and_fields():
    def f(x):
        r = torch.max(x, 1)
        s = torch.sort(x, dim=1)
        v, i = x.topk(2)
        return r.values + 1, r.indices, r[0], s.indices, v, i, torch.min(x, dim=0), x.median(0).values, \
            torch.aminmax(x).min

    out = full(f, X)
    assert type(out[6]) is torch.return_types.min and same(out[6].values, X.min(0).values)


def test_unread_fields_of_return_types_leave_no_node():
    # NOTE: as PyTorch's capture, the graph has no read of ``indices``: min, getitem, add.
    def f(x):
        return x.min(dim=0).values + 1

    full(f, X, ops=3)


def test_return_types_built_in_region():
    def f(x):
        r = torch.return_types.max((x, x.long()))
        return r.values * 2, r.indices

    full(f, X)


def test_dtype_device_finfo_iinfo_size():
    def f(x):
        fi = torch.finfo(x.dtype)
        ii = torch.iinfo(torch.int32)
        dev = torch.device("cpu")
        size = x.size()
        return (x.clamp(min=fi.min) + ii.max, fi.eps, torch.finfo(torch.float16).tiny, x.dtype == torch.float32,
                x.dtype.is_floating_point, x.dtype.itemsize, torch.promote_types(x.dtype, torch.int64),
                x.device.type, x.device == dev, dev, str(x.device), size == torch.Size([4, 3]), size.numel(),
                size[1:], torch.Size([2, 3]) + (1,), len(x.shape), x.shape[-1])

    out = full(f, X)
    assert type(out[13]) is torch.Size and type(out[14]) is torch.Size


def test_tensor_attributes_and_predicates():
    def f(x):
        meta = (x.itemsize, x.nbytes, x.is_contiguous(), x.is_complex(), x.is_cpu, x.is_signed(), x.ndim,
                x.is_leaf, x.requires_grad, x.layout, x.is_sparse, x.dim(), x.numel(), x.element_size(),
                x.is_floating_point(), torch.is_floating_point(x), torch.is_tensor(x), x.__class__)
        return x + 1, meta

    full(f, X)


def test_builtin_max_min_sum_any_all_over_tensors():
    def f(x, y):
        a = max(x[0, 0], y[0, 0])
        b = min(x.sum(), y.sum())
        c = sum([x, y, x])
        d = sum(x.unbind(0))
        e = max(x.shape) + min(3, x.shape[0])
        return a, b, c, d, e, any(t.dim() == 2 for t in (x, y)), all([x.dim() == 2, True])

    full(f, X, Y)


def test_builtin_max_of_mismatched_tensors_breaks_with_a_reason():
    def f(x, y):
        return max(x[0, 0], y[0, 0].double())

    with pytest.raises(Unsupported, match="different dtypes"):
        kiln.compile(f, backend="eager", fullgraph=True)(X, Y)

    def g(x):
        return max(x.sum(), 0.0)  # eager may return the float itself

    with pytest.raises(Unsupported, match="a tensor and a Python value"):
        kiln.compile(g, backend="eager", fullgraph=True)(X)
    assert same(g(X), kiln.compile(g, backend="eager")(X))


def test_sizes_max_min_stay_symbolic():
    def f(x):
        return x.new_zeros(max(x.shape[0], 2), min(x.shape[1], 8))

    cc = CompileCounter()
    opt = kiln.compile(f, backend=cc, dynamic=True)
    for n in (3, 5, 7):
        t = torch.randn(n, 4)
        assert same(f(t), opt(t))
    assert cc.frame_count == 1


def test_id_of_inputs_is_guarded():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.ones(2)

        def forward(self, x, ref):
            if id(self.w) == ref:
                return x * 2
            return x - 1

    m = M()
    cc = CompileCounter()
    opt = kiln.compile(m, backend=cc)
    x = torch.ones(2)
    assert same(opt(x, id(m.w)), x * 2)
    assert same(opt(x, id(m.w) + 1), x - 1)
    assert cc.frame_count == 2


np = pytest.importorskip("numpy")


def test_numpy_code_is_traced_as_torch_ops():
    def f(x, arr):
        a = x.numpy()
        b = np.sin(a) * 2 + np.arange(3, dtype=np.float32)
        c = arr.sum() / len(arr) + arr.size
        d = np.where(arr > 0.5, arr, 0.0)[1:]
        return torch.from_numpy(b) + 1, b.shape, b.dtype, c, d, arr.T.shape, np.issubdtype(arr.dtype, np.floating)

    x = torch.randn(3)
    arr = np.random.rand(2, 3)
    cc = CompileCounter()
    got = kiln.compile(f, backend=cc, fullgraph=True)(x, arr)
    ref = f(x, arr)
    assert cc.frame_count == 1
    # NOTE: NumPy's sin and torch's may differ in the last bit (they do on some machines), so
    # the traced values are compared with a tolerance, the metadata exactly.
    assert ref[0].dtype == got[0].dtype
    torch.testing.assert_close(got[0], ref[0])
    assert ref[1:3] == got[1:3] and ref[5:] == got[5:]
    assert type(got[3]) is np.ndarray and np.allclose(ref[3], got[3])  # a 0-d array for NumPy's scalar
    assert type(got[4]) is np.ndarray and np.array_equal(ref[4], got[4])


def test_numpy_inputs_are_guarded_and_outputs_are_arrays():
    def f(a, b):
        a += 1  # in place, as eager
        return a * b

    cc = CompileCounter()
    opt = kiln.compile(f, backend=cc)
    a1, a2 = np.ones(3), np.ones(3)
    out = opt(a1, np.full(3, 2.0))
    assert type(out) is np.ndarray and np.array_equal(out, f(a2, np.full(3, 2.0))) and np.array_equal(a1, a2)
    opt(np.ones(3), np.ones(3))
    assert cc.frame_count == 1
    opt(np.ones(4, dtype=np.int64), np.ones(4, dtype=np.int64))  # new dtype and shape: recompiles
    assert cc.frame_count == 2


def test_numpy_that_is_not_traced_breaks_with_a_reason():
    def data(arr):
        return arr.tolist()

    def rand(x):
        return x + torch.from_numpy(np.random.randn(3))

    s = np.float64(1.5)

    def scalar(x):
        return torch.tensor(s) + x  # torch.tensor(np.float64) is float64, of a float float32

    for fn, arg, what in [(data, np.ones(2), "tolist"), (rand, torch.ones(3), "random"),
                          (scalar, torch.ones(2), "NumPy scalar")]:
        kiln.reset()
        with pytest.raises(Unsupported, match=what):
            kiln.compile(fn, backend="eager", fullgraph=True)(arg)
        kiln.reset()
        got = kiln.compile(fn, backend="eager")(arg)  # runs eagerly there: same answer
        if fn is not rand:
            assert np.array_equal(np.asarray(got), np.asarray(fn(arg)))


def test_tensor_numpy_of_a_tensor_that_requires_grad():
    def f(x):
        return x.numpy(force=True) * 2

    x = torch.randn(3, requires_grad=True)
    got = kiln.compile(f, backend="eager", fullgraph=True)(x)
    assert np.allclose(got, f(x))
    with pytest.raises(Unsupported, match="requires grad"):
        kiln.compile(lambda t: t.numpy(), backend="eager", fullgraph=True)(x)


def test_numpy_scalars_are_constants_with_numpys_promotion():
    s64, i64 = np.float64(1.5), np.int64(8)

    def f(x, a, arr):
        return x + (a % i64), arr.astype(np.float32) * 2 + s64, np.array([s64, s64])

    x, arr = torch.ones(2), np.ones(2)
    ref = f(x, 4096, arr)
    cc = CompileCounter()
    got = kiln.compile(f, backend=cc, fullgraph=True)(x, 4096, arr)
    assert cc.frame_count == 1 and same(ref[0], got[0])
    for r, g in zip(ref[1:], got[1:]):
        assert g.dtype == r.dtype == np.float64 and np.array_equal(r, g)  # NEP 50: the scalar is float64

    def g(v):
        return np.ones(2) * v

    cc = CompileCounter()
    opt = kiln.compile(g, backend=cc)
    opt(np.float32(2.0))
    out = opt(2.0)  # a Python float equal to it: not the same constant
    assert out.dtype == np.float64 and cc.frame_count == 2
