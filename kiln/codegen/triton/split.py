"""kiln.codegen.triton.split: long reductions to few outputs, split across programs.

In:  a :class:`kiln.codegen.graph.GraphLowering` after ``run()`` and a predicate saying
     which buffers the Triton target prints.
Out: the same lowering, where each Reduction whose output is small (at most
     :data:`SPLIT_MAX_OUTPUT` elements) and whose reduction is long (at least
     :data:`SPLIT_MIN_REDUCTION` elements, static) became two: a partial reduction
     ``part[x, s] = reduce_{c < C} expr(x, s*C + c)`` (masked past the end, stored in the
     accumulator dtype) and the original buffer reducing ``part`` over ``s``.

# NOTE: one program per output row would walk a 10M-element sum alone; split, ``S``
# programs each reduce ``C`` elements and one more combines ``S`` partials
# (deterministic: no atomics).  argmax/argmin keep one pass (they would need the
# partial indices too).
"""
from __future__ import annotations

from typing import Callable

import sympy
import torch

from kiln.codegen import ir
from kiln.codegen.ir import Buffer, Const, IndexValue, Load, Op, Reduction
from kiln.codegen.triton.heuristics import next_pow2

SPLIT_MAX_OUTPUT = 64
SPLIT_MIN_REDUCTION = 1 << 15
SPLITS_MAX = 256

_IDENTITY = {"sum": 0, "prod": 1, "any": False}


def _identity(rtype: str, dt: torch.dtype):
    if rtype in _IDENTITY:
        v = _IDENTITY[rtype]
        return bool(v) if dt == torch.bool else (float(v) if dt.is_floating_point else int(v))
    lo = rtype == "max"
    if dt.is_floating_point:
        return float("-inf") if lo else float("inf")
    if dt == torch.bool:
        return not lo
    info = torch.iinfo(dt)
    return info.min if lo else info.max


def split_reductions(lowered, is_triton: Callable[[Buffer], bool]) -> list[str]:
    """Split the long, small-output reductions of ``lowered`` in place; names split."""
    done = []
    for buf in list(lowered.order):
        body = buf.body
        if not isinstance(body, Reduction) or not is_triton(buf):
            continue
        if body.reduction_type not in ("sum", "prod", "max", "min", "any"):
            continue
        rn = ir.product(body.reduction_ranges)
        xn = ir.product(body.ranges)
        if not (sympy.sympify(rn).is_Integer and sympy.sympify(xn).is_Integer):
            continue
        rn, xn = int(rn), int(xn)
        if xn > SPLIT_MAX_OUTPUT or rn < SPLIT_MIN_REDUCTION:
            continue
        splits = min(SPLITS_MAX, next_pow2(rn // 4096))
        chunk = -(-rn // splits)
        k = len(body.ranges)
        s_var, c_var = ir.var("x", k), ir.var("r", 0)
        lin = s_var * chunk + c_var
        rr = body.reduction_ranges
        strides = ir.contiguous_strides(rr)
        mapping = {}
        for j, (size, st) in enumerate(zip(rr, strides)):
            e = ir.floordiv(lin, st) if st != 1 else lin
            mapping[ir.var("r", j)] = ir.modindex(e, size) if j > 0 else e
        acc = body.acc_dtype
        # NOTE: rename r vars to temporaries first (r0 is reused as the chunk variable).
        tmp = {ir.var("r", j): sympy.Symbol(f"_split{j}", integer=True) for j in range(len(rr))}
        expr = ir.substitute(body.expr, tmp)
        expr = ir.substitute(expr, {tmp[v]: e for v, e in mapping.items()})
        inside = Op("lt", (IndexValue(sympy.expand(lin), torch.int64), IndexValue(sympy.Integer(rn), torch.int64)),
                    torch.bool)
        expr = Op("masked", (inside, expr, Const(_identity(body.reduction_type, acc), acc)), acc)
        sizes = list(body.ranges) + [sympy.Integer(splits)]
        part = Buffer(lowered.new_name("split"), acc, buf.device, sizes, ir.contiguous_strides(sizes),
                      Reduction(sizes, [sympy.Integer(chunk)], body.reduction_type, expr, acc),
                      list(buf.origins))
        lowered.buffers[part.name] = part
        lowered.order.insert(lowered.order.index(buf), part)
        xv = ir.make_vars("x", k)
        idx = ir.strided_index(xv + [ir.var("r", 0)], part.strides)
        second = "any" if body.reduction_type == "any" else body.reduction_type
        buf.body = Reduction(list(body.ranges), [sympy.Integer(splits)], second,
                             Load(part.name, idx, ir.compute_dtype(acc)), acc)
        done.append(buf.name)
    return done


__all__ = ["split_reductions", "SPLIT_MAX_OUTPUT", "SPLIT_MIN_REDUCTION"]
