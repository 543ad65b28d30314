"""A fuzzer sample for the Triton printer: random chains of pointwise ops, broadcasts,
views and reductions over random small shapes and dtypes, compiled for CPU tensors
(config.cpu_backend="triton", Triton's interpreter) and compared with eager.
``KILN_TRITON_DEVICE=cuda`` puts the inputs on the GPU (compiled kernels);
``KILN_FUZZ_SEEDS`` sets the number of programs."""
from __future__ import annotations

import os
import random

import pytest
import torch

pytest.importorskip("triton", reason="optional engine triton is not installed")

from kiln import fallbacks  # noqa: E402
from kiln.codegen import config  # noqa: E402

from test_kernels import check  # noqa: E402

UNARY = [torch.sin, torch.exp, torch.tanh, torch.abs, torch.neg, torch.sigmoid, torch.relu,
         lambda t: t * 0.5 + 1, lambda t: t.clamp(-0.5, 0.7), lambda t: torch.where(t > 0, t, t * 0.1)]
BINARY = [torch.add, torch.sub, torch.mul, torch.maximum, torch.minimum,
          lambda a, b: a / (b.abs() + 1)]
REDUCE = [lambda t: t.sum(-1), lambda t: t.amax(-1), lambda t: t.mean(0), lambda t: t.softmax(-1),
          lambda t: t - t.amin(-1, keepdim=True), lambda t: t.argmax(-1).to(t.dtype)]


def make_program(rng: random.Random):
    steps = []
    for _ in range(rng.randint(2, 6)):
        kind = rng.choice(["u", "u", "b", "r", "t"])
        steps.append((kind, rng.randrange(100)))

    def fn(x, y):
        a = x
        for kind, k in steps:
            if kind == "u":
                a = UNARY[k % len(UNARY)](a)
            elif kind == "b":
                a = BINARY[k % len(BINARY)](a, y if a.shape == y.shape else y.sum())
            elif kind == "r" and a.dim() == 2:
                a = REDUCE[k % len(REDUCE)](a)
            elif kind == "t" and a.dim() == 2:
                a = a.t() * 1.5
        return a

    return fn, steps


DEVICE = os.environ.get("KILN_TRITON_DEVICE", "cpu")


@pytest.mark.parametrize("seed", range(int(os.environ.get("KILN_FUZZ_SEEDS", "6"))))
def test_fuzz_sample(seed):
    rng = random.Random(seed)
    fn, steps = make_program(rng)
    shape = (rng.randint(1, 9), rng.randint(1, 40))
    dt = rng.choice([torch.float32, torch.float32, torch.float16, torch.float64])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(DEVICE, dt)
    y = torch.randn(*shape, generator=g).to(DEVICE, dt)
    mark = fallbacks.mark()
    with config.patch(cpu_backend="triton", profitability_check=False):
        check(fn, x, y)
    assert fallbacks.recorded(mark) == [], steps
