"""Seed 000 (PyTorch's test/higher_order_ops/test_with_effects.py) through kiln's API:
kiln.make_fx, kiln.aot.aot_export_module, kiln.aot.config, kiln.ops.with_effects,
kiln.compile."""
from __future__ import annotations

import pytest
import torch
from torch.testing import FileCheck

import kiln
from kiln.aot import aot_export_module, config
from kiln.ops import with_effects
from kiln.tracing import make_fx


def _strip_hop(code: str) -> str:
    """The graph code with kiln's spelling of the with_effects HOP normalised."""
    return code.replace("kiln_ops_with_effects", "with_effects_op")


@pytest.fixture
def torchbind():
    from torch.testing._internal.torchbind_impls import init_torchbind_implementations

    # NOTE: _TorchScriptTesting lives in a C++ test library that some torch
    # wheels do not ship; the same path (an opaque-object op marked effectful)
    # is covered by tests/ops/test_hops.py with an op of our own.
    try:
        init_torchbind_implementations()
    except (OSError, RuntimeError) as e:
        pytest.skip(f"needs torch's optional torchbind test library (built with torch from source): {e}")


def test_print():
    class M(torch.nn.Module):
        def forward(self, x):
            torch.ops.aten._print("moo")
            res = x + x
            torch.ops.aten._print("moo")
            return (res,)

    inputs = (torch.randn(3),)
    gm = make_fx(M())(*inputs)
    FileCheck().check_count("torch.ops.aten._print.default", 2, exactly=True).run(gm.code)

    gm, gs = aot_export_module(M(), inputs, trace_joint=False)
    assert _strip_hop(str(gm.code).strip()) == """\
def forward(self, arg0_1, arg1_1):
    with_effects = with_effects_op(arg0_1, torch.ops.aten._print.default, 'moo');  arg0_1 = None
    getitem = with_effects[0];  with_effects = None
    add = torch.ops.aten.add.Tensor(arg1_1, arg1_1);  arg1_1 = None
    with_effects_1 = with_effects_op(getitem, torch.ops.aten._print.default, 'moo');  getitem = None
    getitem_1 = with_effects_1[0];  with_effects_1 = None
    return (getitem_1, add)"""
    assert len(gs.input_tokens) == 1
    assert len(gs.output_tokens) == 1

    with config.patch(unlift_effect_tokens=True):
        gm, gs = aot_export_module(M(), inputs, trace_joint=False)
    assert _strip_hop(str(gm.code).strip()) == """\
def forward(self, arg1_1):
    _make_token_default = torch.ops.prims._make_token.default()
    with_effects = with_effects_op(_make_token_default, torch.ops.aten._print.default, 'moo');  _make_token_default = None
    getitem = with_effects[0];  with_effects = None
    add = torch.ops.aten.add.Tensor(arg1_1, arg1_1);  arg1_1 = None
    with_effects_1 = with_effects_op(getitem, torch.ops.aten._print.default, 'moo');  getitem = None
    getitem_1 = with_effects_1[0];  with_effects_1 = None
    _sink_tokens_default = torch.ops.prims._sink_tokens.default((getitem_1,));  getitem_1 = _sink_tokens_default = None
    return (add,)"""  # noqa: E501
    assert gs.input_tokens == [] and gs.output_tokens == []


def test_torchbind_custom_op(torchbind):
    from torch._higher_order_ops.torchbind import enable_torchbind_tracing

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attr = torch.classes._TorchScriptTesting._Foo(10, 20)

        def forward(self, x):
            return (x + torch.ops._TorchScriptTesting.takes_foo(self.attr, x),)

    with enable_torchbind_tracing():
        gm, gs = aot_export_module(M(), (torch.ones(2, 3),), trace_joint=False)
    assert _strip_hop(str(gm.code).strip()) == """\
def forward(self, arg0_1, arg1_1):
    _torchbind_obj0 = self._torchbind_obj0
    with_effects = with_effects_op(arg0_1, torch.ops._TorchScriptTesting.takes_foo.default, _torchbind_obj0, arg1_1);  arg0_1 = _torchbind_obj0 = None
    getitem = with_effects[0]
    getitem_1 = with_effects[1];  with_effects = None
    add = torch.ops.aten.add.Tensor(arg1_1, getitem_1);  arg1_1 = getitem_1 = None
    return (getitem, add)"""  # noqa: E501
    assert len(gs.input_tokens) == 1
    assert len(gs.output_tokens) == 1


def test_print_with_buffer_mutations():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("buf", torch.ones(3))

        def forward(self, x):
            torch.ops.aten._print("moo")
            res = x + x
            self.buf.add_(res)
            res = self.buf + x
            torch.ops.aten._print("moo")
            return (res,)

    gm, gs = aot_export_module(M(), (torch.randn(3),), trace_joint=False)
    assert len(gs.input_tokens) == 1
    assert len(gs.output_tokens) == 1
    assert len(gs.buffers_to_mutate) == 1


def test_print_with_input_mutations():
    class M(torch.nn.Module):
        def forward(self, x):
            torch.ops.aten._print("moo")
            res = x + x
            x.add_(res)
            res = x + x
            torch.ops.aten._print("moo")
            return (res,)

    gm, gs = aot_export_module(M(), (torch.randn(3),), trace_joint=False)
    assert len(gs.input_tokens) == 1
    assert len(gs.output_tokens) == 1
    assert len(gs.user_inputs_to_mutate) == 1


def test_alias_op():
    def f(token, x):
        token, out = with_effects(token, torch.ops.aten.absolute_.default, x)
        return token, out

    with pytest.raises(AssertionError, match=r"Ops with aliasing is not supported"):
        make_fx(f)(torch.tensor([]), torch.tensor(4))


def _print_twice(x):
    torch.ops.aten._print("moo")
    res = x + x
    torch.ops.aten._print("moo")
    return res


def test_compile_aot_eager(capfd):
    inputs = (torch.randn(2, 3),)
    res = kiln.compile(_print_twice, backend="aot_eager")(*inputs)
    assert torch.allclose(res, _print_twice(*inputs))


# NOTE: codegen does not compile graphs with effect tokens yet (the graph's ATen ops run eagerly)
@pytest.mark.expect_fallback("cannot call kiln.ops.with_effects", required=False)
def test_compile_inductor():
    inputs = (torch.randn(2, 3),)
    res = kiln.compile(_print_twice, backend="inductor")(*inputs)
    assert torch.allclose(res, _print_twice(*inputs))


# NOTE: codegen takes functional graphs; a custom op that writes its argument runs eagerly
@pytest.mark.expect_fallback("codegen takes functional graphs", required=False)
def test_compile_inductor_external_op_return_none():
    with torch.library._scoped_library("mylib", "FRAGMENT") as lib:
        torch.library.define("mylib::inplace_add", "(Tensor input, Tensor(a!) output) -> ()", lib=lib)

        def inplace_add(input: torch.Tensor, output: torch.Tensor) -> None:
            assert input.device == output.device
            output.add_(input)

        lib.impl("inplace_add", inplace_add, "CompositeExplicitAutograd")

        def f(x):
            out = torch.empty(3)
            out = torch.zeros_like(out)
            torch.ops.mylib.inplace_add(x, out)
            return out

        inputs = (torch.randn(3),)
        res = kiln.compile(f, backend="inductor")(*inputs)
        assert torch.allclose(res, f(*inputs))


def test_compile_aot_eager_requires_grad():
    inputs = (torch.randn(2, 3, requires_grad=True),)
    res = kiln.compile(_print_twice, backend="aot_eager")(*inputs)
    assert torch.allclose(res, _print_twice(*inputs))
    res.sum().backward()
