"""Bench row: tokens/s of a GPT-2 training step under DistributedDataParallel, eager vs kiln.

``python -m bench.ddp [--quick] [--no-cold] [--device cpu|cuda] [--world-size 2] [--backends ...]
[--steps N] [--out DIR]`` starts ``world-size`` processes (torch.multiprocessing, spawn; gloo on
CPU over 127.0.0.1, NCCL on CUDA), each trains a GPT-2 (transformers config, random weights)
wrapped in DDP with AdamW, and times the steady-state step per compiler column:

* ``eager``: ``DDP(model)``;
* ``kiln:<backend>``: ``kiln.compile(DDP(model), backend=...)`` (the graph split at DDP's
  buckets, ``kiln.capture.config.optimize_ddp``).

Per column: ``tokens_per_s`` (all ranks' tokens per second of wall time, rank 0's clock),
``step_ms``, ``first_step_s`` (compile included), ``parts`` (graph parts after the DDP
split), ``loss_match`` (the first step's loss equals eager's).  Printed, and written to
``DIR/ddp_gpt2.json``.  ``--no-cold`` is accepted for symmetry with ``python -m bench``
(this row has no cold-compile subprocesses).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist

from kiln.testing.distributed import free_port, spawn_bounded

SIZES = {  # profile -> (n_layer, n_embd, n_head, vocab, batch, seq)
    "quick": (2, 128, 4, 1024, 2, 64),
    "cpu": (4, 256, 4, 4096, 2, 128),
    "gpu": (12, 768, 12, 50257, 8, 512),
}


def _model(profile: str, device: str) -> tuple[torch.nn.Module, int, int, int]:
    from transformers import GPT2Config, GPT2LMHeadModel

    layers, embd, heads, vocab, batch, seq = SIZES[profile]
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=embd, n_head=heads, vocab_size=vocab, n_positions=seq,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    return GPT2LMHeadModel(cfg).to(device).train(), vocab, batch, seq


def _rank_main(rank: int, world: int, port: int, out: str, profile: str, device: str, backends: list[str],
               steps: int, threads: int) -> None:
    torch.set_num_threads(threads)
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        rows = {c: _column(c, rank, world, profile, device if device == "cpu" else f"cuda:{rank}", steps)
                for c in ["eager"] + backends}
        if rank == 0:
            with open(os.path.join(out, "rows.json"), "w") as f:
                json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def _column(comp: str, rank: int, world: int, profile: str, device: str, steps: int) -> dict[str, Any]:
    import kiln
    from kiln.backends import ddp_split
    from torch.nn.parallel import DistributedDataParallel as DDP

    kiln.reset()
    model, vocab, batch, seq = _model(profile, device)
    ddp = DDP(model, device_ids=[rank] if device.startswith("cuda") else None)
    split_mark = ddp_split.mark()
    step_model = ddp if comp == "eager" else kiln.compile(ddp, backend=comp.split(":", 1)[1])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = step_model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        return float(loss.detach())

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    t0 = time.perf_counter()
    first_loss = step()
    sync()
    first = time.perf_counter() - t0
    step()  # NOTE: DDP rebuilds its buckets after the first step
    dist.barrier()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    parts = max((len(s.buckets) for s in ddp_split.recorded_splits(split_mark)), default=0)
    return {"tokens_per_s": world * batch * seq / dt, "step_ms": dt * 1e3, "first_step_s": first,
            "first_loss": first_loss, "parts": parts,
            "config": f"GPT-2 L{SIZES[profile][0]} d{SIZES[profile][1]}, batch {batch}x{seq} per rank, world {world}"}


def run(profile: str, device: str, world: int, backends: list[str], steps: int, threads: int,
        timeout_s: float = 1800.0) -> dict[str, Any]:
    """The row: one dict per compiler column (see the module docstring)."""
    out = tempfile.mkdtemp(prefix="kiln_bench_ddp_")
    spawn_bounded(_rank_main, (world, free_port(), out, profile, device, backends, steps, threads), world,
                  timeout_s, "bench.ddp")
    with open(os.path.join(out, "rows.json")) as f:
        rows = json.load(f)
    ref = rows["eager"]["first_loss"]
    for r in rows.values():
        r["loss_match"] = abs(r["first_loss"] - ref) <= 1e-4 * max(1.0, abs(ref))
        r["speedup_vs_eager"] = r["tokens_per_s"] / rows["eager"]["tokens_per_s"]
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ddp", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="the smallest GPT-2 and few steps")
    p.add_argument("--no-cold", action="store_true", help="accepted; this row has no cold compiles")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--backends", default="kiln:inductor,kiln:aot_eager", help="comma list of kiln:<backend>")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: cores / world)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    profile = "gpu" if a.device == "cuda" else ("quick" if a.quick else "cpu")
    steps = a.steps or (20 if a.quick else 30)   # NOTE: 3 steps were within the noise of a shared machine
    threads = a.threads or max(1, (os.cpu_count() or 2) // a.world_size)
    backends = [b for b in a.backends.split(",") if b]
    rows = run(profile, a.device, a.world_size, backends, steps, threads)
    print(f"ddp_gpt2/train ({next(iter(rows.values()))['config']}, {a.device})")
    for name, r in rows.items():
        print(f"  {name:18s} {r['tokens_per_s']:10.1f} tokens/s  {r['step_ms']:8.1f} ms/step  "
              f"x{r['speedup_vs_eager']:.2f}  first step {r['first_step_s']:.1f}s  parts {r['parts']}  "
              f"loss_match={r['loss_match']}")
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", a.device)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "ddp_gpt2.json"), "w") as f:
        json.dump({"case": "ddp_gpt2", "mode": "train", "device": a.device, "world_size": a.world_size,
                   "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
