"""kiln.codegen.graph_cache: a second process compiling the same ATen graph rebuilds the
wrapper from its record (no lowering, no printing), runs the same kernels and counts them."""
from __future__ import annotations

import json

import pytest
import torch

import kiln
from kiln.codegen import cache, config, metrics
from kiln.codegen import graph as cg_graph


@pytest.fixture
def cache_on(tmp_cache):
    with config.patch(graph_cache=True):
        yield tmp_cache


def _as_new_process():
    kiln.reset()
    cache.clear_memory()


def _no_lowering(monkeypatch):
    monkeypatch.setattr(cg_graph.GraphLowering, "run", lambda self: pytest.fail("lowered again"))


def _f(x, w):
    return torch.softmax(x @ w, dim=-1) * 2 + torch.tensor([1.0, 2.0, 3.0, 4.0])


def test_second_process_rebuilds_without_lowering(cache_on, monkeypatch):
    x, w = torch.randn(8, 4), torch.randn(4, 4)
    want = _f(x, w)
    torch.testing.assert_close(kiln.compile(_f)(x, w), want)
    first_kernels = metrics.generated_kernel_count
    assert first_kernels > 0 and metrics.graph_cache_hits == 0
    assert list((cache_on / "graphs").rglob("*.json"))
    _as_new_process()
    _no_lowering(monkeypatch)
    torch.testing.assert_close(kiln.compile(_f)(x, w), want)
    assert metrics.graph_cache_hits == 1
    assert metrics.generated_kernel_count == first_kernels   # PyTorch counts cache hits too
    assert metrics.cpp_compile_count == 0


def test_training_graphs_are_cached_too(cache_on, monkeypatch):
    lin = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.LayerNorm(8))
    x = torch.randn(3, 4)

    def grads():
        for p in lin.parameters():
            p.grad = None
        kiln.compile(lin)(x).sum().backward()
        return [p.grad.clone() for p in lin.parameters()]

    want = grads()
    _as_new_process()
    _no_lowering(monkeypatch)
    got = grads()
    assert metrics.graph_cache_hits == 2   # forward and backward
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)


def test_other_shapes_are_other_entries(cache_on):
    kiln.compile(_f)(torch.randn(8, 4), torch.randn(4, 4))
    _as_new_process()
    kiln.compile(_f, dynamic=False)(torch.randn(5, 4), torch.randn(4, 4))
    assert metrics.graph_cache_hits == 0
    assert len(list((cache_on / "graphs").rglob("*.json"))) == 2


def test_damaged_record_is_compiled_afresh(cache_on):
    x, w = torch.randn(8, 4), torch.randn(4, 4)
    kiln.compile(_f)(x, w)
    for path in (cache_on / "graphs").rglob("*.json"):
        rec = json.loads(path.read_text())
        rec["ops"] = {k: ["op", "aten::no_such_op", "default"] for k in rec["ops"]} or {"op_x": ["op", "aten::nope", ""]}
        rec["wrapper"] = "def call(args):\n    raise AssertionError('stale')\n" if not rec["ops"] else rec["wrapper"]
        path.write_text(json.dumps(rec))
    _as_new_process()
    torch.testing.assert_close(kiln.compile(_f)(x, w), _f(x, w))
    assert metrics.graph_cache_hits == 0 and metrics.cache_corrupt_count == 1


def test_cache_off_writes_nothing(tmp_cache):
    with config.patch(graph_cache=False):
        kiln.compile(_f)(torch.randn(8, 4), torch.randn(4, 4))
    assert not list((tmp_cache / "graphs").rglob("*.json"))


def test_key_covers_node_metadata(cache_on):
    """Two graphs with the same code but other traced shapes (a tracing change) are two
    entries: the wrapper lays buffers out from the metadata."""
    from kiln.codegen import graph_cache
    from kiln.tracing import make_fx

    gm = make_fx(lambda x: (x.sin() * 2,), tracing_mode="fake")(torch.randn(4))
    k1 = graph_cache.key_for(gm, [torch.randn(4)])
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    node.meta["val"] = node.meta["val"].as_strided((2, 2), (2, 1))
    assert graph_cache.key_for(gm, [torch.randn(4)]) != k1
