"""Small helpers for tests: graph-text normalization, strided random tensors, RNG reset."""
from __future__ import annotations

import random
import re
from typing import Any, Sequence, Union

import torch


def strip_comment(code: str) -> str:
    """Drop whole-line ``#`` comments (they hold file paths that differ per machine)."""
    return re.sub(r"(?m)^ *#.*\n?", "", code)


def remove_trailing_space(code: str) -> str:
    """Strip trailing whitespace from every line."""
    return "\n".join(line.rstrip() for line in code.split("\n"))


def _squash_blank_lines(code: str) -> str:
    out: list[str] = []
    saw_blank = False
    for line in code.split("\n"):
        blank = line.strip() == ""
        if blank and saw_blank:
            continue
        saw_blank = blank
        out.append(line)
    return "\n".join(out)


def normalize_gm(gm_str: str) -> str:
    """Normalize ``gm.print_readable(False)`` text for comparisons: comments stripped,
    trailing spaces removed, runs of blank lines squashed to one (as PyTorch does)."""
    return _squash_blank_lines(remove_trailing_space(strip_comment(gm_str)))


def rand_strided(
    size: Sequence[int],
    stride: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    extra_size: int = 0,
) -> torch.Tensor:
    """A tensor of ``size`` and ``stride`` viewing a fresh buffer just large enough
    (plus ``extra_size`` elements): random normal for floating dtypes, zeros otherwise."""
    needed = extra_size
    if all(s > 0 for s in size):
        # NOTE: only allocate when no dimension is empty; the last element's offset + 1.
        needed += sum((sh - 1) * st for sh, st in zip(size, stride)) + 1
    buffer = _random_buffer(needed, dtype, device)
    return torch.as_strided(buffer, size, stride)


def _random_buffer(n: int, dtype: torch.dtype, device: Union[str, torch.device]) -> torch.Tensor:
    if not dtype.is_floating_point:
        return torch.zeros(n, dtype=dtype, device=device)
    fp4 = getattr(torch, "float4_e2m1fn_x2", None)
    if fp4 is not None and dtype == fp4:
        return torch.randint(0, 256, (n,), dtype=torch.uint8, device=device).view(dtype)
    if dtype.itemsize == 1:
        # NOTE: no normal kernel for fp8; draw in fp16 and cast.
        return torch.randn(n, dtype=torch.float16, device=device).to(dtype)
    return torch.randn(n, dtype=dtype, device=device)


def reset_rng_state(use_xla: bool = False) -> None:
    """Seed torch, random and numpy with 1337."""
    torch.manual_seed(1337)
    random.seed(1337)
    try:
        import numpy as np

        np.random.seed(1337)
    except ImportError:
        pass
    if use_xla:
        import torch_xla.core.xla_model as xm  # type: ignore[import-not-found]

        xm.set_rng_state(1337, str(xm.xla_device()))


def expectedFailureDynamic(fn: Any) -> Any:
    """Mark a test as expected to fail when the suite runs with dynamic shapes.

    NOTE: as PyTorch's decorator, a marker only: kiln's default run is static, so the
    test runs normally; a dynamic-shapes run may read ``_expected_failure_dynamic``.
    """
    fn._expected_failure_dynamic = True
    return fn


def reduce_to_scalar_loss(out: Any) -> Any:
    """A scalar loss from a model output (tensor, sequence, dict, or ``.logits``)."""
    if isinstance(out, torch.Tensor):
        return out.sum() / out.numel()  # NOTE: mean() refuses integer tensors
    if isinstance(out, (list, tuple)):
        return sum(reduce_to_scalar_loss(x) for x in out) / len(out)
    if isinstance(out, dict):
        return sum(reduce_to_scalar_loss(v) for v in out.values()) / len(out)
    if hasattr(out, "logits"):
        return reduce_to_scalar_loss(out.logits)
    raise NotImplementedError(f"don't know how to reduce {type(out).__name__} to a loss")


__all__ = [
    "strip_comment",
    "remove_trailing_space",
    "normalize_gm",
    "rand_strided",
    "reset_rng_state",
    "reduce_to_scalar_loss",
    "expectedFailureDynamic",
]
