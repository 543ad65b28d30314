"""kiln.aot's differential cases (mutations, views, duplicated args, custom ops,
effects, LSTM, conv+bn, ...) with kiln's code generator as the graph compiler:
outputs, input mutations and gradients equal eager."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.utils._pytree as pytree

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "aot"))
from cases import CASES, REQUIRES_GRAD_DIFFERS  # noqa: E402
from test_differential import _build, _clone, _loss, _outputs  # noqa: E402

from kiln import exc  # noqa: E402
from kiln.aot import aot_function, aot_module  # noqa: E402
from kiln.codegen.decompose import decomposition_table  # noqa: E402
from kiln.codegen.graph import compile_aten_graph  # noqa: E402

# NOTE: a custom op that mutates its input inside the graph is not a functional graph:
# codegen refuses it with CodegenError (the caller runs that graph eagerly).
REFUSED = {"library_custom_op_mutating_input"}


@pytest.fixture(autouse=True)
def _grad_mode():
    prev = torch.is_grad_enabled()   # some cases change grad mode inside
    yield
    torch.set_grad_enabled(prev)


def _compiled(fn):
    wrap = aot_module if isinstance(fn, torch.nn.Module) else aot_function
    return wrap(fn, compile_aten_graph, decompositions=decomposition_table())


@pytest.mark.parametrize("name", sorted(set(CASES) - REFUSED))
def test_case_through_codegen(name):
    fn, args = _build(name)
    fn_c, args_c = _clone((fn, args)) if not isinstance(fn, torch.nn.Module) else (None, _clone(args))
    if isinstance(fn, torch.nn.Module):
        import copy

        fn_c = copy.deepcopy(fn)
    torch.manual_seed(1)
    want = _outputs(fn(*args))
    torch.manual_seed(1)
    got = _outputs(_compiled(fn_c)(*args_c))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if isinstance(w, torch.Tensor):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    for g, w in zip(pytree.tree_leaves(args_c), pytree.tree_leaves(args)):
        if isinstance(w, torch.Tensor):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)   # input mutations
    lw, lg = _loss(want), _loss(got)
    # NOTE: REQUIRES_GRAD_DIFFERS: kiln.aot's documented requires_grad difference (not codegen's)
    if lw is not None and lw.requires_grad and name not in REQUIRES_GRAD_DIFFERS:
        lw.backward()
        lg.backward()
        for g, w in zip(pytree.tree_leaves(args_c), pytree.tree_leaves(args)):
            if isinstance(w, torch.Tensor) and w.is_leaf and w.grad is not None:
                torch.testing.assert_close(g.grad, w.grad, rtol=1e-4, atol=1e-5)


def test_mutating_custom_op_is_refused():
    fn, args = _build("library_custom_op_mutating_input")
    with pytest.raises(exc.CodegenError, match="mutates its input"):
        _compiled(fn)(*_clone(args))


def test_unsupported_dtype_is_refused():
    with pytest.raises(exc.CodegenError, match="complex"):
        _compiled(lambda x: x * 2)(torch.randn(3, dtype=torch.complex64))
