"""Seed 001 (PyTorch's test/dynamo/test_aot_autograd.py): the tests built on the AOT
stage itself (aot_module_simplified, aot_export_joint_simple, node metadata, fake
tensor config).  The tests about capture behaviour are in test_aot_autograd_capture.py."""
from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.fx.traceback as fx_traceback
from torch._subclasses.fake_tensor import FakeTensorMode

import kiln
from conftest import maybe_dupe_op
from kiln.aot import aot_export_joint_simple, aot_module_simplified, config, nop
from kiln.aot.meta import setup_stacktrace_preservation_hooks
from kiln.tracing import make_fx


@pytest.fixture(scope="module")
def custom_lib():
    lib = torch.library.Library("kiln_seed001", "DEF")  # noqa: TOR901
    lib.define("maybe_dupe_op(Tensor a) -> (Tensor, Tensor)")
    lib.impl("maybe_dupe_op", maybe_dupe_op, "CPU")
    lib.impl("maybe_dupe_op", maybe_dupe_op, "Meta")
    yield lib


@kiln.capture.config.patch(automatic_dynamic_shapes=False)  # as the seed: static recompiles
def test_multiple_aot_autograd_calls_dupe_args(custom_lib):
    class WrapperModule(torch.nn.Module):
        def __init__(self, mod):
            super().__init__()
            self.mod = mod

        def forward(self, *args):
            out = self.mod(*args)
            if isinstance(out, (list, tuple)):
                return out
            return (out,)

    def compile_submod(input_mod, args):
        class WrapperModule(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.original = input_mod
                self.submod = aot_module_simplified(input_mod, args, nop)

            def forward(self, *args):
                return self.submod(*args)

        return WrapperModule()

    def test_compile(fx_g, example_inps):
        split_gm = torch.fx.passes.split_module.split_module(
            fx_g, None, lambda node: 1 if "mul" in str(node) else 0
        )
        submod_1_inps = split_gm.submod_0(*example_inps)
        split_gm.submod_0 = compile_submod(WrapperModule(split_gm.submod_0), example_inps)
        split_gm.submod_1 = compile_submod(WrapperModule(split_gm.submod_1), submod_1_inps)
        return split_gm

    @kiln.optimize(test_compile)
    def f(a):
        b, c = torch.ops.kiln_seed001.maybe_dupe_op(a)
        return (b.mul_(c),)

    f(torch.ones(4))
    f(torch.ones(6))


def test_eager_sequence_nr():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(16, 16, kernel_size=(1, 1), stride=1, padding="same", bias=True)
            self.bn1 = torch.nn.BatchNorm2d(num_features=16)
            self.relu1 = torch.nn.ReLU()
            self.fc1 = torch.nn.Linear(in_features=1638400, out_features=1)
            self.loss_fn = torch.nn.L1Loss()

        def forward(self, x, target):
            y = x
            x = self.conv1(x)
            x = self.bn1(x)
            x = self.relu1(x)
            x = x + y
            x = torch.flatten(x)
            x = self.fc1(x)
            output = self.loss_fn(x, target)
            return (output,)

    def grad_with_create_graph(mod, x, target):
        y = mod(x, target)
        (gx,) = torch.autograd.grad(y[0], x, create_graph=True, grad_outputs=grad_output)
        return gx

    x = torch.rand(100, 16, 32, 32, requires_grad=True)
    target = torch.rand(1)
    mod = Model()
    args = [mod, x, target]
    grad_output = torch.tensor(1.0, requires_grad=True)
    compiled_f1 = kiln.compile(backend="aot_eager")(grad_with_create_graph)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as kineto_prof:
        res = compiled_f1(*args)
    bwd_set = set()
    for event in kineto_prof.events():
        if event.sequence_nr >= 0 and re.search(r"Backward[01]", event.name):
            bwd_set.add(event.sequence_nr)
    assert res.shape == x.shape
    assert len(bwd_set) > 0


def test_split_with_sizes_aot_autograd_cleans_up_traceback_meta():
    def fn(result, split_sizes):
        return torch.ops.aten.split_with_sizes(result, split_sizes.tolist())

    example_inputs = (torch.randn(32, requires_grad=True), torch.tensor((7, 16, 9)))
    outs = fn(*example_inputs)
    setup_stacktrace_preservation_hooks([out.grad_fn for out in outs])
    with fx_traceback.preserve_node_meta():
        (outs[0].sum() + outs[1].sum() + outs[2].sum()).backward()
    assert "grad_fn_seq_nr" not in fx_traceback.current_meta
    assert "in_grad_fn" not in fx_traceback.current_meta


def test_aot_export_joint_simple_repro():
    class Mod(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(5, 7)

        def forward(self, x):
            return self.linear(x)

    def mini_backend(gm, sample_inputs):
        return aot_export_joint_simple(gm, sample_inputs, trace_joint=False)

    sample_inputs = [torch.rand((3, 4, 5))]
    model = Mod()
    m_compiled = kiln.compile(model, backend=mini_backend)
    out_ref = model(*sample_inputs)
    out_test = m_compiled(*sample_inputs)
    out_test = out_test[0] if isinstance(out_test, (list, tuple)) else out_test
    torch.testing.assert_close(out_ref, out_test)


def test_data_ptr_access_copy():
    with config.patch(fake_tensor_allow_unsafe_data_ptr_access=False):
        with FakeTensorMode():
            x = torch.randn(3)
            y = copy.copy(x)
    assert y.shape == x.shape


@pytest.mark.expect_fallback("more than one element of the written-to tensor")
def test_aot_autograd_expand_mutation_error():
    # NOTE: PyTorch marks this test expectedFailure (its compiled version does
    # not raise); kiln raises the same error as eager, so the test passes.
    def fn(x):
        y = x.expand(3, *x.shape)
        y[0:3, 0].add_(5)
        return y

    opt_fn = kiln.compile(fn, backend="aot_eager")
    x = torch.arange(6)
    x_opt = x.clone().detach()
    with pytest.raises(Exception):
        fn(x)
    with pytest.raises(Exception):
        opt_fn(x_opt)
