"""kiln.testing.distributed: a bounded group of processes on this machine.

In:  an entry ``entry(rank, *args)`` (picklable: processes start with spawn), its args,
     the number of processes and a time limit.
Out: :func:`spawn_bounded` returns when every process exited; a process that raised
     re-raises here (torch.multiprocessing's ProcessRaisedException); processes still
     running at the limit are killed and TimeoutError is raised, so that a hung
     collective never hangs the caller.  :func:`free_port` is a loopback port for the
     group's rendezvous.
"""
from __future__ import annotations

import socket
import time
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_bounded(entry: Callable, args: tuple, nprocs: int, timeout_s: float, what: str) -> None:
    """Run ``entry(rank, *args)`` in ``nprocs`` spawned processes, for at most ``timeout_s``."""
    ctx = mp.start_processes(entry, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.5, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: {nprocs} processes still running after {timeout_s:.0f}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)


__all__ = ["free_port", "spawn_bounded"]
