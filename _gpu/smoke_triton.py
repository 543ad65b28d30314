import sys, time, traceback, torch, math
import kiln
from kiln.aot import aot_function
from kiln.codegen.graph import compile_aten_graph
from kiln.codegen.decompose import decomposition_table
from kiln.codegen import metrics
import torch.nn.functional as F
dev = "cuda"
torch.manual_seed(0)
def run(name, fn, *args, grad=False):
    try:
        metrics.reset()
        c = aot_function(fn, fw_compiler=compile_aten_graph, bw_compiler=compile_aten_graph, decompositions=decomposition_table())
        a1 = [a.detach().clone().requires_grad_(grad and a.is_floating_point()) for a in args]
        a2 = [a.detach().clone().requires_grad_(grad and a.is_floating_point()) for a in args]
        e = fn(*a1); o = c(*a2)
        err = (o.float() - e.float()).abs().max().item() if o.numel() else 0.0
        msg = f"{name}: fwd maxerr {err:.2e} kernels {metrics.generated_kernel_count}"
        if grad:
            e.sum().backward(); o.sum().backward()
            gerr = max((x.grad - y.grad).abs().max().item() for x, y in zip(a1, a2) if x.grad is not None)
            msg += f" grad maxerr {gerr:.2e}"
        # timing
        torch.cuda.synchronize()
        def t(f):
            for _ in range(3): f(*a2)
            torch.cuda.synchronize(); s = time.perf_counter()
            for _ in range(20): f(*a2)
            torch.cuda.synchronize(); return (time.perf_counter() - s) / 20
        with torch.no_grad():
            te, tc = t(fn), t(c)
        msg += f"  eager {te*1e6:.0f}us kiln {tc*1e6:.0f}us ({te/tc:.2f}x)"
        print(msg, flush=True)
    except Exception as ex:
        print(f"{name}: FAILED {type(ex).__name__}: {str(ex)[:1500]}", flush=True)
        traceback.print_exc(limit=4)
x = torch.randn(4096, 4096, device=dev)
run("pointwise", lambda x: (x.sin() * 2 + x.cos()).relu() * x.sigmoid(), x)
run("pointwise_half", lambda x: (x.sin() * 2 + x.cos()).relu(), x.half())
run("softmax", lambda x: torch.softmax(x, -1), x, grad=True)
run("layernorm", lambda x, w, b: F.layer_norm(x, (4096,), w, b), x, torch.randn(4096, device=dev), torch.randn(4096, device=dev), grad=True)
run("sum_dim0", lambda x: x.sum(0), x)
run("argmax", lambda x: x.argmax(-1), x)
run("varmean", lambda x: torch.var_mean(x, -1)[0], x)
w = torch.randn(1024, 1024, device=dev); b = torch.randn(1024, device=dev)
run("linear_gelu", lambda x, w, b: F.gelu(F.linear(x, w, b)), torch.randn(2048, 1024, device=dev), w, b, grad=True)
emb = torch.randn(5000, 256, device=dev); idx = torch.randint(0, 5000, (64, 128), device=dev)
run("embedding", lambda e, i: F.embedding(i, e) * 2, emb, idx, grad=True)
run("cat_pad", lambda x: F.pad(torch.cat([x, x * 2], 1), (1, 2)), torch.randn(512, 512, device=dev))
run("bf16_softmax", lambda x: torch.softmax(x, -1), x.bfloat16())
