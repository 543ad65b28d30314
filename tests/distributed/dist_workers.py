"""Two-process torch.distributed runs for the tests in this folder (gloo on CPU, NCCL on GPUs).

``run_world(fn, *args)`` starts ``world_size`` processes (torch.multiprocessing, spawn),
each joins a process group on 127.0.0.1 and a free port, runs ``fn(rank, *args)`` and
saves what it returns; the parent gets one result per rank.  Every wait is bounded: the
process group has a timeout and the parent kills its children past ``timeout_s``.

The workers below train the same model eagerly and compiled (DDP, FSDP2) and return
losses, gradients, kiln's fallbacks and DDP splits, which the tests compare.
"""
from __future__ import annotations

import copy
import datetime
import os
import sys
import tempfile
from typing import Any, Callable

import torch
import torch.distributed as dist

from kiln.testing.distributed import free_port, spawn_bounded

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models"))

BACKEND = os.environ.get("KILN_DIST_BACKEND", "gloo")  # NOTE: "nccl" for the multi-GPU run


def _entry(rank: int, world: int, port: int, out: str, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)  # NOTE: two processes on a machine of two cores
    if BACKEND == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(BACKEND, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = fn(rank, *args)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_world(fn: Callable, *args: Any, world_size: int = 2, timeout_s: float = 120.0,
              ranks_to_read: list | None = None) -> list:
    """``[fn(0, *args), fn(1, *args), ...]``, each run in its own process of one process group."""
    out = tempfile.mkdtemp(prefix="kiln_dist_")
    spawn_bounded(_entry, (world_size, free_port(), out, fn, args), world_size, timeout_s, fn.__name__)
    ranks = range(world_size) if ranks_to_read is None else ranks_to_read
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in ranks]


# --------------------------------------------------------------------------- models and loops


def device() -> str:
    return f"cuda:{dist.get_rank()}" if BACKEND == "nccl" else "cpu"


def gpt2_model() -> torch.nn.Module:
    import zoo

    model, _, _ = zoo.gpt2("tiny")
    return model.train().to(device())


def batches(rank: int, steps: int, vocab: int = 128) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)  # NOTE: each rank its own data, as DDP is used
    return [torch.randint(0, vocab, (2, 16), generator=g).to(device()) for _ in range(steps)]


def train(model: torch.nn.Module, params_of: torch.nn.Module, data: list, opt_name: str = "adamw",
          loss_fn: Callable | None = None, events: list | None = None) -> dict:
    """Losses of each step and the gradients of the last one (before its optimizer step)."""
    opt = (torch.optim.AdamW(params_of.parameters(), lr=1e-3) if opt_name == "adamw"
           else torch.optim.SGD(params_of.parameters(), lr=0.05))
    losses, grads = [], {}
    for i, ids in enumerate(data):
        opt.zero_grad(set_to_none=True)
        if events is not None:
            events.append("step")
        loss = loss_fn(model, ids) if loss_fn else model(ids, labels=ids).loss
        if events is not None:
            _watch_compiled_backward(loss, events)
        loss.backward()
        losses.append(loss.detach().cpu())
        if i == len(data) - 1:
            # NOTE: names without kiln.compile's "_orig_mod." level, to compare with eager
            grads = {k.replace("_orig_mod.", ""): _full(p.grad).cpu()
                     for k, p in params_of.named_parameters() if p.grad is not None}
        opt.step()
    return {"losses": losses, "grads": grads}


def _watch_compiled_backward(loss: torch.Tensor, events: list) -> None:
    """Record "backward" each time the backward of a compiled graph finishes."""
    seen, todo = set(), [loss.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if "CompiledFunction" in fn.name():
            fn.register_hook(lambda gi, go: events.append("backward"))
        todo.extend(f for f, _ in fn.next_functions)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def _kiln_report(fb_since: int, split_since: int) -> dict:
    from kiln import fallbacks
    from kiln.backends import ddp_split

    return {"fallbacks": [str(f) for f in fallbacks.recorded(fb_since)],
            "splits": [(len(s.buckets), s.reason) for s in ddp_split.recorded_splits(split_since)]}


# --------------------------------------------------------------------------- DDP


def ddp_suite(rank: int, backend: str, steps: int, cap_mb: float) -> dict:
    """Each DDP scenario on the same model and data: eager, DDP(kiln.compile(m)), kiln.compile(DDP(m))."""
    import kiln
    from kiln import fallbacks
    from kiln.backends import ddp_split
    from kiln.capture import config
    from torch.nn.parallel import DistributedDataParallel as DDP

    base = gpt2_model()
    data = batches(rank, steps)
    dev = [rank] if BACKEND == "nccl" else None
    results = {}

    def scenario(name: str, build: Callable, patch: dict | None = None) -> None:
        kiln.reset()
        m = copy.deepcopy(base)
        fb, sp = fallbacks.mark(), ddp_split.mark()
        model = build(m)
        events: list = []
        ddp = getattr(model, "_orig_mod", model)
        _record_order(ddp, m, events)
        with config.patch(**(patch or {})):
            out = train(model, m, data, events=events)
        out.update(_kiln_report(fb, sp), events=events)
        results[name] = out

    scenario("eager", lambda m: DDP(m, device_ids=dev, bucket_cap_mb=cap_mb))
    scenario("inner", lambda m: DDP(kiln.compile(m, backend=backend), device_ids=dev, bucket_cap_mb=cap_mb))
    scenario("outer", lambda m: kiln.compile(DDP(m, device_ids=dev, bucket_cap_mb=cap_mb), backend=backend))
    scenario("outer_one_graph", lambda m: kiln.compile(DDP(m, device_ids=dev, bucket_cap_mb=cap_mb),
                                                       backend=backend), patch={"optimize_ddp": False})
    return results


def _record_order(ddp: Any, model: torch.nn.Module, events: list) -> None:
    """Record when each bucket's all-reduce starts (train() records the compiled backwards)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        events.append(f"allreduce{bucket.index()}")
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, hook)


class Branchy(torch.nn.Module):
    """A model whose second layer is used on odd steps only (find_unused_parameters=True)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 16)
        self.c = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if use_b:
            h = torch.relu(self.b(h))
        return self.c(h)


def unused_suite(rank: int, backend: str, steps: int) -> dict:
    """find_unused_parameters=True, eager and compiled, with a layer used on odd steps only."""
    import kiln
    from kiln import fallbacks
    from kiln.backends import ddp_split
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    base = Branchy().to(device())
    g = torch.Generator().manual_seed(7 + rank)
    data = [torch.randn(4, 8, generator=g).to(device()) for _ in range(steps)]
    dev = [rank] if BACKEND == "nccl" else None

    def loss_fn(model, x):
        step = loss_fn.step
        loss_fn.step += 1
        return model(x, step % 2 == 1).square().mean()

    results = {}
    for name, wrap in (("eager", lambda m: DDP(m, device_ids=dev, find_unused_parameters=True)),
                       ("outer", lambda m: kiln.compile(DDP(m, device_ids=dev, find_unused_parameters=True),
                                                        backend=backend))):
        kiln.reset()
        m = copy.deepcopy(base)
        fb, sp = fallbacks.mark(), ddp_split.mark()
        loss_fn.step = 0
        out = train(wrap(m), m, data, opt_name="sgd", loss_fn=loss_fn)
        out["params"] = {k: p.detach().cpu().clone() for k, p in m.named_parameters()}
        out.update(_kiln_report(fb, sp))
        results[name] = out
    return results


def explain_split(rank: int, cap_mb: float) -> dict:
    """``kiln.explain(DDP(model))``: the graphs the backend got and the splits it reports."""
    import kiln
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(gpt2_model(), bucket_cap_mb=cap_mb, device_ids=[rank] if BACKEND == "nccl" else None)
    ids = batches(rank, 1)[0]
    out = kiln.explain(ddp)(ids, labels=ids)
    return {"graph_count": out.graph_count, "graph_break_count": out.graph_break_count,
            "splits": [str(s) for s in out.ddp_splits], "text": str(out),
            "parts": [g.meta.get("kiln_ddp_part") for g in out.graphs]}


def broken_peer(rank: int, backend: str) -> dict:
    """Rank 1 leaves after DDP is built; rank 0's compiled training step meets gloo's error."""
    import kiln
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = kiln.compile(DDP(Branchy()), backend=backend)
    dist.barrier()
    if rank == 1:
        os._exit(0)  # NOTE: a peer that disappears without a word
    x = torch.randn(4, 8)
    try:
        for _ in range(3):
            model(x, True).sum().backward()
    except Exception as e:  # noqa: BLE001 - the error is what the test looks at
        return {"type": f"{type(e).__module__}.{type(e).__name__}", "message": str(e).splitlines()[0]}
    return {"type": None, "message": "no error"}


# --------------------------------------------------------------------------- FSDP2


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # NOTE: torch before 2.6 kept it under _composable
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def fsdp_suite(rank: int, backend: str, steps: int) -> dict:
    """FSDP2 on each GPT-2 block and on the root, eagerly and with each block compiled by kiln."""
    import kiln
    from kiln import fallbacks

    fully_shard = _fully_shard()
    base = gpt2_model()
    data = batches(rank, steps)
    results = {}
    for name in ("eager", "kiln"):
        kiln.reset()
        m = copy.deepcopy(base)
        fb = fallbacks.mark()
        blocks = m.transformer.h
        for i, block in enumerate(blocks):
            fully_shard(block)
            if name == "kiln":
                # NOTE: FSDP's hooks stay on the block and run eagerly around its compiled forward
                blocks[i] = kiln.compile(block, backend=backend)
        fully_shard(m)
        out = train(m, m, data)
        out["fallbacks"] = [str(f) for f in fallbacks.recorded(fb)]
        out["compiled"] = [len(getattr(b, "_kiln_fwd", None).func._kiln_cache.entries)
                           if name == "kiln" else 0 for b in blocks]
        results[name] = out
    return results
