"""``torch.profiler.profile()`` / ``record_function(name)`` (and their ``torch.autograd.profiler``
names) in the region: ignored, as PyTorch's capture ignores them (a profiler cannot time the
ops of one graph separately): a context manager with no effect, so that a graph break inside
the block resumes compiled.

Out: a ``NullContextVT`` whose ``__enter__`` gives the profiler object itself (as eager
does); that object only stands in the ``with`` statement: any use of it, or its leaving the
region, is unsupported.
"""
from __future__ import annotations

from .base import VT, unsupported
from .objects import NullContextVT


class ProfilerVT(NullContextVT):
    def __init__(self, what: str):
        super().__init__(self)
        self.what = what

    def python_type(self) -> type:
        import torch

        return torch.profiler.profile if self.what == "profile" else torch.autograd.profiler.record_function

    def getattr(self, tx, name: str) -> VT:
        if name == "__exit__":
            return super().getattr(tx, name)
        unsupported(f"torch.profiler {self.what} object: attribute {name}",
                    why="profilers are ignored in the compiled region (as in PyTorch)")

    def call_method(self, tx, name: str, args: list, kwargs: dict) -> VT:
        if name in ("__enter__", "__exit__"):
            return super().call_method(tx, name, args, kwargs)
        unsupported(f"torch.profiler {self.what} object: method {name}",
                    why="profilers are ignored in the compiled region (as in PyTorch)")

    def reconstruct(self, cg) -> str:
        unsupported(f"a torch.profiler {self.what} object leaving the compiled region",
                    why="profilers are ignored in the compiled region (as in PyTorch)")

    def __repr__(self) -> str:
        return f"ProfilerVT({self.what})"


def profiler_functions() -> dict:
    import torch

    def make(what: str):
        def run(tx, *args, **kwargs) -> VT:
            return ProfilerVT(what)

        return run

    table = {}
    for fn in (torch.profiler.profile, torch.autograd.profiler.profile):
        table[fn] = make("profile")
    for fn in (torch.profiler.record_function, torch.autograd.profiler.record_function):
        table[fn] = make("record_function")
    return table
