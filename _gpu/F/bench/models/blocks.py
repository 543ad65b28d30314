"""Small synthetic workloads: each stresses one thing a compiler should do well.

- ``AddOne``: ``x + 1``, nothing to optimise; measures per-call overhead.
- ``PointwiseChain``: a long chain of elementwise ops (ideal for fusion).
- ``SoftmaxLayerNorm``: two reductions back to back (softmax, then layer norm).
- ``MLPStack``: Linear + LayerNorm + GELU stacks (matmuls with pointwise epilogues).
- ``AttentionBlock``: pre-norm multi-head self-attention + MLP, written out by hand.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


class AddOne(nn.Module):
    """``x -> x + 1``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


class PointwiseChain(nn.Module):
    """Twelve elementwise ops in a row; eager launches one kernel per op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 1.5 + 0.25
        y = torch.sin(y) * torch.sigmoid(x)
        y = torch.relu(y) + torch.tanh(x) * 0.5
        y = torch.exp(-y * y) + y
        y = y / (1.0 + torch.abs(x))
        return torch.nn.functional.gelu(y) - 0.1 * x


class SoftmaxLayerNorm(nn.Module):
    """softmax over the last dim, scaled, then layer norm with affine weights."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(x * 0.125, dim=-1)
        return self.norm(p * x.shape[-1] + x)


class MLPStack(nn.Module):
    """``depth`` x (Linear -> LayerNorm -> GELU), with a residual every layer."""

    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.GELU()) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


class AttentionBlock(nn.Module):
    """A pre-norm transformer block with causal attention written as matmuls + softmax."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q = q.view(b, t, h, d // h).transpose(1, 2)
        k = k.view(b, t, h, d // h).transpose(1, 2)
        v = v.view(b, t, h, d // h).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // h)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
        att = torch.softmax(scores, dim=-1) @ v
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
