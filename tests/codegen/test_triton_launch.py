"""Launching compiled Triton kernels (kiln.codegen.triton.launch and Launcher's per-call
path): one cached launch per (sizes, alignment), a new one for an input Triton would
specialize differently, eager's values either way.  On CPU tensors (Triton's
interpreter) the cached launches go through the JIT; the CUDA test checks that they are
direct launches of the compiled kernel."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="optional engine triton is not installed")

from kiln import fallbacks  # noqa: E402
from kiln.codegen import config  # noqa: E402
import kiln.codegen.triton as ktriton  # noqa: E402
from kiln.codegen.triton import launch  # noqa: E402

from test_kernels import compiled  # noqa: E402


@pytest.fixture
def launchers(monkeypatch):
    """The Launcher objects of every Triton module loaded during the test."""
    seen: list = []
    real = ktriton.load_kernels

    def spy(*a, **k):
        out = real(*a, **k)
        seen.extend(out.values())
        return out

    monkeypatch.setattr(ktriton, "load_kernels", spy)   # NOTE: the wrapper calls it from there
    return seen


def _fn(x):
    return (x.sin() * 2 + 1).relu()


def _run(device: str, launchers: list, tmp_path):
    mark = fallbacks.mark()
    with config.patch(cpu_backend="triton", cache_dir=str(tmp_path), profitability_check=False):
        f, _ = compiled(_fn)
        x = torch.randn(1024, device=device)
        for _ in range(3):
            torch.testing.assert_close(f(x), _fn(x))
        assert len(launchers) == 1 and len(launchers[0]._fast) == 1
        # NOTE: same sizes, tensors one float off 16-byte alignment: Triton compiles
        # another specialization, so the launcher keeps a second entry (called directly:
        # kiln.aot would compile a new graph for an input with a storage offset)
        la = launchers[0]
        names = [str(v) for kind, v in la.info.args if kind == "tensor"]
        src = torch.empty(1025, device=device)[1:].copy_(x)
        dst = torch.empty(1025, device=device)[1:]
        la(*[src if n.startswith("arg") else dst for n in names])
        torch.testing.assert_close(dst, _fn(src))
        assert len(la._fast) == 2
        torch.testing.assert_close(f(x), _fn(x))
        assert len(la._fast) == 2
    assert fallbacks.recorded(mark) == []
    return launchers[0]


def test_one_cached_launch_per_sizes_and_alignment(launchers, tmp_path):
    la = _run("cpu", launchers, tmp_path)
    assert la.interpret
    assert launch.alignment_key((torch.empty(4)[1:],)) == 1
    assert launch.alignment_key((torch.empty(8), torch.empty(8)[4:])) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_launches_are_direct(launchers, tmp_path):
    la = _run("cuda", launchers, tmp_path)
    assert launch._supported()
    for entry in la._fast.values():
        assert all(go.__qualname__.startswith("direct.") for go in entry), entry
