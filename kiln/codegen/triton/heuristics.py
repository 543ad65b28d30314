"""kiln.codegen.triton.heuristics: block sizes and warps from a kernel's shape.

In:  the kernel kind ("pointwise" | "reduction"), ``xnumel`` (outer elements),
     ``rnumel`` (largest inner loop, 0 for pointwise), whether its reduction is persistent,
     whether it runs under the interpreter, and ``max_autotune``.
Out: :func:`default_config` one launch config ``{"XBLOCK", "RBLOCK", "num_warps"}``;
     :func:`autotune_configs` the few configs timed on first use (GPU only).
"""
from __future__ import annotations


def next_pow2(n: int) -> int:
    n = max(int(n), 1)
    return 1 << (n - 1).bit_length()


# NOTE: a persistent reduction keeps a whole row in registers; past this many elements
# register pressure costs more than the extra loads of a looped one.
PERSISTENT_MAX = 4096
LOOP_RBLOCK = 1024
# NOTE: the interpreter runs each program as numpy calls: few, large programs are fast.
INTERP_TILE = 1 << 16


def _warps(tile: int) -> int:
    return max(1, min(8, tile // 256))


def default_config(kind: str, xnumel: int, rnumel: int, persistent: bool,
                   interpret: bool = False) -> dict:
    """The config used when nothing was tuned (and always under the interpreter)."""
    if kind == "pointwise":
        if interpret:
            xb = min(next_pow2(xnumel), INTERP_TILE)
        else:
            xb = min(next_pow2(xnumel), 1024 if xnumel >= 65536 else 256 if xnumel >= 4096 else 128)
            xb = max(xb, 16)
        return {"XBLOCK": xb, "RBLOCK": 1, "num_warps": _warps(xb)}
    # NOTE: the interpreter reduces a block lane by lane in Python: short blocks, more loop trips.
    rb = next_pow2(rnumel) if persistent else (min(next_pow2(rnumel), 128) if interpret
                                               else LOOP_RBLOCK)
    tile = INTERP_TILE if interpret else 4096
    xb = max(1, min(next_pow2(xnumel), tile // rb))
    if not interpret:
        xb = min(xb, 64)
    return {"XBLOCK": xb, "RBLOCK": rb, "num_warps": _warps(xb * rb)}


def autotune_configs(kind: str, xnumel: int, rnumel: int, persistent: bool,
                     max_autotune: bool = False) -> list[dict]:
    """A few configs around the default (more with ``max_autotune``), no duplicates."""
    base = default_config(kind, xnumel, rnumel, persistent)
    out = [base]
    if kind == "pointwise":
        sizes = [256, 512, 1024, 2048] + ([128, 4096] if max_autotune else [])
        for xb in sizes:
            if xb <= next_pow2(xnumel):
                for w in ([_warps(xb)] + ([2, 8] if max_autotune else [])):
                    out.append({"XBLOCK": xb, "RBLOCK": 1, "num_warps": w})
    else:
        rbs = [base["RBLOCK"]] if persistent else [512, 1024, 2048] + ([4096] if max_autotune else [])
        xbs = [1, 2, 4, 8, 16] + ([32, 64] if max_autotune else [])
        for rb in rbs:
            for xb in xbs:
                if xb <= next_pow2(xnumel) and xb * rb <= (16384 if max_autotune else 8192):
                    out.append({"XBLOCK": xb, "RBLOCK": rb, "num_warps": _warps(xb * rb)})
    seen, uniq = set(), []
    for c in out:
        key = tuple(sorted(c.items()))
        if key not in seen:
            seen.add(key)
            uniq.append(c)
    return uniq if max_autotune else uniq[:6]


# NOTE: kernels smaller than this run in microseconds; tuning them costs more than it saves.
AUTOTUNE_MIN_WORK = 1 << 18

__all__ = ["next_pow2", "default_config", "autotune_configs", "PERSISTENT_MAX", "AUTOTUNE_MIN_WORK"]
