"""Names in captured graphs: placeholders of module state, nodes named after locals, and the
results of torch.func bodies (as PyTorch names them)."""
from __future__ import annotations

import torch

import kiln
from kiln.testing import EagerAndRecordGraphs


def _placeholders(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


def _nodes(gm) -> dict:
    """{node name: [names of its source_fn_stack]} over the graph and its bodies."""
    out = {}
    for mod in gm.modules():
        for n in mod.graph.nodes:
            if n.op.startswith("call"):
                out[n.name] = [name for name, _ in n.meta.get("source_fn_stack", [])]
    return out


def test_module_state_is_named_through_its_tables():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)
            self.register_buffer("scale", torch.ones(3))

        def forward(self, x):
            return self.fc(x) * self.scale

    kiln.reset()
    rec = EagerAndRecordGraphs()
    m = Block()
    x = torch.randn(2, 3)
    torch.testing.assert_close(kiln.compile(m, backend=rec)(x), m(x))
    assert _placeholders(rec.graphs[0]) == [
        "L_x_", "L_self_modules_fc_parameters_weight_", "L_self_modules_fc_parameters_bias_",
        "L_self_buffers_scale_"]


def test_guard_reason_names_a_parameter_through_its_table():
    m = torch.nn.Linear(3, 3)

    def f(x):
        return m(x)

    kiln.reset()
    reasons = []
    compiled = kiln.optimize("eager", guard_fail_fn=lambda fail: reasons.append(fail[0]))(f)
    compiled(torch.randn(2, 3))
    m.weight.requires_grad_(False)
    try:
        compiled(torch.randn(2, 3))
    finally:
        m.weight.requires_grad_(True)
    assert any("L['m']._parameters['weight']" in r for r in reasons), reasons


def test_source_fn_stack_keeps_the_name_a_node_was_made_with():
    def f(x):
        y = x.sum()
        return torch.sin(y)

    rec = EagerAndRecordGraphs()
    kiln.compile(f, backend=rec)(torch.randn(3))
    assert _nodes(rec.graphs[0]) == {"y": ["sum_1"], "sin": ["sin"]}


def test_grad_body_result_is_named_output():
    def fn(x):
        return x.sin().sum()

    def f(x):
        return torch.func.grad(torch.func.grad(fn))(x)

    rec = EagerAndRecordGraphs()
    x = torch.randn(())
    torch.testing.assert_close(kiln.compile(f, backend=rec)(x), f(x))
    names = _nodes(rec.graphs[0])
    assert "sum_1" not in names and names["output"] == ["sum_1"] and names["sin"] == ["sin"]


def test_transform_body_results_named_as_functorch_locals():
    def aux_fn(x):
        return x.sin().sum(), x.cos()

    def f(x):
        g, aux = torch.func.grad(aux_fn, has_aux=True)(x)
        v = torch.func.vmap(lambda a: a * 2)(x)
        kept = torch.func.vmap(_stored)(x)
        return g, aux, v, kept

    rec = EagerAndRecordGraphs()
    x = torch.randn(3)
    torch.testing.assert_close(kiln.compile(f, backend=rec)(x), f(x))
    names = _nodes(rec.graphs[0])
    # NOTE: a result the user stored to a local keeps that name.
    assert {"output", "aux", "batched_outputs", "mine"} <= set(names), names


def _stored(a):
    mine = a + 1
    return mine
