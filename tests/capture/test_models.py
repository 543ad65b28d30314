"""Capture on small real models: compiled results and gradients equal eager, graph counts."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kiln
from kiln.testing import CompileCounter


@pytest.fixture(autouse=True)
def _reset():
    kiln.reset()
    yield


@dataclass
class GPTConfig:
    block_size: int = 16
    vocab_size: int = 50
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 16
    dropout: float = 0.0
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.register_buffer("bias", torch.tril(torch.ones(config.block_size, config.block_size))
                             .view(1, 1, config.block_size, config.block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(config.n_embd, 4 * config.n_embd),
                                      c_proj=nn.Linear(4 * config.n_embd, config.n_embd), act=nn.GELU()))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        m = self.mlp
        return x + m.c_proj(m.act(m.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, idx, targets=None):
        b, t = idx.size()
        assert t <= self.config.block_size, f"sequence too long {t}"
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return {"logits": logits, "loss": loss}


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
    torch.manual_seed(0)
    model = GPT(GPTConfig())
    idx = torch.randint(0, 50, (2, 8))
    tgt = torch.randint(0, 50, (2, 8))
    ref, got, cc = _check(model, (idx, tgt), backend)
    assert cc.frame_count == 1
    assert torch.allclose(ref["logits"], got["logits"], atol=1e-5)
    ref["loss"].backward()
    g_ref = _grads(model)
    model.zero_grad()
    got["loss"].backward()
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
