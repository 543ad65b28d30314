"""kiln.aot on CUDA tensors (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch

from kiln.aot import aot_function, aot_module, min_cut_rematerialization_partition, nop

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_forward_backward_and_mutation():
    def f(x, w, buf):
        buf.add_(1)
        return (x @ w).relu().sum() + buf.sum()

    for kw in ({}, {"partition_fn": min_cut_rematerialization_partition}):
        x = torch.randn(8, 16, device="cuda")
        w = torch.randn(16, 4, device="cuda", requires_grad=True)
        buf = torch.zeros(3, device="cuda")
        w2 = w.detach().clone().requires_grad_()
        buf2 = buf.clone()
        ref = f(x, w2, buf2)
        ref.backward()
        out = aot_function(f, nop, **kw)(x, w, buf)
        out.backward()
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(w.grad, w2.grad)
        torch.testing.assert_close(buf, buf2)


def test_cuda_module_with_batchnorm():
    torch.manual_seed(0)
    mod = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).cuda()
    ref_mod = __import__("copy").deepcopy(mod)
    x = torch.randn(2, 3, 8, 8, device="cuda")
    out = aot_module(mod, nop)(x)
    ref = ref_mod(x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(mod[1].running_mean, ref_mod[1].running_mean)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(mod[0].weight.grad, ref_mod[0].weight.grad)
