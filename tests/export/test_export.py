"""kiln.export.export: programs, signatures, dynamic shapes, module(), errors, compile."""
from __future__ import annotations

import pytest
import torch

import kiln
from kiln import exc
from kiln.export import Dim, InputKind, OutputKind, export, export_forward_backward


class Counted(torch.nn.Module):
    """A parameter, a buffer the forward updates, a tensor constant, a keyword default."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("scratch", torch.ones(4), persistent=False)

    def forward(self, x, scale: float = 2.0):
        self.count.add_(1)
        return self.lin(x) * scale + torch.tensor([1.0, 2.0, 3.0, 4.0]) + self.scratch


@pytest.mark.parametrize("strict", [True, False])
def test_signature_names_and_kinds_follow_pytorch(strict):
    m = Counted()
    ep = export(m, (torch.randn(5, 3),), strict=strict)
    phs = [n.name for n in ep.graph.nodes if n.op == "placeholder"]
    assert phs == ["p_lin_weight", "p_lin_bias", "b_count", "b_scratch", "c_lifted_tensor_0", "x"]
    sig = ep.graph_signature
    assert [s.kind for s in sig.input_specs] == [InputKind.PARAMETER] * 2 + [InputKind.BUFFER] * 2 + [
        InputKind.CONSTANT_TENSOR, InputKind.USER_INPUT]
    assert sig.parameters == ["lin.weight", "lin.bias"] and sig.buffers == ["count", "scratch"]
    assert sig.user_inputs == ["x"]
    assert [s.persistent for s in sig.input_specs if s.kind is InputKind.BUFFER] == [True, False]
    assert list(sig.buffers_to_mutate.values()) == ["count"]
    assert [s.kind for s in sig.output_specs] == [OutputKind.BUFFER_MUTATION, OutputKind.USER_OUTPUT]
    assert set(ep.state_dict) == {"lin.weight", "lin.bias", "count", "scratch"}
    assert "aten.addmm.default" in ep.graph_module.code and "aten.add_." not in ep.graph_module.code
    assert "p_lin_weight: PARAMETER" in str(ep)
    assert m.count.item() == 0, "export ran the forward's buffer update"


@pytest.mark.parametrize("strict", [True, False])
def test_module_runs_the_program_and_applies_buffer_mutations(strict):
    m, ref = Counted(), Counted()
    ref.load_state_dict(m.state_dict())
    ep = export(m, (torch.randn(5, 3),), strict=strict)
    mod = ep.module()
    x = torch.randn(5, 3)
    for _ in range(2):
        torch.testing.assert_close(mod(x), ref(x))
    assert mod.count.item() == 2 and ref.count.item() == 2
    assert set(mod.state_dict()) == {"lin.weight", "lin.bias", "count"}
    torch.testing.assert_close(ep(x), ref(x))   # an ExportedProgram is callable too


def test_user_input_mutation_is_written_back():
    class Mut(torch.nn.Module):
        def forward(self, x):
            x.mul_(2)
            return x + 1

    ep = export(Mut(), (torch.randn(3),), strict=False)
    assert list(ep.graph_signature.user_inputs_to_mutate.values()) == ["x"]
    x = torch.ones(3)
    torch.testing.assert_close(ep.module()(x), torch.full((3,), 3.0))
    torch.testing.assert_close(x, torch.full((3,), 2.0))


def test_nested_and_keyword_inputs_are_named_by_path():
    class KW(torch.nn.Module):
        def forward(self, x, *, bias=None, pair=()):
            return {"out": x + bias + pair[0] * pair[1], "none": None}

    args = (torch.randn(2),)
    kwargs = {"bias": torch.randn(2), "pair": (torch.randn(2), torch.randn(2))}
    ep = export(KW(), args, kwargs, strict=False)
    assert [n.name for n in ep.graph.nodes if n.op == "placeholder"] == ["x", "bias", "pair_0", "pair_1"]
    out = ep.module()(*args, **kwargs)
    assert out["none"] is None
    torch.testing.assert_close(out["out"], KW()(*args, **kwargs)["out"])
    with pytest.raises(exc.ExportInputError, match="structure"):
        ep.module()(*args, bias=kwargs["bias"])


@pytest.mark.parametrize("strict", [True, False])
def test_dynamic_dim_takes_other_sizes_and_checks_its_range(strict):
    lin = torch.nn.Linear(3, 4)
    ep = export(lin, (torch.randn(5, 3),), dynamic_shapes={"input": {0: Dim("batch", max=64)}},
                strict=strict)
    (rng,) = ep.range_constraints.values()
    assert (rng.min, rng.max) == (2, 64)
    mod = ep.module()
    for n in (2, 7, 64):
        x = torch.randn(n, 3)
        torch.testing.assert_close(mod(x), lin(x))
    with pytest.raises(exc.ExportInputError, match=r"\.size\(0\) is 65, outside the range of Dim 'batch'"):
        mod(torch.randn(65, 3))
    with pytest.raises(exc.ExportInputError, match=r"static 3"):
        mod(torch.randn(5, 4))
    with pytest.raises(exc.ExportInputError, match="dtype"):
        mod(torch.randn(5, 3, dtype=torch.float64))


def test_shared_and_derived_dims():
    class Cat(torch.nn.Module):
        def forward(self, x, y, z):
            return torch.cat([x, x]) + y, x + z

    d = Dim("d")
    ep = export(Cat(), (torch.randn(3, 2), torch.randn(6, 2), torch.randn(3, 2)),
                dynamic_shapes={"x": {0: d}, "y": {0: 2 * d}, "z": (d, None)})
    assert len(ep.range_constraints) == 1
    out = ep.module()(torch.randn(5, 2), torch.randn(10, 2), torch.randn(5, 2))
    assert out[0].shape == (10, 2)
    with pytest.raises(exc.ExportInputError, match=r"needs 2\*s\d+ = 10"):
        ep.module()(torch.randn(5, 2), torch.randn(9, 2), torch.randn(5, 2))
    with pytest.raises(exc.ExportInputError, match="must agree|needs"):
        ep.module()(torch.randn(5, 2), torch.randn(10, 2), torch.randn(4, 2))


def test_specialised_or_narrowed_dims_are_reported_with_suggested_fixes():
    class View(torch.nn.Module):
        def forward(self, x):
            return x.view(3, 4) + 1

    with pytest.raises(exc.ConstraintViolationError, match="Suggested fixes:\n  n = 12"):
        export(View(), (torch.randn(12),), dynamic_shapes={"x": {0: Dim("n")}})

    class Branch(torch.nn.Module):
        def forward(self, x):
            return x + 1 if x.shape[0] > 5 else x - 1

    with pytest.raises(exc.ConstraintViolationError, match=r"n = Dim\('n', min=6\)"):
        export(Branch(), (torch.randn(8),), dynamic_shapes={"x": {0: Dim("n")}}, strict=False)
    ep = export(Branch(), (torch.randn(8),), dynamic_shapes={"x": {0: Dim("n", min=6)}}, strict=False)
    torch.testing.assert_close(ep.module()(torch.ones(9)), torch.full((9,), 2.0))
    # Dim.AUTO: dynamic where it can be, static without an error where it cannot
    ep = export(View(), (torch.randn(12),), dynamic_shapes={"x": {0: Dim.AUTO}})
    assert ep.range_constraints == {}


def test_bad_dynamic_shapes_name_the_problem():
    lin = torch.nn.Linear(3, 4)
    x = torch.randn(5, 3)
    with pytest.raises(exc.ExportError, match="'weights', which is not an input"):
        export(lin, (x,), dynamic_shapes={"weights": {0: Dim("b")}})
    with pytest.raises(exc.ExportError, match="3 entries for a tensor with 2 dims"):
        export(lin, (x,), dynamic_shapes={"input": (None, None, None)})
    with pytest.raises(exc.ExportError, match="sizes 0 and 1 are specialised"):
        export(lin, (torch.randn(1, 3),), dynamic_shapes={"input": {0: Dim("b")}})
    with pytest.raises(exc.ExportError, match="args is a list, not a tuple"):
        export(lin, [x])


def test_graph_breaks_data_dependence_and_non_tensor_outputs_are_clear_errors():
    class Prints(torch.nn.Module):
        def forward(self, x):
            print("side effect")
            return x + 1

    with pytest.raises(exc.Unsupported, match="print"):
        export(Prints(), (torch.randn(3),))

    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x + 1
            return x - 1

    with pytest.raises(exc.ExportError, match="reads tensor values") as e:
        export(DataDependent(), (torch.randn(3),), strict=False)
    assert "test_export.py" in str(e.value) and "if x.sum() > 0" in str(e.value)
    with pytest.raises(exc.Unsupported, match="data-dependent"):
        export(DataDependent(), (torch.randn(3),))

    class ReturnsObject(torch.nn.Module):
        def forward(self, x):
            return x + 1, object()

    with pytest.raises(exc.ExportError, match="is a object, not a tensor"):
        export(ReturnsObject(), (torch.randn(3),), strict=False)


def test_run_decompositions_keeps_signature_and_values():
    class Act(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = torch.nn.LayerNorm(8)

        def forward(self, x):
            return torch.nn.functional.gelu(self.ln(x)).softmax(-1)

    m = Act()
    from torch._decomp import get_decompositions

    ep = export(m, (torch.randn(4, 8),), dynamic_shapes={"x": {0: Dim("b")}})
    dec = ep.run_decompositions(get_decompositions([torch.ops.aten.native_layer_norm.default]))
    assert "native_layer_norm" in ep.graph_module.code and "native_layer_norm" not in dec.graph_module.code
    torch.testing.assert_close(ep.run_decompositions().module()(torch.ones(3, 8)), m(torch.ones(3, 8)))
    assert dec.graph_signature.user_inputs == ["x"] and dec.graph_signature.parameters == ["ln.weight", "ln.bias"]
    x = torch.randn(6, 8)
    torch.testing.assert_close(dec.module()(x), m(x))


def test_joint_export_has_loss_and_gradients():
    lin = torch.nn.Linear(3, 1)

    class Loss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x).pow(2).mean()

    x = torch.randn(6, 3)
    joint = export_forward_backward(export(Loss(), (x,), dynamic_shapes={"x": {0: Dim("n")}}))
    sig = joint.graph_signature
    assert sig.loss_output is not None
    assert sorted(sig.gradients_to_parameters.values()) == ["lin.bias", "lin.weight"]
    loss, gw, gb = joint.module()(torch.randn(5, 3))
    x2 = torch.randn(7, 3)
    loss, gw, gb = joint.module()(x2)
    ref = lin(x2).pow(2).mean()
    rw, rb = torch.autograd.grad(ref, [lin.weight, lin.bias])
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close((gw, gb), (rw, rb))
    with pytest.raises(exc.ExportError, match="one scalar output"):
        export_forward_backward(export(_TwoOutputs(), (x,)))
    # a user input whose example requires grad gets its gradient too
    xg = torch.randn(6, 3, requires_grad=True)
    joint = export_forward_backward(export(Loss(), (xg,), strict=False))
    assert list(joint.graph_signature.gradients_to_user_inputs.values()) == ["x"]
    loss, gw, gb, gx = joint.module()(xg)
    torch.testing.assert_close(gx, torch.autograd.grad(lin(xg).pow(2).mean(), xg)[0])


class _TwoOutputs(torch.nn.Module):
    def forward(self, x):
        return x.sum(), x.mean()


@pytest.mark.parametrize("dynamic", [False, True])
def test_kiln_export_compile_runs_generated_code(dynamic):
    from kiln.codegen import metrics

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 16)
            self.ln = torch.nn.LayerNorm(16)

        def forward(self, x):
            return torch.nn.functional.gelu(self.ln(self.lin(x))) * 2 + 1

    m = Block()
    x = torch.randn(8, 16)
    ep = export(m, (x,), dynamic_shapes={"x": {0: Dim("b")}} if dynamic else None)
    kiln.reset()
    from kiln.codegen import config

    with config.patch(profitability_check=False):
        fast = kiln.export.compile(ep)
        made = metrics.generated_kernel_count
        assert made > 0, "kiln.export.compile compiles ahead of the first call"
        torch.testing.assert_close(fast(x), m(x))
        if dynamic:
            for n in (5, 33):
                x2 = torch.randn(n, 16)
                torch.testing.assert_close(fast(x2), m(x2))
    assert metrics.generated_kernel_count == made, "a program with Dims compiles once"
    with pytest.raises(exc.ExportInputError):
        fast(torch.randn(8, 15))


@pytest.mark.parametrize("strict", [True, False])
def test_a_size_read_in_python_is_a_specialisation_in_both_modes(strict):
    import math

    class Scaled(torch.nn.Module):
        def forward(self, x):
            return x * (1.0 / math.sqrt(x.shape[1]))

    with pytest.raises(exc.ConstraintViolationError, match=r"x\.size\(1\) \(Dim 'k'\) was specialised to 4"):
        export(Scaled(), (torch.randn(2, 4),), dynamic_shapes={"x": {1: Dim("k")}}, strict=strict)
    ep = export(Scaled(), (torch.randn(2, 4),), dynamic_shapes={"x": {0: Dim("b")}}, strict=strict)
    torch.testing.assert_close(ep.module()(torch.ones(3, 4)), torch.full((3, 4), 0.5))


@pytest.mark.parametrize("strict", [True, False])
def test_inputs_that_are_not_tensors_are_specialised(strict):
    class Scale(torch.nn.Module):
        def forward(self, x, n, flag=True):
            return x * n if flag else x

    ep = export(Scale(), (torch.randn(3), 4), strict=strict)
    assert [n.name for n in ep.graph.nodes if n.op == "placeholder"] == ["x"]
    torch.testing.assert_close(ep.module()(torch.ones(3), 4), torch.full((3,), 4.0))
    with pytest.raises(exc.ExportInputError, match="input n is 5, but the program was exported with 4"):
        ep.module()(torch.ones(3), 5)
    ep = export(Scale(), (torch.randn(3), 4), dynamic_shapes={"x": {0: Dim("n")}, "n": None}, strict=strict)
    torch.testing.assert_close(ep.module()(torch.ones(6), 4), torch.full((6,), 4.0))


def test_batch_norm_statistics_are_buffer_mutations():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()
    ref.load_state_dict(m.state_dict())
    ep = export(m, (torch.randn(2, 3, 8, 8),), strict=False)
    assert sorted(ep.graph_signature.buffers_to_mutate.values()) == [
        "1.num_batches_tracked", "1.running_mean", "1.running_var"]
    assert "native_batch_norm.default" not in ep.graph_module.code   # the op that writes unannounced
    x = torch.randn(2, 3, 8, 8)
    mod = ep.module()
    torch.testing.assert_close(mod(x), ref(x))
    torch.testing.assert_close(mod.get_buffer("1.running_mean"), ref[1].running_mean)


def test_program_traced_in_grad_mode_takes_gradients():
    """Attention over a mask that requires grad (T5's position bias): the kernel picked at
    export must be one autograd can run (eager picks the math kernel there)."""
    class Biased(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(1, 2, 4, 4))

        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=self.bias)

    m = Biased()
    q = torch.randn(1, 2, 4, 8)
    ep = export(m, (q,), strict=False)
    out = ep.module()(q)
    torch.testing.assert_close(out, m(q))
    out.sum().backward()


def test_a_loaded_program_with_a_dim_compiles_once(tmp_path):
    from kiln.codegen import config, metrics

    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.LayerNorm(8))
    ep = export(m, (torch.randn(4, 8),), dynamic_shapes=({0: Dim("batch")},))
    kiln.export.save(ep, tmp_path / "m.kiln")
    kiln.reset()
    with config.patch(profitability_check=False):
        fast = kiln.export.compile(kiln.export.load(tmp_path / "m.kiln"))
        made = metrics.generated_kernel_count
        for n in (2, 9, 40):
            x = torch.randn(n, 8)
            torch.testing.assert_close(fast(x), m(x))
    assert made > 0 and metrics.generated_kernel_count == made
