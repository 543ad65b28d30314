"""Seed 004 (export's test_experimental), ported to kiln's API (kiln.export)."""
from typing import Dict, List, Tuple

import pytest
import torch

import kiln




def test_with_buffer_as_submodule():
    from kiln.export import export, mark_strict

    @mark_strict
    class B(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("buffer1", torch.ones(3))

        def forward(self, x):
            y = x + 2
            y.add_(4)
            buffer_updated = self.buffer1 + 6
            return x.sum() + y.sum() + buffer_updated.sum()

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.submodule = B()

        def forward(self, x):
            x_v2 = x.sin()
            return (self.submodule(x_v2), x + 3)

    inp = torch.randn(3)
    ep = export(M(), (inp,), strict=False)
    code = ep.graph_module.code
    assert "strict_mode" in code and "strict_graph_0" in code
    sub = ep.graph_module.strict_graph_0.code
    assert sub.count("torch.ops.aten.sum.default") == 3
    eager_mod = M()
    ep = export(eager_mod, (inp,), strict=True)
    for _ in range(2):
        g1, g2 = ep.module()(inp)
        e1, e2 = eager_mod(inp)
        assert torch.allclose(g2, e2) and torch.allclose(g1, e1)


def test_mark_strict_with_container_type():
    from kiln.export import export, mark_strict

    @mark_strict
    class B(torch.nn.Module):
        def forward(self, x):
            x0 = x[0][0]
            return x0.sum()

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.submodule = B()

        def forward(self, x):
            return self.submodule(x)

    inp = ((torch.randn(3),),)
    with pytest.raises(RuntimeError, match="strict_mode HOO doesn't work unless"):
        export(M(), inp, strict=False)


class _CosSin(torch.nn.Module):
    def forward(self, x):
        return x.cos() + x.sin()


def test_torchscript_module_export():
    from kiln.export import from_torchscript

    inps = (torch.randn(4, 4),)
    traced = torch.jit.trace(_CosSin(), example_inputs=inps)
    exported = from_torchscript(traced, inps)
    assert torch.allclose(exported(*inps), _CosSin()(*inps))


def test_torchscript_module_export_single_input():
    from kiln.export import from_torchscript

    inps = torch.randn(4, 4)
    traced = torch.jit.trace(_CosSin(), example_inputs=inps)
    exported = from_torchscript(traced, inps)
    assert torch.allclose(exported(inps), _CosSin()(inps))


def test_torchscript_module_export_various_inputs_with_annotated_input_names():
    from kiln.export import export, from_torchscript

    def check(m_func, inps):
        traced = torch.jit.trace(m_func(), example_inputs=inps)
        exported = from_torchscript(traced, inps)
        original = export(m_func(), inps)
        orig_names = [n.name for n in original.graph.nodes if n.op == "placeholder"]
        names = [n.name for n in exported.graph.nodes if n.op == "placeholder"]
        assert orig_names == names
        assert torch.allclose(exported(*inps), m_func()(*inps))

    class MTuple(torch.nn.Module):
        def forward(self, x: Tuple[torch.Tensor]):
            return x[0] + x[1]

    class MList(torch.nn.Module):
        def forward(self, x: List[torch.Tensor]):
            return x[0] + x[1]

    class MDict(torch.nn.Module):
        def forward(self, x: Dict[str, torch.Tensor]):
            return x["0"] + x["1"]

    check(MTuple, ((torch.randn(4), torch.randn(4)),))
    check(MList, ([torch.randn(4), torch.randn(4)],))
    check(MDict, ({"0": torch.randn(4), "1": torch.randn(4)},))


# NOTE: as the seed, with pre_dispatch=True: kiln records that it exports the
# post-dispatch program instead (no pre-dispatch graph yet)
@pytest.mark.expect_fallback("a pre-dispatch graph is not built yet")
def test_joint_dynamic():
    from kiln.export import Dim, export, export_forward_backward

    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.y = torch.nn.Parameter(torch.randn(3))

        def forward(self, x):
            x = torch.ones(x.shape[0], 3)
            return (self.y + x).sum()

    m = Module()
    example_inputs = (torch.randn(3),)
    m(*example_inputs)
    ep = export(m, example_inputs, pre_dispatch=True, dynamic_shapes={"x": {0: Dim("x0")}})
    joint_ep = export_forward_backward(ep)
    assert joint_ep is not None
