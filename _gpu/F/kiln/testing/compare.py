"""Result comparison: :func:`same` (with the meaning of PyTorch's dynamo ``same``) and
:func:`compare_equal_outs_and_grads` (as PyTorch's test helper of that name)."""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
from typing import Any, Callable, Optional

import torch
import torch.utils._pytree as pytree

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Opts:
    tol: float = 1e-4
    equal_nan: bool = False
    exact_dtype: bool = True
    relax_numpy_equality: bool = False
    ignore_non_fp: bool = False
    cos_similarity: bool = False
    log_error: Callable[..., None] = log.error


def same(
    ref: Any,
    res: Any,
    fp64_ref: Any = None,
    cos_similarity: bool = False,
    tol: float = 1e-4,
    equal_nan: bool = False,
    exact_dtype: bool = True,
    relax_numpy_equality: bool = False,
    ignore_non_fp: bool = False,
    log_error: Callable[..., None] = log.error,
) -> bool:
    """True when ``res`` matches ``ref``: nested lists/tuples/dicts element by element,
    tensors and floats by ``allclose(atol=rtol=tol)`` (or, given a float64 reference
    ``fp64_ref``, by an RMSE no worse than a few times ``ref``'s own error), other
    values by ``==``.  Mismatches are logged through ``log_error``."""
    opts = _Opts(tol, equal_nan, exact_dtype, relax_numpy_equality, ignore_non_fp, cos_similarity, log_error)
    return _same(ref, res, ref if fp64_ref is None else fp64_ref, opts)


def _same(ref: Any, res: Any, fp64_ref: Any, o: _Opts) -> bool:
    for predicate, handler in _HANDLERS:
        if predicate(ref):
            return handler(ref, res, fp64_ref, o)
    if dataclasses.is_dataclass(ref) or hasattr(ref, "__dict__"):
        return _same_object(ref, res, fp64_ref, o)
    raise RuntimeError(f"unsupported type: {type(ref).__name__}")


def _same_sequence(ref: Any, res: Any, fp64_ref: Any, o: _Opts) -> bool:
    if not isinstance(res, (list, tuple, collections.deque)):
        raise AssertionError(f"type mismatch {type(ref)} {type(res)}")
    if len(ref) != len(res):
        o.log_error("Length mismatch")
        return False
    return all(_same(a, b, c, o) for a, b, c in zip(ref, res, fp64_ref))


def _same_dict(ref: dict, res: Any, fp64_ref: Any, o: _Opts) -> bool:
    if not isinstance(res, dict):
        raise AssertionError(f"Expected res to be a dict, got {type(res)}")
    if set(ref) != set(res):
        raise AssertionError(f"keys mismatch {set(ref)} == {set(res)}")
    for k in sorted(ref, key=str):
        if not _same(ref[k], res[k], fp64_ref[k], o):
            o.log_error("Accuracy failed for key name %s", k)
            return False
    return True


def _same_set(ref: set, res: Any, fp64_ref: Any, o: _Opts) -> bool:
    if not isinstance(res, set):
        raise AssertionError(f"Expected res to be a set, got {type(res)}")
    if set(ref) != set(res):
        raise AssertionError(f"elements mismatch {set(ref)} == {set(res)}")
    return True


def _same_plain(ref: Any, res: Any, fp64_ref: Any, o: _Opts) -> bool:
    if o.ignore_non_fp:
        return True
    r = ref == res
    if not r:
        o.log_error("Accuracy failed (%s): %s != %s", type(ref), ref, res)
    return bool(r)


def _same_numpy_scalar(ref: Any, res: Any, fp64_ref: Any, o: _Opts) -> bool:
    if o.relax_numpy_equality and not _is_numpy_scalar(res):
        ref = ref.item()
    r = type(ref) is type(res) and ref == res
    if not r:
        o.log_error("Accuracy failed (numpy): %s != %s", ref, res)
    return bool(r)


def _same_ndarray(ref: Any, res: Any, fp64_ref: Any, o: _Opts) -> bool:
    return type(ref) is type(res) and _same(torch.as_tensor(ref), torch.as_tensor(res), fp64_ref, o)


def _same_object(ref: Any, res: Any, fp64_ref: Any, o: _Opts) -> bool:
    # NOTE: model-output objects (dataclasses, HF outputs) compare field by field.
    if type(ref) is not type(res):
        raise AssertionError(f"type mismatch {type(ref)} {type(res)}")
    keys = vars(ref).keys()
    return all(_same(getattr(ref, k), getattr(res, k), getattr(fp64_ref, k), o) for k in keys)


def _same_tensor(ref: Any, res: Any, fp64_ref: Any, o: _Opts) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    if (isinstance(ref, torch.Tensor) and is_fake(ref)) or (isinstance(res, torch.Tensor) and is_fake(res)):
        raise AssertionError("ref and res must not be FakeTensors")
    ref, res, fp64_ref = (v if isinstance(v, torch.Tensor) else torch.tensor(v) for v in (ref, res, fp64_ref))
    if ref.is_sparse:
        if not res.is_sparse:
            raise AssertionError("Expected res to be sparse since ref is sparse")
        ref, res = ref.to_dense(), res.to_dense()
    if o.exact_dtype and ref.dtype != res.dtype:
        o.log_error("dtype mismatch %s, %s", ref.dtype, res.dtype)
        return False
    if o.exact_dtype and ref.dtype == torch.bool:
        return o.ignore_non_fp or _allclose_bool(ref, res, o)
    if o.cos_similarity:
        return _cos_similar(ref, res, o)
    if not o.exact_dtype:
        ref = ref.to(res.dtype)
    if torch.allclose(ref, res, atol=o.tol, rtol=o.tol, equal_nan=o.equal_nan):
        return True
    if fp64_ref.dtype == torch.float64:
        return _rmse_ok(ref, res, fp64_ref, o)
    if o.ignore_non_fp:
        return True
    o.log_error("Accuracy failed: allclose not within tol=%s", o.tol)
    return False


def _allclose_bool(ref: torch.Tensor, res: torch.Tensor, o: _Opts) -> bool:
    r = torch.allclose(ref.to(torch.uint8), res.to(torch.uint8), atol=o.tol, rtol=o.tol, equal_nan=o.equal_nan)
    if not r:
        o.log_error("Accuracy failed: uint8 tensor did not match")
    return r


def _cos_similar(ref: torch.Tensor, res: torch.Tensor, o: _Opts) -> bool:
    ref, res = ref.flatten().to(torch.float32), res.flatten().to(torch.float32)
    if torch.allclose(ref, res, atol=o.tol, rtol=o.tol, equal_nan=True):
        return True  # NOTE: cosine of two zero vectors is 0; allclose settles it first
    score = torch.nn.functional.cosine_similarity(ref, res, dim=0, eps=1e-6)
    if score < 0.99:
        log.warning("Similarity score=%s", score.detach().cpu().item())
    return bool(score >= 0.99)


def _rmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(torch.mean(torch.square(a.double() - b.double())))


def _rmse_ok(ref: torch.Tensor, res: torch.Tensor, fp64_ref: torch.Tensor, o: _Opts) -> bool:
    # NOTE: compare errors against the float64 reference: res may be as far from the truth
    # as ref is, times a small multiplier (noise dominates small tensors).
    ref_error = _rmse(fp64_ref, ref).item()
    res_error = _rmse(fp64_ref, res).item()
    if math.isnan(ref_error):
        log.warning("Found nan in reference. Consider running in higher precision.")
    multiplier = 3.0 if res.dtype in (torch.float16, torch.bfloat16) else 2.0
    if fp64_ref.numel() < 1000 or (ref.ndim == 4 and ref.shape[-1] == ref.shape[-2] == 1) or o.tol >= 2e-2:
        multiplier = 3.0
    ok = res_error <= multiplier * ref_error + o.tol / 10.0
    if not ok and o.equal_nan and math.isnan(ref_error) and math.isnan(res_error):
        ok = True
    if not ok:
        o.log_error(
            "RMSE (res-fp64): %.5f, (ref-fp64): %.5f and shape=%s. res.dtype: %s, multiplier: %f, tol: %f",
            res_error, ref_error, res.size(), res.dtype, multiplier, o.tol,
        )
    return ok


def _is_numpy_scalar(x: Any) -> bool:
    try:
        import numpy as np
    except ImportError:
        return False
    return isinstance(x, (np.integer, np.floating))


def _is_ndarray(x: Any) -> bool:
    try:
        import numpy as np
    except ImportError:
        return False
    return isinstance(x, np.ndarray)


# (predicate on ref, handler); first match wins.
_HANDLERS: list[tuple[Callable[[Any], bool], Callable[..., bool]]] = [
    (lambda r: isinstance(r, (list, tuple, collections.deque, torch.nn.ParameterList, torch.Size)), _same_sequence),
    (lambda r: isinstance(r, dict), _same_dict),
    (lambda r: isinstance(r, set), _same_set),
    (lambda r: isinstance(r, (torch.Tensor, float)), _same_tensor),
    (lambda r: isinstance(r, (str, int, type(None), bool, torch.device)), _same_plain),
    (_is_numpy_scalar, _same_numpy_scalar),
    (_is_ndarray, _same_ndarray),
]


def outs_and_grads(fn: Callable, graph_inps: Any, inps: Any) -> tuple[Any, list]:
    """Run ``fn(*graph_inps)``, backprop ``.sum()`` of every output that requires grad,
    and return ``(outputs, grads of the tensors in inps)``; the grads are then cleared."""
    outs = fn(*graph_inps)
    for out in pytree.tree_leaves(outs):
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.sum().backward(retain_graph=True)
    tensors = [t for t in pytree.tree_leaves(inps) if isinstance(t, torch.Tensor)]
    grads = [t.grad for t in tensors]
    for t in tensors:
        t.grad = None
    return outs, grads


def _assert_equal(a: Any, b: Any, what: str) -> None:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            raise AssertionError(f"{what}: one is a tensor, the other {type(b).__name__}")
        torch.testing.assert_close(a, b, equal_nan=True, msg=lambda m: f"{what}: {m}")
        return
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            raise AssertionError(f"{what}: lengths differ ({len(a)} vs {len(b)})")
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{what}[{i}]")
        return
    if a != b:
        raise AssertionError(f"{what}: {a!r} != {b!r}")


def compare_equal_outs_and_grads(test: Optional[Any], m1: Callable, m2: Callable, inps: Any) -> None:
    """Assert that ``m1`` and ``m2`` give equal outputs and equal input gradients on
    ``inps``.  ``test`` (a TestCase or None) only supplies ``fail`` for reporting."""
    r1, g1 = outs_and_grads(m1, inps, inps)
    r2, g2 = outs_and_grads(m2, inps, inps)
    try:
        _assert_equal(r1, r2, "outputs")
        _assert_equal(g1, g2, "grads")
    except AssertionError as e:
        if test is not None and hasattr(test, "fail"):
            test.fail(str(e))
        raise


__all__ = ["same", "outs_and_grads", "compare_equal_outs_and_grads"]
