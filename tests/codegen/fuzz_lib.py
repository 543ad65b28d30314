"""A differential fuzzer: random straight-line programs of pointwise, reduction, view and
indexing ops over random shapes, layouts and dtypes, compiled with kiln's inductor
backend (profitability check off) and compared with eager (values and gradients).

Used by tests/codegen/test_fuzz.py and runnable directly:

    python tests/codegen/fuzz_lib.py --count 200 [--seed 0] [--show]

A program is Python source (so a mismatch report is a program one can paste), built op
by op: each candidate line runs eagerly on the sample inputs first and is kept only if
eager accepts it, so every program is valid eager code.
"""
from __future__ import annotations

import dataclasses
import random
import sys
import time
import traceback
import warnings
from typing import Any, Optional

import torch

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INTS = (torch.int32, torch.int64)
DTYPES = FLOATS + INTS + (torch.bool,)
LOW_PRECISION = (torch.float16, torch.bfloat16)
SIZES = (0, 1, 1, 2, 3, 5, 7, 16)
# NOTE: float -> int casts of NaN are undefined in C++ (eager happens to give INT_MIN):
# programs cast only after nan_to_num.
LAYOUTS = ("contiguous", "contiguous", "transposed", "expanded", "strided")
_TOL = {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float32: 1e-4, torch.float64: 1e-7}


@dataclasses.dataclass
class Input:
    shape: tuple
    dtype: torch.dtype
    layout: str
    seed: int

    def make(self, requires_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(the tensor passed to the program, the leaf that gradients are taken for)."""
        g = torch.Generator().manual_seed(self.seed)
        shape = list(self.shape)
        if self.layout == "transposed" and len(shape) >= 2:
            base_shape = shape[:-2] + [shape[-1], shape[-2]]
        elif self.layout == "expanded":
            base_shape = [1 if (i % 2 == 0) else s for i, s in enumerate(shape)]
        elif self.layout == "strided" and shape:
            base_shape = shape[:-1] + [2 * shape[-1]]
        else:
            base_shape = shape
        if self.dtype.is_floating_point:
            base = (torch.randn(base_shape, generator=g, dtype=torch.float64) * 2).to(self.dtype)
        elif self.dtype == torch.bool:
            base = torch.randint(0, 2, base_shape, generator=g).bool()
        else:
            base = torch.randint(-8, 9, base_shape, generator=g, dtype=self.dtype)
        leaf = base.requires_grad_(requires_grad and self.dtype.is_floating_point)
        if self.layout == "transposed" and len(shape) >= 2:
            x = leaf.transpose(-1, -2)
        elif self.layout == "expanded":
            x = leaf.expand(shape)
        elif self.layout == "strided" and shape:
            x = leaf[..., ::2]
        else:
            x = leaf
        return x, leaf


@dataclasses.dataclass
class Program:
    seed: int
    inputs: list
    lines: list
    outputs: list

    def source(self) -> str:
        args = ", ".join(f"x{i}" for i in range(len(self.inputs)))
        body = "".join(f"    {ln}\n" for ln in self.lines)
        return f"def prog({args}):\n{body}    return ({', '.join(self.outputs)},)\n"

    def function(self):
        import linecache

        env: dict = {"torch": torch}
        # NOTE: a file-like name: capture leaves frames of "<...>" code alone.
        name = f"fuzz_program_{self.seed}.py"
        src = self.source()
        linecache.cache[name] = (len(src), None, src.splitlines(True), name)
        exec(compile(src, name, "exec"), env)
        return env["prog"]

    def describe(self) -> str:
        ins = ", ".join(f"x{i}: {tuple(s.shape)} {str(s.dtype).replace('torch.', '')} {s.layout}"
                        for i, s in enumerate(self.inputs))
        return f"# seed {self.seed}; inputs {ins}\n{self.source()}"


# --------------------------------------------------------------------------- generating


def _shape(rng: random.Random) -> tuple:
    rank = rng.choice((0, 1, 1, 2, 2, 2, 3, 3, 4))
    shape = [rng.choice(SIZES) for _ in range(rank)]
    if 0 in shape and rng.random() < 0.7:  # NOTE: zero-size now and then, not half the time
        shape = [s or 1 for s in shape]
    return tuple(shape)


def _dim(rng: random.Random, t: torch.Tensor) -> int:
    return rng.randrange(-t.dim(), t.dim()) if t.dim() else 0


def _candidates(rng: random.Random, name: str, t: torch.Tensor, other: Optional[str],
                other_t: Optional[torch.Tensor]) -> list[str]:
    """Lines that might apply to value ``name`` (eager decides which really do)."""
    fl, low = t.dtype.is_floating_point, t.dtype in LOW_PRECISION
    d = _dim(rng, t)
    k = rng.choice((True, False))
    ops: list[str] = []
    if fl:
        ops += [f"torch.sin({name})", f"torch.exp({name}.clamp(max=8))", f"torch.tanh({name})",
                f"torch.sigmoid({name})", f"torch.relu({name})", f"{name}.abs().sqrt()",
                f"torch.log1p({name}.abs())", f"torch.floor({name})", f"torch.nn.functional.gelu({name})",
                f"torch.erf({name})", f"({name} * 0.5).cos()", f"torch.softmax({name}, dim={d})",
                f"{name}.mean(dim={d}, keepdim={k})", f"{name}.var(dim={d})",
                f"torch.nn.functional.silu({name})", f"torch.rsqrt({name}.abs() + 1)"]
        if not low:
            ops += [f"{name}.nan_to_num().clamp(-50, 50).to(torch.int32)", f"{name}.argmax(dim={d})",
                    f"{name} > 0.25"]
    elif t.dtype == torch.bool:
        ops += [f"~{name}", f"{name}.any(dim={d})", f"{name}.to(torch.float32)", f"{name}.sum(dim={d})"]
    else:
        ops += [f"torch.bitwise_not({name})", f"{name} // 3", f"{name} % 3", f"torch.remainder({name}, -4)",
                f"{name}.to(torch.float32) / 3", f"{name}.argmax(dim={d})", f"{name} > 1",
                f"{name}.abs()", f"({name} * 3 - 1)", f"{name}.prod(dim={d})"]
    ops += [f"{name}.sum(dim={d}, keepdim={k})", f"{name}.sum()", f"{name}.amax(dim={d})",
            f"{name}.amin(dim={d}, keepdim={k})", f"{name}.flip({d})", f"{name}.unsqueeze({d})",
            f"{name}.reshape(-1)", f"{name}.expand(2, *{name}.shape)"]
    if t.dim() >= 2:
        ops += [f"{name}.transpose(0, -1)", f"{name}.permute(*reversed(range({t.dim()})))",
                f"{name}[..., ::2]", f"{name}[1:]", f"{name}.narrow({d}, 0, 1)"]
    if t.dim() >= 1 and t.shape[0] > 0:
        m = rng.choice((1, 3, 4))
        ops += [f"{name}[torch.arange({m}) % {t.shape[0]}]",
                f"{name}.index_select(0, torch.tensor([{t.shape[0] - 1}, 0]))"]
        if t.dim() >= 2:
            ops += [f"torch.gather({name}, 0, torch.zeros_like({name}, dtype=torch.long)[:1])"]
    if other is not None and other_t is not None:
        ops += [f"{name} + {other}", f"{name} * {other}", f"torch.maximum({name}, {other})",
                f"torch.minimum({name}, {other})", f"torch.where({name} > {other}, {name}, {other})",
                f"{name} == {other}", f"torch.div({name}, {other})", f"torch.cat([{name}, {other}], dim={d})"]
        if t.dtype != torch.bool:
            ops += [f"{name} - {other}"]
    return ops


def generate(seed: int) -> Program:
    """The program of ``seed`` (the same program for the same seed)."""
    rng = random.Random(seed)
    n_in = rng.choice((1, 2, 2, 3))
    base_shape = _shape(rng)
    family = rng.choice(FLOATS + FLOATS + INTS + (torch.bool,))
    inputs = []
    for i in range(n_in):
        # NOTE: mostly one shape (so binary ops apply), sometimes a broadcastable one
        shape = base_shape if rng.random() < 0.8 or not base_shape else base_shape[1:]
        dtype = family if rng.random() < 0.8 else rng.choice(DTYPES)
        layout = rng.choice(LAYOUTS)
        inputs.append(Input(tuple(shape), dtype, layout, seed * 31 + i))
    env: dict = {"torch": torch}
    for i, spec in enumerate(inputs):
        env[f"x{i}"] = spec.make(False)[0]
    names = [f"x{i}" for i in range(n_in)]
    lines: list[str] = []
    n_ops = rng.randint(2, 6)
    attempts = 0
    while len(lines) < n_ops and attempts < 60:
        attempts += 1
        name = rng.choice(names[-3:])
        t = env[name]
        partners = [n for n in names if n != name]
        other = rng.choice(partners) if partners else None
        cands = _candidates(rng, name, t, other, env.get(other) if other else None)
        expr = rng.choice(cands)
        var = f"v{len(lines)}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                val = eval(expr, env)
        except Exception:  # noqa: BLE001 - eager refuses: pick another op
            continue
        if not isinstance(val, torch.Tensor) or val.numel() > 1 << 16:
            continue
        env[var] = val
        names.append(var)
        lines.append(f"{var} = {expr}")
    outs = names[-1:] if rng.random() < 0.6 else names[-2:]
    if not lines:
        lines, outs = ["v0 = x0 + 1"], ["v0"]
    return Program(seed, inputs, lines, outs)


# --------------------------------------------------------------------------- checking


@dataclasses.dataclass
class Outcome:
    seed: int
    status: str        # "match" | "mismatch" | "error" | "fallback" | "not_compiled"
    detail: str = ""
    program: str = ""


def _tol(dtypes: list) -> float:
    return max((_TOL.get(d, 0.0) for d in dtypes), default=0.0)


def _compare(tag: str, a: Any, b: Any, tol: float) -> Optional[str]:
    if not isinstance(a, torch.Tensor):
        return None if a == b else f"{tag}: {a!r} vs {b!r}"
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{tag}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
    a, b = a.detach(), b.detach()
    if a.dtype.is_floating_point:
        ok = torch.allclose(a.double(), b.double(), rtol=tol, atol=tol, equal_nan=True)
    else:
        ok = torch.equal(a, b)
    if ok:
        return None
    return f"{tag} differs (eager vs compiled):\n{a}\n{b}"


def _grads(outs: tuple, leaves: list) -> Optional[list]:
    diff = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad and o.dtype in FLOATS]
    want = [t for t in leaves if t.requires_grad]
    if not diff or not want:
        return None
    loss = sum((o.double() * torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view(o.shape)).sum()
               for o in diff)
    return list(torch.autograd.grad(loss, want, allow_unused=True))


def check(prog: Program, grads: bool = True) -> Outcome:
    """Run ``prog`` eagerly and compiled (inductor, profitability off) and compare."""
    import kiln
    from kiln import fallbacks
    from kiln.codegen import metrics

    fn = prog.function()
    use_grad = grads and all(s.dtype in (torch.float32, torch.float64) or not s.dtype.is_floating_point
                             for s in prog.inputs)
    e_pairs = [s.make(use_grad) for s in prog.inputs]
    c_pairs = [s.make(use_grad) for s in prog.inputs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e_out = fn(*[x for x, _ in e_pairs])
    kiln.reset()
    since = fallbacks.mark()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = kiln.compile(fn, backend="inductor", fullgraph=True,
                                    options={"profitability_check": False})
            c_out = compiled(*[x for x, _ in c_pairs])
            e_g = _grads(e_out, [leaf for _, leaf in e_pairs]) if use_grad else None
            c_g = _grads(c_out, [leaf for _, leaf in c_pairs]) if e_g is not None else None
    except Exception as e:  # noqa: BLE001 - reported with the program
        return Outcome(prog.seed, "error", "".join(traceback.format_exception_only(type(e), e))[-2000:],
                       prog.describe())
    fell = fallbacks.recorded(since)
    if fell:
        return Outcome(prog.seed, "fallback", "; ".join(str(f) for f in fell)[:2000], prog.describe())
    if metrics.graphs_compiled == 0:
        return Outcome(prog.seed, "not_compiled", "no graph reached codegen", prog.describe())
    tol = _tol([s.dtype for s in prog.inputs] + [o.dtype for o in e_out if isinstance(o, torch.Tensor)])
    for i, (a, b) in enumerate(zip(e_out, c_out)):
        why = _compare(f"output {i}", a, b, tol)
        if why:
            return Outcome(prog.seed, "mismatch", why[:2000], prog.describe())
    for i, (a, b) in enumerate(zip(e_g or [], c_g or [])):
        if a is None and b is None:
            continue
        if (a is None) != (b is None):
            return Outcome(prog.seed, "mismatch", f"grad {i}: {a} vs {b}", prog.describe())
        why = _compare(f"grad of x{i}", a, b, max(tol, 1e-4))
        if why:
            return Outcome(prog.seed, "mismatch", why[:2000], prog.describe())
    return Outcome(prog.seed, "match", "", prog.describe())


def run(count: int, seed: int = 0, show: bool = False, stream=sys.stderr) -> list[Outcome]:
    out = []
    for s in range(seed, seed + count):
        prog = generate(s)
        r = check(prog)
        out.append(r)
        if show or r.status != "match":
            print(f"[{r.status}] {r.detail}\n{r.program}", file=stream)
    return out


def main(argv: list) -> None:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", action="store_true")
    a = p.parse_args(argv)
    t0 = time.time()
    res = run(a.count, a.seed, a.show)
    by: dict = {}
    for r in res:
        by[r.status] = by.get(r.status, 0) + 1
    print(f"{len(res)} programs in {time.time() - t0:.0f}s: {by}")


if __name__ == "__main__":
    import os

    # NOTE: the kiln of this checkout, not an installed one
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    main(sys.argv[1:])
