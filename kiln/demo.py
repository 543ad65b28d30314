"""kiln's demo: ``python -m kiln.demo`` (or the ``kiln-demo`` script).

It takes a small real model — two transformer layers written in plain torch.nn —
through every stage of kiln that exists in this checkout, one section per stage:

  1. tracing   kiln.make_fx: the ATen graph, op counts and shapes, checked against eager
  2. modes     the same trace with fake and symbolic tensors
  3. aot       kiln.aot: forward and backward graphs of a training step
  4. capture   kiln.explain / kiln.compile: graphs, graph breaks and their reasons
  5. codegen   what kiln's code generator made of it: kernels, extern calls, a kernel's source
  6. speed     compiled against eager, per call and compile time (the default backend first)

A section whose stage is not built yet says so; a section that fails prints why
(one line), never a traceback, and the demo goes on.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import math
import operator
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn


# --------------------------------------------------------------------------- the model


class SelfAttention(nn.Module):
    """Multi-head self-attention, spelled out (no nn.MultiheadAttention)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer layer: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """Two transformer layers and a final LayerNorm."""

    def __init__(self, dim: int = 32, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_f(self.blocks(x))


def with_graph_break(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model, with a print() between its layers: capture must break the graph there."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = model.blocks[0](x)
        print("    (user print between the layers)")
        x = model.blocks[1](x)
        return model.ln_f(x)

    return fn


# --------------------------------------------------------------------------- sections


class Skipped(Exception):
    """A section whose stage is not built yet."""


@dataclass
class Context:
    model: nn.Module
    x: torch.Tensor
    show_graph: bool = True
    iters: int = 20
    notes: dict = field(default_factory=dict)


def kiln_attr(name: str) -> Any:
    """``kiln.<name>``, or Skipped when that stage does not exist yet."""
    import kiln

    try:
        return getattr(kiln, name)
    except (AttributeError, ImportError) as e:
        raise Skipped(f"kiln.{name} is not built yet ({type(e).__name__})") from None


def stage(module: str, *names: str) -> Any:
    """The stage's module, or Skipped when it (or one of ``names`` in it) is not built yet."""
    if importlib.util.find_spec(module) is None:
        raise Skipped(f"{module} is not built yet")
    mod = importlib.import_module(module)
    missing = [n for n in names if not hasattr(mod, n)]
    if missing:
        raise Skipped(f"{module}.{missing[0]} is not built yet")
    return mod


def op_name(target: Any) -> str:
    return "getitem (picks one output of a multi-output op)" if target is operator.getitem else str(target)


def op_counts(gm: torch.fx.GraphModule) -> collections.Counter:
    return collections.Counter(op_name(n.target) for n in gm.graph.nodes if n.op == "call_function")


def shape_of(node: torch.fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return f"{str(val.dtype).replace('torch.', '')}{list(val.shape)}"
    return type(val).__name__ if val is not None else "?"


def max_diff(a: Any, b: Any) -> float:
    import torch.utils._pytree as pytree

    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return max((float((x.detach() - y.detach()).abs().max()) for x, y in zip(la, lb)), default=0.0)


def section_tracing(ctx: Context) -> None:
    make_fx = kiln_attr("make_fx")
    gm = make_fx(ctx.model)(ctx.x)
    ctx.notes["gm"] = gm
    if ctx.show_graph:
        print(gm.print_readable(False))
    nodes = list(gm.graph.nodes)
    kinds = collections.Counter(n.op for n in nodes)
    print(f"  nodes: {len(nodes)}  ({', '.join(f'{k}={v}' for k, v in sorted(kinds.items()))})")
    print("  ATen ops (count):")
    for op, n in op_counts(gm).most_common():
        print(f"    {n:4d}  {op}")
    inputs = [f"{n.name}: {shape_of(n)}" for n in nodes if n.op == "placeholder"]
    outputs = [shape_of(a) for a in nodes[-1].all_input_nodes]
    params = sum(p.numel() for p in ctx.model.parameters())
    print(f"  inputs: {', '.join(inputs)}   outputs: {', '.join(outputs)}   parameters: {params}")
    print(f"  graph vs eager: max |diff| = {max_diff(gm(ctx.x), ctx.model(ctx.x)):.2e}")


def section_modes(ctx: Context) -> None:
    make_fx = kiln_attr("make_fx")
    for mode in ("fake", "symbolic"):
        gm = make_fx(ctx.model, tracing_mode=mode)(ctx.x)
        out = [n for n in gm.graph.nodes if n.op == "output"][0].all_input_nodes
        print(f"  {mode:9s}: {len(gm.graph.nodes)} nodes, output {', '.join(shape_of(o) for o in out)}")


def section_aot(ctx: Context) -> None:
    aot = stage("kiln.aot", "aot_module")
    graphs: dict[str, torch.fx.GraphModule] = {}

    def recorder(kind: str) -> Callable:
        def compiler(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
            graphs[kind] = gm
            return gm

        return compiler

    compiled = aot.aot_module(ctx.model, fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))
    x = ctx.x.clone().requires_grad_()
    out = compiled(x)
    out.sum().backward()
    for kind, gm in graphs.items():
        print(f"  {kind:8s}: {len(gm.graph.nodes)} nodes, {sum(op_counts(gm).values())} ATen ops")
    ref = ctx.x.clone().requires_grad_()
    ctx.model(ref).sum().backward()
    print(f"  input grad vs eager: max |diff| = {max_diff(x.grad, ref.grad):.2e}")


def section_capture(ctx: Context) -> None:
    explain = kiln_attr("explain")
    for label, fn in (("whole model", ctx.model), ("model with a print() inside", with_graph_break(ctx.model))):
        out = explain(fn)(ctx.x)
        print(f"  {label}: graphs={out.graph_count} breaks={out.graph_break_count} ops={out.op_count}")
        for br in out.break_reasons:
            where = getattr(br, "user_stack", None) or []
            loc = f" at {where[-1].filename}:{where[-1].lineno}" if where else ""
            print(f"    break: {getattr(br, 'reason', br)}{loc}")


def sync(x: torch.Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize()


def time_calls(fn: Callable, x: torch.Tensor, iters: int) -> float:
    """Median seconds per call (after two warm-up calls)."""
    for _ in range(2):
        fn(x)
    sync(x)
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn(x)
        sync(x)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def section_codegen(ctx: Context) -> None:
    """Compile the model with the default backend and show what codegen generated."""
    import io
    import contextlib
    import os

    kiln_compile = kiln_attr("compile")
    codegen = stage("kiln.codegen", "metrics", "config")
    kiln_attr("reset")()
    codegen.metrics.reset()
    buf = io.StringIO()
    old = os.environ.get("KILN_LOGS")
    os.environ["KILN_LOGS"] = "output_code"
    try:
        with torch.no_grad(), contextlib.redirect_stderr(buf):
            out = kiln_compile(ctx.model)(ctx.x)
    finally:
        if old is None:
            del os.environ["KILN_LOGS"]
        else:
            os.environ["KILN_LOGS"] = old
    code = buf.getvalue()
    print(f"  default backend: {kiln_attr('backends').DEFAULT_BACKEND}; "
          f"generated kernels: {codegen.metrics.generated_kernel_count}; "
          f"max |diff| vs eager {max_diff(out, ctx.model(ctx.x)):.1e}")
    externs = sorted({l.split("aten.")[1].split("(")[0] for l in code.splitlines()
                      if "aten." in l and "=" in l and not l.lstrip().startswith("#")})
    print(f"  extern ATen calls (matmuls and the like): {', '.join(externs) or 'none'}")
    lines = code.splitlines()
    start = next((i for i, l in enumerate(lines) if "extern \"C\"" in l or "@triton.jit" in l), None)
    if start is not None:
        print("  one generated kernel (KILN_LOGS=output_code prints them all):")
        begin = max(0, start - 3)
        for l in lines[begin:start + 18]:
            print(f"    {l}")


def section_speed(ctx: Context) -> None:
    kiln_compile = kiln_attr("compile")
    from kiln.backends import DEFAULT_BACKEND, list_backends

    with torch.no_grad():
        eager_t = time_calls(ctx.model, ctx.x, ctx.iters)
        print(f"  {'eager':12s} {eager_t * 1e6:9.1f} us/call")
        order = [DEFAULT_BACKEND] + [b for b in ["aot_eager"] + list_backends() if b != DEFAULT_BACKEND]
        for backend in order:
            why = not_shown(backend, ctx.x.device)
            if why:
                print(f"  {backend:12s} not shown: {why}")
                continue
            run_backend(kiln_compile, backend, ctx, eager_t)


def section_export(ctx: Context) -> None:
    """Export the model with a dynamic batch, save it, load it back, serve it compiled."""
    import os
    import tempfile

    ex = stage("kiln.export", "export", "Dim", "save", "load", "compile")
    ep = ex.export(ctx.model, (ctx.x,), dynamic_shapes={"x": {0: ex.Dim("batch", max=1024)}})
    sig = ep.graph_signature
    print(f"  kiln.export.export: {len(list(ep.graph.nodes))} nodes; inputs {len(sig.parameters)} parameters, "
          f"{len(sig.buffers)} buffers, user inputs {sig.user_inputs}; ranges {ep.range_constraints}")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "tiny.kiln")
        ex.save(ep, path)
        size = os.path.getsize(path)
        loaded = ex.load(path)
    x2 = torch.cat([ctx.x, ctx.x])
    with torch.no_grad():
        same = torch.equal(loaded.module()(x2), ep.module()(x2))
        fast = ex.compile(loaded)
        diff = max_diff(fast(x2), ctx.model(x2))
    print(f"  save/load: {size / 1024:.0f} KiB archive (JSON graph + safetensors), loaded program "
          f"bit-identical at batch {x2.shape[0]}: {same}")
    print(f"  kiln.export.compile(loaded): max |diff| vs eager {diff:.1e}")
    try:
        loaded.module()(torch.randn(2000, *ctx.x.shape[1:], device=ctx.x.device))
    except Exception as e:  # noqa: BLE001 - shown, as a user would see it
        print(f"  an input outside the program's range: {type(e).__name__}: {first_line(e)}")


def not_shown(backend: str, device: torch.device) -> str:
    """Why a listed backend has nothing to show here ('' when it has)."""
    if backend == "cudagraphs" and device.type != "cuda":
        return "records CUDA work; run with --device cuda"
    if backend == "tvm" and importlib.util.find_spec("tvm") is None:
        return "needs apache-tvm (pip install -e '.[tvm]')"
    return ""


def run_backend(kiln_compile: Callable, backend: str, ctx: Context, eager_t: float) -> None:
    try:
        compiled = kiln_compile(ctx.model, backend=backend)
        start = time.perf_counter()
        out = compiled(ctx.x)
        compile_s = time.perf_counter() - start
        t = time_calls(compiled, ctx.x, ctx.iters)
        diff = max_diff(out, ctx.model(ctx.x))
        print(
            f"  {backend:12s} {t * 1e6:9.1f} us/call  ({eager_t / t:4.2f}x eager)  "
            f"first call {compile_s:6.2f} s  max |diff| {diff:.1e}"
        )
    except Exception as e:  # NOTE: one backend failing must not hide the others
        print(f"  {backend:12s} failed: {type(e).__name__}: {first_line(e)}")


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


SECTIONS: list[tuple[str, Callable[[Context], None]]] = [
    ("1. tracing: kiln.make_fx(model)(x) -> ATen graph", section_tracing),
    ("2. fake and symbolic tracing", section_modes),
    ("3. AOT autograd: forward + backward graphs", section_aot),
    ("4. capture: graphs and graph breaks (kiln.explain)", section_capture),
    ("5. codegen: kernels generated for the model (default backend)", section_codegen),
    ("6. speed: kiln.compile vs eager (default backend first)", section_speed),
    ("7. export: save, load, serve compiled (kiln.export)", section_export),
]


def run_section(title: str, fn: Callable[[Context], None], ctx: Context) -> str:
    print(f"\n== {title}")
    try:
        fn(ctx)
        return "ok"
    except Skipped as e:
        print(f"  skipped: {e}")
        return "skipped"
    except Exception as e:  # NOTE: the demo reports and goes on; no traceback dumps
        print(f"  failed: {type(e).__name__}: {first_line(e)}")
        return "failed"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kiln.demo", description=__doc__.splitlines()[0])
    p.add_argument("--no-graph", action="store_true", help="do not print the full ATen graph")
    p.add_argument("--iters", type=int, default=20, help="timed calls per backend (default 20)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Run every section; exit status 0 unless a section failed."""
    args = parse_args(argv)
    torch.manual_seed(0)
    model = TinyTransformer().to(args.device).eval()
    x = torch.randn(2, 8, 32, device=args.device)
    ctx = Context(model, x, show_graph=not args.no_graph, iters=args.iters)
    print(f"kiln demo: {type(model).__name__} (2 layers, dim 32, 4 heads), input {list(x.shape)}, "
          f"torch {torch.__version__}, {args.device}")
    results = [run_section(title, fn, ctx) for title, fn in SECTIONS]
    print(f"\nsections: {results.count('ok')} ok, {results.count('skipped')} skipped, {results.count('failed')} failed")
    return 1 if "failed" in results else 0


if __name__ == "__main__":
    sys.exit(main())
