"""Capture on small real models: compiled results and gradients equal eager, graph counts."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kiln
from kiln.testing import CompileCounter

sys.path.insert(0, os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models")))
import zoo  # noqa: E402  (the model zoo shared with tests/models and tests/aot)


@pytest.fixture(autouse=True)
def _reset():
    kiln.reset()
    yield


def _check(model, args, backend, frames=None):
    cc = CompileCounter()

    def counting(gm, ex):
        cc(gm, ex)
        return kiln.lookup_backend(backend)(gm, ex)

    ref_model = model
    opt = kiln.compile(model, backend=counting)
    ref = ref_model(*args)
    got = opt(*args)
    return ref, got, cc


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_nanogpt_single_graph_values_and_grads(backend):
    model, (idx, tgt), _ = zoo.nanogpt("tiny")
    ref, got, cc = _check(model, (idx, tgt), backend)
    assert cc.frame_count == 1
    assert torch.allclose(ref[0], got[0], atol=1e-5)
    ref[1].backward()
    g_ref = _grads(model)
    model.zero_grad()
    got[1].backward()
    for a, b in zip(g_ref, _grads(model)):
        assert torch.allclose(a, b, atol=1e-5)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


def test_convnet_batchnorm_training_updates_buffers():
    torch.manual_seed(0)
    m1 = ConvNet()
    m2 = ConvNet()
    m2.load_state_dict(m1.state_dict())
    x = torch.randn(4, 3, 8, 8)
    opt = kiln.compile(m2, backend="eager")
    for _ in range(2):
        assert torch.allclose(m1(x), opt(x), atol=1e-5)
    assert torch.allclose(m1.bn.running_mean, m2.bn.running_mean)
    assert int(m1.bn.num_batches_tracked) == int(m2.bn.num_batches_tracked) == 2
    m1.eval()
    opt.eval()
    assert torch.allclose(m1(x), opt(x), atol=1e-5)


def test_lstm_module_runs_correctly():
    torch.manual_seed(0)
    m = nn.LSTM(4, 5, num_layers=1)
    x = torch.randn(3, 2, 4)
    out, (h, c) = kiln.compile(m, backend="eager")(x)
    ref, (rh, rc) = m(x)
    assert torch.allclose(out, ref) and torch.allclose(h, rh)


def test_multihead_attention_module():
    torch.manual_seed(0)
    m = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    got = kiln.compile(m, backend="eager")(x, x, x)
    ref = m(x, x, x)
    assert torch.allclose(got[0], ref[0], atol=1e-5)
