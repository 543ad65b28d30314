"""Bench row: memory of a checkpointed transformer training step, eager vs kiln.

``python -m bench.checkpoint_memory [--device cpu|cuda] [--out DIR]`` builds a small
pre-norm transformer (blocks of layer norm, attention, MLP), runs one training step
(forward, backward) with and without ``torch.utils.checkpoint.checkpoint`` around each
block, in eager and through kiln (``aot_eager``, ``inductor``), and reports per column:

* ``saved_MB``: bytes of the tensors autograd holds for backward at the end of the forward
  (``torch.autograd.graph.saved_tensors_hooks``, distinct storages): the activation memory
  that checkpointing trades for recomputation;
* ``peak_MB`` (CUDA only): ``torch.cuda.max_memory_allocated`` over the step;
* ``grads_equal``: the step's gradients equal eager's without checkpointing.

The row is printed and written to ``DIR/checkpoint_memory.json``.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable

import torch
from torch import nn
import torch.utils.checkpoint as cp


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


class Model(nn.Module):
    def __init__(self, d: int = 64, heads: int = 4, layers: int = 4, checkpoint: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = cp.checkpoint(blk, x, use_reentrant=False) if self.checkpoint else blk(x)
        return x.square().mean()


def _step(fn: Callable, model: nn.Module, x: torch.Tensor, device: str) -> dict:
    seen: dict = {}

    def pack(t: torch.Tensor) -> Any:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(x)
    saved = sum(seen.values())
    loss.backward()
    out = {"saved_MB": round(saved / 2**20, 3)}
    if device == "cuda":
        torch.cuda.synchronize()
        out["peak_MB"] = round(torch.cuda.max_memory_allocated() / 2**20, 3)
    out["grads"] = [p.grad.detach().clone() for p in model.parameters()]
    return out


def run(device: str = "cpu", batch: int = 8, seq: int = 128) -> dict:
    import kiln

    torch.manual_seed(0)
    model = Model().to(device)
    x = torch.randn(batch, seq, 64, device=device)
    row: dict = {"case": "checkpointed transformer train step", "device": device,
                 "config": f"4 blocks, d=64, batch={batch}, seq={seq}"}
    ref = None
    for backend in ("eager", "kiln:aot_eager", "kiln:inductor"):
        for ckpt in (False, True):
            model.checkpoint = ckpt
            kiln.reset()
            fn = model if backend == "eager" else kiln.compile(model, backend=backend.split(":")[1])
            _step(fn, model, x, device)  # warm-up (compiles)
            res = _step(fn, model, x, device)
            grads = res.pop("grads")
            if ref is None:
                ref = grads
            res["grads_equal"] = all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(grads, ref))
            row[f"{backend}{'+checkpoint' if ckpt else ''}"] = res
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    row = run(a.device)
    print(json.dumps(row, indent=1))
    out = a.out or os.path.join(os.path.dirname(__file__), "results", a.device)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "checkpoint_memory.json"), "w") as f:
        json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
