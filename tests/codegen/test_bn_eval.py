"""Eval-mode BatchNorm is decomposed into pointwise ops (fused after the convolution),
not kept as an opaque ``native_batch_norm`` call: its meta kernel's save_mean/save_rstd
shapes differ from the real kernels', which the decomposition check must allow."""
from __future__ import annotations

import torch

import kiln
from kiln.backends.common import aot_autograd
from kiln.codegen.decompose import decomposition_table


def test_eval_batch_norm_is_decomposed():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).eval()
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 16, 16)
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm

    backend = aot_autograd(fw_compiler=keep, inference_compiler=keep, decompositions=decomposition_table())
    with torch.no_grad():
        f = kiln.compile(m, backend=backend)
        torch.testing.assert_close(f(x), m(x))
    assert len(graphs) == 1
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in t for t in targets), targets
    assert "aten.convolution.default" in targets


def test_eval_batch_norm_through_inductor_matches():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(kiln.compile(m)(x), m(x))
