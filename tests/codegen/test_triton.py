"""The Triton printer on CPU tensors (config.cpu_backend="triton": kernels run under
Triton's interpreter): values vs eager, fusion (kernel counts), the generated source
(masks, persistent vs looped reductions, int64 index math), symbolic sizes (one compile
for two sizes), the on-disk cache, and the fallback when a kernel fails to compile."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="optional engine triton is not installed")

from kiln import fallbacks  # noqa: E402
from kiln.codegen import config  # noqa: E402
from kiln.codegen.triton import heuristics, runtime  # noqa: E402

from test_kernels import check, compiled  # noqa: E402


@pytest.fixture(autouse=True)
def _triton_cpu(tmp_path, request):
    mark = fallbacks.mark()
    with config.patch(cpu_backend="triton", cache_dir=str(tmp_path), profitability_check=False):
        yield
    if "falls_back" not in request.node.name:
        # NOTE: a kernel that failed would still give eager's values: fail on any fallback.
        assert fallbacks.recorded(mark) == []


def test_pointwise_chain_one_kernel_masked():
    rec = check(lambda x, y: (x.sin() + y * 2).relu() - x.exp() / 3, torch.randn(5, 7), torch.randn(5, 7))
    assert rec.kernels == 1
    src = rec.source
    assert "@triton.jit" in src and "mask=xmask" in src and "# ATen nodes:" in src
    assert "tl.int64" not in src.split("def kernel0")[1].split("xmask")[0]   # int32 index math


def test_broadcast_and_noncontiguous():
    x = torch.randn(6, 4).t()          # non-contiguous input
    b = torch.randn(6)
    check(lambda x, b: x * b + 1.5, x, b)
    check(lambda x: x.permute(1, 0) * 2, torch.randn(3, 5))
    check(lambda x: x[:, ::2].cos(), torch.randn(4, 9))


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16, torch.float64])
def test_float_dtypes(dt):
    x = torch.randn(33, dtype=dt)
    rec = check(lambda x: (x * 3).sigmoid() + x.abs().sqrt(), x)
    if dt in (torch.float16, torch.bfloat16):
        assert ".to(tl.float32)" in rec.source   # loaded, computed in float32


def test_integer_and_bool_ops():
    a = torch.randint(-20, 20, (17,))
    b = torch.randint(1, 7, (17,)) * torch.where(torch.rand(17) > 0.5, 1, -1)
    check(lambda a, b: (a // b, a % b, torch.maximum(a, b), a * b - 3), a, b)
    check(lambda a, b: ((a > b) & (a != 0), ~(a < 0), (a > 0).to(torch.int32) + 1), a, b)
    x = torch.randn(13)
    y = torch.randn(13)
    x[3] = float("nan")
    check(lambda x, y: (torch.floor_divide(x, y), torch.remainder(x, y), torch.maximum(x, y),
                        x.isnan(), x.round(), x.trunc()), x, y)


@pytest.mark.parametrize("persistent_max", [4096, 16])   # persistent, looped
def test_reductions(persistent_max, monkeypatch):
    monkeypatch.setattr(heuristics, "PERSISTENT_MAX", persistent_max)
    x = torch.randn(4, 300)
    x[1, 2] = float("nan")
    y = torch.randn(4, 300)
    rec = check(lambda x, y: (y.sum(1), y.amax(1), y.amin(0), x.amax(1), y.argmax(1), y.argmin(1),
                              x.argmax(1), (y > 0).any(1), y.sum()), x, y)
    assert ("while roffset <" in rec.source) == (persistent_max < 300)


def test_argmax_ties_first_index():
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    check(lambda x: (x.argmax(1), x.argmin(1), x.argmax()), x)
    check(lambda x: x.argmax(1), torch.randint(0, 3, (5, 6)))


def test_var_mean_and_int_sum():
    x = torch.randn(6, 37)
    check(lambda x: torch.var_mean(x, dim=1), x)
    check(lambda x: (x.sum(1), x.prod(1)), torch.randint(-3, 4, (4, 9)))


def test_softmax_layer_norm_one_kernel_per_row():
    x = torch.randn(8, 32)
    rec = check(lambda x: torch.softmax(x, -1), x)
    assert rec.kernels == 1
    w, b = torch.randn(32), torch.randn(32)
    rec = check(lambda x, w, b: F.layer_norm(x, (32,), w, b), x, w, b)
    assert rec.kernels == 1


def test_layer_norm_flattened_for_a_matmul_is_one_row_kernel():
    from test_kernels import _ln_then_matmul

    x, r, w, b, m = torch.randn(2, 17, 64), torch.randn(2, 17, 64), torch.randn(64), torch.randn(64), torch.randn(64, 32)
    rec = check(_ln_then_matmul, x, r, w, b, m)
    assert rec.kernels == 1 and "// 17" not in rec.source


def test_row_kernel_keeps_its_intermediate_rows_in_registers():
    w, b = torch.randn(32), torch.randn(32)
    # NOTE: the softmax's output is the norm's input: read from registers, never stored
    rec = check(lambda x: F.layer_norm(torch.softmax(x * 0.5, -1) * 32 + x, (32,), w, b), torch.randn(6, 32))
    assert rec.kernels == 1 and rec.source.count("tl.store(") == 1


def test_looped_rows_softmax_layer_norm(monkeypatch):
    monkeypatch.setattr(heuristics, "PERSISTENT_MAX", 64)
    x = torch.randn(3, 200)
    rec = check(lambda x: torch.log_softmax(x, -1), x)
    assert "while roffset <" in rec.source and rec.kernels == 1
    w, b = torch.randn(200), torch.randn(200)
    rec = check(lambda x, w, b: F.layer_norm(x, (200,), w, b), x, w, b)
    assert "while roffset <" in rec.source


def test_softmax_layer_norm_backward():
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    check(lambda x, w, b: F.layer_norm(x, (16,), w, b).softmax(-1), x, w, b, grad=True)


def test_indexing_embedding_cat_pad():
    w = torch.randn(10, 4)
    idx = torch.tensor([[1, 3, 5], [0, 9, 2]])
    check(lambda w, i: F.embedding(i, w) * 2, w, idx)
    check(lambda w, i: w[i[0]] + 1, w, idx)
    check(lambda a, b: torch.cat([a.sin(), b * 2], 1), torch.randn(3, 2), torch.randn(3, 5))
    check(lambda a: F.pad(a.exp(), (1, 2, 0, 1), value=-1.0), torch.randn(3, 4))


def test_mlp_forward_backward():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.LayerNorm(16),
                              torch.nn.Linear(16, 4))
    params = [p.detach().clone().requires_grad_(True) for p in mlp.parameters()]
    x = torch.randn(5, 8, requires_grad=True)

    def f(x, w1, b1, g, bb, w2, b2):
        h = F.gelu(F.linear(x, w1, b1))
        h = F.layer_norm(h, (16,), g, bb)
        return F.linear(h, w2, b2).log_softmax(-1)

    check(f, x, *params, grad=True)


def test_transformer_block_forward_backward():
    torch.manual_seed(0)
    b, t, d, h = 2, 5, 16, 2

    def block(x, wqkv, wo, g1, b1, w1, w2, g2, b2):
        q, k, v = F.linear(x, wqkv).chunk(3, -1)
        q, k, v = (z.view(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-1, -2) / (d // h) ** 0.5)
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = F.layer_norm(x + F.linear(y, wo), (d,), g1, b1)
        return F.layer_norm(x + F.linear(F.gelu(F.linear(x, w1)), w2), (d,), g2, b2)

    shapes = [(3 * d, d), (d, d), (d,), (d,), (4 * d, d), (d, 4 * d), (d,), (d,)]
    ps = [(torch.randn(*s) * 0.2).requires_grad_(True) for s in shapes]
    check(block, torch.randn(b, t, d, requires_grad=True), *ps, grad=True)


def test_nn_transformer_encoder_layer_forward_backward():
    torch.manual_seed(0)
    d = 16
    blk = torch.nn.TransformerEncoderLayer(d, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    names, ps = zip(*blk.named_parameters())

    def f(x, *params):
        return torch.func.functional_call(blk, dict(zip(names, params)), (x,))

    check(f, torch.randn(2, 5, d, requires_grad=True),
          *[p.detach().clone().requires_grad_(True) for p in ps], grad=True)


def test_symbolic_sizes_one_compile():
    from kiln.codegen.decompose import decomposition_table
    from kiln.codegen.graph import compile_aten_graph
    from kiln.tracing import make_fx

    fn = lambda x: torch.softmax(x * 2, -1) + x.sum(-1, keepdim=True)  # noqa: E731
    x1, x2 = torch.randn(3, 7), torch.randn(5, 11)
    # NOTE: symbolic tracing gives the graph SymInt sizes: they become kernel arguments.
    gm = make_fx(fn, tracing_mode="symbolic", decomposition_table=decomposition_table())(x1)
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    call = compile_aten_graph(gm, [n.meta["val"] for n in ph])
    src = call.kernel_source
    assert "while roffset <" in src and "tl.program_id(0).to(tl.int64)" in src
    for x in (x1, x2):
        torch.testing.assert_close(call([x])[0], fn(x))


def test_cache_files_and_identical_kernels_load_once(tmp_path):
    fn = lambda x: x.cos() * 3  # noqa: E731
    check(fn, torch.randn(8))
    files = sorted(p for p in os.listdir(os.path.join(config.cache_dir, "triton")) if p.endswith(".py"))
    assert len(files) == 1
    n_mod = len(runtime._modules)
    check(fn, torch.randn(8))
    assert len(runtime._modules) == n_mod      # same source: loaded once
    with open(os.path.join(config.cache_dir, "triton", files[0])) as f:
        assert "@triton.jit" in f.read()


@pytest.mark.expect_fallback("the ATen graph runs eagerly")
def test_kernel_compile_error_names_file_and_falls_back(monkeypatch):
    from kiln.codegen.triton import printer

    real = printer.KernelPrinter.op

    def bad(self, name, a, args, dt):
        s = real(self, name, a, args, dt)
        return f"tl.no_such_function({s})" if name == "sin" else s

    monkeypatch.setattr(printer.KernelPrinter, "op", bad)
    mark = fallbacks.mark()
    x = torch.randn(4)
    with pytest.warns(Warning, match="kernel0"):
        out = compiled(lambda x: x.sin() + 1)[0](x)
    torch.testing.assert_close(out, x.sin() + 1)   # the ATen graph ran eagerly
    recs = fallbacks.recorded(mark)
    assert len(recs) == 1 and "kernel0" in recs[0].why and os.sep + "triton" + os.sep in recs[0].why


def test_unavailable_reason_cpu_none():
    assert runtime.unavailable_reason("cpu") is None
    if not torch.cuda.is_available():
        assert "CUDA" in runtime.unavailable_reason("cuda")


def test_split_reduction_small_output_long_reduction(monkeypatch):
    from kiln.codegen.triton import split

    monkeypatch.setattr(split, "SPLIT_MIN_REDUCTION", 512)
    x = torch.randn(2, 3000)
    rec = check(lambda x: (x.sum(1), x.amax(1), (x > 2).any(1), x.sum()), x)
    assert "split" in rec.source          # the partial buffers of the first pass
    xi = torch.randint(-5, 5, (4000,))
    check(lambda x: (x.sum(), x.amin()), xi)


def test_cuda_without_triton_raises_codegen_error(monkeypatch):
    from kiln import exc
    from kiln.codegen import wrapper

    monkeypatch.setattr(runtime, "unavailable_reason", lambda dev="cuda": "Triton is not installed")
    import kiln.codegen.triton as kt

    monkeypatch.setattr(kt, "unavailable_reason", lambda dev="cuda": "Triton is not installed")
    with pytest.raises(exc.CodegenError, match="Triton is not installed"):
        compiled(lambda x: x.sin())[0](torch.randn(4))
    assert wrapper.device_target(torch.device("cuda")) == "triton"


def test_heuristics_shapes():
    c = heuristics.default_config("pointwise", 10 ** 6, 0, False)
    assert c["XBLOCK"] == 1024 and c["num_warps"] == 4
    c = heuristics.default_config("reduction", 4096, 100, True)
    assert c["RBLOCK"] == 128 and c["XBLOCK"] * c["RBLOCK"] <= 4096
    c = heuristics.default_config("reduction", 8, 10 ** 6, False)
    assert c["RBLOCK"] == heuristics.LOOP_RBLOCK
    small = heuristics.autotune_configs("reduction", 8, 10 ** 6, False)
    big = heuristics.autotune_configs("reduction", 8, 10 ** 6, False, max_autotune=True)
    assert len(big) > len(small) >= 2


def test_autotune_drops_oom_configs_and_caches_winner(tmp_path, monkeypatch):
    import json

    import triton.testing

    from kiln.codegen.triton.printer import KernelInfo

    class OutOfResources(Exception):
        pass

    launched = []

    class FakeFn:
        def __getitem__(self, grid):
            return lambda *a, **kw: launched.append((grid, kw))

    info = KernelInfo("kernel0", [("tensor", "buf0")], "pointwise", 1 << 20, [], False, 0, False, [])
    path = str(tmp_path / "kabc.py")
    la = runtime.Launcher(FakeFn(), info, path, interpret=False)
    times = {256: 3.0, 512: 1.0, 1024: 2.0, 2048: 5.0}

    def bench(fn, warmup=0, rep=0):
        fn()
        xb = launched[-1][1]["XBLOCK"]
        if xb == 512:
            raise OutOfResources("out of resource: shared memory")
        return times[xb]

    monkeypatch.setattr(triton.testing, "do_bench", bench)
    cfg = la.config_for([1 << 20], (None,))
    assert cfg["XBLOCK"] == 1024            # 512 was fastest but ran out of resources
    saved = json.load(open(path[:-3] + ".tune.json"))
    assert saved["kernel0"][str(1 << 20)]["XBLOCK"] == 1024
    la2 = runtime.Launcher(FakeFn(), info, path, interpret=False)
    n = len(launched)
    assert la2.config_for([1 << 20], (None,))["XBLOCK"] == 1024 and len(launched) == n   # from the file


def test_indirect_stores_atomic_adds():
    x = torch.randn(6, 4)
    idx = torch.tensor([0, 2, 2, -1, 5])
    v = torch.randn(5, 4)
    sidx = torch.randint(0, 6, (3, 4), generator=torch.Generator().manual_seed(0))
    src = torch.randn(3, 4)
    rec = check(lambda x, v, src: (torch.index_put(x, (idx,), v, accumulate=True),
                                   torch.scatter_add(x, 0, sidx, src),
                                   x.index_put((idx, idx.abs() % 4), v[:, 0], accumulate=True)), x, v, src)
    assert "tl.atomic_add" in rec.source and "aten.index_put" not in rec.wrapper
    w = torch.randn(10, 3, requires_grad=True)     # embedding backward: scatter-add of grads
    check(lambda w: F.embedding(torch.tensor([[1, 3, 3], [0, 9, 1]]), w).tanh(), w, grad=True)


def test_cat_loads_only_inside_each_part():
    """rotate_half (LLaMA's rotary embedding): cat(-x[..., 4:], x[..., :4]).  Each part's
    load runs under its own range: the last part unmasked read 4 elements before its
    buffer for the first part's lanes (an illegal address on a GPU at a page start)."""
    import re

    rec = check(lambda x: torch.cat([-x[..., 4:], x[..., :4]], -1) * 2, torch.randn(3, 8))
    loads = [ln for ln in rec.source.splitlines() if "tl.load(" in ln]
    shifted = [ln for ln in loads if re.search(r"\+ -4\)", ln)]
    assert shifted, loads
    for ln in shifted:
        mask = ln.split("mask=")[1]
        assert "&" in mask, ln   # xmask & the part's range


def test_cat_middle_part_loads_under_both_bounds():
    """GPT-2's attention backward: cat([dq, dk, dv], -1).  The middle part's load must be
    masked below its offset too: under only ``index < end`` it ran at negative offsets
    for the first part's lanes (an illegal address on the GPU at GPT-2-small size)."""
    import re

    a, b, c = torch.randn(4, 3), torch.randn(4, 5), torch.randn(4, 2)
    rec = check(lambda a, b, c: torch.cat([a, b, c], 1) * 2, a, b, c)
    lines = rec.source.splitlines()
    defs = dict(re.findall(r"^\s*(\w+) = (.*)$", "\n".join(lines), re.M))

    def expand(text: str, depth: int = 0) -> str:
        if depth > 8:
            return text
        return re.sub(r"\b[tc]\d+\b", lambda m: "(" + expand(defs.get(m.group(0), m.group(0)), depth + 1) + ")",
                      text)

    middle = [ln for ln in lines if "tl.load(" in ln and re.search(r"\+ -3\)", ln)]
    assert middle, lines
    for ln in middle:
        mask = expand(ln.split("mask=")[1])
        assert ">=" in mask and "<" in mask.replace("<=", ""), (ln, mask)
